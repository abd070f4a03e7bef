"""
Tests for dsla.assignment (docs/METHOD.md, "Smooth label assignment"): a hand-computed case for
every assignment rule, then exact agreement with the unchunked computation and with the
loop-and-sort reference in tests/reference_assignment.py.

Most cases use one point and one box centred on it: l = r and t = b make the centerness exactly 1,
so the score isolates the rule under test.
"""
import pytest
import torch

from dsla.assignment import (
    BOX_CHUNK_SIZE,
    _assign_in_chunks,
    _relaxed_ranges,
    assign_smooth_labels,
    level_point_info,
)
from dsla.points import grid_points

NUM_CLASSES = 3
BACKGROUND = NUM_CLASSES
STRIDES = [8, 16, 32, 64, 128]
LEVEL_RANGES = [(0, 64), (64, 128), (128, 256), (256, 512), (512, 1e8)]
# Relaxation and core zone off: only the inside test and centerness shape the score.
PLAIN = dict(relaxation_factor=0.0, core_zone=False)


def _reference():
    from reference_assignment import reference_assign_smooth_labels

    return reference_assign_smooth_labels


def assign(points, boxes, classes=None, stride=8, level=(0, 64), **options):
    """One level: every point gets the same stride and range. points/boxes are lists."""
    points = torch.tensor(points, dtype=torch.float32).reshape(-1, 2)
    strides = torch.full((len(points),), float(stride))
    ranges = torch.tensor([level], dtype=torch.float32).expand(len(points), 2)
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    classes = torch.tensor(classes if classes is not None else [0] * len(boxes))
    return assign_smooth_labels(points, strides, ranges, boxes, classes, NUM_CLASSES, **options)


def centred_score(half_size, level, **options):
    """q* of the point (100, 100) for the box of half-size h centred on it, so m = h, ctr = 1."""
    h = half_size
    _, scores, _ = assign([(100, 100)], [(100 - h, 100 - h, 100 + h, 100 + h)], level=level,
                          **options)
    return scores.item()


def image_points(height=256, width=320):
    """All points of an image on the five levels, with their strides and ranges."""
    return level_point_info(grid_points((height, width), STRIDES), STRIDES, LEVEL_RANGES)


def random_boxes(num_boxes, height=256, width=320, seed=0):
    """
    Integer-coordinate boxes (so points land exactly on edges and on core-zone borders), with
    exact duplicates and equal-area reshapes, so ties in q and in area happen, also across chunks.
    """
    g = torch.Generator().manual_seed(seed)
    centre = torch.rand(num_boxes, 2, generator=g) * torch.tensor([width, height])
    size = torch.exp(torch.rand(num_boxes, 2, generator=g) * 5.5) + 2  # 3 .. ~250 px
    boxes = torch.cat([centre - size / 2, centre + size / 2], dim=1).round()
    boxes[1::2, 2:] = boxes[1::2, :2] + (boxes[1::2, 2:] - boxes[1::2, :2]).round()
    dup = num_boxes // 5
    boxes[-dup:] = boxes[:dup]  # identical boxes, far apart in index: ties across chunks
    w, h = boxes[:dup, 2] - boxes[:dup, 0], boxes[:dup, 3] - boxes[:dup, 1]
    boxes[dup:2 * dup] = torch.stack([boxes[:dup, 0], boxes[:dup, 1],
                                      boxes[:dup, 0] + h, boxes[:dup, 1] + w], dim=1)
    classes = torch.randint(0, NUM_CLASSES, (num_boxes,), generator=g)
    return boxes, classes


# --- inside test ---------------------------------------------------------------------------------

