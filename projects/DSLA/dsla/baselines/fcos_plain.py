"""Plain FCOS, the detector DSLA modifies: the paper's baseline (Su et al. 2022, Sec. 4; Tian et
al., ICCV 2019), as mmdetection's ``fcos_r50_caffe_fpn_gn-head_1x`` computes it. Its keys are
``MODEL.FCOS_PLAIN`` (``dsla.config.FCOS_PLAIN_SETTINGS``).

A sibling of DSLA: both are :class:`dsla.point_detector.PointDetector` (points ``(j s, i s)``,
regress ranges, box decoding, the whole per-image inference) with the head ``DSLAHead`` (two
towers, cls logits, per-level Scale, ``exp(scale * x)`` or ``NORM_ON_BBOX`` distances, DCN /
conv-bias options), the IoU / GIoU box loss function and the all-reduced normalisers.

Plain FCOS's own: the head's centerness conv on the classification tower (``centerness=True``);
FCOS's hard labelling (``fcos_targets.py``: inside test, range test, smallest box, centerness
target); the losses -- sigmoid focal loss / number of positives, IoU loss weighted by the
centerness target / sum of centerness targets, centerness BCE / number of positives -- and the
score ``sigmoid(cls) * sigmoid(centerness)``.

Kept as DSLA's rather than mmdetection's, so that the comparison isolates the method: the points
(mmdetection's FCOS adds s // 2), the 0.05 score threshold applied to cls x ctr (mmdetection
thresholds cls, then multiplies) and the NMS IoU ``NMS_THRESH_TEST`` (0.6; its FCOS config uses
0.5).

Shape letters: N = images, P = points of all levels, Pi = points of level i, C = classes,
K = positive points of the batch.
"""
from typing import List

import torch
import torch.nn.functional as F
from fvcore.nn import sigmoid_focal_loss

from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import Boxes, Instances
from detectron2.structures.boxes import matched_pairwise_iou
from detectron2.utils.events import get_event_storage

from ..assignment import level_point_info
from ..config import FOCAL_LOSS_SETTINGS, defaults
from ..losses import all_reduce_mean, box_iou_loss
from ..point_detector import PointDetector, point_detector_arguments
from .fcos_targets import fcos_targets

__all__ = ["FCOSPlain", "focal_loss_sum"]

# Defaults of the constructor's optional arguments: the config's (FOCAL_LOSS_SETTINGS).
_DEFAULTS = defaults(FOCAL_LOSS_SETTINGS)


