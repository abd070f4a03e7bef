"""FCOS labelling (Tian et al., "FCOS: Fully Convolutional One-Stage Object Detection", ICCV 2019,
Sec. 3.1-3.3): the hard assignment that plain FCOS trains with and that DSLA's smooth labels
replace. Shared by the two FCOS baselines (``fcos_plain.py`` and ``fcos_detectron2.py``);
DSLA's own assignment lives in ``dsla/assignment.py``.

Shape letters: P = points of one image, all levels concatenated level by level;
G = ground-truth boxes of the image.

For a point p = (x, y) of a level with stride s and regress range [lo, hi], and a box g with
distances l = x - x0, t = y - y0, r = x1 - x, b = y1 - y:

- (p, g) is a positive pair when p is strictly inside g (min(l, t, r, b) > 0) -- or, with a
  centre-sampling radius R > 0, strictly inside g's centre region [cx - R s, cx + R s] x
  [cy - R s, cy + R s] clipped to g -- and lo <= max(l, t, r, b) <= hi;
- p's target is the smallest positive box (the lowest index among equal areas), with that box's
  class; a point without positive box is background;
- the centerness target of a positive point is sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)).
"""
from typing import Tuple

import torch
from torch import Tensor

from detectron2.structures import Boxes, pairwise_point_box_distance

__all__ = ["fcos_match_quality", "fcos_targets", "centerness_targets"]


@torch.no_grad()
def fcos_match_quality(points, strides, regress_ranges, gt_boxes, *,
                       center_sampling_radius: float = 0.0) -> Tensor:
    """
    FCOS's match quality of every (box, point) pair: 0 unless the pair is positive, and among a
    point's positive boxes the larger value goes to the smaller box, so that an argmax over G
    is FCOS's choice (detectron2's ``FCOS._match_anchors`` convention).

    Args:
        points (Tensor[P, 2]): (x, y) of every point, float.
        strides (Tensor[P]): stride of each point's level.
        regress_ranges (Tensor[P, 2]): (lo, hi) of each point's level.
        gt_boxes (Tensor[G, 4]): xyxy ground-truth boxes; G may be 0.
        center_sampling_radius (float): R in strides; 0 turns centre sampling off.

    Returns:
        Tensor[G, P] float: 0 for non-positive pairs; G - (rank of the box by area, ascending,
        ties by index) >= 1 for positive pairs. Exact for any areas (no ``1e8 - area``
        rounding).
    """
    boxes = gt_boxes.to(points.dtype)
    num_boxes = boxes.shape[0]
    dists = pairwise_point_box_distance(points, Boxes(boxes)).permute(1, 0, 2)  # [G, P, 4]
    inside = dists
    if center_sampling_radius > 0:
        # Distances to the edges of the centre region clipped to g: the nearer of the region's
        # and g's edge on each side, so "strictly inside" stays min(...) > 0.
        offsets = points[None] - Boxes(boxes).get_centers()[:, None]  # [G, P, 2]
        reach = (strides.to(points.dtype) * center_sampling_radius)[None, :, None]
        inside = torch.minimum(dists, torch.cat([reach + offsets, reach - offsets], dim=2))
    measure = dists.max(dim=2).values  # max(l, t, r, b), [G, P]
    positive = (inside.min(dim=2).values > 0) & (measure >= regress_ranges[None, :, 0]) & (
        measure <= regress_ranges[None, :, 1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    rank = torch.empty(num_boxes, dtype=torch.long, device=points.device)
    rank[torch.argsort(areas, stable=True)] = torch.arange(num_boxes, device=points.device)
    return positive.to(points.dtype) * (num_boxes - rank).to(points.dtype)[:, None]


@torch.no_grad()
def fcos_targets(points, strides, regress_ranges, gt_boxes, gt_classes, num_classes: int, *,
                 center_sampling_radius: float = 0.0) -> Tuple[Tensor, Tensor, Tensor]:
    """
    FCOS's targets of every point of one image.

    Args:
        points, strides, regress_ranges, gt_boxes, center_sampling_radius: as in
            :func:`fcos_match_quality`.
        gt_classes (Tensor[G] long): class of each box, in [0, num_classes).
        num_classes (int): C; also the background label.

    Returns:
        labels (Tensor[P] long): class of the target box, ``num_classes`` for background.
        matched_boxes (Tensor[P, 4]): target box, xyxy; zeros for background.
        centerness (Tensor[P]): centerness target; 0 for background.
    """
    num_points = points.shape[0]
    labels = torch.full((num_points,), num_classes, dtype=torch.long, device=points.device)
    matched_boxes = points.new_zeros((num_points, 4))
    centerness = points.new_zeros(num_points)
    if gt_boxes.shape[0] == 0:
        return labels, matched_boxes, centerness
    quality = fcos_match_quality(points, strides, regress_ranges, gt_boxes,
                                 center_sampling_radius=center_sampling_radius)
    best, best_idx = quality.max(dim=0)
    fg = best > 0
    labels[fg] = gt_classes[best_idx[fg]].long()
    matched_boxes[fg] = gt_boxes[best_idx[fg]].to(points.dtype)
    centerness[fg] = centerness_targets(points[fg], matched_boxes[fg])
    return labels, matched_boxes, centerness


def centerness_targets(points: Tensor, boxes: Tensor) -> Tensor:
    """
    FCOS's centerness (Tian et al. 2019, Eq. 3) of points strictly inside their boxes.

    Args:
        points (Tensor[K, 2]): (x, y).
        boxes (Tensor[K, 4]): xyxy box of each point, which must contain it strictly (the
            ratios are undefined on an edge).

    Returns:
        Tensor[K]: sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)) in (0, 1].
    """
    x, y = points.unbind(dim=1)
    left_right = torch.stack([x - boxes[:, 0], boxes[:, 2] - x], dim=1)
    top_bottom = torch.stack([y - boxes[:, 1], boxes[:, 3] - y], dim=1)
    ratio_x = left_right.min(dim=1).values / left_right.max(dim=1).values
    ratio_y = top_bottom.min(dim=1).values / top_bottom.max(dim=1).values
    return torch.sqrt(ratio_x * ratio_y)
