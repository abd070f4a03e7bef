"""The DSLA meta-architecture: smooth label assignment + dynamic IoU coupling + QFL/IoU losses
(docs/METHOD.md walks through the computation).

Shape letters (docs/METHOD.md, "Shape letters"): N images, L levels, Pi points of level i,
P points of all levels of one image, C classes, G ground-truth boxes of one image,
K positive points of the batch, D detections of one image.
"""
from typing import List

import torch

from detectron2.config import configurable
from detectron2.layers import batched_nms, cat
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.box_regression import Box2BoxTransformLinear
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.structures import Boxes, Instances
from detectron2.structures.boxes import matched_pairwise_iou
from detectron2.utils.events import get_event_storage

from .assignment import assign_smooth_labels, level_point_info
from .config import dsla_arguments_from_config, validate_dsla_arguments, validate_dsla_config
from .cpu_memory import keep_freed_memory
from .head import DSLAHead
from .losses import all_reduce_mean, box_iou_loss, quality_focal_loss
from .points import grid_anchors, grid_sizes, point_generator

__all__ = ["DSLA"]


@META_ARCH_REGISTRY.register()
class DSLA(DenseDetector):
    """
    DSLA (Su et al., Pattern Recognition 2022): an FCOS-like detector without centerness whose
    classification target is the smooth label q* coupled with the predicted box's IoU.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone,
        head,
        head_in_features,
        num_classes,
        regress_ranges,
        smooth_label=True,
        relaxation_factor=0.2,
        core_zone=True,
        center_sampling_radius=0.0,
        iou_coupling="on",
        qfl_beta=2.0,
        cls_loss_weight=1.0,
        box_loss_type="iou",
        box_loss_weight=1.0,
        test_score_thresh=0.05,
        test_topk_candidates=1000,
        test_nms_thresh=0.6,
        max_detections_per_image=100,
        pixel_mean,
        pixel_std,
        input_format="BGR",
    ):
        """
        Args:
            backbone, head, head_in_features, pixel_mean, pixel_std: as in
                :class:`DenseDetector`; ``head`` returns (logits, distances in pixels).
            num_classes: C.
            regress_ranges: one (lo, hi) per head input feature (docs/METHOD.md, "Points").
            smooth_label: False turns q* into 1 on positive points (hard labels, ablation).
            relaxation_factor, core_zone, center_sampling_radius: assignment switches
                (docs/METHOD.md, "Smooth label assignment").
            iou_coupling: "on" (y = IoU * q*), "off" (y = q*) or "iou_only" (y = IoU)
                (docs/METHOD.md, "IoU coupling").
            qfl_beta, cls_loss_weight, box_loss_type, box_loss_weight: losses
                (docs/METHOD.md, "Losses").
            test_score_thresh, test_topk_candidates, test_nms_thresh,
            max_detections_per_image: inference (docs/METHOD.md, "Inference").
            input_format: channel order of input images, used for visualisation.

        Raises:
            UserError: for a setting out of its range, naming the argument (the config path
                checks the same settings first, naming the config key).
        """
        settings = dict(locals())
        validate_dsla_arguments(
            settings, {k: v.stride for k, v in backbone.output_shape().items()})
        super().__init__(
            backbone, head, head_in_features, pixel_mean=pixel_mean, pixel_std=pixel_std
        )
        self.num_classes = num_classes
        self.anchor_generator = point_generator(
            [backbone.output_shape()[f].stride for f in self.head_in_features])
        self.box2box_transform = Box2BoxTransformLinear(normalize_by_size=False)
        self.regress_ranges = [tuple(float(v) for v in r) for r in regress_ranges]
        self.smooth_label = smooth_label
        self.relaxation_factor = relaxation_factor
        self.core_zone = core_zone
        self.center_sampling_radius = center_sampling_radius
        self.iou_coupling = iou_coupling
        self.qfl_beta = qfl_beta
        self.cls_loss_weight = cls_loss_weight
        self.box_loss_type = box_loss_type
        self.box_loss_weight = box_loss_weight
        self.test_score_thresh = test_score_thresh
        self.test_topk_candidates = test_topk_candidates
        self.test_nms_thresh = test_nms_thresh
        self.max_detections_per_image = max_detections_per_image
        self.input_format = input_format

    @classmethod
    def from_config(cls, cfg):
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        validate_dsla_config(cfg, {k: v.stride for k, v in shapes.items()})
        return {
            "backbone": backbone,
            "head": cls.build_head(cfg, [shapes[f] for f in cfg.MODEL.DSLA.IN_FEATURES]),
            **dsla_arguments_from_config(cfg),
            "input_format": cfg.INPUT.FORMAT,
        }

    @classmethod
    def build_head(cls, cfg, input_shape):
        """The head of :meth:`from_config` (a hook for subclasses that add branches)."""
        return DSLAHead(cfg, input_shape)

    def forward(self, batched_inputs):
        """
        :meth:`DenseDetector.forward`; on a CPU, first sets the process's allocator to keep
        freed memory (:func:`dsla.cpu_memory.keep_freed_memory`): values are unchanged.
        """
        if self.device.type == "cpu":
            keep_freed_memory()
        return super().forward(batched_inputs)

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