def test_inside_test_is_strict():
    # Box (0, 0, 16, 16). A point on any edge has one distance exactly 0: outside.
    edge_points = [(0, 8), (16, 8), (8, 0), (8, 16)]
    # (8, 8): l = r = t = b = 8, ctr = 1.  (4, 8): l/r = 4/12 = 1/3, t/b = 1, ctr = sqrt(1/3).
    # (0.5, 8): l/r = 0.5/15.5 = 1/31, ctr = sqrt(1/31), tiny but positive.
    labels, scores, matched = assign(edge_points + [(8, 8), (4, 8), (0.5, 8)],
                                     [(0, 0, 16, 16)], classes=[2], **PLAIN)
    assert labels.tolist() == [BACKGROUND] * 4 + [2, 2, 2]
    expected = torch.tensor([0, 0, 0, 0, 1.0, (1 / 3) ** 0.5, (1 / 31) ** 0.5])
    torch.testing.assert_close(scores, expected)
    assert (matched[:4] == 0).all()
    assert (matched[4:] == torch.tensor([0.0, 0, 16, 16])).all()
    # With the core zone an edge point matters: (8, 8) on the left edge of (8, 4, 16, 12) is
    # within s/2 = 4 of the centre (12, 8) and would get ctr = 1 if the edge counted as inside.
    labels, scores, _ = assign([(8, 8)], [(8, 4, 16, 12)], core_zone=True)
    assert labels.item() == BACKGROUND and scores.item() == 0.0


# --- centerness ----------------------------------------------------------------------------------

def test_centerness_at_off_centre_points():
    # Box (0, 0, 40, 20), every m <= 32 so the scale score is 1.
    # (16, 8): l/r = 16/24 = 2/3, t/b = 8/12 = 2/3 -> sqrt(4/9) = 2/3
    # (8, 4):  l/r = 8/32 = 1/4,  t/b = 4/16 = 1/4 -> 1/4
    # (30, 15): min/max: 10/30 = 1/3, 5/15 = 1/3 -> 1/3 (right/bottom side, same formula)
    # (10, 10): l/r = 10/30 = 1/3, t/b = 10/10 = 1 -> sqrt(1/3)
    _, scores, _ = assign([(16, 8), (8, 4), (30, 15), (10, 10)], [(0, 0, 40, 20)], **PLAIN)
    torch.testing.assert_close(scores, torch.tensor([2 / 3, 1 / 4, 1 / 3, (1 / 3) ** 0.5]))


def test_centerness_denominators_are_clamped_for_degenerate_boxes():
    # A 0.01-px-wide box around x = 8: l and r are about 0.005 < 0.01, so min(l, r) / 0.01 is
    # about 1/2 (the authors' clamp) and ctr = sqrt(1/2 * 8/8); without the clamp ctr would be 1.
    _, scores, _ = assign([(8, 8)], [(7.995, 0, 8.005, 16)], **PLAIN)
    assert scores.item() == pytest.approx(0.5 ** 0.5, abs=1e-3)


# --- core zone -----------------------------------------------------------------------------------

def test_core_zone_gives_full_label_near_the_centre():
    # Box (4, 4, 18, 18), centre (11, 11), stride 8 (s/2 = 4); the centre is between points.
    # (8, 8):   |8 - 11| = 3 <= 4 on both axes: core.  Without: l/r = 4/10, t/b = 4/10 -> 0.4.
    # (16, 8):  |16 - 11| = 5 > 4: not core. l/r = 2/12, t/b = 4/10 -> sqrt(1/15) either way.
    # (16, 16): not core. l/r = t/b = 2/12 -> 1/6 either way.
    points, box = [(8, 8), (16, 8), (16, 16)], [(4, 4, 18, 18)]
    _, with_core, _ = assign(points, box, core_zone=True)
    _, without_core, _ = assign(points, box, core_zone=False)
    torch.testing.assert_close(with_core, torch.tensor([1.0, (1 / 15) ** 0.5, 1 / 6]))
    torch.testing.assert_close(without_core, torch.tensor([0.4, (1 / 15) ** 0.5, 1 / 6]))


def test_core_zone_border_is_inclusive_and_needs_an_inside_point():
    # Box (2, 2, 22, 22), centre (12, 12): |8 - 12| = 4 = s/2 is still core -> 1.
    # Without core: l/r = 6/14 = 3/7, t/b = 3/7 -> 3/7.
    _, scores, _ = assign([(8, 8)], [(2, 2, 22, 22)], core_zone=True)
    assert scores.item() == 1.0
    _, scores, _ = assign([(8, 8)], [(2, 2, 22, 22)], core_zone=False)
    assert scores.item() == pytest.approx(3 / 7, abs=1e-6)
    # Box (9, 9, 15, 15), centre (12, 12): (8, 8) is within s/2 of the centre but outside the box.
    labels, scores, _ = assign([(8, 8)], [(9, 9, 15, 15)], core_zone=True)
    assert labels.item() == BACKGROUND and scores.item() == 0.0