@META_ARCH_REGISTRY.register()
class FCOSPlain(PointDetector):
    """
    Plain FCOS: centerness branch on the cls tower, focal loss, centerness-weighted IoU loss,
    no centre sampling (unless ``center_sampling_radius`` > 0), score = cls x ctr.
    """

    @configurable
    def __init__(
        self,
        *,
        focal_loss_alpha=_DEFAULTS["focal_loss_alpha"],
        focal_loss_gamma=_DEFAULTS["focal_loss_gamma"],
        **kwargs,
    ):
        """
        Args:
            focal_loss_alpha, focal_loss_gamma: sigmoid focal loss parameters.
            kwargs: arguments of :class:`PointDetector` (backbone, head, head_in_features,
                num_classes, regress_ranges, center_sampling_radius, loss weights and box
                loss, inference settings, pixel_mean, pixel_std, input_format); ``head``
                returns (logits, distances in pixels, centerness logits).
        """
        super().__init__(**kwargs)
        self.focal_loss_alpha = focal_loss_alpha
        self.focal_loss_gamma = focal_loss_gamma

    @classmethod
    def from_config(cls, cfg):
        return point_detector_arguments(cfg, "FCOSPlain", centerness=True)

    def forward_training(self, images, features, predictions, gt_instances):
        pred_logits, pred_dists, pred_ctr = self._transpose_dense_predictions(
            predictions, [self.num_classes, 4, 1]
        )
        anchors = self.anchor_generator(features)
        labels, ctr_targets, matched_boxes = self.label_points(anchors, gt_instances)
        return self.losses(
            anchors, pred_logits, pred_dists, pred_ctr, labels, ctr_targets, matched_boxes
        )

    @torch.no_grad()
    def label_points(self, anchors: List[Boxes], gt_instances: List[Instances]):
        """
        FCOS's hard labels of every point of every image (``fcos_targets.py``).

        Args:
            anchors: per level, Boxes ``[Pi, 4]`` whose centres are the points.
            gt_instances: N Instances with ``gt_boxes`` and ``gt_classes``.

        Returns:
            labels ``[N, P]`` long (C = background), centerness targets ``[N, P]`` (0 on
            background; they play the part of DSLA's q*), matched_boxes ``[N, P, 4]``.
        """
        points, strides, ranges = level_point_info(
            [a.get_centers() for a in anchors], self.anchor_generator.strides, self.regress_ranges
        )
        per_image = [
            fcos_targets(points, strides, ranges, inst.gt_boxes.tensor, inst.gt_classes,
                         self.num_classes, center_sampling_radius=self.center_sampling_radius)
            for inst in gt_instances
        ]
        labels, matched_boxes, centerness = (torch.stack(x) for x in zip(*per_image))
        return labels, centerness, matched_boxes

    def losses(self, anchors, pred_logits, pred_dists, pred_ctr, labels, ctr_targets,
               matched_boxes):
        """
        Args:
            anchors: per level, Boxes ``[Pi, 4]``.
            pred_logits, pred_dists, pred_ctr: per level ``[N, Pi, C]``, ``[N, Pi, 4]`` and
                ``[N, Pi, 1]``.
            labels, ctr_targets, matched_boxes: outputs of :meth:`label_points`.

        Returns:
            dict with ``loss_fcos_cls``, ``loss_fcos_loc`` and ``loss_fcos_ctr`` (scalars).
        """
        num_images = labels.shape[0]
        pos = labels != self.num_classes  # [N, P]
        points = Boxes.cat(anchors).tensor.unsqueeze(0).expand(num_images, -1, -1)
        pred_boxes = self.box2box_transform.apply_deltas(cat(pred_dists, dim=1)[pos], points[pos])
        pos_ctr = ctr_targets[pos]  # [K]
        # Normalisers averaged over workers on every rank, as mmdetection's FCOS: the number of
        # positives (>= 1) and the sum of centerness targets (> 0; mmdetection clamps at 1e-6).
        num_pos = all_reduce_mean(pos.sum().float()).clamp(min=1.0)
        ctr_sum = all_reduce_mean(pos_ctr.sum().float()).clamp(min=1e-6)
        logits = cat(pred_logits, dim=1).reshape(-1, self.num_classes)
        loss_cls = focal_loss_sum(
            logits, labels.flatten(), self.focal_loss_alpha, self.focal_loss_gamma
        )
        # With no positive these are empty (zero) sums that stay connected to the graph.
        loss_box = box_iou_loss(pred_boxes, matched_boxes[pos], pos_ctr, self.box_loss_type)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            loss_ctr = F.binary_cross_entropy_with_logits(
                cat(pred_ctr, dim=1).squeeze(2)[pos].float(), pos_ctr.float(), reduction="sum"
            )
        storage = get_event_storage()
        storage.put_scalar("fcos/num_pos_per_image", pos.sum().item() / num_images)
        if pos_ctr.numel() > 0:  # the same curves as DSLA's (dsla/pos_iou_mean)
            iou = matched_pairwise_iou(Boxes(pred_boxes.detach().float()),
                                       Boxes(matched_boxes[pos].float()))
            storage.put_scalar("fcos/pos_iou_mean", iou.mean().item())
        return {
            "loss_fcos_cls": self.cls_loss_weight * loss_cls / num_pos,
            "loss_fcos_loc": self.box_loss_weight * loss_box / ctr_sum,
            "loss_fcos_ctr": loss_ctr / num_pos,
        }

    def forward_inference(self, images, features, predictions):
        pred_logits, pred_dists, pred_ctr = self._transpose_dense_predictions(
            predictions, [self.num_classes, 4, 1]
        )
        anchors = self.anchor_generator(features)
        results: List[Instances] = []
        for img_idx, image_size in enumerate(images.image_sizes):
            # FCOS's score, as mmdetection: cls probability x centerness probability, no sqrt
            # (detectron2's FCOS takes the square root).
            scores = [x[img_idx].sigmoid() * y[img_idx].sigmoid() for x, y in zip(pred_logits,
                                                                                  pred_ctr)]
            dists = [x[img_idx] for x in pred_dists]
            results.append(self.inference_single_image(anchors, scores, dists, image_size))
        return results


def focal_loss_sum(logits, labels, alpha: float, gamma: float):
    """
    Sigmoid focal loss (Lin et al., ICCV 2017) with one-hot targets, un-normalised, in float32
    even under autocast.

    Args:
        logits: ``[P, C]`` class logits.
        labels: ``[P]`` long, target class; C = background (all-zero target row).
        alpha, gamma: focal loss parameters.

    Returns:
        Tensor: scalar float32 sum over all P x C entries.
    """
    num_classes = logits.shape[1]
    targets = F.one_hot(labels, num_classes + 1)[:, :num_classes]
    # fvcore's focal loss casts its inputs to float32 itself, so autocast cannot lower it.
    return sigmoid_focal_loss(logits, targets, alpha, gamma, reduction="sum")
