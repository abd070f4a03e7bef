"""Built-in synthetic detection datasets ("shapes"), generated once to disk in COCO format.

Three *styles* of the same generator are registered (``STYLES``); all draw filled shapes on a
background of low-frequency blotches in square 256 px JPEG images with Gaussian noise (1000
training and 150 validation images per style, 7 % of them holding clutter only), and differ in
their statistics:

``easy`` (``shapes_easy_train`` / ``shapes_easy_val``, the data of ``make demo``): three classes
(circle, square, triangle), solid fills, longer box sides 20 px to 0.75 x the image, 2-6 objects
per image, at most 20 % of a box covered by later ones, light clutter (0-1 blobs or bars, 0-2
thin lines, none over the objects, noise sigma 1-3).

``standard`` (``shapes_train`` / ``shapes_val``, the benchmarks' first dataset): four classes
with distinct outlines (circle, square, triangle, cross), solid or gradient fills, longer sides
16 px to 0.8 x the image (log-uniform, so every FPN level of the CPU configs gets objects), 2-8
objects per image, at most 25 % of a box covered, clutter of 0-2 blobs or bars and 1-4 thin lines
(at most one over the objects), noise sigma 2-5.

``crowded`` (``shapes_crowded_train`` / ``shapes_crowded_val``, the benchmarks' second dataset):
five classes including look-alikes (ellipse of axis ratio 0.45-0.7, square, triangle, ring,
cross), all four textures (solid, stripes, gradient, speckle), mostly small and medium objects
(10-160 px), 4-12 objects per image, up to 60 % of a box covered, heavier clutter (1-6 blobs or
bars, 2-8 lines, up to two over the objects, noise sigma 2-10).

Objects are drawn largest first, so smaller ones partly cover larger ones; a placement is
rejected if the boxes above an earlier box would cover more than the style's fraction of it.

Boxes are the FULL geometric extent of each shape (the bounds of its outline), also where it is
partly covered, never the visible extent; shapes always lie entirely inside the image. Every
class gets every colour and texture of its style, so only the outline tells the class.

Layout on disk (``root`` from ``default_shapes_root``)::

    <root>/<split>/annotations.json      COCO json; "info" records the generation parameters
    <root>/<split>/images/000000.jpg     image i of the split

A split is written to a temporary ``<root>/.<split>-tmp-*`` directory and published with one
``os.replace``: a killed run leaves only a tmp directory that is never taken for a dataset (and is
deleted by a later generation once an hour old), and two processes generating at once (e.g. the
ranks of a first multi-GPU run) each write their own copy; the first rename wins and the other
copy (identical, generation is deterministic) is discarded.
"""
import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw

from detectron2.data import DatasetCatalog, MetadataCatalog

from ..errors import UserError
from .datasets import load_coco_dataset

__all__ = [
    "SHAPES_SPLITS",
    "STYLES",
    "ShapesStyle",
    "default_shapes_root",
    "generate_shapes_dataset",
    "register_shapes_datasets",
    "render_shapes_image",
]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ShapesStyle:
    """
    Statistics of a shapes dataset. Ranges are inclusive ``(lo, hi)``; sizes are the longer box
    side in pixels; fractions are of the image size or of an earlier box's area.
    """

    classes: Tuple[str, ...]
    object_size: Tuple[float, float]  # lo px, hi as a fraction of the image size
    objects_per_image: Tuple[int, int]  # in a non-empty image (fewer if there is no room)
    max_covered_fraction: float  # of an earlier box that the later (upper) boxes may cover
    textures: Tuple[str, ...]  # of "solid", "stripes", "gradient", "speckle"
    ellipse_ratio: Tuple[float, float]  # minor / major axis of "ellipse"
    distractors: Tuple[int, int]  # unannotated blobs / bars per image
    lines: Tuple[int, int]  # thin lines per image (background and over the objects)
    noise_sigma: Tuple[float, float]  # Gaussian pixel noise
    lines_over_objects: Tuple[int, int]  # thin lines drawn after the objects (partial occluders)


