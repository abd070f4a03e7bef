"""Dynamic smooth label assignment (DSLA spec §3) as pure, vectorised tensor functions.

Shape letters used in this module:
    P: points of one image, all FPN levels concatenated level by level
    G: ground-truth boxes of the image
    C: ground-truth boxes in one chunk (C <= chunk size)

Every point p is scored against every box g with the smooth label q(p, g) = ctr · scale_score
(spec §3.6); a point takes the box with the largest q (spec §3.7). Boxes are processed in chunks
so that the [C, P] intermediates stay small however crowded the image is.
"""
import math
from typing import Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["BOX_CHUNK_SIZE", "assign_smooth_labels", "level_point_info", "pairwise_smooth_labels"]

# Boxes per chunk: with ~20k points each [C, P] temporary stays at ~2.5 MB whatever G is. Larger
# chunks were no faster on CPU; smaller ones mean more (GPU: kernel-launch bound) iterations.
BOX_CHUNK_SIZE = 32


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
        regress_ranges (list[tuple[float, float]]): L (lo, hi) ranges, one per level (spec §2).

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
    Assign each point its target box, class and smooth label q* (spec §3).

    Args:
        points (Tensor[P, 2]): (x, y) of every point, float.
        strides (Tensor[P]): stride of each point's level.
        regress_ranges (Tensor[P, 2]): (lo, hi) regress range of each point's level.
        gt_boxes (Tensor[G, 4]): ground-truth boxes, xyxy. G may be 0.
        gt_classes (Tensor[G]): long class of each box, in [0, num_classes).
        num_classes (int): number of foreground classes; also the background label.
        relaxation_factor (float): interval relaxation f (spec §3.5); 0 turns it off.
        core_zone (bool): give ctr = 1 to points within half a stride of the box centre (§3.4).
        center_sampling_radius (float): centre sampling radius R in strides; 0 turns it off (§3.2).

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
    The smooth label q(p, g) of every (box, point) pair (spec §3.1-§3.6), before the per-point
    choice of §3.7. Not chunked: memory is O(G x P); for training use
    :func:`assign_smooth_labels`. Used by the FCOS baseline (which picks boxes by area, not q)
    and by the assignment visualisation.

    Args:
        points, strides, regress_ranges, gt_boxes, relaxation_factor, core_zone,
        center_sampling_radius: as in :func:`assign_smooth_labels`.

    Returns:
        Tensor[G, P]: q(p, g) in [0, 1], 0 where p is not a positive of g.
    """
    dtype = points.dtype
    if gt_boxes.shape[0] == 0:
        return points.new_zeros((0, points.shape[0]))
    ranges = _relaxed_ranges(regress_ranges.to(dtype).t().contiguous(), relaxation_factor)
    return _smooth_labels(points.t().contiguous(), strides.to(dtype)[None, :], ranges,
                          gt_boxes.to(dtype), core_zone, center_sampling_radius)


def _assign_in_chunks(points, strides, regress_ranges, gt_boxes, gt_classes, num_classes, *,
                      relaxation_factor, core_zone, center_sampling_radius, chunk_size):
    """
    :func:`assign_smooth_labels` with the chunk size as an argument. Results do not depend on
    ``chunk_size``: a running best (q, area, index) is kept across chunks, and a later chunk only
    replaces it with a strictly better (q, -area), so equal candidates keep the lower box index.
    """
    num_points = points.shape[0]
    dtype, device = points.dtype, points.device
    best_q = torch.full((num_points,), -1.0, dtype=dtype, device=device)
    best_area = torch.full((num_points,), math.inf, dtype=dtype, device=device)
    best_idx = torch.zeros(num_points, dtype=torch.long, device=device)
    if gt_boxes.shape[0] > 0:
        # Internally pairs are laid out [C, P]: the long point axis is the contiguous one, which
        # lets the elementwise kernels vectorise (a short inner box axis is several times slower).
        ranges = _relaxed_ranges(regress_ranges.to(dtype).t().contiguous(), relaxation_factor)
        points_t = points.t().contiguous()
        strides = strides.to(dtype)[None, :]
        boxes = gt_boxes.to(dtype)
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        for start in range(0, boxes.shape[0], chunk_size):
            chunk = slice(start, start + chunk_size)
            q = _smooth_labels(points_t, strides, ranges, boxes[chunk], core_zone,
                               center_sampling_radius)
            q_c, area_c, idx_c = _best_box_per_point(q, areas[chunk])
            better = (q_c > best_q) | ((q_c == best_q) & (area_c < best_area))
            best_q = torch.where(better, q_c, best_q)
            best_area = torch.where(better, area_c, best_area)
            best_idx = torch.where(better, idx_c + start, best_idx)
    return _gather_targets(best_q, best_idx, gt_boxes, gt_classes, num_classes)


def _relaxed_ranges(regress_ranges: Tensor, relaxation_factor: float) -> Tuple[Tensor, ...]:
    """
    Args:
        regress_ranges (Tensor[2, P]): (lo, hi) per point, transposed.
        relaxation_factor (float): f.

    Returns:
        lo, hi, rlo, rhi: four Tensor[1, P] in the dtype of ``regress_ranges``.
    """
    lo, hi = regress_ranges[0:1], regress_ranges[1:2]
    if relaxation_factor <= 0:
        # Relaxation off: empty ramps, i.e. the hard 0/1 range test (spec §3.5).
        return lo, hi, lo, hi
    # Spec §3.5 uses Python int() of a double product (64 * 0.8 -> 51); float64 + trunc matches it
    # exactly, float32 does not always (90 * 0.7 is 62.99.. in float64 but 63.0 in float32).
    f = float(relaxation_factor)
    rlo = torch.trunc(lo.double() * (1.0 - f)).to(lo.dtype)
    rhi = torch.trunc(hi.double() * (1.0 + f)).to(hi.dtype)
    return lo, hi, rlo, rhi


def _smooth_labels(points, strides, ranges, boxes, core_zone, center_sampling_radius):
    """
    Args:
        points (Tensor[2, P]): transposed points. strides (Tensor[1, P]).
        ranges: output of :func:`_relaxed_ranges`. boxes (Tensor[C, 4]).
        core_zone (bool), center_sampling_radius (float).

    Returns:
        Tensor[C, P]: q(p, g) = ctr · scale_score (spec §3.6), 0 where p is not inside g.
    """
    x, y = points[0:1], points[1:2]
    x0, y0, x1, y1 = boxes[:, 0:1], boxes[:, 1:2], boxes[:, 2:3], boxes[:, 3:4]
    left, top, right, bottom = x - x0, y - y0, x1 - x, y1 - y
    inside = _inside_mask(x, y, boxes, left, top, right, bottom, strides, center_sampling_radius)
    ctr = _centerness(left, top, right, bottom)
    if core_zone:
        # Spec §3.4: a box whose centre falls between points would otherwise get only tiny
        # labels; the points nearest its centre get ctr = 1.
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        half = strides / 2
        core = ((x - cx).abs() <= half) & ((y - cy).abs() <= half)
        ctr.masked_fill_(core, 1.0)
    # Spec §3.5: the measure is max of the raw distances, whether or not p is inside g.
    m = torch.maximum(torch.maximum(left, top), torch.maximum(right, bottom))
    return torch.where(inside, ctr.mul_(_scale_score(m, ranges)), 0.0)


def _inside_mask(x, y, boxes, left, top, right, bottom, strides, radius) -> Tensor:
    """
    Spec §3.2, strict inside test. x, y (Tensor[1, P]); boxes (Tensor[C, 4]); left..bottom
    (Tensor[C, P]); strides (Tensor[1, P]); radius (float). Returns a bool Tensor[C, P].
    """
    if radius > 0:
        # Centre sampling: the box [cx - R·s, cy - R·s, cx + R·s, cy + R·s] clipped to g.
        x0, y0, x1, y1 = boxes[:, 0:1], boxes[:, 1:2], boxes[:, 2:3], boxes[:, 3:4]
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        reach = strides * radius
        left = x - torch.maximum(cx - reach, x0)
        top = y - torch.maximum(cy - reach, y0)
        right = torch.minimum(cx + reach, x1) - x
        bottom = torch.minimum(cy + reach, y1) - y
    return torch.minimum(torch.minimum(left, top), torch.minimum(right, bottom)) > 0


def _centerness(left, top, right, bottom) -> Tensor:
    """Spec §3.3, Tensor[C, P] each -> Tensor[C, P]; clamps keep it finite at and off the edges."""
    lr = torch.minimum(left, right).clamp_(min=0).div_(torch.maximum(left, right).clamp_(min=0.01))
    tb = torch.minimum(top, bottom).clamp_(min=0).div_(torch.maximum(top, bottom).clamp_(min=0.01))
    return lr.mul_(tb).sqrt_()


def _scale_score(m: Tensor, ranges) -> Tensor:
    """
    Spec §3.5: 1 on [lo, hi], linear ramps to 0 at rlo and rhi, 0 outside [rlo, rhi].

    Args:
        m (Tensor[C, P]): max(l, t, r, b).
        ranges: (lo, hi, rlo, rhi), each Tensor[1, P].

    Returns:
        Tensor[C, P] in [0, 1].
    """
    lo, hi, rlo, rhi = ranges
    # The ramps are negative beyond rlo / rhi, so clamping at 0 gives the "0 outside" case.
    below = (m - rlo).div_((lo - rlo).clamp(min=0.01)).clamp_(min=0)
    above = (rhi - m).div_((rhi - hi).clamp(min=0.01)).clamp_(min=0)
    # m > hi implies m >= lo, so `below` may hold the plateau value 1 for all m >= lo.
    return torch.where(m > hi, above, below.masked_fill_(m >= lo, 1.0))


def _best_box_per_point(q: Tensor, areas: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """
    Per point, the box with the largest q; ties go to the smaller area, then the lower index
    (spec §3.7), without sorting.

    Args:
        q (Tensor[C, P]): smooth labels. areas (Tensor[C]): box areas.

    Returns:
        q (Tensor[P]), area (Tensor[P]), index into the C boxes (Tensor[P] long).
    """
    best_q = q.max(dim=0).values
    tied_areas = torch.where(q == best_q[None, :], areas[:, None], math.inf)
    # min(dim) returns the first minimal index, i.e. the lower box index among equal areas.
    best_area, best_idx = tied_areas.min(dim=0)
    return best_q, best_area, best_idx


def _gather_targets(best_q, best_idx, gt_boxes, gt_classes, num_classes):
    """
    Turn the per-point best (q*, index) into (labels, scores, matched_boxes); q* <= 0 is
    background (spec §3.7-§3.8). best_q, best_idx: Tensor[P]. Shapes as in assign_smooth_labels.
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
