"""detectron2's own FCOS ("FCOS with tricks": centre sampling, GIoU loss, centerness on the
regression tower, score sqrt(cls x ctr)), made buildable from yacs configs as a baseline of DSLA,
as meta-architecture ``FCOSDetectron2`` with the keys ``MODEL.FCOS``
(``dsla.config.FCOS_DETECTRON2_SETTINGS``).

Only two things change: a ``from_config`` (detectron2 ships FCOS for LazyConfig only, and does
not register it), and ``_match_anchors``, whose per-level regress ranges, which detectron2 fixes
at 4x/8x the stride, come from ``MODEL.FCOS.REGRESS_RANGES`` so that FCOS and DSLA see the same
ranges on any dataset; it is FCOS's rule from ``fcos_targets.py`` (shared with the plain-FCOS
baseline), with the ranges closed ``[lo, hi]`` as in mmdetection. The rest of the labelling
(``label_anchors``), the losses and inference are detectron2's.
"""
from typing import List

import torch

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.meta_arch.fcos import FCOS, FCOSHead
from detectron2.structures import Boxes

from ..assignment import level_point_info
from ..config import detector_arguments
from .fcos_targets import fcos_match_quality

__all__ = ["FCOSDetectron2"]


@META_ARCH_REGISTRY.register()
class FCOSDetectron2(FCOS):
    """detectron2's FCOS (focal loss, GIoU, centerness branch) with configurable ranges."""

    @configurable
    def __init__(self, *, regress_ranges, **kwargs):
        """
        Args:
            regress_ranges: one (lo, hi) per head input feature.
            kwargs: arguments of :class:`detectron2.modeling.meta_arch.fcos.FCOS`.
        """
        super().__init__(**kwargs)
        self.regress_ranges = [tuple(float(v) for v in r) for r in regress_ranges]
        if len(self.regress_ranges) != len(self.head_in_features):
            raise ValueError(
                f"Invalid MODEL.FCOS.REGRESS_RANGES = {regress_ranges!r}: needs one range per "
                f"IN_FEATURE ({len(self.head_in_features)})."
            )

    @classmethod
    def from_config(cls, cfg):
        backbone = build_backbone(cfg)
        c = cfg.MODEL.FCOS
        shapes = [backbone.output_shape()[f] for f in c.IN_FEATURES]
        head = FCOSHead(
            input_shape=shapes, conv_dims=[shapes[0].channels] * c.NUM_CONVS,
            num_classes=c.NUM_CLASSES, norm=c.NORM, prior_prob=c.PRIOR_PROB,
        )
        return {"backbone": backbone, "head": head,
                **detector_arguments(cfg, "FCOSDetectron2")}

    def losses(self, anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes,
               pred_centerness):
        """
        detectron2's FCOS losses, computed in float32 also under mixed precision (as DSLA's):
        fvcore's GIoU loss fails on bfloat16 boxes (``dsla.cpu_amp``). Arguments as in
        detectron2's ``FCOS.losses``: per level ``[N, Pi, C]``, ``[N, Pi, 4]``, ``[N, Pi, 1]``.
        """
        with torch.autocast(device_type=pred_logits[0].device.type, enabled=False):
            return super().losses(
                anchors, [x.float() for x in pred_logits], gt_labels,
                [x.float() for x in pred_anchor_deltas], gt_boxes,
                [x.float() for x in pred_centerness])

    @torch.no_grad()
    def _match_anchors(self, gt_boxes: Boxes, anchors: List[Boxes]):
        """
        FCOS's match quality with configurable ranges (:func:`fcos_match_quality`): a point
        matches a box when it is inside the box's centre region (clipped to the box), with
        max(l, t, r, b) in the level's range; among matching boxes the smallest wins.
        detectron2's ``label_anchors`` turns this into labels.

        Returns:
            Tensor[G, P]: > 0 for matching pairs, larger for smaller boxes.
        """
        points, strides, ranges = level_point_info(
            [a.get_centers() for a in anchors], self.anchor_generator.strides, self.regress_ranges
        )
        return fcos_match_quality(points, strides, ranges, gt_boxes.tensor,
                                  center_sampling_radius=self.center_sampling_radius)