STYLES = {
    "easy": ShapesStyle(
        classes=("circle", "square", "triangle"),
        object_size=(20.0, 0.75), objects_per_image=(2, 6), max_covered_fraction=0.2,
        textures=("solid",), ellipse_ratio=(0.45, 0.7), distractors=(0, 1),
        lines=(0, 2), noise_sigma=(1.0, 3.0), lines_over_objects=(0, 0),
    ),
    "standard": ShapesStyle(
        classes=("circle", "square", "triangle", "cross"),
        object_size=(16.0, 0.8), objects_per_image=(2, 8), max_covered_fraction=0.25,
        textures=("solid", "gradient"), ellipse_ratio=(0.45, 0.7), distractors=(0, 2),
        lines=(1, 4), noise_sigma=(2.0, 5.0), lines_over_objects=(0, 1),
    ),
    "crowded": ShapesStyle(
        classes=("ellipse", "square", "triangle", "ring", "cross"),
        object_size=(10.0, 160.0 / 256), objects_per_image=(4, 12), max_covered_fraction=0.6,
        textures=("solid", "stripes", "gradient", "speckle"), ellipse_ratio=(0.45, 0.7),
        distractors=(1, 6), lines=(2, 8), noise_sigma=(2.0, 10.0), lines_over_objects=(0, 2),
    ),
}
# How a split's annotations.json names its style (``info``, compared with the wanted parameters
# to decide whether a split on disk is current): fixed identifiers of the file format, so that
# published splits stay valid; the "standard" style's files say "demo".
_STYLE_IDS_IN_FILES = {"easy": "easy", "standard": "demo", "crowded": "crowded"}
# Registered name -> split directory, image count, seed and style. val has its own seed, so no
# val image repeats a train image.
SHAPES_SPLITS = {
    "shapes_train": {"split": "train", "num_images": 1000, "seed": 0, "style": "standard"},
    "shapes_val": {"split": "val", "num_images": 150, "seed": 1, "style": "standard"},
    "shapes_crowded_train": {"split": "crowded_train", "num_images": 1000, "seed": 2,
                             "style": "crowded"},
    "shapes_crowded_val": {"split": "crowded_val", "num_images": 150, "seed": 3,
                           "style": "crowded"},
    # Seeds 0 and 1 again: another style's settings draw other images from the same seed.
    "shapes_easy_train": {"split": "easy_train", "num_images": 1000, "seed": 0, "style": "easy"},
    "shapes_easy_val": {"split": "easy_val", "num_images": 150, "seed": 1, "style": "easy"},
}
DEFAULT_STYLE = "standard"
DEFAULT_IMAGE_SIZE = 256
DEFAULT_EMPTY_FRACTION = 0.07
# Bump when the drawing code changes: an existing split with another version is regenerated.
GENERATOR_VERSION = 3

PLACEMENT_TRIES = 20
SUPERSAMPLE = 2  # outlines are rasterised at 2x and averaged down for anti-aliased edges
JPEG_QUALITY = 90
# A tmp directory untouched this long belongs to a killed run (a split takes seconds to write).
STALE_TMP_SECONDS = 3600
# Rotation range (degrees, +-) per class: squares stay square-ish rather than becoming diamonds.
_MAX_ROTATION = {"circle": 0, "ellipse": 180, "square": 20, "triangle": 180, "ring": 0, "cross": 45}


def default_shapes_root() -> str:
    """
    Where the shapes splits live: ``$DSLA_DATASETS`` if set, else ``$DETECTRON2_DATASETS/shapes``,
    else ``<repo>/datasets/shapes`` (git-ignored).

    Returns:
        str: the root directory (not created here).
    """
    if os.environ.get("DSLA_DATASETS"):
        return os.environ["DSLA_DATASETS"]
    if os.environ.get("DETECTRON2_DATASETS"):
        return os.path.join(os.environ["DETECTRON2_DATASETS"], "shapes")
    repo = Path(__file__).resolve().parents[4]  # <repo>/projects/DSLA/dsla/data/shapes.py
    if not (repo / "projects" / "DSLA").is_dir():  # installed outside the repo
        repo = Path.cwd()
    return str(repo / "datasets" / "shapes")


