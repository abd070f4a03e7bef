"""The base of DSLA and of the plain-FCOS baseline: a detectron2 dense detector whose anchors are
points ``(j s, i s)``, with per-level regress ranges, boxes decoded from distances (l, t, r, b)
in pixels, and the authors' per-image inference (docs/METHOD.md, "Inference").

Shape letters (docs/METHOD.md, "Shape letters"): L levels, Pi points of level i, C classes,
D detections of one image.
"""
import torch

from detectron2.layers import batched_nms, cat
from detectron2.modeling import build_backbone
from detectron2.modeling.box_regression import Box2BoxTransformLinear
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.structures import Boxes, Instances

from .config import (
    GENERAL_DEFAULTS,
    HEAD_CONFIG_NODES,
    POINT_LOSS_SETTINGS,
    POINT_SETTINGS,
    defaults,
    detector_arguments,
    head_arguments,
    validate_arguments,
    validate_config,
)
from .cpu_memory import keep_freed_memory
from .head import DSLAHead
from .points import point_generator

__all__ = ["PointDetector", "point_detector_arguments"]

# Defaults of the constructor's optional arguments: the config's (dsla.config.POINT_SETTINGS,
# POINT_LOSS_SETTINGS).
_DEFAULTS = {**defaults(POINT_SETTINGS + POINT_LOSS_SETTINGS), **GENERAL_DEFAULTS}


def point_detector_arguments(cfg, arch: str, **head_options):
    """
    The constructor arguments of a :class:`PointDetector` read from ``cfg``, after checking
    them: a backbone, a ``DSLAHead`` on its ``IN_FEATURES`` and the detector's settings.

    Args:
        arch (str): the meta-architecture, a key of ``dsla.config.DETECTORS``.
        head_options: further arguments of ``DSLAHead`` (e.g. ``centerness=True``).

    Raises:
        UserError: for a setting out of its range, naming the config key.
    """
    backbone = build_backbone(cfg)
    shapes = backbone.output_shape()
    validate_config(cfg, arch, {k: v.stride for k, v in shapes.items()})
    features = cfg.MODEL[HEAD_CONFIG_NODES[arch]].IN_FEATURES
    return {
        "backbone": backbone,
        "head": DSLAHead(input_shape=[shapes[f] for f in features], **head_options,
                         **head_arguments(cfg, arch)),
        **detector_arguments(cfg, arch),
        "input_format": cfg.INPUT.FORMAT,
    }


