"""FCOS labelling (dsla/baselines/fcos_targets.py), every rule on hand-computed cases: strict
inside test, closed range test, smallest box (ties to the lower index), a point outside every box,
an empty image, a box on two levels, the centerness target, centre sampling; and detectron2's
FCOS baseline labelling with it."""
import math

import pytest
import torch

from detectron2.modeling import build_model

from conftest import make_inputs, tiny_cfg
from dsla.baselines.fcos_targets import centerness_targets, fcos_match_quality, fcos_targets

NUM_CLASSES = 3
BACKGROUND = NUM_CLASSES


def grid(size, stride, lo=0.0, hi=1e8):
    """Points (j s, i s) of one level covering ``size`` x ``size`` pixels, with their strides
    and ranges: Tensor[P, 2], Tensor[P], Tensor[P, 2]."""
    coords = torch.arange(0, size, stride, dtype=torch.float32)
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    points = torch.stack([xs.flatten(), ys.flatten()], dim=1)
    return (points, torch.full((len(points),), float(stride)),
            torch.tensor([[lo, hi]]).expand(len(points), 2))


def levels(*levels_):
    """Concatenate several ``grid`` outputs (levels), finest first."""
    return tuple(torch.cat(parts) for parts in zip(*levels_))


def targets(level, boxes, classes=None, radius=0.0):
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    classes = torch.tensor(classes if classes is not None else [0] * len(boxes))
    return fcos_targets(*level, boxes, classes, NUM_CLASSES, center_sampling_radius=radius)


def at(points, x, y):
    return ((points[:, 0] == x) & (points[:, 1] == y)).nonzero().flatten().tolist()


def test_inside_test_is_strict():
    level = grid(32, 8)
    labels, _, _ = targets(level, [[0.0, 0.0, 16.0, 16.0]], [2])
    # Only (8, 8) is strictly inside; the eight points on the edges are not.
    assert (labels != BACKGROUND).nonzero().flatten().tolist() == at(level[0], 8, 8)
    assert labels[at(level[0], 8, 8)].item() == 2


@pytest.mark.parametrize("lo, hi, positive", [
    (8.0, 16.0, True),    # m = 8 = lo: the range is closed below
    (0.0, 8.0, True),     # m = 8 = hi: and above
    (0.0, 7.9, False),
    (8.1, 16.0, False),
])
def test_range_test_is_closed(lo, hi, positive):
    # Point (8, 8) in [0, 0, 16, 16]: l = t = r = b = 8, so m = max(l, t, r, b) = 8.
    level = grid(32, 8, lo, hi)
    labels, _, _ = targets(level, [[0.0, 0.0, 16.0, 16.0]])
    assert (labels[at(level[0], 8, 8)].item() != BACKGROUND) == positive


@pytest.mark.parametrize("reverse", [False, True])
def test_smallest_box_wins_not_the_better_centred(reverse):
    # Point (16, 16) in A = [0, 0, 32, 32] (centred: ctr 1, area 1024, class 0) and in
    # B = [12, 12, 40, 40] (ctr sqrt(4/24 * 4/24) = 1/6, area 784, class 1): FCOS takes B.
    level = grid(48, 8)
    boxes, classes = [[0.0, 0.0, 32.0, 32.0], [12.0, 12.0, 40.0, 40.0]], [0, 1]
    if reverse:
        boxes, classes = boxes[::-1], classes[::-1]
    labels, matched, ctr = targets(level, boxes, classes)
    i = at(level[0], 16, 16)
    assert labels[i].item() == 1
    assert matched[i].tolist() == [[12.0, 12.0, 40.0, 40.0]]
    assert ctr[i].item() == pytest.approx(1 / 6)


def test_equal_areas_go_to_the_lower_index():
    # Point (16, 16) is inside two different boxes of the same area (384).
    level = grid(48, 8)
    boxes = [[4.0, 8.0, 28.0, 24.0], [8.0, 4.0, 24.0, 28.0]]
    labels, matched, _ = targets(level, boxes, [1, 2])
    i = at(level[0], 16, 16)
    assert labels[i].item() == 1 and matched[i].tolist() == [boxes[0]]
    labels, matched, _ = targets(level, boxes[::-1], [2, 1])
    assert labels[i].item() == 2 and matched[i].tolist() == [boxes[1]]