# --- scale score ---------------------------------------------------------------------------------

@pytest.mark.parametrize("level, half_size, expected", [
    # (64, 128), f = 0.2: [rlo, rhi] = [int(51.2), int(153.6)] = [51, 153]
    ((64, 128), 50, 0.0),             # below rlo
    ((64, 128), 51, 0.0),             # ramp starts at 0 on rlo
    ((64, 128), 52, 1 / 13),          # (52 - 51) / (64 - 51)
    ((64, 128), 60, 9 / 13),          # (60 - 51) / 13; untruncated 51.2 would give 0.6875
    ((64, 128), 64, 1.0),             # [lo, hi] is closed
    ((64, 128), 100, 1.0),
    ((64, 128), 128, 1.0),
    ((64, 128), 128.5, 24.5 / 25),    # just above hi: (153 - 128.5) / (153 - 128)
    ((64, 128), 140, 13 / 25),        # (153 - 140) / 25
    ((64, 128), 153, 0.0),            # ramp ends at 0 on rhi
    ((64, 128), 160, 0.0),            # above rhi
    # (0, 64): [0, int(76.8)] = [0, 76], no lower ramp
    ((0, 64), 10, 1.0),
    ((0, 64), 65, 11 / 12),           # (76 - 65) / (76 - 64)
    ((0, 64), 70, 0.5),               # (76 - 70) / 12
    ((0, 64), 140, 0.0),              # far beyond rhi = 76
    # (128, 256): [int(102.4), int(307.2)] = [102, 307]
    ((128, 256), 110, 4 / 13),        # (110 - 102) / (128 - 102) = 8 / 26
    ((128, 256), 300, 7 / 51),        # (307 - 300) / (307 - 256)
    # (512, 1e8): rlo = int(409.6) = 409
    ((512, 1e8), 450, 41 / 103),      # (450 - 409) / (512 - 409)
])
def test_relaxed_scale_score(level, half_size, expected):
    score = centred_score(half_size, level, relaxation_factor=0.2, core_zone=False)
    assert score == pytest.approx(expected, abs=1e-6)


def test_relaxed_range_truncates_a_double_product():
    # The authors' int(lo * (1 - f)) in double precision: 64 * 0.8 = 51.2 -> 51 and
    # 128 * 1.2 = 153.6 -> 153 (rounding would give 154); 90 * 0.7 = 62.999.. -> 62 (float32
    # would give 63.0 -> 63) and 180 * 1.3 = 234.00..04 -> 234 (float32: 233.99998 -> 233).
    _, _, rlo, rhi = _relaxed_ranges(torch.tensor([[64.0, 128.0]]), 0.2)
    assert (rlo.item(), rhi.item()) == (51.0, 153.0)
    _, _, rlo, rhi = _relaxed_ranges(torch.tensor([[90.0, 180.0]]), 0.3)
    assert (rlo.item(), rhi.item()) == (62.0, 234.0)
    # (76 - 62) / (90 - 62) = 0.5   (rlo = 63 would give 13/27)
    assert centred_score(76, (90, 180), relaxation_factor=0.3) == pytest.approx(0.5, abs=1e-6)
    # (234 - 200) / (234 - 180) = 17/27   (rhi = 233 would give 33/53)
    assert centred_score(200, (90, 180), relaxation_factor=0.3) == pytest.approx(17 / 27,
                                                                                 abs=1e-6)
    # Just above rlo = 51: (51.1 - 51) / 13 > 0, while m = 51 itself scores 0.
    assert centred_score(51.1, (64, 128)) == pytest.approx(0.1 / 13, abs=1e-6)


