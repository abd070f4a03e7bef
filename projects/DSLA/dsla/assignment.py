"""Dynamic smooth label assignment (docs/METHOD.md, "Smooth label assignment") as pure,
vectorised tensor functions.

Shape letters (docs/METHOD.md, "Shape letters"): L levels, Pi points of level i, P points of one
image (all levels, level by level), G ground-truth boxes of the image, E candidate (box, point)
pairs, i.e. pairs whose point passes the inside test; a chunk holds at most BOX_CHUNK_SIZE boxes.

Every point p is scored against every box g with the smooth label q(p, g) = ctr · scale_score;
a point takes the box with the largest q. Only the strict inside test is evaluated densely, on
[chunk, P] boolean masks for chunks of boxes (bounded memory however crowded the image); the
rest of the math runs on the E candidate pairs, which are few because a box covers a small part
of the image, and the per-point choice is a scatter-reduction.
"""
from typing import Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["BOX_CHUNK_SIZE", "assign_smooth_labels", "level_point_info", "pairwise_smooth_labels"]

# Boxes per chunk of the dense inside test: with ~26k points (800x1333) a [chunk, P] bool mask is
# ~0.4 MB, so the dense part stays small whatever G is.
BOX_CHUNK_SIZE = 16


def level_point_info(
    points_per_level: Sequence[Tensor],
    strides: Sequence[int],
    regress_ranges: Sequence[Tuple[float, float]],
) -> Tuple[Tensor, Tensor, Tensor]:
    """
    Concatenate the points of all levels with each point's stride and regress range.

    Args:
        points_per_level (list[Tensor]): L tensors of shape [Pi, 2], the (x, y) of level i's points.
        strides (list[int]): L strides, one per level.
        regress_ranges (list[tuple[float, float]]): L (lo, hi) ranges, one per level
            (docs/METHOD.md, "Points").

    Returns:
        points (Tensor[P, 2]), strides (Tensor[P]), regress_ranges (Tensor[P, 2]) with
        P = sum(Pi), all with the dtype and device of ``points_per_level``.
    """
    assert len(points_per_level) == len(strides) == len(regress_ranges), (
        len(points_per_level), len(strides), len(regress_ranges))
    points = torch.cat(list(points_per_level), dim=0)
    # One loop iteration per FPN level (5), not per point.
    point_strides = torch.cat(
        [p.new_full((len(p),), float(s)) for p, s in zip(points_per_level, strides)])
    point_ranges = torch.cat(
        [p.new_tensor([float(lo), float(hi)]).expand(len(p), 2)
         for p, (lo, hi) in zip(points_per_level, regress_ranges)])
    return points, point_strides, point_ranges


@torch.no_grad()
def assign_smooth_labels(points, strides, regress_ranges, gt_boxes, gt_classes, num_classes, *,
                         relaxation_factor=0.2, core_zone=True, center_sampling_radius=0.0):
    """
    Assign each point its target box, class and smooth label q* (docs/METHOD.md, "Smooth label
    assignment").

    Args:
        points (Tensor[P, 2]): (x, y) of every point, float.
        strides (Tensor[P]): stride of each point's level.
        regress_ranges (Tensor[P, 2]): (lo, hi) regress range of each point's level.
        gt_boxes (Tensor[G, 4]): ground-truth boxes, xyxy. G may be 0.
        gt_classes (Tensor[G]): long class of each box, in [0, num_classes).
        num_classes (int): number of foreground classes; also the background label.
        relaxation_factor (float): interval relaxation f ("Scale score"); 0 turns it off.
        core_zone (bool): give ctr = 1 to points within half a stride of the box centre
            ("Core zone").
        center_sampling_radius (float): centre sampling radius R in strides; 0 turns it off
            ("Inside test").

    Returns:
        labels (Tensor[P] long): class of g*, or ``num_classes`` for background (q* = 0).
        scores (Tensor[P]): the smooth label q* in [0, 1]; 0 for background.
        matched_boxes (Tensor[P, 4]): g* in xyxy; zeros for background.
    """
    return _assign_in_chunks(
        points, strides, regress_ranges, gt_boxes, gt_classes, num_classes,
        relaxation_factor=relaxation_factor, core_zone=core_zone,
        center_sampling_radius=center_sampling_radius, chunk_size=BOX_CHUNK_SIZE)


