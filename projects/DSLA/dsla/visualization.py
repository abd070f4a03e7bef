"""Drawing helpers shared by ``make demo`` and the tools: predictions with detectron2's Visualizer.

In a picture with ground truth, ground-truth boxes are thin white lines and predictions are thick
coloured boxes labelled "class score%", so hits and misses can be told apart at a glance.
"""
from typing import List, Optional, Sequence

import numpy as np
import torch
from matplotlib.patches import Rectangle

from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor
from detectron2.structures import Instances
from detectron2.utils.visualizer import Visualizer

__all__ = ["SCORE_THRESHOLD", "LoadedPredictor", "draw_instances", "image_grid", "predict",
           "predict_images"]

# Detections drawn by default (make demo's picture, dsla-predict): DSLA's IoU-coupled scores run
# lower than class confidences (docs/BENCHMARKS.md, "Calibration"); 0.4 is where make demo's
# picture precision and recall are measured, so every picture draws the same detections.
SCORE_THRESHOLD = 0.4

# Ground truth is drawn under the predictions, one pixel wide (predictions: Visualizer default).
GT_LINE_WIDTH = 1.0
GT_COLOR = "white"


def draw_instances(image_rgb: np.ndarray, instances: Instances, metadata=None,
                   score_threshold: float = SCORE_THRESHOLD,
                   gt_boxes: Optional[torch.Tensor] = None, scale: float = 1.0) -> np.ndarray:
    """
    Args:
        image_rgb: ``[H, W, 3]`` uint8 RGB image.
        instances: predictions (``pred_boxes``, ``scores``, ``pred_classes``) in image
            coordinates, or ground truth (``gt_boxes``, ``gt_classes``).
        metadata: detectron2 Metadata with ``thing_classes`` for class names (optional).
        score_threshold: predictions below it are not drawn.
        gt_boxes (Tensor[G, 4], xyxy, optional): ground truth drawn thin under predictions.
        scale: output size relative to the image (labels stay readable on small images).

    Returns:
        ``[H*scale, W*scale, 3]`` uint8 RGB image with boxes and labels.
    """
    instances = instances.to("cpu")
    if instances.has("scores"):
        instances = instances[instances.scores >= score_threshold]
    viz = Visualizer(image_rgb, metadata=metadata, scale=scale)
    for x0, y0, x1, y1 in (gt_boxes.tolist() if gt_boxes is not None else []):
        viz.output.ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False,
                                          edgecolor=GT_COLOR, linewidth=GT_LINE_WIDTH))
    if instances.has("pred_boxes"):
        return viz.draw_instance_predictions(instances).get_image()
    names = getattr(metadata, "thing_classes", None)
    labels = [names[c] if names else str(c) for c in instances.gt_classes.tolist()]
    return viz.overlay_instances(boxes=instances.gt_boxes, labels=labels).get_image()


def image_grid(images: Sequence[np.ndarray], columns: int = 4, pad: int = 4) -> np.ndarray:
    """
    Tile ``[Hi, Wi, 3]`` uint8 images into one ``[H, W, 3]`` image (white padding).
    """
    assert len(images) > 0, "image_grid needs at least one image"
    rows = (len(images) + columns - 1) // columns
    cell_h = max(im.shape[0] for im in images) + pad
    cell_w = max(im.shape[1] for im in images) + pad
    grid = np.full((rows * cell_h + pad, min(columns, len(images)) * cell_w + pad, 3), 255,
                   dtype=np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        y, x = pad + r * cell_h, pad + c * cell_w
        grid[y : y + im.shape[0], x : x + im.shape[1]] = im
    return grid


class LoadedPredictor(DefaultPredictor):
    """detectron2's ``DefaultPredictor`` (test-time resize, input format, one image per call)
    around a model already built and loaded, strictly, by ``dsla.cli.load_model``:
    DefaultPredictor's own constructor would build the model again and load it non-strictly."""

    def __init__(self, cfg, model: torch.nn.Module):
        self.cfg = cfg.clone()
        self.model = model.eval()
        self.aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
        self.input_format = cfg.INPUT.FORMAT


def predict(cfg, model: torch.nn.Module, image_paths: List[str]) -> List[Instances]:
    """
    Predict on image files with ``model`` (built and loaded from ``cfg``), through
    :class:`LoadedPredictor` (the test-time resize of ``cfg``).

    Returns:
        one ``Instances`` per image (CPU), in the image's original coordinates.
    """
    predictor = LoadedPredictor(cfg, model)
    # DefaultPredictor takes BGR and converts to INPUT.FORMAT itself.
    return [predictor(read_image(path, format="BGR"))["instances"].to("cpu")
            for path in image_paths]


def predict_images(cfg, model: torch.nn.Module, image_paths: List[str],
                   dataset_name: Optional[str] = None,
                   score_threshold: float = SCORE_THRESHOLD) -> List[np.ndarray]:
    """
    :func:`predict`, then draw each image's predictions.

    Args:
        cfg: the config ``model`` was built from.
        model: the detector, weights loaded (``dsla.cli.load_model``).
        image_paths: files to read.
        dataset_name: for class names (``thing_classes``) if known.
        score_threshold: drawing threshold.

    Returns:
        one ``[H, W, 3]`` uint8 RGB drawing per image, at the image's original size.
    """
    metadata = MetadataCatalog.get(dataset_name) if dataset_name else None
    return [draw_instances(read_image(path, format="RGB"), instances, metadata, score_threshold)
            for path, instances in zip(image_paths, predict(cfg, model, image_paths))]