@pytest.mark.parametrize("half_size, expected", [
    (51, 0.0), (60, 0.0), (63.9, 0.0), (64, 1.0), (100, 1.0), (128, 1.0), (128.5, 0.0), (140, 0.0),
])
def test_relaxation_off_is_a_hard_range(half_size, expected):
    assert centred_score(half_size, (64, 128), relaxation_factor=0.0) == expected


def test_relaxation_off_has_no_ramp_for_fractional_ranges():
    # f = 0 means no relaxation at all, not int(lo) = 63: m = 63.25 just below lo = 63.5 is 0.
    level = (63.5, 127.5)
    assert centred_score(63.25, level, relaxation_factor=0.0) == 0.0
    assert centred_score(127.75, level, relaxation_factor=0.0) == 0.0
    assert centred_score(63.5, level, relaxation_factor=0.0) == 1.0


@pytest.mark.parametrize("half_size, small_level, large_level", [
    (40, 1.0, 0.0),        # inside (0, 64) only
    (56, 1.0, 5 / 13),     # (56 - 51) / 13 on the larger level
    (62, 1.0, 11 / 13),
    (66, 10 / 12, 1.0),    # (76 - 66) / 12 on the smaller level
    (72, 4 / 12, 1.0),
    (80, 0.0, 1.0),        # beyond rhi = 76 of (0, 64)
])
def test_box_near_a_level_boundary_trains_both_levels(half_size, small_level, large_level):
    # The same location (96, 96) on stride 8 / (0, 64) and on stride 16 / (64, 128).
    points, strides, ranges = level_point_info(
        [torch.tensor([[96.0, 96.0]]), torch.tensor([[96.0, 96.0]])], [8, 16], LEVEL_RANGES[:2])
    h = half_size
    box = torch.tensor([[96.0 - h, 96.0 - h, 96.0 + h, 96.0 + h]])
    _, scores, _ = assign_smooth_labels(points, strides, ranges, box, torch.tensor([1]),
                                        NUM_CLASSES, core_zone=False)
    torch.testing.assert_close(scores, torch.tensor([small_level, large_level]))


# --- centre sampling -----------------------------------------------------------------------------

def test_center_sampling_region_scales_with_the_point_stride():
    # Box (0, 0, 100, 100), centre (50, 50). R = 1.5, stride 8: region (38, 38, 62, 62).
    box, level = [(0, 0, 100, 100)], (0, 1e8)
    points = [(40, 40), (32, 48), (38, 50), (62, 50), (61.5, 50)]
    labels, scores, _ = assign(points, box, level=level, center_sampling_radius=1.5)
    assert labels.tolist() == [0, BACKGROUND, BACKGROUND, BACKGROUND, 0]
    # (40, 40): l/r = 40/60 = 2/3, t/b = 2/3 -> ctr 2/3; m = 60, scale 1.
    assert scores[0].item() == pytest.approx(2 / 3, abs=1e-6)
    # Without sampling (32, 48) is an ordinary inside point: sqrt(32/68 * 48/52).
    _, scores, _ = assign([(32, 48)], box, level=level)
    assert scores.item() == pytest.approx((32 / 68 * 48 / 52) ** 0.5, abs=1e-6)
    # Stride 16: region (26, 26, 74, 74) contains (32, 48).
    labels, _, _ = assign([(32, 48)], box, stride=16, level=level, center_sampling_radius=1.5)
    assert labels.item() == 0


def test_center_sampling_region_is_clipped_to_the_box():
    # Box (10, 10, 14, 14), centre (12, 12), stride 8, R = 1.5: region (0, 0, 24, 24) unclipped,
    # (10, 10, 14, 14) clipped. (9, 12) lies in the core zone (|9 - 12| <= 4) but outside the box.
    labels, scores, _ = assign([(9, 12), (12, 12)], [(10, 10, 14, 14)],
                               center_sampling_radius=1.5)
    assert labels.tolist() == [BACKGROUND, 0]
    assert scores.tolist() == [0.0, 1.0]


# --- choice of box -------------------------------------------------------------------------------

