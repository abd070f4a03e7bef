"""DSLA losses (docs/METHOD.md, "Losses") as plain functions, computed in float32 even under
autocast, as the authors' head forces float32 for its losses.

Shape letters (docs/METHOD.md, "Shape letters"): N images, P points of one image, C classes,
K positive points of the batch.
"""
import torch
import torch.nn.functional as F
from fvcore.nn import giou_loss

from detectron2.structures import Boxes
from detectron2.structures.boxes import matched_pairwise_iou
from detectron2.utils import comm

__all__ = ["quality_focal_loss", "box_iou_loss", "all_reduce_mean"]


def quality_focal_loss(logits, labels, targets, beta: float = 2.0):
    """
    Quality Focal Loss (un-normalised sum).

    Every entry is treated as a negative, ``BCE(sigmoid(z), 0) * sigmoid(z)^beta``, except the
    target-class entry of a positive point, ``BCE(sigmoid(z), y) * |y - sigmoid(z)|^beta``.

    Args:
        logits: ``[N·P, C]`` class logits of every point of the batch.
        labels: ``[N·P]`` long, target class; ``C`` (or any value outside [0, C)) = background.
        targets: ``[N·P]`` soft target y in [0, 1] for the target class (ignored for background).
        beta: focusing exponent.

    Returns:
        Tensor: scalar float32 sum over all N·P x C entries.
    """
    with torch.autocast(device_type=logits.device.type, enabled=False):
        logits = logits.float()
        num_classes = logits.shape[1]
        neg = F.binary_cross_entropy_with_logits(
            logits, torch.zeros_like(logits), reduction="none"
        ) * logits.sigmoid().pow(beta)
        pos_idx = torch.nonzero((labels >= 0) & (labels < num_classes)).squeeze(1)
        pos_cls = labels[pos_idx]
        z = logits[pos_idx, pos_cls]
        y = targets[pos_idx].float()
        pos = F.binary_cross_entropy_with_logits(z, y, reduction="none") * (
            (y - z.sigmoid()).abs().pow(beta)
        )
        # Replace the negative term of the positive entries by their positive term.
        return neg.sum() - neg[pos_idx, pos_cls].sum() + pos.sum()


def box_iou_loss(pred_boxes, target_boxes, weights, loss_type: str = "iou", eps: float = 1e-6):
    """
    Weighted IoU loss ``-log(max(IoU, eps))`` or GIoU loss ``1 - GIoU`` (un-normalised sum).

    Args:
        pred_boxes: ``[K, 4]`` xyxy predicted boxes.
        target_boxes: ``[K, 4]`` xyxy target boxes.
        weights: ``[K]`` per-box weights (the smooth labels q*).
        loss_type: "iou" or "giou".

    Returns:
        Tensor: scalar float32 ``sum(weights * loss)``.
    """
    with torch.autocast(device_type=pred_boxes.device.type, enabled=False):
        pred_boxes, target_boxes = pred_boxes.float(), target_boxes.float()
        if loss_type == "iou":
            iou = matched_pairwise_iou(Boxes(pred_boxes), Boxes(target_boxes))
            loss = -iou.clamp(min=eps).log()
        elif loss_type == "giou":
            loss = giou_loss(pred_boxes, target_boxes, reduction="none")
        else:
            raise ValueError(f"Unknown box loss type {loss_type!r}; use 'iou' or 'giou'.")
        return (loss * weights.float()).sum()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """
    Average a scalar tensor over all workers (identity with one worker).

    Every rank must call this every iteration, whether or not it has positives, or the
    collective deadlocks (docs/METHOD.md, "Losses": normalisers).
    """
    world_size = comm.get_world_size()
    if world_size > 1:
        value = value.clone()
        torch.distributed.all_reduce(value)
        value = value / world_size
    return value