class PointDetector(DenseDetector):
    """
    What DSLA and plain FCOS share: points, regress ranges, centre sampling, loss weights and
    box loss type, box decoding and inference. A subclass implements ``forward_training`` and
    ``forward_inference`` (which turns its head's outputs into per-class scores and calls
    :meth:`inference_single_image`).
    """

    def __init__(
        self,
        *,
        backbone,
        head,
        head_in_features,
        num_classes,
        regress_ranges,
        center_sampling_radius=_DEFAULTS["center_sampling_radius"],
        cls_loss_weight=_DEFAULTS["cls_loss_weight"],
        box_loss_type=_DEFAULTS["box_loss_type"],
        box_loss_weight=_DEFAULTS["box_loss_weight"],
        test_score_thresh=_DEFAULTS["test_score_thresh"],
        test_topk_candidates=_DEFAULTS["test_topk_candidates"],
        test_nms_thresh=_DEFAULTS["test_nms_thresh"],
        max_detections_per_image=_DEFAULTS["max_detections_per_image"],
        pixel_mean,
        pixel_std,
        input_format=_DEFAULTS["input_format"],
    ):
        """
        Args:
            backbone, head, head_in_features, pixel_mean, pixel_std: as in
                :class:`DenseDetector`; ``head`` returns (logits, distances in pixels, ...).
            num_classes: C.
            regress_ranges: one (lo, hi) per head input feature (docs/METHOD.md, "Points").
            center_sampling_radius: R in strides (docs/METHOD.md, "Inside test"); 0 turns
                centre sampling off.
            cls_loss_weight, box_loss_weight: weights of the two losses.
            box_loss_type: "iou" (-log IoU) or "giou" (1 - GIoU).
            test_score_thresh, test_topk_candidates, test_nms_thresh,
            max_detections_per_image: inference (docs/METHOD.md, "Inference").
            input_format: channel order of input images, used for visualisation.

        Raises:
            UserError: for a setting out of its range, naming the argument (the config path
                checks the same settings first, naming the config key).
        """
        validate_arguments(dict(locals()),
                           {k: v.stride for k, v in backbone.output_shape().items()},
                           detector=type(self).__name__)
        super().__init__(
            backbone, head, head_in_features, pixel_mean=pixel_mean, pixel_std=pixel_std
        )
        self.num_classes = num_classes
        self.anchor_generator = point_generator(
            [backbone.output_shape()[f].stride for f in self.head_in_features])
        self.box2box_transform = Box2BoxTransformLinear(normalize_by_size=False)
        self.regress_ranges = [tuple(float(v) for v in r) for r in regress_ranges]
        self.center_sampling_radius = center_sampling_radius
        self.cls_loss_weight = cls_loss_weight
        self.box_loss_type = box_loss_type
        self.box_loss_weight = box_loss_weight
        self.test_score_thresh = test_score_thresh
        self.test_topk_candidates = test_topk_candidates
        self.test_nms_thresh = test_nms_thresh
        self.max_detections_per_image = max_detections_per_image
        self.input_format = input_format

    def forward(self, batched_inputs):
        """
        :meth:`DenseDetector.forward`; on a CPU, first sets the process's allocator to keep
        freed memory (:func:`dsla.cpu_memory.keep_freed_memory`): values are unchanged, the
        page faults of fresh feature maps at every pass are gone.
        """
        if self.device.type == "cpu":
            keep_freed_memory()
        return super().forward(batched_inputs)

    def inference_single_image(self, anchors, scores, dists, image_size):
        """
        The detections of one image, selected as the authors' code does (docs/METHOD.md,
        "Inference"): per level the ``test_topk_candidates`` points with the highest best-class
        score, their boxes clipped to the image; then every (point, class) entry of those points
        above ``test_score_thresh``, class-aware NMS, the ``max_detections_per_image`` best.

        Args:
            anchors: L Boxes ``[Pi, 4]`` whose centres are the points.
            scores: L tensors ``[Pi, C]``, the per-class score of every point (DSLA: sigmoid of
                the logits; any detector's final per-class score works, e.g. cls x centerness).
            dists: L tensors ``[Pi, 4]``, distances (l, t, r, b) in pixels.
            image_size: (H, W) of the resized image, before padding.

        Returns:
            Instances with D <= ``max_detections_per_image`` detections (``pred_boxes``,
            ``scores``, ``pred_classes``), best first, in the coordinates of the resized image.
        """
        boxes, point_scores = [], []
        for level_anchors, level_scores, level_dists in zip(anchors, scores, dists):
            keep = self._top_points(level_scores)
            boxes.append(self.box2box_transform.apply_deltas(
                level_dists[keep], level_anchors.tensor[keep]))
            point_scores.append(level_scores[keep])
        pred_boxes = Boxes(cat(boxes))
        pred_boxes.clip(image_size)
        return self._select_detections(pred_boxes, cat(point_scores), image_size)

    def _top_points(self, scores):
        """
        Args:
            scores: ``[Pi, C]`` per-class scores of one level's points.

        Returns:
            long ``[min(test_topk_candidates, Pi)]``: the points with the highest best-class
            score. The authors rank points, not (point, class) pairs as detectron2 does: on a
            crowded level the two keep different candidates.
        """
        num_kept = min(self.test_topk_candidates, scores.shape[0])
        return scores.max(dim=1).values.topk(num_kept).indices

    def _select_detections(self, boxes, scores, image_size):
        """
        Args:
            boxes: Boxes ``[M, 4]``, the kept points of all levels (clipped).
            scores: ``[M, C]`` their per-class scores.
            image_size: (H, W).

        Returns:
            Instances: every (point, class) entry above the score threshold, after class-aware
            NMS, at most ``max_detections_per_image``, best first.
        """
        point_idx, classes = torch.nonzero(scores > self.test_score_thresh, as_tuple=True)
        candidate_boxes, candidate_scores = boxes.tensor[point_idx], scores[point_idx, classes]
        keep = batched_nms(candidate_boxes, candidate_scores, classes, self.test_nms_thresh)
        keep = keep[: self.max_detections_per_image]
        return Instances(image_size, pred_boxes=Boxes(candidate_boxes[keep]),
                         scores=candidate_scores[keep], pred_classes=classes[keep])