@pytest.mark.parametrize("reverse", [False, True])
def test_largest_smooth_label_wins_over_smaller_box(reverse):
    # Point (50, 50). Big box centred on it: q = 1. Small box (40, 40, 80, 80), centre (60, 60):
    # l/r = 10/30, t/b = 10/30 -> q = 1/3. The big box wins although it is larger.
    boxes, classes = [(0, 0, 100, 100), (40, 40, 80, 80)], [0, 1]
    if reverse:
        boxes, classes = boxes[::-1], classes[::-1]
    labels, scores, matched = assign([(50, 50)], boxes, classes)
    assert labels.item() == 0 and scores.item() == 1.0
    assert matched[0].tolist() == [0, 0, 100, 100]


@pytest.mark.parametrize("reverse", [False, True])
def test_equal_labels_go_to_the_smaller_box(reverse):
    # Both boxes centred on (50, 50): q = 1 for both; areas 10000 and 1600.
    boxes, classes = [(0, 0, 100, 100), (30, 30, 70, 70)], [0, 1]
    if reverse:
        boxes, classes = boxes[::-1], classes[::-1]
    labels, scores, matched = assign([(50, 50)], boxes, classes)
    assert labels.item() == 1 and scores.item() == 1.0
    assert matched[0].tolist() == [30, 30, 70, 70]


@pytest.mark.parametrize("chunk_size", [1, 2])
def test_equal_labels_and_areas_go_to_the_lower_index(chunk_size):
    # 40 x 40 and 80 x 20 (area 1600 each), both centred on (50, 50): q = 1 for both.
    points = torch.tensor([[50.0, 50.0]])
    strides, ranges = torch.tensor([8.0]), torch.tensor([[0.0, 64.0]])
    square, wide = [30.0, 30, 70, 70], [10.0, 40, 90, 60]
    # The square has class 1, the wide box class 2; whichever comes first wins.
    for boxes, classes in [([square, wide], [1, 2]), ([wide, square], [2, 1])]:
        labels, _, _ = _assign_in_chunks(
            points, strides, ranges, torch.tensor(boxes), torch.tensor(classes), NUM_CLASSES,
            relaxation_factor=0.2, core_zone=True, center_sampling_radius=0.0,
            chunk_size=chunk_size)
        assert labels.item() == classes[0]