@torch.no_grad()
def pairwise_smooth_labels(points, strides, regress_ranges, gt_boxes, *, relaxation_factor=0.2,
                           core_zone=True, center_sampling_radius=0.0):
    """
    The smooth label q(p, g) of every (box, point) pair, before the per-point choice of a box
    (docs/METHOD.md, "Choice of box"). Dense output, memory O(G x P): for training use
    :func:`assign_smooth_labels`.
    Used by the FCOS baseline (which picks boxes by area, not q) and the visualisation.

    Args:
        points, strides, regress_ranges, gt_boxes, relaxation_factor, core_zone,
        center_sampling_radius: as in :func:`assign_smooth_labels`.

    Returns:
        Tensor[G, P]: q(p, g) in [0, 1], 0 where p is not a positive of g.
    """
    boxes = gt_boxes.to(points.dtype)
    q = points.new_zeros((boxes.shape[0], points.shape[0]))
    if boxes.shape[0] > 0:
        g_idx, p_idx = _candidate_pairs(points, strides, boxes, center_sampling_radius,
                                        BOX_CHUNK_SIZE)
        q[g_idx, p_idx] = _pair_smooth_labels(points, strides, regress_ranges, boxes, g_idx,
                                              p_idx, relaxation_factor, core_zone)
    return q


def _assign_in_chunks(points, strides, regress_ranges, gt_boxes, gt_classes, num_classes, *,
                      relaxation_factor, core_zone, center_sampling_radius, chunk_size):
    """
    :func:`assign_smooth_labels` with the chunk size of the dense inside test as an argument;
    results do not depend on it.
    """
    num_points = points.shape[0]
    best_q = points.new_zeros(num_points)
    best_idx = torch.zeros(num_points, dtype=torch.long, device=points.device)
    boxes = gt_boxes.to(points.dtype)
    if boxes.shape[0] > 0:
        g_idx, p_idx = _candidate_pairs(points, strides, boxes, center_sampling_radius, chunk_size)
        q = _pair_smooth_labels(points, strides, regress_ranges, boxes, g_idx, p_idx,
                                relaxation_factor, core_zone)
        best_q, best_idx = _best_box_per_point(q, g_idx, p_idx, boxes, num_points)
    return _gather_targets(best_q, best_idx, gt_boxes, gt_classes, num_classes)


def _candidate_pairs(points, strides, boxes, radius, chunk_size) -> Tuple[Tensor, Tensor]:
    """
    Inside test (docs/METHOD.md): the (box, point) pairs whose point is strictly inside the box,
    or, with centre sampling (radius R > 0), strictly inside [cx - R·s, cy - R·s, cx + R·s,
    cy + R·s] clipped to the box (s = the point's stride).

    Args:
        points (Tensor[P, 2]), strides (Tensor[P]), boxes (Tensor[G, 4]), radius (float),
        chunk_size (int): boxes per dense [chunk, P] mask.

    Returns:
        g_idx, p_idx (Tensor[E] long): box and point index of every pair, ordered by box.
    """
    x, y = points[None, :, 0], points[None, :, 1]
    reach = strides.to(points.dtype)[None, :] * radius
    pairs = []
    for start in range(0, boxes.shape[0], chunk_size):
        x0, y0, x1, y1 = boxes[start : start + chunk_size, :, None].unbind(dim=1)
        if radius > 0:
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            x0, y0 = torch.maximum(cx - reach, x0), torch.maximum(cy - reach, y0)
            x1, y1 = torch.minimum(cx + reach, x1), torch.minimum(cy + reach, y1)
        # x - x0 > 0 <=> x > x0 exactly in floating point, so this equals min(l, t, r, b) > 0.
        inside = (x > x0) & (x < x1) & (y > y0) & (y < y1)
        g, p = inside.nonzero(as_tuple=True)
        pairs.append((g + start, p))
    return torch.cat([g for g, _ in pairs]), torch.cat([p for _, p in pairs])


