"""
Show how DSLA labels the points of one dataset image, next to FCOS's hard labels.

One PNG, one row per FPN level. Column 1: DSLA's smooth label q* of every point, as the model of
the config computes its training targets (``DSLA.smooth_label_maps``: core zone, interval
relaxation across levels, the larger-q box winning where boxes overlap). Column 2: FCOS's
positives (``dsla.baselines.fcos_targets``: inside a box's centre-sampling region,
``MODEL.FCOS.CENTER_SAMPLING_RADIUS``, with max(l, t, r, b) in the level's range).
Both columns use the DSLA model's points (``dsla.points``) and regress ranges, so that they
differ only in the assignment rule. Ground-truth boxes are drawn on top; each coloured cell is
one point (its centre is the point). The image and boxes are resized as at test time
(``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``). No model weights are needed.

    dsla-visualize-assignment \\
        --config-file configs/Shapes/dsla_R_18_FPN_cpu.yaml --dataset shapes_train --index 3 \\
        --output assignment.png
"""
import os
import sys
from typing import Dict, List, Tuple

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure  # files only: no pyplot, no GUI backend
from matplotlib.patches import Rectangle
from PIL import Image

import detectron2.data.transforms as T
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

import dsla  # noqa: F401  (registers the meta-architectures and the built-in datasets)
from dsla.analysis import ground_truth_of
from dsla.assignment import _relaxed_ranges, level_point_info
from dsla.cli import exit_on_user_error, load_config, register_datasets, tool_parser
from dsla.errors import UserError
from dsla.baselines.fcos_targets import fcos_targets
from dsla.meta_arch import DSLA
from dsla.points import grid_points, grid_sizes

# Heatmap over a dimmed grey copy of the image: the labels stay readable on busy images.
_IMAGE_DIM = 0.55
_DSLA_CMAP = "viridis"
_FCOS_COLOUR = (0.9, 0.2, 0.2)


def parse_args(argv=None):
    parser = tool_parser(__doc__, weights="e.g. MODEL.DSLA.CORE_ZONE False",
                         output_help="the PNG to write")
    parser.add_argument("--dataset", default=None,
                        help="registered dataset (default: the config's DATASETS.TRAIN[0])")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--index", type=int, default=None,
                       help="position of the image in the dataset (default 0)")
    which.add_argument("--image-id", default=None, help="image_id of the image")
    return parser.parse_args(argv)


def load_example(cfg, dataset: str, index=None, image_id=None):
    """
    One dataset image with its ground truth, resized as the model sees it at test time.

    Returns:
        image (uint8 [H, W, 3] RGB), boxes (Tensor[G, 4] xyxy), classes (Tensor[G] long),
        and the dataset dict.
    """
    if dataset not in DatasetCatalog.list():
        raise UserError(f"unknown dataset '{dataset}' (not registered; --register-coco NAME "
                        "JSON_FILE IMAGE_ROOT registers one)")
    dicts = DatasetCatalog.get(dataset)
    if image_id is not None:
        found = [d for d in dicts if str(d["image_id"]) == str(image_id)]
        if not found:
            raise UserError(f"dataset '{dataset}' has no image with image_id {image_id}")
        record = found[0]
    else:
        index = 0 if index is None else index
        if not -len(dicts) <= index < len(dicts):
            raise UserError(
                f"--index {index} is out of range: '{dataset}' has {len(dicts)} images")
        record = dicts[index]
    image = read_image(record["file_name"], format="RGB")
    boxes, classes = ground_truth_of(record)
    resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    transform = resize.get_transform(image)
    boxes = torch.as_tensor(transform.apply_box(boxes.numpy()), dtype=torch.float32)
    return transform.apply_image(image), boxes.reshape(-1, 4), classes, record