# --- empty images, shapes, dtypes ----------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_empty_image_is_all_background(dtype):
    points, strides, ranges = image_points(64, 64)
    points, ranges = points.to(dtype), ranges.to(dtype)
    labels, scores, matched = assign_smooth_labels(
        points, strides, ranges, torch.zeros(0, 4, dtype=dtype), torch.zeros(0, dtype=torch.long),
        NUM_CLASSES)
    num_points = points.shape[0]
    assert labels.dtype == torch.long and labels.shape == (num_points,)
    assert (labels == BACKGROUND).all()
    assert scores.dtype == dtype and scores.shape == (num_points,) and (scores == 0).all()
    assert matched.dtype == dtype and matched.shape == (num_points, 4) and (matched == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_output_shapes_dtypes_and_consistency(dtype):
    points, strides, ranges = image_points()
    boxes, classes = random_boxes(40)
    points, ranges, boxes = points.to(dtype), ranges.to(dtype), boxes.to(dtype).requires_grad_()
    labels, scores, matched = assign_smooth_labels(points, strides, ranges, boxes, classes,
                                                   NUM_CLASSES)
    num_points = points.shape[0]
    assert labels.shape == (num_points,) and labels.dtype == torch.long
    assert scores.shape == (num_points,) and scores.dtype == dtype
    assert matched.shape == (num_points, 4) and matched.dtype == dtype
    assert not (scores.requires_grad or matched.requires_grad)
    positive = labels != BACKGROUND
    assert positive.any() and (~positive).any()
    assert ((scores > 0) == positive).all() and (scores <= 1).all()
    assert (matched[~positive] == 0).all()
    # Each positive's matched box is one of the boxes, with that box's class.
    same = (matched[positive][:, None, :] == boxes.detach()[None]).all(dim=2)  # [pos, G]
    assert same.any(dim=1).all()
    assert (same & (classes[None] == labels[positive][:, None])).any(dim=1).all()


def test_level_point_info_concatenates_levels():
    points, strides, ranges = level_point_info(
        [torch.zeros(2, 2), torch.ones(3, 2)], [8, 16], [(0, 64), (64, 128)])
    assert points.shape == (5, 2) and (points[2:] == 1).all()
    assert strides.tolist() == [8, 8, 16, 16, 16] and strides.dtype == torch.float32
    assert ranges.tolist() == [[0, 64]] * 2 + [[64, 128]] * 3


# --- chunking, scale, reference ------------------------------------------------------------------

OPTIONS = [
    dict(relaxation_factor=0.2, core_zone=True, center_sampling_radius=0.0),
    dict(relaxation_factor=0.0, core_zone=False, center_sampling_radius=1.5),
    dict(relaxation_factor=0.3, core_zone=True, center_sampling_radius=1.5),
]


@pytest.mark.parametrize("options", OPTIONS[:2])
def test_chunked_equals_unchunked(options):
    points, strides, ranges = image_points()
    boxes, classes = random_boxes(300, seed=1)
    args = (points, strides, ranges, boxes, classes, NUM_CLASSES)
    whole = _assign_in_chunks(*args, chunk_size=len(boxes), **options)
    assert (whole[0] != BACKGROUND).sum() > 100
    for chunk_size in [7, BOX_CHUNK_SIZE]:
        chunked = _assign_in_chunks(*args, chunk_size=chunk_size, **options)
        for a, b in zip(chunked, whole):
            assert torch.equal(a, b)
    public = assign_smooth_labels(*args, **options)
    assert all(torch.equal(a, b) for a, b in zip(public, whole))


def test_thousand_boxes():
    points, strides, ranges = image_points()
    boxes, classes = random_boxes(1000, seed=2)
    args = (points, strides, ranges, boxes, classes, NUM_CLASSES)
    labels, scores, matched = assign_smooth_labels(*args)
    assert labels.shape == (points.shape[0],) and matched.shape == (points.shape[0], 4)
    assert ((labels >= 0) & (labels <= BACKGROUND)).all()
    assert (labels != BACKGROUND).sum() > 500
    whole = _assign_in_chunks(*args, chunk_size=1000, relaxation_factor=0.2, core_zone=True,
                              center_sampling_radius=0.0)
    assert all(torch.equal(a, b) for a, b in zip((labels, scores, matched), whole))


@pytest.mark.parametrize("options", OPTIONS)
def test_matches_loop_and_sort_reference(options):
    reference_assign_smooth_labels = _reference()
    points, strides, ranges = image_points()
    boxes, classes = random_boxes(120, seed=3)
    args = (points, strides, ranges, boxes, classes, NUM_CLASSES)
    expected = reference_assign_smooth_labels(*args, **options)
    actual = assign_smooth_labels(*args, **options)
    assert (expected[0] != BACKGROUND).sum() > 100
    for a, b in zip(actual, expected):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_pairwise_smooth_labels_agree_with_assignment():
    # q* of every point is the largest pairwise q over the boxes (docs/METHOD.md, "Choice of
    # box").
    from dsla.assignment import pairwise_smooth_labels

    g = torch.Generator().manual_seed(3)
    points, strides, ranges = level_point_info(
        grid_points((256, 256), STRIDES), STRIDES,
        [(0, 16), (16, 32), (32, 64), (64, 128), (128, 1e8)])
    xy = torch.rand(40, 2, generator=g) * 200
    boxes = torch.cat([xy, xy + torch.rand(40, 2, generator=g) * 120 + 4], dim=1)
    for options in [{}, {"relaxation_factor": 0.0, "core_zone": False,
                         "center_sampling_radius": 1.5}]:
        q = pairwise_smooth_labels(points, strides, ranges, boxes, **options)
        assert q.shape == (40, len(points))
        _, scores, _ = assign_smooth_labels(points, strides, ranges, boxes,
                                            torch.zeros(40, dtype=torch.long), 3, **options)
        assert torch.equal(q.max(dim=0).values, scores)
    assert pairwise_smooth_labels(points, strides, ranges, boxes[:0]).shape == (0, len(points))
