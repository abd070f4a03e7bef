"""The DSLA meta-architecture: smooth label assignment + dynamic IoU coupling + QFL/IoU losses
(docs/METHOD.md walks through the computation).

Shape letters (docs/METHOD.md, "Shape letters"): N images, L levels, Pi points of level i,
P points of all levels of one image, C classes, G ground-truth boxes of one image,
K positive points of the batch, D detections of one image.
"""
from typing import List

import torch

from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import Boxes, Instances
from detectron2.structures.boxes import matched_pairwise_iou
from detectron2.utils.events import get_event_storage

from .assignment import assign_smooth_labels, level_point_info
from .config import DSLA_METHOD_SETTINGS, defaults, validate_arguments
from .losses import all_reduce_mean, box_iou_loss, quality_focal_loss
from .point_detector import PointDetector, point_detector_arguments
from .points import grid_anchors, grid_sizes

__all__ = ["DSLA"]


# Defaults of the constructor's optional arguments: the config's (dsla.config.DSLA_METHOD_SETTINGS).
_DEFAULTS = defaults(DSLA_METHOD_SETTINGS)


@META_ARCH_REGISTRY.register()
class DSLA(PointDetector):
    """
    DSLA (Su et al., Pattern Recognition 2022): an FCOS-like detector without centerness whose
    classification target is the smooth label q* coupled with the predicted box's IoU.
    """

    @configurable
    def __init__(
        self,
        *,
        smooth_label=_DEFAULTS["smooth_label"],
        relaxation_factor=_DEFAULTS["relaxation_factor"],
        core_zone=_DEFAULTS["core_zone"],
        iou_coupling=_DEFAULTS["iou_coupling"],
        qfl_beta=_DEFAULTS["qfl_beta"],
        **kwargs,
    ):
        """
        Args:
            smooth_label: False turns q* into 1 on positive points (hard labels, ablation).
            relaxation_factor, core_zone: assignment switches (docs/METHOD.md, "Smooth label
                assignment"; the third, ``center_sampling_radius``, is in ``kwargs``).
            iou_coupling: "on" (y = IoU * q*), "off" (y = q*) or "iou_only" (y = IoU)
                (docs/METHOD.md, "IoU coupling").
            qfl_beta: Quality Focal Loss exponent (docs/METHOD.md, "Losses").
            kwargs: arguments of :class:`PointDetector` (backbone, head, head_in_features,
                num_classes, regress_ranges, center_sampling_radius, loss weights and box
                loss, inference settings, pixel_mean, pixel_std, input_format); ``head``
                returns (logits, distances in pixels).

        Raises:
            UserError: for a setting out of its range, naming the argument (the config path
                checks the same settings first, naming the config key).
        """
        validate_arguments(dict(locals()), detector="DSLA")
        super().__init__(**kwargs)
        self.smooth_label = smooth_label
        self.relaxation_factor = relaxation_factor
        self.core_zone = core_zone
        self.iou_coupling = iou_coupling
        self.qfl_beta = qfl_beta

    @classmethod
    def from_config(cls, cfg):
        return point_detector_arguments(cfg, "DSLA")

    def forward_training(self, images, features, predictions, gt_instances):
        pred_logits, pred_dists = self._transpose_dense_predictions(
            predictions, [self.num_classes, 4]
        )
        anchors = self.anchor_generator(features)
        labels, scores, matched_boxes = self.label_points(anchors, gt_instances)
        get_event_storage().put_scalar(
            "dsla/num_gt_per_image", sum(len(x) for x in gt_instances) / len(gt_instances))
        return self.losses(anchors, pred_logits, pred_dists, labels, scores, matched_boxes)

    @torch.no_grad()
    def label_points(self, anchors: List[Boxes], gt_instances: List[Instances]):
        """
        Smooth label assignment (docs/METHOD.md, "Smooth label assignment") of every point of
        every image.

        Args:
            anchors: L Boxes ``[Pi, 4]`` whose centres are the points.
            gt_instances: N Instances with ``gt_boxes`` and ``gt_classes``.

        Returns:
            labels ``[N, P]`` long (C = background), scores ``[N, P]`` (q*),
            matched_boxes ``[N, P, 4]`` (xyxy of g*).
        """
        points, strides, ranges = level_point_info(
            [a.get_centers() for a in anchors], self.anchor_generator.strides, self.regress_ranges
        )
        per_image = [
            assign_smooth_labels(
                points, strides, ranges, inst.gt_boxes.tensor, inst.gt_classes, self.num_classes,
                relaxation_factor=self.relaxation_factor, core_zone=self.core_zone,
                center_sampling_radius=self.center_sampling_radius,
            )
            for inst in gt_instances
        ]
        labels, scores, matched_boxes = (torch.stack(x) for x in zip(*per_image))
        if not self.smooth_label:
            scores = (labels != self.num_classes).to(scores.dtype)
        return labels, scores, matched_boxes

    @torch.no_grad()
    def smooth_label_maps(self, image_size, gt_instances: Instances) -> List[torch.Tensor]:
        """
        The training targets q* of one image as pictures: :meth:`label_points` on the points
        that fall on the image, level by level.

        Args:
            image_size: (H, W) of the image the boxes are in (as the model sees it).
            gt_instances: Instances with ``gt_boxes`` ``[G, 4]`` and ``gt_classes`` ``[G]``.

        Returns:
            L tensors ``[Hi, Wi]`` with Hi = ceil(H / s), Wi = ceil(W / s): q* of the point
            (j·s, i·s) at [i, j] (1 on positives when ``smooth_label`` is False).
        """
        sizes = grid_sizes(image_size, self.anchor_generator.strides)
        anchors = grid_anchors(self.anchor_generator, sizes)
        _, scores, _ = self.label_points(anchors, [gt_instances.to(self.device)])
        maps = scores[0].split([h * w for h, w in sizes])
        return [q.reshape(h, w) for q, (h, w) in zip(maps, sizes)]

    @torch.no_grad()
    def classification_targets(self, pred_boxes, gt_boxes, smooth_labels):
        """
        Dynamic IoU coupling (docs/METHOD.md, "IoU coupling"): the cls target of each positive
        point.

        Args:
            pred_boxes, gt_boxes: ``[K, 4]`` xyxy predicted boxes and their g*.
            smooth_labels: ``[K]`` q*.

        Returns:
            ``[K]`` targets y (IoU * q*, q* or IoU), and ``[K]`` IoU (gradient stopped).
        """
        iou = matched_pairwise_iou(Boxes(pred_boxes.detach().float()), Boxes(gt_boxes.float()))
        iou = iou.clamp(min=0.0, max=1.0)
        if self.iou_coupling == "on":
            return iou * smooth_labels, iou
        if self.iou_coupling == "off":
            return smooth_labels.clone(), iou
        return iou, iou

    def losses(self, anchors, pred_logits, pred_dists, labels, scores, matched_boxes):
        """
        Args:
            anchors: L Boxes ``[Pi, 4]``.
            pred_logits: L tensors ``[N, Pi, C]``; pred_dists: L tensors ``[N, Pi, 4]``.
            labels, scores, matched_boxes: outputs of :meth:`label_points`.

        Returns:
            dict with ``loss_dsla_cls`` and ``loss_dsla_box`` (scalars).
        """
        num_images = labels.shape[0]
        pos = labels != self.num_classes  # [N, P]; q* > 0 exactly there
        points = Boxes.cat(anchors).tensor.unsqueeze(0).expand(num_images, -1, -1)
        pred_boxes = self.box2box_transform.apply_deltas(cat(pred_dists, dim=1)[pos], points[pos])
        gt_boxes, smooth_labels = matched_boxes[pos], scores[pos]
        cls_y, iou = self.classification_targets(pred_boxes, gt_boxes, smooth_labels)
        cls_targets = torch.zeros_like(scores)
        cls_targets[pos] = cls_y

        # Normalisers (docs/METHOD.md, "Losses"): sums of soft labels averaged over workers, on
        # every rank whether or not it has positives, so that the collective never deadlocks.
        cls_norm = all_reduce_mean(cls_y.sum().float()).clamp(min=1.0)
        box_norm = all_reduce_mean(smooth_labels.sum().float()).clamp(min=1.0)
        logits = cat(pred_logits, dim=1)
        loss_cls = quality_focal_loss(
            logits.reshape(-1, self.num_classes), labels.flatten(), cls_targets.flatten(),
            beta=self.qfl_beta,
        )
        # With no positive the sum is an empty (zero) sum that is still connected to the graph.
        loss_box = box_iou_loss(pred_boxes, gt_boxes, smooth_labels, self.box_loss_type)

        self._log_target_statistics(pos, iou, smooth_labels, cls_y)
        return {
            "loss_dsla_cls": self.cls_loss_weight * loss_cls / cls_norm,
            "loss_dsla_box": self.box_loss_weight * loss_box / box_norm,
        }

    @staticmethod
    def _log_target_statistics(pos, iou, smooth_labels, cls_targets):
        """
        Training curves of the targets (``metrics.json``, TensorBoard): positive points per
        image, and the mean over positives of the IoU of their predicted box, of q* and of the
        classification target (IoU x q* with coupling on).

        Args:
            pos: ``[N, P]`` bool; iou, smooth_labels, cls_targets: ``[K]``.
        """
        storage = get_event_storage()
        storage.put_scalar("dsla/num_pos_per_image", pos.sum().item() / pos.shape[0])
        if iou.numel() > 0:
            storage.put_scalar("dsla/pos_iou_mean", iou.mean().item())
            storage.put_scalar("dsla/pos_q_mean", smooth_labels.mean().item())
            storage.put_scalar("dsla/pos_cls_target_mean", cls_targets.mean().item())

    def forward_inference(self, images, features, predictions):
        pred_logits, pred_dists = self._transpose_dense_predictions(
            predictions, [self.num_classes, 4]
        )
        anchors = self.anchor_generator(features)
        results: List[Instances] = []
        for img_idx, image_size in enumerate(images.image_sizes):
            # sigmoid(logits) is the final score: no centerness product (docs/METHOD.md,
            # "Inference").
            scores = [x[img_idx].sigmoid() for x in pred_logits]
            dists = [x[img_idx] for x in pred_dists]
            results.append(self.inference_single_image(anchors, scores, dists, image_size))
        return results