def level_grids(cfg, image_hw: Tuple[int, int], boxes, classes) -> List[Dict]:
    """
    DSLA and FCOS labels of every point, level by level.

    Args:
        cfg: a DSLA config (``MODEL.DSLA``, and ``MODEL.FCOS.CENTER_SAMPLING_RADIUS``).
        image_hw: (H, W) of the (resized) image.
        boxes (Tensor[G, 4]), classes (Tensor[G]): ground truth in that image.

    Returns:
        one dict per level: ``name``, ``stride``, ``range`` (lo, hi), ``relaxed`` (rlo, rhi),
        ``dsla`` (float [Hi, Wi], q*) and ``fcos`` (float [Hi, Wi], 0/1): the points (j·s, i·s)
        that fall on the image.
    """
    model = build_model(cfg)
    if not isinstance(model, DSLA):
        raise UserError(f"MODEL.META_ARCHITECTURE is {cfg.MODEL.META_ARCHITECTURE}: this tool "
                        "shows DSLA's labels, use a DSLA config")
    gt = Instances(image_hw, gt_boxes=Boxes(boxes), gt_classes=classes)
    dsla_maps = model.smooth_label_maps(image_hw, gt)
    fcos_maps = _fcos_positive_maps(model, image_hw, gt, cfg.MODEL.FCOS.CENTER_SAMPLING_RADIUS)
    strides = model.anchor_generator.strides
    ranges = torch.tensor(model.regress_ranges, dtype=torch.float64)
    _, _, rlo, rhi = _relaxed_ranges(ranges, model.relaxation_factor)
    return [
        {"name": name, "stride": s, "range": (lo, hi), "relaxed": (float(a), float(b)),
         "dsla": dq.cpu().numpy(), "fcos": fq.cpu().numpy()}
        for name, s, (lo, hi), a, b, dq, fq in zip(
            model.head_in_features, strides, model.regress_ranges, rlo, rhi, dsla_maps, fcos_maps)
    ]


def _fcos_positive_maps(model, image_hw, gt: Instances, radius: float) -> List[torch.Tensor]:
    """FCOS's positives (1) on the model's points and ranges, as L maps [Hi, Wi]."""
    strides = model.anchor_generator.strides
    points, point_strides, ranges = level_point_info(
        grid_points(image_hw, strides), strides, model.regress_ranges)
    labels, _, _ = fcos_targets(points, point_strides, ranges, gt.gt_boxes.tensor,
                                gt.gt_classes, model.num_classes, center_sampling_radius=radius)
    positive = (labels != model.num_classes).float()
    sizes = grid_sizes(image_hw, strides)
    return [m.reshape(h, w) for m, (h, w) in zip(positive.split([h * w for h, w in sizes]), sizes)]


def draw_figure(image, boxes, classes, levels: List[Dict], class_names=None, title=""):
    """
    Args:
        image: uint8 [H, W, 3] RGB. boxes (Tensor[G, 4]), classes (Tensor[G]).
        levels: output of :func:`level_grids`.
        class_names: optional list of names indexed by class.
        title: figure title.

    Returns:
        a matplotlib Figure with len(levels) rows and 2 columns.
    """
    rows = len(levels)
    fig = Figure(figsize=(5.6, 2.75 * rows + 0.9), layout="constrained")
    axes = fig.subplots(rows, 2, squeeze=False)
    grey = (image.mean(axis=2) * _IMAGE_DIM).astype(np.uint8)
    heat = None
    for ax_row, level in zip(axes, levels):
        s = level["stride"]
        h, w = level["dsla"].shape
        # Cell (i, j) is centred on the point (j·s, i·s).
        extent = (-s / 2, w * s - s / 2, h * s - s / 2, -s / 2)
        for ax, key in zip(ax_row, ("dsla", "fcos")):
            ax.imshow(grey, cmap="gray", vmin=0, vmax=255)
            grid = np.ma.masked_equal(level[key], 0.0)  # background stays see-through
            if key == "dsla":
                heat = ax.imshow(grid, cmap=_DSLA_CMAP, vmin=0, vmax=1, alpha=0.85,
                                 extent=extent, interpolation="nearest")
            else:
                ax.imshow(grid, cmap=ListedColormap([_FCOS_COLOUR]),
                          alpha=0.6, extent=extent, interpolation="nearest")
            _draw_boxes(ax, boxes, classes, class_names)
            ax.set_xlim(-0.5, image.shape[1] - 0.5)
            ax.set_ylim(image.shape[0] - 0.5, -0.5)
            ax.set_xticks([])
            ax.set_yticks([])
        _label_row(ax_row, level)
    axes[0, 0].set_title("DSLA smooth label q*\n" + axes[0, 0].get_title(), fontsize=9)
    axes[0, 1].set_title("FCOS positives (hard 0/1)\n" + axes[0, 1].get_title(), fontsize=9)
    fig.colorbar(heat, ax=axes, location="bottom", shrink=0.5, aspect=30, label="DSLA q*")
    fig.suptitle(title, fontsize=9)
    return fig


