"""Drawing helpers shared by ``make demo`` and the tools: predictions with detectron2's Visualizer."""
from typing import List, Optional, Sequence

import numpy as np
from detectron2.data import MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor
from detectron2.structures import Instances
from detectron2.utils.visualizer import Visualizer

__all__ = ["draw_instances", "image_grid", "predict_images"]


def draw_instances(image_rgb: np.ndarray, instances: Instances, metadata=None,
                   score_threshold: float = 0.3) -> np.ndarray:
    """
    Args:
        image_rgb: ``[H, W, 3]`` uint8 RGB image.
        instances: predictions (``pred_boxes``, ``scores``, ``pred_classes``) in image
            coordinates, or ground truth (``gt_boxes``, ``gt_classes``).
        metadata: detectron2 Metadata with ``thing_classes`` for class names (optional).
        score_threshold: predictions below it are not drawn.

    Returns:
        ``[H, W, 3]`` uint8 RGB image with boxes and labels.
    """
    instances = instances.to("cpu")
    if instances.has("scores"):
        instances = instances[instances.scores >= score_threshold]
    viz = Visualizer(image_rgb, metadata=metadata)
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


def predict_images(cfg, image_paths: List[str], dataset_name: Optional[str] = None,
                   score_threshold: float = 0.3) -> List[np.ndarray]:
    """
    Predict on image files with detectron2's ``DefaultPredictor`` (builds the model of ``cfg``,
    loads ``cfg.MODEL.WEIGHTS``, applies the test-time resize) and draw the predictions.

    Args:
        cfg: a config with ``MODEL.WEIGHTS`` set.
        image_paths: files to read.
        dataset_name: for class names (``thing_classes``) if known.
        score_threshold: drawing threshold.

    Returns:
        one ``[H, W, 3]`` uint8 RGB drawing per image, at the image's original size.
    """
    predictor = DefaultPredictor(cfg)
    metadata = MetadataCatalog.get(dataset_name) if dataset_name else None
    drawings = []
    for path in image_paths:
        # DefaultPredictor takes BGR and converts to INPUT.FORMAT itself.
        instances = predictor(read_image(path, format="BGR"))["instances"]
        rgb = read_image(path, format="RGB")
        drawings.append(draw_instances(rgb, instances, metadata, score_threshold))
    return drawings
