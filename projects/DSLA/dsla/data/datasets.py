"""COCO-format datasets for DSLA: registration with validation, box sanitising, class counts.

``register_coco_dataset`` is detectron2's ``register_coco_instances`` with the checks a new user
needs: a wrong json path fails at registration; a broken or malformed json (duplicate image ids,
boxes that are not numbers) and a missing, empty, undecodable or wrongly sized image fail at load
time with the offending file in the message; boxes the loss cannot use are clipped or dropped by
``sanitize_dataset_dicts`` (one warning per process that counts them). The built-in ``shapes``
datasets (``shapes.py``) load through the same ``load_coco_dataset``.
"""
import json
import logging
import math
import numbers
import os
from functools import partial
from typing import Dict, List, Optional, Sequence, Tuple, Union

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.structures import BoxMode
from detectron2.utils.file_io import PathManager

from ..errors import UserError
from .images import check_image_headers

__all__ = [
    "register_coco_dataset",
    "load_coco_dataset",
    "bbox_problem",
    "check_coco_json",
    "check_image_files",
    "sanitize_dataset_dicts",
    "num_classes_of",
    "check_num_classes",
    "check_training_data",
]

logger = logging.getLogger(__name__)

# Errors that pycocotools / load_coco_json raise on a file that is not valid COCO json (json
# syntax errors are ValueErrors; a non-dict top level trips an assert; missing keys, KeyError).
_INVALID_JSON_ERRORS = (ValueError, KeyError, TypeError, AssertionError, IndexError)
# The loads of this process whose files were checked: (name, json, image root, check_images,
# json modification time).
_CHECKED_LOADS = set()


def register_coco_dataset(
    name: str,
    json_file: str,
    image_root: str,
    metadata: Optional[Dict] = None,
    check_images: bool = True,
) -> None:
    """
    Register a COCO-format detection dataset in detectron2's DatasetCatalog and MetadataCatalog.

    Like ``detectron2.data.datasets.register_coco_instances``, but the dicts it returns are
    validated (see ``load_coco_dataset``) and sanitised (see ``sanitize_dataset_dicts``).
    Registration stays cheap: only the json file's existence is checked here; parsing happens the
    first time the dataset is requested.

    Args:
        name: dataset name, e.g. "my_dataset_train"; used in ``DATASETS.TRAIN`` / ``DATASETS.TEST``.
        json_file: path to the COCO instances json.
        image_root: directory that the json's ``file_name`` entries are relative to.
        metadata: extra metadata (e.g. ``thing_colors``); ``thing_classes`` is filled in from the
            json's categories on load.
        check_images: verify on load that every image file exists (one stat per image).

    Raises:
        UserError: ``json_file`` does not exist (the message names it).
    """
    if not PathManager.isfile(json_file):
        raise UserError(f"Dataset '{name}': annotation file {json_file} does not exist.")
    DatasetCatalog.register(
        name, partial(load_coco_dataset, name, json_file, image_root, check_images)
    )
    MetadataCatalog.get(name).set(
        json_file=json_file, image_root=image_root, evaluator_type="coco", **(metadata or {})
    )


def load_coco_dataset(
    name: str, json_file: str, image_root: str, check_images: bool = True
) -> List[Dict]:
    """
    Load a COCO json into detectron2 dataset dicts, validate them and sanitise their boxes.

    The checks (``check_coco_json``; with ``check_images``, ``check_image_files`` and
    ``check_image_headers``) and the sanitising warning run on the first load of a json in a
    process; later loads (DatasetCatalog runs the loader each time it is asked) only parse and
    sanitise.

    Args:
        name: registered dataset name; its metadata receives ``thing_classes`` and
            ``thing_dataset_id_to_contiguous_id`` (as in ``load_coco_json``).
        json_file: path to the COCO instances json.
        image_root: directory that the json's ``file_name`` entries are relative to.
        check_images: raise if an image file listed in the json is missing, empty, not an
            image, of a pixel mode no reader handles, or not of the json's size.

    Returns:
        list[dict]: detectron2 dataset dicts (boxes in ``BoxMode.XYWH_ABS``), sanitised.

    Raises:
        UserError: the json file is missing, cannot be parsed as COCO or is malformed
            (``check_coco_json``), or (with ``check_images``) an image is unusable; the message
            names the file.
    """
    if not PathManager.isfile(json_file):
        # Registered fine, deleted since: say which dataset points at it.
        raise UserError(f"Dataset '{name}': annotation file {json_file} does not exist.")
    try:
        dicts = load_coco_json(json_file, image_root, name)
    except _INVALID_JSON_ERRORS as e:
        # pycocotools' messages do not say which file was being read.
        raise UserError(
            f"Dataset '{name}': {json_file} is not a valid COCO json file "
            f"({type(e).__name__}: {e})"
        ) from e
    # DatasetCatalog calls this loader each time a dataset is asked for (the class count, the
    # training check, each data loader): check the files and warn on the first load only.
    version = os.path.getmtime(json_file) if os.path.exists(json_file) else None  # local only
    key = (name, json_file, image_root, check_images, version)
    first_load = key not in _CHECKED_LOADS
    if first_load:
        check_coco_json(json_file)
        if check_images:
            check_image_files(dicts, json_file)
            check_image_headers(dicts, json_file)
    dicts = sanitize_dataset_dicts(dicts, name, warn=first_load)
    _CHECKED_LOADS.add(key)
    return dicts