def shapes_split_paths(root: str, split: str) -> Tuple[str, str]:
    """
    Args:
        root: shapes root directory.
        split: split directory name, e.g. "train".

    Returns:
        (json_file, image_root) of the split.
    """
    return os.path.join(root, split, "annotations.json"), os.path.join(root, split, "images")


# ----------------------------------------------------------------------------------------------
# Drawing. Polygons are float arrays of shape (N, 2) in (x, y) pixel coordinates, where pixel
# (i, j) covers [i, i+1) x [j, j+1); an outline is a list of (polygon, fill), fill 0 cuts a hole.
# ----------------------------------------------------------------------------------------------


def _ellipse_polygon(ratio: float = 1.0, n: int = 64) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([np.cos(t), ratio * np.sin(t)], axis=1)


def _class_outline(rng: np.random.Generator, cls: str,
                   style: ShapesStyle) -> List[Tuple[np.ndarray, int]]:
    """Unit-size outline of a class, before rotation and scaling."""
    if cls == "circle":
        return [(_ellipse_polygon(), 255)]
    if cls == "ellipse":
        return [(_ellipse_polygon(rng.uniform(*style.ellipse_ratio)), 255)]
    if cls == "square":
        return [(np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=float), 255)]
    if cls == "triangle":
        angles = np.deg2rad(np.array([90, 210, 330]) + rng.uniform(-12, 12, 3))
        return [(np.stack([np.cos(angles), np.sin(angles)], axis=1), 255)]
    if cls == "ring":
        hole = _ellipse_polygon() * rng.uniform(0.45, 0.7)
        return [(_ellipse_polygon(), 255), (hole, 0)]
    if cls == "cross":
        t = rng.uniform(0.22, 0.4)  # half arm thickness
        arm = [(t, 1), (t, t), (1, t), (1, -t), (t, -t), (t, -1)]
        pts = arm + [(-x, -y) for x, y in arm]
        return [(np.array(pts, dtype=float), 255)]
    raise ValueError(f"Unknown shape class {cls}")


def _distractor_outline(rng: np.random.Generator) -> List[Tuple[np.ndarray, int]]:
    """Unannotated clutter: an irregular blob, or a bar that a square detector must reject."""
    if rng.random() < 0.35:
        half = rng.uniform(0.2, 0.45)
        return [(np.array([[-1, -half], [1, -half], [1, half], [-1, half]], dtype=float), 255)]
    n = int(rng.integers(5, 10))
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = rng.uniform(0.45, 1.0, n)
    return [(np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1), 255)]


def _fit_outline(outline, angle_deg: float, size: float):
    """Rotate an outline and scale it so its box's longer side is ``size``, centred at 0.

    Returns:
        (outline, (w, h)) with the outer polygon spanning [-w/2, w/2] x [-h/2, h/2].
    """
    a = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    polys = [poly @ rot.T for poly, _ in outline]
    lo, hi = polys[0].min(axis=0), polys[0].max(axis=0)
    scale = size / (hi - lo).max()
    centre = (lo + hi) / 2
    fitted = [((p - centre) * scale, fill) for p, (_, fill) in zip(polys, outline)]
    w, h = (hi - lo) * scale
    return fitted, (float(w), float(h))


def _outline_area(outline) -> float:
    """Geometric area (shoelace) of the filled parts minus the holes."""
    area = 0.0
    for poly, fill in outline:
        x, y = poly[:, 0], poly[:, 1]
        a = 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
        area += a if fill else -a
    return area


