"""
A plain, loop-based smooth label assignment (docs/METHOD.md, "Smooth label assignment"), the
oracle for ``dsla.assignment.assign_smooth_labels``.

It follows the way mmdetection target code is usually written: one pass per ground-truth box
builds a column of the full [P, G] smooth-label matrix, and the per-point choice is resolved by
sorting the boxes by area and taking the first maximum. It is slow and memory-hungry on purpose
(readable first); ``tests/test_assignment.py`` checks the vectorised version against it exactly,
and ``benchmarks/assignment.py`` times the vectorised version against it (it puts tests/ on
its path for this module).

Shape letters: P = points, G = ground-truth boxes.
"""
import torch


def _relaxed_bounds(regress_ranges, relaxation_factor):
    """
    Per point relaxed range, computed with Python ``int`` per distinct level range, exactly as
    the authors' code computes it (docs/METHOD.md, "Scale score"). Returns rlo, rhi (Tensor[P])
    in the dtype of ``regress_ranges``.
    """
    lo, hi = regress_ranges[:, 0], regress_ranges[:, 1]
    if relaxation_factor <= 0:
        return lo.clone(), hi.clone()
    levels, level_of_point = torch.unique(regress_ranges, dim=0, return_inverse=True)
    relaxed = [
        [int(level_lo * (1 - relaxation_factor)), int(level_hi * (1 + relaxation_factor))]
        for level_lo, level_hi in levels.tolist()
    ]
    relaxed = torch.tensor(relaxed, dtype=regress_ranges.dtype, device=regress_ranges.device)
    relaxed = relaxed[level_of_point]
    return relaxed[:, 0], relaxed[:, 1]


def _smooth_label_one_box(points, strides, lo, hi, rlo, rhi, box, core_zone, radius):
    """q(p, g) of every point p for one box g = box (Tensor[4]). Returns Tensor[P]."""
    xs, ys = points[:, 0], points[:, 1]
    x0, y0, x1, y1 = box
    l, t, r, b = xs - x0, ys - y0, x1 - xs, y1 - ys
    dists = torch.stack([l, t, r, b], dim=1)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2

    if radius > 0:
        sx0 = torch.maximum(cx - strides * radius, x0)
        sy0 = torch.maximum(cy - strides * radius, y0)
        sx1 = torch.minimum(cx + strides * radius, x1)
        sy1 = torch.minimum(cy + strides * radius, y1)
        region = torch.stack([xs - sx0, ys - sy0, sx1 - xs, sy1 - ys], dim=1)
        inside = region.min(dim=1).values > 0
    else:
        inside = dists.min(dim=1).values > 0

    lr = torch.minimum(l, r).clamp(min=0) / torch.maximum(l, r).clamp(min=0.01)
    tb = torch.minimum(t, b).clamp(min=0) / torch.maximum(t, b).clamp(min=0.01)
    ctr = torch.sqrt(lr * tb)
    if core_zone:
        core = ((xs - cx).abs() <= strides / 2) & ((ys - cy).abs() <= strides / 2)
        ctr[core] = 1.0
    ctr[~inside] = 0.0

    m = dists.max(dim=1).values
    score = torch.zeros_like(m)
    score[(m >= lo) & (m <= hi)] = 1.0
    rising = (m >= rlo) & (m < lo)
    score[rising] = ((m - rlo) / (lo - rlo).clamp(min=0.01))[rising]
    falling = (m > hi) & (m <= rhi)
    score[falling] = ((rhi - m) / (rhi - hi).clamp(min=0.01))[falling]
    return ctr * score


@torch.no_grad()
def reference_assign_smooth_labels(points, strides, regress_ranges, gt_boxes, gt_classes,
                                   num_classes, *, relaxation_factor=0.2, core_zone=True,
                                   center_sampling_radius=0.0):
    """
    Same signature and outputs as ``dsla.assignment.assign_smooth_labels``:
    labels (Tensor[P] long, ``num_classes`` = background), scores (Tensor[P], q*),
    matched_boxes (Tensor[P, 4], zeros for background).
    """
    num_points = points.shape[0]
    labels = torch.full((num_points,), num_classes, dtype=torch.long, device=points.device)
    scores = torch.zeros(num_points, dtype=points.dtype, device=points.device)
    matched = gt_boxes.new_zeros((num_points, 4))
    if gt_boxes.shape[0] == 0:
        return labels, scores, matched

    strides = strides.to(points.dtype)
    regress_ranges = regress_ranges.to(points.dtype)
    lo, hi = regress_ranges[:, 0], regress_ranges[:, 1]
    rlo, rhi = _relaxed_bounds(regress_ranges, relaxation_factor)
    boxes = gt_boxes.to(points.dtype)
    q = torch.stack(
        [_smooth_label_one_box(points, strides, lo, hi, rlo, rhi, box, core_zone,
                               center_sampling_radius) for box in boxes],
        dim=1)  # [P, G]

    # Smallest box first (stable: equal areas keep index order); argmax returns the first
    # maximum, so ties in q go to the smaller box, then to the lower index.
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    order = torch.sort(areas, stable=True).indices
    best = order[q[:, order].argmax(dim=1)]
    best_q = q[torch.arange(num_points, device=q.device), best]

    positive = best_q > 0
    labels[positive] = gt_classes[best[positive]].long()
    scores[positive] = best_q[positive]
    matched[positive] = gt_boxes[best[positive]]
    return labels, scores, matched