def _label_row(ax_row, level: Dict) -> None:
    """Level name and ranges on the left, label statistics above each panel."""
    lo, hi = level["range"]
    rlo, rhi = level["relaxed"]
    hi_txt = "inf" if hi >= 1e7 else f"{hi:g}"
    rhi_txt = "inf" if rhi >= 1e7 else f"{rhi:g}"
    ax_row[0].set_ylabel(f"{level['name']}  stride {level['stride']}\nrange [{lo:g}, {hi_txt}]\n"
                         f"relaxed [{rlo:g}, {rhi_txt}]", fontsize=8)
    q = level["dsla"]
    ax_row[0].set_title(f"{int((q > 0).sum())} positives, sum q* = {q.sum():.1f}", fontsize=8)
    ax_row[1].set_title(f"{int(level['fcos'].sum())} positives", fontsize=8)


def _draw_boxes(ax, boxes, classes, class_names) -> None:
    for (x0, y0, x1, y1), c in zip(boxes.tolist(), classes.tolist()):
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=1.0,
                                   edgecolor="white"))
        ax.plot([(x0 + x1) / 2], [(y0 + y1) / 2], marker="+", color="white", markersize=4)
        name = class_names[c] if class_names and c < len(class_names) else str(c)
        ax.text(x0, y0 - 1, name, color="white", fontsize=6, va="bottom",
                bbox={"facecolor": "black", "alpha": 0.5, "pad": 0.5, "lw": 0})


def save_png(fig, path: str, dpi: int = 80) -> None:
    """Save ``fig`` as a 256-colour PNG: a third of the size of matplotlib's RGBA output on noisy
    images, with no visible loss on heatmaps (keeps the docs pictures small)."""
    fig.set_dpi(dpi)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3]
    Image.fromarray(rgb).quantize(colors=256).save(path, optimize=True)


def run(args) -> str:
    cfg = load_config(args.config_file, args.opts)
    register_datasets(args)
    dataset = args.dataset or (cfg.DATASETS.TRAIN[0] if cfg.DATASETS.TRAIN else None)
    if not dataset:
        raise UserError("no dataset: pass --dataset NAME (the config has no DATASETS.TRAIN)")
    image, boxes, classes, record = load_example(cfg, dataset, args.index, args.image_id)
    levels = level_grids(cfg, image.shape[:2], boxes, classes)
    names = MetadataCatalog.get(dataset).get("thing_classes", None)
    title = (f"{dataset}: {os.path.basename(record['file_name'])} (image_id {record['image_id']}), "
             f"{len(boxes)} boxes, {image.shape[1]}x{image.shape[0]} px")
    fig = draw_figure(image, boxes, classes, levels, names, title)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    save_png(fig, args.output)
    return args.output


def main(argv=None) -> int:
    args = parse_args(argv)
    with exit_on_user_error():
        out = run(args)
    print(f"Wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