def _texture(rng: np.random.Generator, h: int, w: int, colour: np.ndarray,
             textures: Tuple[str, ...]) -> np.ndarray:
    """(h, w, 3) float fill of one of ``textures``, independent of the class."""
    kind = textures[int(rng.integers(len(textures)))]
    if kind == "solid":
        return np.broadcast_to(colour, (h, w, 3))
    second = rng.uniform(0, 255, 3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a = rng.uniform(0, np.pi)
    proj = xx * np.cos(a) + yy * np.sin(a)
    if kind == "stripes":
        t = (np.floor(proj / rng.uniform(1.5, 5.0)) % 2) * rng.uniform(0.3, 0.8)
    elif kind == "gradient":
        t = (proj - proj.min()) / max(float(np.ptp(proj)), 1.0) * rng.uniform(0.3, 0.9)
    else:
        t = rng.random((h, w)) * rng.uniform(0.2, 0.6)
    t = t[..., None]
    return colour * (1 - t) + second * t


def _paste(rng, image: np.ndarray, outline, cx: float, cy: float,
           textures: Tuple[str, ...]) -> None:
    """Alpha-composite a textured outline centred at (cx, cy) into ``image`` (H, W, 3) in place."""
    pts = np.concatenate([p for p, _ in outline]) + (cx, cy)
    height, width = image.shape[:2]
    x0, y0 = np.maximum(np.floor(pts.min(axis=0)).astype(int), 0)
    x1, y1 = np.minimum(np.ceil(pts.max(axis=0)).astype(int), (width, height))
    if x1 <= x0 or y1 <= y0:
        return
    canvas = Image.new("L", ((x1 - x0) * SUPERSAMPLE, (y1 - y0) * SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(canvas)
    for poly, fill in outline:
        # PIL puts pixel centres at integer coordinates, hence the -0.5.
        local = (poly + (cx - x0, cy - y0)) * SUPERSAMPLE - 0.5
        draw.polygon([tuple(p) for p in local], fill=fill)
    alpha = np.asarray(canvas.reduce(SUPERSAMPLE), dtype=np.float32)[..., None] / 255.0
    region = image[y0:y1, x0:x1]
    colour = _contrasting_colour(rng, region.reshape(-1, 3).mean(axis=0))
    texture = _texture(rng, y1 - y0, x1 - x0, colour, textures)
    image[y0:y1, x0:x1] = region * (1 - alpha) + texture * alpha


def _contrasting_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A random colour far enough from the local background that the outline stays visible."""
    colour = rng.uniform(0, 255, 3)
    for _ in range(10):
        if np.linalg.norm(colour - background) >= 80:
            break
        colour = rng.uniform(0, 255, 3)
    return colour


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) float background: two colours mixed by upsampled coarse noise."""
    base, other = rng.uniform(0, 255, (2, 3))
    grid = int(rng.integers(2, 9))
    coarse = Image.fromarray((rng.random((grid, grid)) * 255).astype(np.uint8))
    blotches = np.asarray(coarse.resize((size, size), Image.BILINEAR), dtype=np.float32) / 255
    t = (blotches * rng.uniform(0.1, 0.7))[..., None]
    return (base * (1 - t) + other * t).astype(np.float32)


def _draw_lines(rng: np.random.Generator, image: np.ndarray, count: int) -> np.ndarray:
    """Random straight lines of width 1-3 px; returns a new float image."""
    pil = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    size = image.shape[0]
    for _ in range(count):
        ends = [tuple(p) for p in rng.uniform(0, size, (2, 2))]
        draw.line(ends, fill=tuple(int(c) for c in rng.integers(0, 256, 3)),
                  width=int(rng.integers(1, 4)))
    return np.asarray(pil, dtype=np.float32).copy()


def _add_clutter(rng: np.random.Generator, image: np.ndarray, style: ShapesStyle) -> np.ndarray:
    """Background lines and unannotated distractors of object-like size (6-48 px)."""
    image = _draw_lines(rng, image, _randint(rng, style.lines))
    size = image.shape[0]
    for _ in range(_randint(rng, style.distractors)):
        side = math.exp(rng.uniform(math.log(6), math.log(min(48, size / 2))))
        outline, (w, h) = _fit_outline(_distractor_outline(rng), rng.uniform(0, 180), side)
        cx, cy = rng.uniform(w / 2, size - w / 2), rng.uniform(h / 2, size - h / 2)
        _paste(rng, image, outline, cx, cy, style.textures)
    return image


def _randint(rng: np.random.Generator, bounds: Tuple[int, int]) -> int:
    """A uniform integer in the inclusive range ``bounds``."""
    return int(rng.integers(bounds[0], bounds[1] + 1))


def _overlaps(box: np.ndarray, earlier: np.ndarray) -> np.ndarray:
    """Intersection areas of one XYXY ``box`` [4] with each of ``earlier`` [M, 4] -> [M]."""
    iw = np.minimum(box[2], earlier[:, 2]) - np.maximum(box[0], earlier[:, 0])
    ih = np.minimum(box[3], earlier[:, 3]) - np.maximum(box[1], earlier[:, 1])
    return np.clip(iw, 0, None) * np.clip(ih, 0, None)


def _covers_too_much(box: np.ndarray, earlier: np.ndarray, covered: np.ndarray,
                     max_fraction: float) -> bool:
    """
    Whether ``box`` (XYXY, drawn on top) would bring the area of an earlier box [M, 4] that the
    boxes above it cover (``covered`` [M], summed, so overlapping occluders count twice: a
    conservative bound) above ``max_fraction`` of that box.
    """
    if len(earlier) == 0:
        return False
    areas = (earlier[:, 2] - earlier[:, 0]) * (earlier[:, 3] - earlier[:, 1])
    return bool(np.any(covered + _overlaps(box, earlier) > max_fraction * areas))


def _place_objects(rng: np.random.Generator, image: np.ndarray, num_objects: int,
                   style: ShapesStyle) -> List[Dict]:
    """Draw up to ``num_objects`` shapes largest first; returns their COCO annotations."""
    size = image.shape[0]
    min_side, max_side = style.object_size[0], style.object_size[1] * size
    sides = np.exp(rng.uniform(math.log(min_side), math.log(max_side), num_objects))
    annotations, boxes, covered = [], np.zeros((0, 4)), np.zeros(0)
    for side in np.sort(sides)[::-1]:  # largest first: small shapes stay on top, visible
        label = int(rng.integers(len(style.classes)))
        cls = style.classes[label]
        angle = rng.uniform(-1, 1) * _MAX_ROTATION[cls]
        outline, (w, h) = _fit_outline(_class_outline(rng, cls, style), angle, side)
        for _ in range(PLACEMENT_TRIES):
            cx, cy = rng.uniform(w / 2, size - w / 2), rng.uniform(h / 2, size - h / 2)
            box = np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
            if not _covers_too_much(box, boxes, covered, style.max_covered_fraction):
                break
        else:
            continue  # no room left for this one
        _paste(rng, image, outline, cx, cy, style.textures)
        covered = np.append(covered + _overlaps(box, boxes), 0.0)
        boxes = np.vstack([boxes, box])
        # Full extent, clamped against float round-off; COCO XYWH with 2 decimals.
        x0, y0, x1, y1 = np.clip(box, 0, size)
        annotations.append({
            "category_id": label + 1,
            "bbox": [round(float(v), 2) for v in (x0, y0, x1 - x0, y1 - y0)],
            "area": round(_outline_area(outline), 2),
            "iscrowd": 0,
        })
    return annotations


def render_shapes_image(
    rng: np.random.Generator, image_size: int, num_objects: int, style: str = DEFAULT_STYLE
) -> Tuple[np.ndarray, List[Dict]]:
    """
    Draw one shapes image.

    Args:
        rng: the image's random generator (all randomness comes from it).
        image_size: side of the square image in pixels.
        num_objects: shapes to try to place (fewer when there is no room); 0 for a clutter-only
            image.
        style: a key of ``STYLES``.

    Returns:
        (image, annotations): uint8 array (image_size, image_size, 3) RGB, and COCO annotation
        dicts with 1-based ``category_id``, ``bbox`` (XYWH, full extent), ``area``, ``iscrowd``.
    """
    spec = STYLES[style]
    image = _add_clutter(rng, _background(rng, image_size), spec)
    annotations = _place_objects(rng, image, num_objects, spec)
    # A few lines over the objects: thin partial occluders that are not objects.
    image = _draw_lines(rng, image, _randint(rng, spec.lines_over_objects))
    image += rng.normal(0, rng.uniform(*spec.noise_sigma), image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8), annotations


# ----------------------------------------------------------------------------------------------
# Writing a split atomically.
# ----------------------------------------------------------------------------------------------


def _write_split(directory: str, params: Dict, style_name: str) -> None:
    """Render all images of a split of style ``style_name`` into ``directory`` and write its
    annotations.json, which records ``params``."""
    n, seed, size = params["num_images"], params["seed"], params["image_size"]
    style = STYLES[style_name]
    os.makedirs(os.path.join(directory, "images"))
    num_empty = int(round(params["empty_fraction"] * n))
    empty = set(np.random.default_rng(seed).permutation(n)[:num_empty].tolist())
    images, annotations = [], []
    for i in range(n):
        # One generator per image: an image does not depend on the ones before it.
        rng = np.random.default_rng((seed, i))
        num_objects = 0 if i in empty else _randint(rng, style.objects_per_image)
        pixels, annos = render_shapes_image(rng, size, num_objects, style_name)
        file_name = f"{i:06d}.jpg"
        Image.fromarray(pixels).save(
            os.path.join(directory, "images", file_name), quality=JPEG_QUALITY
        )
        images.append({"id": i + 1, "file_name": file_name, "width": size, "height": size})
        for anno in annos:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, **anno})
    categories = [
        {"id": k + 1, "name": name, "supercategory": "shape"}
        for k, name in enumerate(style.classes)
    ]
    coco = {"info": {"description": "DSLA synthetic shapes", "dsla_shapes": params},
            "images": images, "annotations": annotations, "categories": categories}
    with open(os.path.join(directory, "annotations.json"), "w") as f:
        json.dump(coco, f)


def _read_params(directory: str) -> Optional[Dict]:
    """Generation parameters of a published split, or None if it is not a shapes split."""
    try:
        with open(os.path.join(directory, "annotations.json")) as f:
            return json.load(f).get("info", {}).get("dsla_shapes")
    except (OSError, ValueError, AttributeError):
        return None


def _publish(tmp: str, final: str, params: Dict) -> None:
    """Move a finished split from ``tmp`` to ``final`` with one rename; keep the first copy."""
    if os.path.isdir(final) and os.listdir(final):
        existing = _read_params(final)
        if existing == params:
            return  # another process published the same split first
        if existing is None:
            raise RuntimeError(
                f"{final} exists but is not a generated shapes split; remove it or set "
                "$DSLA_DATASETS to another directory."
            )
        logger.warning(f"Regenerating {final}: it was made with {existing}, not {params}.")
        stale = tempfile.mkdtemp(prefix=".stale-", dir=os.path.dirname(final))
        try:
            os.replace(final, os.path.join(stale, "split"))
        except FileNotFoundError:
            pass  # another process moved it away already
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.replace(tmp, final)
    except OSError:
        # A non-empty target: another process won the race; fine if it wrote the same split.
        if _read_params(final) != params:
            raise


def _remove_stale_tmp_dirs(root: str) -> None:
    """Delete leftovers of killed runs; a live run keeps touching its images/ directory."""
    now = time.time()
    for entry in os.scandir(root):
        if not (entry.name.startswith(".") and ("-tmp-" in entry.name or "stale-" in entry.name)):
            continue
        try:
            paths = [entry.path, os.path.join(entry.path, "images")]
            newest = max(os.path.getmtime(p) for p in paths if os.path.exists(p))
        except (OSError, ValueError):
            continue  # removed meanwhile by its owner
        if now - newest > STALE_TMP_SECONDS:
            shutil.rmtree(entry.path, ignore_errors=True)


def generate_shapes_dataset(
    root: str,
    split: str,
    num_images: int,
    seed: int,
    image_size: int = DEFAULT_IMAGE_SIZE,
    empty_fraction: float = DEFAULT_EMPTY_FRACTION,
    style: str = DEFAULT_STYLE,
) -> Tuple[str, str]:
    """
    Generate one split of the shapes dataset under ``root`` unless it is there already.

    Deterministic: the same arguments give byte-identical json and images. A split made with
    other arguments (or another ``GENERATOR_VERSION``) is replaced.

    Args:
        root: shapes root directory; the split goes to ``<root>/<split>/``.
        split: split directory name, e.g. "train".
        num_images: number of images.
        seed: random seed of the split.
        image_size: side of the square images in pixels.
        empty_fraction: fraction of images without objects (rounded to a whole count).
        style: a key of ``STYLES`` (the dataset's statistics; recorded in the json with them,
            under the style's identifier in files).

    Returns:
        (json_file, image_root) of the split.
    """
    if style not in STYLES:
        raise UserError(f"unknown shapes style {style!r}: use one of {sorted(STYLES)}")
    params = {"version": GENERATOR_VERSION, "split": split, "num_images": int(num_images),
              "seed": int(seed), "image_size": int(image_size),
              "empty_fraction": float(empty_fraction), "style": _STYLE_IDS_IN_FILES[style],
              "style_settings": json.loads(json.dumps(dataclasses.asdict(STYLES[style])))}
    final = os.path.join(root, split)
    if _read_params(final) != params:
        os.makedirs(root, exist_ok=True)
        _remove_stale_tmp_dirs(root)
        start = time.perf_counter()
        logger.info(f"Generating shapes split '{split}' ({num_images} images) in {final} ...")
        tmp = tempfile.mkdtemp(prefix=f".{split}-tmp-", dir=root)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the published split should not be
        try:
            _write_split(tmp, params, style)
            _publish(tmp, final, params)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone already once published
        logger.info(f"Generated {final} in {time.perf_counter() - start:.1f} s.")
    return shapes_split_paths(root, split)


# ----------------------------------------------------------------------------------------------
# Registration.
# ----------------------------------------------------------------------------------------------


def _load_shapes(name: str, root: str, spec: Dict) -> List[Dict]:
    """DatasetCatalog loader: generate the split on first use, then load it like any COCO json."""
    json_file, image_root = generate_shapes_dataset(root, **spec)
    return load_coco_dataset(name, json_file, image_root)


def register_shapes_datasets(root: Optional[str] = None, splits: Optional[Dict] = None) -> None:
    """
    Register shapes splits in DatasetCatalog / MetadataCatalog (cheap: nothing is generated or
    read until the dicts are requested). Re-registering a name replaces it, so calling this again
    with another ``root`` redirects the built-in splits.

    Args:
        root: shapes root; default ``default_shapes_root()`` (read now, not at load time).
        splits: name -> keyword arguments of ``generate_shapes_dataset`` except ``root``;
            default ``SHAPES_SPLITS`` (``shapes_train``, ``shapes_val``, the ``crowded``
            style's ``shapes_crowded_train``, ``shapes_crowded_val`` and the ``easy`` style's
            ``shapes_easy_train``, ``shapes_easy_val``).
    """
    root = default_shapes_root() if root is None else root
    splits = SHAPES_SPLITS if splits is None else splits
    for name, spec in splits.items():
        json_file, image_root = shapes_split_paths(root, spec["split"])
        if name in DatasetCatalog:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        DatasetCatalog.register(name, partial(_load_shapes, name, root, dict(spec)))
        classes = STYLES[spec.get("style", DEFAULT_STYLE)].classes
        MetadataCatalog.get(name).set(
            thing_classes=list(classes),
            # Set now (load_coco_json sets the same on load) so an evaluator built first works.
            thing_dataset_id_to_contiguous_id={k + 1: k for k in range(len(classes))},
            evaluator_type="coco",
            json_file=json_file,
            image_root=image_root,
        )
