"""Image files as the model sees them: 8-bit, EXIF-rotated, and checked before training starts.

Training and evaluation (detectron2's ``DatasetMapper``) and the tools read every image with
detectron2's ``detection_utils.read_image``, which applies the EXIF orientation and converts with
PIL's ``Image.convert``. That conversion is right for palette, CMYK, grey+alpha and RGBA images,
but it clips 16-bit images at 255: a 16-bit grey PNG would be read as an all-white image.
:func:`install_8bit_conversion` (run when ``dsla.data`` is imported) makes detectron2's
conversion scale 16-bit images to 8 bits first, so every reader gets the same, correct pixels.

:func:`check_image_headers` reads each image's header at load time (no decoding), so that an
empty or undecodable file, a pixel mode no reader handles, or a size that disagrees with the json
stops the command with one line naming the file, before training starts.
"""
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from detectron2.data import detection_utils
from detectron2.utils.file_io import PathManager

from ..errors import UserError

__all__ = [
    "check_image_headers",
    "image_problem",
    "install_8bit_conversion",
    "mode_problem",
    "to_8bit",
]

# Grey images of more than 8 bits: Pillow opens 16-bit PNG / TIFF files as "I;16*", or as "I"
# (32-bit integers) for some encoders. Both are read as 16-bit values and scaled to 8 bits.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# Modes that PIL's convert() turns into RGB / L correctly (alpha is dropped, CMYK is inverted).
CONVERTIBLE_MODES = ("1", "L", "P", "RGB", "RGBA", "RGBX", "LA", "PA", "CMYK", "YCbCr")
_EXIF_ORIENTATION = 0x0112  # values 5-8 rotate by 90 degrees: width and height swap
# Images whose headers are read at once: the check waits on file reads, not on Python.
_HEADER_THREADS = 16

_detectron2_convert = detection_utils.convert_PIL_to_numpy


def mode_problem(mode: str) -> Optional[str]:
    """None if images of PIL mode ``mode`` are read correctly, else what is wrong (a message)."""
    if mode in SIXTEEN_BIT_MODES or mode in CONVERTIBLE_MODES:
        return None
    return (f"has pixel mode {mode}, which cannot be read as an 8-bit image: save it as 8-bit RGB "
            "(or 8/16-bit grey)")


def to_8bit(image: Image.Image) -> Image.Image:
    """
    A 16-bit grey image (modes in ``SIXTEEN_BIT_MODES``) as 8-bit grey ``L``, scaled by
    255/65535 and rounded (0 -> 0, 65535 -> 255); other readable modes are returned unchanged.

    Raises:
        UserError: the mode is not readable (:func:`mode_problem`), or an ``I`` image holds values
            outside the 16-bit range.
    """
    if image.mode not in SIXTEEN_BIT_MODES:
        problem = mode_problem(image.mode)
        if problem:
            raise UserError(f"image {_name(image)} {problem}")
        return image
    values = np.asarray(image).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise UserError(f"image {_name(image)} has {image.mode} pixel values "
                        f"in [{values.min()}, {values.max()}], outside 0-65535: save it as 8-bit")
    return Image.fromarray(((values + 128) // 257).astype(np.uint8))


def _name(image: Image.Image) -> str:
    """The file an image was opened from, when PIL knows it (not for file objects)."""
    return getattr(image, "filename", "") or "(file name unknown)"


def _convert_PIL_to_numpy(image: Image.Image, format: Optional[str]) -> np.ndarray:
    """detectron2's ``convert_PIL_to_numpy`` after :func:`to_8bit`."""
    return _detectron2_convert(to_8bit(image), format)


def install_8bit_conversion() -> None:
    """
    Route detectron2's ``read_image`` through :func:`to_8bit`: ``read_image`` looks its
    ``convert_PIL_to_numpy`` up when called, so DatasetMapper (training, evaluation) and every
    tool that reads images get the scaled 16-bit pixels, whatever they imported first.
    Idempotent. Data-loader workers inherit it when forked (Linux's default start method).
    """
    detection_utils.convert_PIL_to_numpy = _convert_PIL_to_numpy


def _oriented_size(image: Image.Image) -> Tuple[int, int]:
    """(width, height) after the EXIF orientation that ``read_image`` applies."""
    # Pillow's PNG getexif() decodes the whole image when the header holds no eXIf chunk (an
    # eXIf chunk after the pixels, which the PNG specification does not allow, goes unseen).
    if image.format == "PNG" and "exif" not in image.info:
        return image.size
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001  read_image ignores unreadable EXIF data the same way
        orientation = 1
    return image.size[::-1] if orientation in (5, 6, 7, 8) else image.size


def image_problem(path: str, expected_wh: Optional[Tuple[int, int]] = None) -> Optional[str]:
    """
    What keeps ``path`` from being read as the image it should be, from its header only (a file
    open and a few hundred bytes read; pixels are not decoded, so a truncated file passes).

    Args:
        path: image file.
        expected_wh: (width, height) the dataset records, or None.

    Returns:
        None if the image is fine, else the problem and what to do, for a message.
    """
    try:
        with PathManager.open(path, "rb") as f:
            with Image.open(f) as image:
                problem = mode_problem(image.mode)
                size = _oriented_size(image)
    except OSError as e:  # PIL.UnidentifiedImageError included
        with PathManager.open(path, "rb") as f:
            if not f.read(1):
                return "is empty (0 bytes): copy the image again, or remove it from the json"
        detail = "not a format PIL reads" if isinstance(e, UnidentifiedImageError) else e
        return f"cannot be read as an image ({detail}): replace it, or remove it from the json"
    if problem or expected_wh is None or tuple(expected_wh) == size:
        return problem
    return (f"is {size[0]}x{size[1]} (width x height, EXIF orientation applied, as the model "
            f"reads it) but the json says {expected_wh[0]}x{expected_wh[1]}: correct the json's "
            "width/height (a photo rotated by its EXIF orientation needs the rotated size)")


def _expected_size(record: Dict) -> Optional[Tuple[int, int]]:
    if "width" in record and "height" in record:
        return record["width"], record["height"]
    return None


def check_image_headers(dataset_dicts: Sequence[Dict], source: str = "the dataset") -> None:
    """
    Check every image of a dataset with :func:`image_problem`, ``_HEADER_THREADS`` files at a
    time. Cost: one file open and header read per image, no decoding: under 1 ms per image on a
    local disk (the shapes data), so about a minute at most for COCO's 118k training images; on a
    network file system each file costs its latency, which the threads overlap.

    Args:
        dataset_dicts: detectron2 dataset dicts (``file_name``; ``width`` / ``height`` if known).
        source: where the list came from (the json path), for the message.

    Raises:
        UserError: naming the first bad image (id and file), its problem, and how many more.
    """
    with ThreadPoolExecutor(min(_HEADER_THREADS, max(len(dataset_dicts), 1))) as pool:
        problems = list(pool.map(lambda d: image_problem(d["file_name"], _expected_size(d)),
                                 dataset_dicts))
    bad: List[Tuple[Dict, str]] = [(d, p) for d, p in zip(dataset_dicts, problems) if p]
    if not bad:
        return
    record, problem = bad[0]
    more = f" (and problems in {len(bad) - 1} more of its {len(dataset_dicts)} images)" if (
        len(bad) > 1) else ""
    raise UserError(f"{source}: image id {record.get('image_id')} ({record['file_name']}) "
                    f"{problem}{more}")
