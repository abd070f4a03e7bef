"""
DSLA as one ONNX graph that onnxruntime runs without PyTorch or detectron2 (docs/DEPLOY.md).

The graph holds the whole test-time computation of :class:`dsla.meta_arch.DSLA` on one image:
normalisation and padding, backbone, FPN, head, the authors' candidate selection (per level the
``test_topk_candidates`` points with the highest best-class score), box decoding and clipping,
score threshold, class-aware NMS and the ``max_detections_per_image`` best. Image height and
width are dynamic. What the graph does not do (reading, colour order, the test-time resize) is
recorded in the file's ``metadata_props`` (:data:`METADATA_KEYS`), which is all a runner needs.

Shape letters (docs/METHOD.md, "Shape letters"): L levels, Pi points of level i, C classes,
D detections of one image; H x W the resized input image.
"""
import contextlib
import json
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from detectron2.structures import Boxes

from .errors import UserError

__all__ = [
    "DEPLOY_EXTRA",
    "FORMAT_NAME",
    "OnnxDetector",
    "export_onnx",
    "metadata_props",
    "require_onnx",
    "run_onnx",
    "top_points",
    "unsupported_operator",
]

# The value of metadata_props["format"] that marks a DSLA export (runners check it).
FORMAT_NAME = "dsla-detector"
FORMAT_VERSION = "1"
DEPLOY_EXTRA = "pip install .[deploy] (or: pip install onnx onnxruntime)"
INPUT_NAMES = ["image"]
OUTPUT_NAMES = ["boxes", "scores", "classes"]
# NonMaxSuppression needs opset >= 11; 17 is what the exports here are tested with, and every
# onnxruntime the deploy extra allows (>= 1.17) runs it.
OPSET = 17
# What metadata_props holds; every value is a string (ONNX metadata is str -> str).
METADATA_KEYS = ("format", "format_version", "class_names", "input_format", "min_size_test",
                 "max_size_test", "size_divisibility", "normalization", "inputs", "outputs")


def require_onnx():
    """
    Returns:
        the ``onnx`` and ``onnxruntime`` modules.

    Raises:
        UserError: either is not installed (the message says what to install).
    """
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise UserError(f"ONNX export needs the '{e.name}' package: {DEPLOY_EXTRA}") from None
    return onnx, onnxruntime


def unsupported_operator(model: nn.Module) -> Optional[str]:
    """
    The first part of ``model`` that has no correct ONNX export, or None.

    - torchvision's ``deform_conv2d`` (DCN in the R-101 / X-101 backbones and in the heads with
      ``DCN_ON_LAST_CONV``): torchvision registers no ONNX symbolic for it, so the exporter
      would stop deep in the trace.
    - detectron2's ``SwinTransformer``: its shifted-window attention mask and window count are
      computed from the input size in Python, so the traced graph fits only the traced size
      (onnxruntime fails on a Reshape at any other size).

    Naming the part up front gives the user one line instead of a trace error or a wrong graph.
    """
    from detectron2.modeling.backbone.swin import SwinTransformer

    from .layers import ModulatedDeformConv2d

    for name, module in model.named_modules():
        if isinstance(module, ModulatedDeformConv2d):
            return f"torchvision::deform_conv2d (module {name}) has no ONNX export"
        if isinstance(module, SwinTransformer):
            return (f"detectron2's SwinTransformer (module {name}) builds its shifted-window "
                    "attention mask from the input size in Python, so its graph would only fit "
                    "the traced size")
    return None