def check_coco_json(json_file: str) -> None:
    """
    What detectron2's COCO loader takes without a word but trains wrongly on: two images with one
    id (pycocotools keeps the last, and the annotations of both go to it), and boxes that are not
    4 finite numbers (strings fail deep inside training; NaN gives NaN losses).

    Reads the json once more (the loader's parse is not exposed): one more parse per process.

    Raises:
        UserError: naming the json, the image id and both files, or the annotation and its box.
    """
    with PathManager.open(json_file) as f:
        coco = json.load(f)
    file_of_id = {}
    for image in coco.get("images", []):
        image_id, file_name = image.get("id"), image.get("file_name")
        other = file_of_id.setdefault(image_id, file_name)
        if other != file_name:
            raise UserError(
                f"{json_file}: image id {image_id} is used by two images, {other} and "
                f"{file_name}: give every image its own id (annotations name their image by id, "
                "so one image would be dropped and its boxes trained on the other).")
    for anno in coco.get("annotations", []):
        problem = bbox_problem(anno.get("bbox", [0, 0, 0, 0]))
        if problem:
            raise UserError(f"{json_file}: annotation id {anno.get('id')} (image id "
                            f"{anno.get('image_id')}) has bbox {json.dumps(anno['bbox'])}: "
                            f"{problem}")