def _pair_smooth_labels(points, strides, regress_ranges, boxes, g_idx, p_idx, relaxation_factor,
                        core_zone) -> Tensor:
    """
    q = ctr · scale_score of candidate pairs (whose point is inside the box): docs/METHOD.md,
    "Centerness", "Core zone", "Scale score", "Smooth label".

    Args:
        points (Tensor[P, 2]), strides (Tensor[P]), regress_ranges (Tensor[P, 2]),
        boxes (Tensor[G, 4]), g_idx / p_idx (Tensor[E]): the pairs; relaxation_factor (float),
        core_zone (bool).

    Returns:
        Tensor[E]: q of each pair.
    """
    x, y = points[p_idx].unbind(dim=1)
    x0, y0, x1, y1 = boxes[g_idx].unbind(dim=1)
    left, top, right, bottom = x - x0, y - y0, x1 - x, y1 - y
    lr = torch.minimum(left, right).clamp(min=0) / torch.maximum(left, right).clamp(min=0.01)
    tb = torch.minimum(top, bottom).clamp(min=0) / torch.maximum(top, bottom).clamp(min=0.01)
    ctr = torch.sqrt(lr * tb)
    if core_zone:
        # Core zone: a box whose centre falls between points would otherwise get only tiny
        # labels; the points within half a stride of its centre get ctr = 1.
        half = strides.to(points.dtype)[p_idx] / 2
        core = ((x - (x0 + x1) / 2).abs() <= half) & ((y - (y0 + y1) / 2).abs() <= half)
        ctr = torch.where(core, torch.ones_like(ctr), ctr)
    # Scale score: the measure is the max of the raw distances.
    m = torch.maximum(torch.maximum(left, top), torch.maximum(right, bottom))
    lo, hi, rlo, rhi = _relaxed_ranges(regress_ranges.to(points.dtype)[p_idx], relaxation_factor)
    # The ramps are negative beyond rlo / rhi, so clamping at 0 gives the "0 outside" case.
    below = ((m - rlo) / (lo - rlo).clamp(min=0.01)).clamp(min=0)
    above = ((rhi - m) / (rhi - hi).clamp(min=0.01)).clamp(min=0)
    scale = torch.where(m > hi, above, torch.where(m >= lo, torch.ones_like(m), below))
    return ctr * scale


def _relaxed_ranges(regress_ranges: Tensor, relaxation_factor: float) -> Tuple[Tensor, ...]:
    """
    Args:
        regress_ranges (Tensor[E, 2]): (lo, hi) per pair.
        relaxation_factor (float): f.

    Returns:
        lo, hi, rlo, rhi: four Tensor[E] in the dtype of ``regress_ranges``.
    """
    lo, hi = regress_ranges.unbind(dim=1)
    if relaxation_factor <= 0:
        # Relaxation off: empty ramps, i.e. the hard 0/1 range test.
        return lo, hi, lo, hi
    # The authors' code takes Python int() of a double product (64 * 0.8 -> 51); float64 + trunc
    # matches it exactly, float32 does not always (90 * 0.7 is 62.99.. in float64, 63.0 in float32).
    f = float(relaxation_factor)
    rlo = torch.trunc(lo.double() * (1.0 - f)).to(lo.dtype)
    rhi = torch.trunc(hi.double() * (1.0 + f)).to(hi.dtype)
    return lo, hi, rlo, rhi


def _best_box_per_point(q, g_idx, p_idx, boxes, num_points) -> Tuple[Tensor, Tensor]:
    """
    Choice of box (docs/METHOD.md) without sorting: per point, the largest q; among equal q the
    smaller box area; among equal areas the lower box index (three scatter-reductions).

    Args:
        q, g_idx, p_idx (Tensor[E]): pairs and their smooth labels. boxes (Tensor[G, 4]).
        num_points (int): P.

    Returns:
        best_q (Tensor[P], 0 where no pair has q > 0), best_idx (Tensor[P] long).
    """
    best_q = q.new_zeros(num_points).scatter_reduce(0, p_idx, q, "amax")
    tied = (q == best_q[p_idx]) & (q > 0)
    areas = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[g_idx]
    areas = torch.where(tied, areas, torch.full_like(areas, float("inf")))
    best_area = torch.full_like(best_q, float("inf")).scatter_reduce(0, p_idx, areas, "amin")
    tied &= areas == best_area[p_idx]
    num_boxes = boxes.shape[0]
    candidates = torch.where(tied, g_idx, torch.full_like(g_idx, num_boxes))
    best_idx = torch.full((num_points,), num_boxes, dtype=torch.long, device=q.device)
    best_idx = best_idx.scatter_reduce(0, p_idx, candidates, "amin")
    return best_q, best_idx.clamp(max=num_boxes - 1)


def _gather_targets(best_q, best_idx, gt_boxes, gt_classes, num_classes):
    """
    Turn the per-point best (q*, index) into (labels, scores, matched_boxes); q* <= 0 is
    background (docs/METHOD.md, "Choice of box"). best_q, best_idx: Tensor[P]. Shapes as in
    assign_smooth_labels.
    """
    positive = best_q > 0
    num_points = best_q.shape[0]
    if gt_boxes.shape[0] == 0:
        labels = torch.full((num_points,), num_classes, dtype=torch.long, device=best_q.device)
        boxes = gt_boxes.new_zeros((num_points, 4))
        return labels, best_q.new_zeros(num_points), boxes
    labels = torch.where(positive, gt_classes[best_idx].long(), num_classes)
    scores = torch.where(positive, best_q, torch.zeros_like(best_q))
    boxes = gt_boxes[best_idx]
    boxes = torch.where(positive[:, None], boxes, torch.zeros_like(boxes))
    return labels, scores, boxes