class OnnxDetector(nn.Module):
    """
    The test-time computation of a DSLA model on one image, as tensors in and out (what the ONNX
    graph is traced from). Uses the model's own preprocessing, backbone, head, points, decoding
    and detection selection, and drops empty boxes as detectron2's ``detector_postprocess``
    does (the rescale to the original image size is the runner's, recorded in the metadata).

    ``forward(image [3, H, W] float, channels in INPUT.FORMAT, 0-255, already resized)`` returns
    ``boxes [D, 4]`` (xyxy in input pixels), ``scores [D]``, ``classes [D]`` (int64), best first.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.eval()

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m = self.model
        images = m.preprocess_image([{"image": image}])
        features = m.backbone(images.tensor)
        features = [features[f] for f in m.head_in_features]
        logits, dists = m._transpose_dense_predictions(m.head(features), [m.num_classes, 4])
        anchors = m.anchor_generator(features)
        image_size = images.image_sizes[0]
        boxes, point_scores = [], []
        # DSLA.forward_inference and inference_single_image on image 0, with top_points for
        # DSLA._top_points, whose min() would freeze the traced size's point counts.
        for level_anchors, level_logits, level_dists in zip(anchors, logits, dists):
            scores = level_logits[0].sigmoid()
            keep = top_points(scores, m.test_topk_candidates)
            boxes.append(m.box2box_transform.apply_deltas(
                level_dists[0][keep], level_anchors.tensor[keep]))
            point_scores.append(scores[keep])
        pred_boxes = Boxes(torch.cat(boxes))
        pred_boxes.clip(image_size)
        result = m._select_detections(pred_boxes, torch.cat(point_scores), image_size)
        # DenseDetector.forward's postprocessing drops boxes that clipping made empty.
        result = result[result.pred_boxes.nonempty()]
        return result.pred_boxes.tensor, result.scores, result.pred_classes


def top_points(scores: torch.Tensor, k: int) -> torch.Tensor:
    """
    :meth:`DSLA._top_points` with the number kept computed as a tensor, so that a traced graph
    keeps ``min(k, Pi)`` for every input size instead of the value at the traced size.

    Args:
        scores: ``[Pi, C]`` per-class scores of one level's points.
        k: ``test_topk_candidates``.

    Returns:
        long ``[min(k, Pi)]``: the points with the highest best-class score.
    """
    best = scores.max(dim=1).values
    num_points = best.shape[0]
    if isinstance(num_points, torch.Tensor):  # a traced size
        return best.topk(torch.clamp(num_points, max=k)).indices
    return best.topk(min(k, num_points)).indices


def metadata_props(cfg, class_names: Optional[Sequence[str]], size_divisibility: int
                   ) -> Dict[str, str]:
    """
    What a runner needs besides the graph: the class names (indices as names if unknown), the
    channel order, the test-time resize (shorter side ``min_size_test``, longer side at most
    ``max_size_test``, bilinear, as detectron2's ``ResizeShortestEdge``) and the interface.
    Normalisation and padding to ``size_divisibility`` happen inside the graph.
    """
    num_classes = cfg.MODEL.DSLA.NUM_CLASSES
    names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "class_names": json.dumps(names),
        "input_format": cfg.INPUT.FORMAT,
        "min_size_test": str(cfg.INPUT.MIN_SIZE_TEST),
        "max_size_test": str(cfg.INPUT.MAX_SIZE_TEST),
        "size_divisibility": str(size_divisibility),
        "normalization": json.dumps({"in_graph": True, "pixel_mean": list(cfg.MODEL.PIXEL_MEAN),
                                     "pixel_std": list(cfg.MODEL.PIXEL_STD)}),
        "inputs": "image: float32 [3, H, W], channels in input_format, 0-255, resized",
        "outputs": "boxes: float32 [D, 4] xyxy in input pixels; scores: float32 [D]; "
                   "classes: int64 [D]; best first",
    }


def export_onnx(model: nn.Module, image: torch.Tensor, path: str, metadata: Dict[str, str]):
    """
    Trace ``model`` (a DSLA in eval mode, on the CPU) on ``image`` into an ONNX file at ``path``
    with dynamic H and W, add ``metadata`` and check the file with ``onnx.checker``.

    Args:
        image: float32 ``[3, H, W]``, as :class:`OnnxDetector` takes it.

    Raises:
        UserError: onnx/onnxruntime missing, or an operator without ONNX export (named).
    """
    onnx, _ = require_onnx()
    from .meta_arch import DSLA

    # OnnxDetector computes DSLA's scores (sigmoid of the logits); subclasses such as the
    # plain-FCOS baseline score differently (x centerness).
    if type(model) is not DSLA:
        raise UserError(f"ONNX export covers the DSLA meta-architecture, not "
                        f"{type(model).__name__}; use --format torchscript for this model")
    operator = unsupported_operator(model)
    if operator is not None:
        raise UserError(f"cannot export to ONNX: {operator}; use --format torchscript for "
                        "this model")
    wrapper = OnnxDetector(model)
    with torch.no_grad(), _quiet_tracer():
        torch.onnx.export(
            wrapper, (image,), path, dynamo=False, opset_version=OPSET,
            input_names=INPUT_NAMES, output_names=OUTPUT_NAMES,
            dynamic_axes={"image": {1: "height", 2: "width"}, "boxes": {0: "detections"},
                          "scores": {0: "detections"}, "classes": {0: "detections"}},
        )
    proto = onnx.load(path)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, path)


@contextlib.contextmanager
def _quiet_tracer():
    """TracerWarnings name asserts and shape reads that are constant for a given model; the
    comparison of the export with eager is what tells whether the graph is right."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def run_onnx(session, image: torch.Tensor) -> List[torch.Tensor]:
    """Run an onnxruntime ``session`` of an export on ``image [3, H, W]``; returns
    (boxes [D, 4], scores [D], classes [D]) as tensors."""
    outputs = session.run(OUTPUT_NAMES, {"image": image.detach().cpu().numpy()})
    return [torch.from_numpy(x) for x in outputs]