def bbox_problem(bbox) -> Optional[str]:
    """None if ``bbox`` is 4 finite numbers, else what is wrong with it (for a message)."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return "a box must be a list of 4 numbers (COCO: [x, y, width, height])"
    if any(isinstance(v, str) for v in bbox):
        return "its values are strings; write numbers (12.5, not \"12.5\")"
    if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
               for v in bbox):
        return "a box must be 4 finite numbers (COCO: [x, y, width, height])"
    return None


def check_image_files(dataset_dicts: Sequence[Dict], source: str = "the dataset") -> None:
    """
    Check that the image of every dataset dict exists, so that a missing file fails before
    training starts instead of inside a data-loader worker hours later.

    Args:
        dataset_dicts: detectron2 dataset dicts with a ``file_name`` key.
        source: where the list came from (e.g. the json path), for the message.

    Raises:
        UserError: naming the number of missing images and the first few paths.
    """
    missing = [d["file_name"] for d in dataset_dicts if not PathManager.isfile(d["file_name"])]
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise UserError(
            f"{len(missing)} of {len(dataset_dicts)} images listed in {source} "
            f"do not exist: {shown}"
        )


def _sanitize_box(
    bbox: Sequence[float], mode: BoxMode, width: float, height: float
) -> Tuple[Optional[List[float]], str]:
    """
    Clip one box to the image, or reject it.

    Args:
        bbox: 4 numbers in ``mode`` (XYWH_ABS or XYXY_ABS).
        mode: the box mode.
        width, height: image size; ``inf`` when unknown (then nothing is clipped).

    Returns:
        (new bbox in ``mode`` or None if dropped, one of "ok", "clipped", "degenerate", "outside")
    """
    x0, y0, a, b = (float(v) for v in bbox)
    x1, y1 = (x0 + a, y0 + b) if mode == BoxMode.XYWH_ABS else (a, b)
    if x1 <= x0 or y1 <= y0:
        return None, "degenerate"
    if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
        return None, "outside"
    cx0, cy0, cx1, cy1 = max(x0, 0.0), max(y0, 0.0), min(x1, width), min(y1, height)
    if (cx0, cy0, cx1, cy1) == (x0, y0, x1, y1):
        return list(bbox), "ok"
    if mode == BoxMode.XYWH_ABS:
        return [cx0, cy0, cx1 - cx0, cy1 - cy0], "clipped"
    return [cx0, cy0, cx1, cy1], "clipped"


def sanitize_dataset_dicts(dataset_dicts: Sequence[Dict], dataset_name: str,
                           warn: bool = True) -> List[Dict]:
    """
    Drop boxes the detector cannot learn from and clip the ones that stick out of the image.

    A box with zero or negative width/height, or entirely outside the image, has no point inside
    it, so point-based assignment would see it as nothing (or crash on it); a box partly outside
    is clipped to ``[0, width] x [0, height]``. Logs ONE warning for the whole load with the counts.
    The input is not modified.

    Args:
        dataset_dicts: detectron2 dataset dicts (``height``/``width`` per image; boxes in
            ``BoxMode.XYWH_ABS`` or ``BoxMode.XYXY_ABS``).
        dataset_name: used in the warning and the error.
        warn: log the warning (a loader that runs again logs it once).

    Returns:
        list[dict]: new dicts; unchanged annotations are shared with the input.

    Raises:
        UserError: a box is in another mode (e.g. relative or rotated), or is not 4 finite
            numbers (naming the image file).
    """
    counts = {"ok": 0, "clipped": 0, "degenerate": 0, "outside": 0}
    result = []
    for record in dataset_dicts:
        width = record.get("width", float("inf"))
        height = record.get("height", float("inf"))
        annotations = []
        for anno in record.get("annotations", []):
            mode = BoxMode(anno["bbox_mode"])
            if mode not in (BoxMode.XYWH_ABS, BoxMode.XYXY_ABS):
                raise UserError(f"{dataset_name}: unsupported bbox_mode {mode} in {record}")
            problem = bbox_problem(anno["bbox"])
            if problem:
                raise UserError(f"{dataset_name}: a box of image {record.get('file_name')} is "
                                f"{anno['bbox']!r}: {problem}")
            bbox, status = _sanitize_box(anno["bbox"], mode, width, height)
            counts[status] += 1
            if status == "clipped":
                anno = {**anno, "bbox": bbox}
            if bbox is not None:
                annotations.append(anno)
        result.append({**record, "annotations": annotations})
    if warn:
        _warn_sanitized(dataset_name, counts)
    return result


def _warn_sanitized(dataset_name: str, counts: Dict[str, int]) -> None:
    """One warning per load, and none for a clean dataset."""
    dropped = counts["degenerate"] + counts["outside"]
    if counts["clipped"] or dropped:
        logger.warning(
            f"{dataset_name}: clipped {counts['clipped']} boxes to the image, dropped {dropped} "
            f"boxes with zero/negative size or outside the image ({counts['degenerate']} "
            f"zero/negative size, {counts['outside']} outside)."
        )


def num_classes_of(dataset_name: str) -> int:
    """
    Number of (foreground) classes of a registered dataset: ``len(thing_classes)``.

    Args:
        dataset_name: a name registered in DatasetCatalog.

    Returns:
        int: the class count; loads the dataset once if the metadata does not list the classes
        yet (a COCO json registered with ``register_coco_dataset`` learns them on load).
    """
    if dataset_name not in DatasetCatalog:
        raise UserError(f"Dataset '{dataset_name}' is not registered (register it with "
                        "--register-coco NAME JSON_FILE IMAGE_ROOT).")
    meta = MetadataCatalog.get(dataset_name)
    if not hasattr(meta, "thing_classes"):
        DatasetCatalog.get(dataset_name)
    if not hasattr(meta, "thing_classes"):
        raise UserError(f"Dataset '{dataset_name}' has no thing_classes in its metadata.")
    return len(meta.thing_classes)


def check_num_classes(cfg_num_classes: int, dataset_names: Union[str, Sequence[str]],
                      key: str = "NUM_CLASSES") -> None:
    """
    Check the config's class count against every dataset's ``thing_classes``.

    Args:
        cfg_num_classes: the model's NUM_CLASSES from the config.
        dataset_names: one name or a list: the datasets the command uses (training: train and
            test sets; ``--eval-only``: test sets only).
        key: the config key of ``cfg_num_classes``, for the message.

    Raises:
        UserError: stating both numbers; detectron2 counts foreground classes only.
    """
    if isinstance(dataset_names, str):
        dataset_names = [dataset_names]
    for name in dataset_names:
        n = num_classes_of(name)
        if n != cfg_num_classes:
            raise UserError(
                f"{key} = {cfg_num_classes}, but dataset '{name}' has {n} classes. detectron2's "
                f"class count has no background class (it counts foreground classes only), so "
                f"set {key} {n}."
            )


def check_training_data(dataset_names: Sequence[str]) -> None:
    """
    Refuse to train on nothing: every training dataset needs at least one box.

    Args:
        dataset_names: ``DATASETS.TRAIN``.

    Raises:
        UserError: no dataset given, or naming the dataset (and its json) without boxes.
    """
    if not dataset_names:
        raise UserError("DATASETS.TRAIN is empty: name the training dataset(s)")
    for name in dataset_names:
        dicts = DatasetCatalog.get(name)
        if not any(anno.get("iscrowd", 0) == 0 for d in dicts for anno in d.get("annotations", [])):
            source = MetadataCatalog.get(name).get("json_file", "its loader")
            raise UserError(f"Dataset '{name}' ({source}) has {len(dicts)} images and no usable "
                            "box annotations: nothing to train on.")