def test_nearly_equal_huge_areas_are_told_apart():
    # detectron2's quality 1e8 - area is 0 (no match) for the first box and has a float32
    # spacing of 8 near 1e8; the rank keeps the smaller box whatever the areas.
    level = grid(64, 32)
    boxes = [[1.0, 1.0, 10001.0, 10001.0], [1.0, 1.0, 10001.0, 10000.0]]
    labels, matched, _ = targets(level, boxes, [1, 2])
    assert (labels[at(level[0], 32, 32)] == 2).all()
    quality = fcos_match_quality(*level, torch.tensor(boxes))
    assert quality[:, at(level[0], 32, 32)].flatten().tolist() == [1.0, 2.0]


def test_point_outside_every_box_is_background():
    level = grid(64, 8)
    labels, matched, ctr = targets(level, [[0.0, 0.0, 20.0, 20.0], [30.0, 30.0, 50.0, 50.0]])
    i = at(level[0], 24, 24)
    assert labels[i].item() == BACKGROUND
    assert matched[i].tolist() == [[0.0, 0.0, 0.0, 0.0]] and ctr[i].item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_empty_image_is_all_background(dtype):
    points, strides, ranges = (t.to(dtype) for t in grid(32, 8))
    labels, matched, ctr = fcos_targets(points, strides, ranges, torch.zeros(0, 4),
                                        torch.zeros(0, dtype=torch.long), NUM_CLASSES)
    assert labels.dtype == torch.long and (labels == BACKGROUND).all()
    assert matched.shape == (16, 4) and matched.dtype == dtype and (matched == 0).all()
    assert ctr.shape == (16,) and (ctr == 0).all()
    assert fcos_match_quality(points, strides, ranges, torch.zeros(0, 4)).shape == (0, 16)


def test_box_on_two_levels():
    # Box [0, 0, 28, 28]: point (16, 16) has l = t = 16, r = b = 12, m = 16, which is in both
    # [0, 16] (stride 8) and [16, 32] (stride 16); P3's (8, 8) has m = 20 (out of range).
    p3, p4 = grid(32, 8, 0.0, 16.0), grid(32, 16, 16.0, 32.0)
    level = levels(p3, p4)
    labels, _, ctr = targets(level, [[0.0, 0.0, 28.0, 28.0]], [1])
    positives = (labels != BACKGROUND).nonzero().flatten().tolist()
    assert positives == at(level[0], 16, 16) and len(positives) == 2
    assert level[1][positives].tolist() == [8.0, 16.0]
    # ctr = sqrt(12/16 * 12/16) = 0.75 on both levels.
    assert ctr[positives].tolist() == pytest.approx([0.75, 0.75])


def test_centerness_target_hand_computed():
    points = torch.tensor([[8.0, 8.0], [20.0, 10.0]])
    boxes = torch.tensor([[0.0, 0.0, 40.0, 20.0], [0.0, 0.0, 40.0, 20.0]])
    # (8, 8): l/r = 8/32, t/b = 8/12; (20, 10): the box centre, 1.
    expected = [math.sqrt(8 / 32 * 8 / 12), 1.0]
    assert centerness_targets(points, boxes).tolist() == pytest.approx(expected)
    labels, _, ctr = targets(grid(48, 8), [[0.0, 0.0, 40.0, 20.0]])
    assert ctr[at(grid(48, 8)[0], 8, 8)].item() == pytest.approx(expected[0])
    # No core zone: no point of this box gets centerness 1 (its centre (20, 10) is off-grid).
    assert ctr.max().item() < 1.0


def test_center_sampling_region_is_strict_and_scales_with_stride():
    # Box [4, 4, 100, 100], centre (52, 52); R = 1.5 at stride 8 -> region (40, 64) open:
    # points 48 and 56 are in, 40 and 64 on its edge are out.
    level = grid(128, 8)
    labels, _, _ = targets(level, [[4.0, 4.0, 100.0, 100.0]], radius=1.5)
    xs = sorted({x for x, y in level[0][labels != BACKGROUND].tolist()})
    assert xs == [48.0, 56.0]
    # Stride 16: region (28, 76) -> points 32, 48, 64.
    level = grid(128, 16)
    labels, _, _ = targets(level, [[4.0, 4.0, 100.0, 100.0]], radius=1.5)
    assert sorted({x for x, y in level[0][labels != BACKGROUND].tolist()}) == [32.0, 48.0, 64.0]


def test_center_sampling_region_is_clipped_to_the_box():
    # Box [2, 0, 20, 100], centre (11, 50); region x in (-1, 23) clipped to the box (2, 20):
    # x = 8 and 16 are in, x = 0 is outside the box though inside the region.
    level = grid(128, 8)
    labels, _, _ = targets(level, [[2.0, 0.0, 20.0, 100.0]], radius=1.5)
    assert sorted({x for x, y in level[0][labels != BACKGROUND].tolist()}) == [8.0, 16.0]
    assert sorted({y for x, y in level[0][labels != BACKGROUND].tolist()}) == [40.0, 48.0, 56.0]


def test_matches_a_loop_reference():
    # Random crowded image, three levels: the vectorised labelling equals a per-point loop
    # over boxes written from the rules (inside, range, smallest area, lowest index).
    g = torch.Generator().manual_seed(0)
    level = levels(grid(128, 8, 0, 32), grid(128, 16, 32, 64), grid(128, 32, 64, 1e8))
    xy = torch.rand(30, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + torch.rand(30, 2, generator=g) * 80 + 2], dim=1).round()
    classes = torch.arange(30) % NUM_CLASSES
    for radius in (0.0, 1.5):
        labels, matched, ctr = fcos_targets(*level, boxes, classes, NUM_CLASSES,
                                            center_sampling_radius=radius)
        for p in range(len(level[0])):
            best = _reference_choice(level, p, boxes, radius)
            expected = BACKGROUND if best is None else classes[best].item()
            assert labels[p].item() == expected, (p, radius)
            if best is not None:
                assert matched[p].tolist() == boxes[best].tolist()
                assert ctr[p].item() > 0


def _reference_choice(level, p, boxes, radius):
    (x, y), s, (lo, hi) = level[0][p].tolist(), level[1][p].item(), level[2][p].tolist()
    best, best_area = None, None
    for g, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        if radius > 0:
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            rx0, ry0 = max(x0, cx - radius * s), max(y0, cy - radius * s)
            rx1, ry1 = min(x1, cx + radius * s), min(y1, cy + radius * s)
        else:
            rx0, ry0, rx1, ry1 = x0, y0, x1, y1
        inside = rx0 < x < rx1 and ry0 < y < ry1
        m = max(x - x0, y - y0, x1 - x, y1 - y)
        area = (x1 - x0) * (y1 - y0)
        if inside and lo <= m <= hi and (best is None or area < best_area):
            best, best_area = g, area
    return best


def test_detectron2_fcos_baseline_samples_centres_with_its_ranges():
    # detectron2's FCOS (dsla/baselines/fcos_detectron2.py) with points at ((j + 0.5) s,
    # (i + 0.5) s) and COCO-like ranges: box [0, 0, 100, 100] on P3 (range [0, 64]): x = 36, 44,
    # 52, 60 have m <= 64, but only 44, 52, 60 lie within 1.5 x 8 = 12 px of the centre 50 ->
    # 3 x 3 positives.
    cfg = tiny_cfg("MODEL.META_ARCHITECTURE", "FCOSDetectron2", "MODEL.FCOS.REGRESS_RANGES",
                   [[0, 64], [64, 128], [128, 256], [256, 512], [512, 1e8]])
    fcos = build_model(cfg)
    anchors = fcos.anchor_generator([torch.zeros(1, 1, 128 // s, 128 // s)
                                     for s in (8, 16, 32, 64, 128)])
    batch = make_inputs([[[0.0, 0.0, 100.0, 100.0]]], [[2]])
    labels, _ = fcos.label_anchors(anchors, [batch[0]["instances"]])
    p3 = anchors[0].get_centers()[labels[0][: len(anchors[0])] == 2]
    assert sorted({x for x, _ in p3.tolist()}) == [44.0, 52.0, 60.0] and len(p3) == 9
