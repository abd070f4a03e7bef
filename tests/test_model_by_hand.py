"""
DSLA's losses and inference through the whole model, checked against numbers computed by hand.

The model is a real :class:`dsla.meta_arch.DSLA` built in Python around a stub backbone (empty
feature maps of the right sizes) and a stub head that returns fixed logits and distances, so
every number below follows from the docs/METHOD.md formulas and the values written here. The
expected values are computed in this file with plain math, independently of dsla.losses.
"""
import math

import pytest
import torch
import torchvision
from torch import nn

from detectron2.layers import ShapeSpec
from detectron2.modeling import Backbone
from detectron2.structures import Boxes, Instances

from dsla.errors import UserError
from dsla.meta_arch import DSLA

LN2 = math.log(2.0)
NUM_CLASSES = 2
IMAGE = 32  # one 32 x 32 image; stride 8 gives a 4 x 4 grid of points (8j, 8i)


class GridBackbone(Backbone):
    """Empty feature maps ``[N, 0, ceil(H / s), ceil(W / s)]``, one per stride: only their
    sizes matter (they place the points)."""

    def __init__(self, strides):
        super().__init__()
        self.strides = list(strides)

    def forward(self, x):
        h, w = x.shape[-2:]
        return {f"p{i}": x.new_zeros((x.shape[0], 0, math.ceil(h / s), math.ceil(w / s)))
                for i, s in enumerate(self.strides)}

    def output_shape(self):
        return {f"p{i}": ShapeSpec(channels=0, stride=s) for i, s in enumerate(self.strides)}


class FixedHead(nn.Module):
    """Returns the same logits ``[C, Hi, Wi]`` and distances ``[4, Hi, Wi]`` for every image, as
    parameters (so that gradients can be inspected)."""

    def __init__(self, logits, distances):
        super().__init__()
        self.logits = nn.ParameterList([nn.Parameter(x.clone()) for x in logits])
        self.distances = nn.ParameterList([nn.Parameter(x.clone()) for x in distances])

    def forward(self, features):
        n = features[0].shape[0]
        return ([x.expand(n, -1, -1, -1) for x in self.logits],
                [x.expand(n, -1, -1, -1) for x in self.distances])


def make_dsla(logits, distances, strides=(8,), **kwargs):
    """A DSLA around the stubs; ``kwargs`` override the constructor defaults."""
    args = dict(
        backbone=GridBackbone(strides), head=FixedHead(logits, distances),
        head_in_features=[f"p{i}" for i in range(len(strides))], num_classes=NUM_CLASSES,
        regress_ranges=[(0, 64), (64, 128), (128, 256)][: len(strides)],
        pixel_mean=[0.0, 0.0, 0.0], pixel_std=[1.0, 1.0, 1.0])
    args.update(kwargs)
    return DSLA(**args)


def batch(boxes, classes, size=IMAGE, out_size=None):
    inst = Instances((size, size))
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.tensor(classes, dtype=torch.long)
    out = out_size or size
    return [{"image": torch.zeros(3, size, size), "instances": inst, "height": out,
             "width": out}]


def grid(value, channels, size=IMAGE // 8):
    return torch.full((channels, size, size), float(value))


# --- losses ---------------------------------------------------------------------------------------
#
# Box g = (0, 0, 32, 16), class 1, stride 8, range (0, 64). Points strictly inside: (8, 8), (16, 8),
# (24, 8) (y = 0 and y = 16 lie on the edges).
#   (8, 8):  l, t, r, b = 8, 8, 24, 8  -> ctr = sqrt(8/24 * 8/8) = 1/sqrt(3); m = 24, scale 1
#   (16, 8): 16, 8, 16, 8              -> ctr = 1 (also the core-zone point)
#   (24, 8): 24, 8, 8, 8               -> ctr = 1/sqrt(3)
# so q* = [1/sqrt(3), 1, 1/sqrt(3)]. Predicted distances are 8 everywhere, except (16, 8) which
# predicts g exactly: boxes (0,0,16,16), g, (16,0,32,16), i.e. IoU = [1/2, 1, 1/2].
# Logits: 0 for class 0 (sigma 1/2), log 3 for class 1 (sigma 3/4), at every point.
BOX, BOX_CLASS = [0.0, 0.0, 32.0, 16.0], 1
POSITIVES = [(1, 1), (1, 2), (1, 3)]  # (row, column) of the three positive points
Q_STAR = [1 / math.sqrt(3), 1.0, 1 / math.sqrt(3)]
IOU = [0.5, 1.0, 0.5]


def box_loss_head():
    logits = torch.stack([grid(0.0, 1)[0], grid(math.log(3.0), 1)[0]])
    distances = grid(8.0, 4)
    distances[:, 1, 2] = torch.tensor([16.0, 8.0, 16.0, 8.0])
    return [logits], [distances]


def bce(p, y):
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def qfl_by_hand(targets, beta):
    """Sum over the 16 x 2 entries: class 0 is negative everywhere (sigma 1/2); class 1 is
    negative on the 13 other points (sigma 3/4) and has target y_k on the positives."""
    negatives = 16 * bce(0.5, 0) * 0.5 ** beta + 13 * bce(0.75, 0) * 0.75 ** beta
    return negatives + sum(bce(0.75, y) * abs(y - 0.75) ** beta for y in targets)


def expected_losses(coupling, beta, cls_weight, box_weight, box_loss):
    y = {"on": [i * q for i, q in zip(IOU, Q_STAR)], "off": Q_STAR, "iou_only": IOU}[coupling]
    per_box = [-math.log(i) if box_loss == "iou" else 1 - i for i in IOU]  # GIoU = IoU here
    box_sum = sum(q * b for q, b in zip(Q_STAR, per_box))
    return (cls_weight * qfl_by_hand(y, beta) / max(sum(y), 1.0),
            box_weight * box_sum / max(sum(Q_STAR), 1.0))


LOSS_CASES = [
    # coupling, beta, cls weight, box weight, box loss
    ("on", 2.0, 1.0, 1.0, "iou"),
    ("on", 1.0, 2.0, 3.0, "giou"),
    ("off", 2.0, 1.0, 0.5, "iou"),
    ("iou_only", 3.0, 0.5, 1.0, "iou"),
]


@pytest.mark.parametrize("coupling, beta, cls_weight, box_weight, box_loss", LOSS_CASES)
def test_losses_hand_computed(storage, coupling, beta, cls_weight, box_weight, box_loss):
    # Which normaliser divides which loss (cls: max(sum y, 1); box: max(sum q*, 1)), both loss
    # weights, beta and the three coupling modes; sum y != sum q* except for "off".
    model = make_dsla(*box_loss_head(), iou_coupling=coupling, qfl_beta=beta,
                      cls_loss_weight=cls_weight, box_loss_weight=box_weight,
                      box_loss_type=box_loss)
    model.train()
    losses = model(batch([BOX], [BOX_CLASS]))
    expected_cls, expected_box = expected_losses(coupling, beta, cls_weight, box_weight, box_loss)
    assert losses["loss_dsla_cls"].item() == pytest.approx(expected_cls, rel=1e-5)
    assert losses["loss_dsla_box"].item() == pytest.approx(expected_box, rel=1e-5)


def test_labels_of_the_loss_example():
    # The q* and IoUs the hand computation above starts from.
    model = make_dsla(*box_loss_head())
    maps = model.smooth_label_maps((IMAGE, IMAGE), batch([BOX], [BOX_CLASS])[0]["instances"])
    expected = torch.zeros(4, 4)
    for (row, col), q in zip(POSITIVES, Q_STAR):
        expected[row, col] = q
    torch.testing.assert_close(maps[0], expected)


def test_hard_labels_are_one_on_the_positives():
    # SMOOTH_LABEL False (the ablation's first rung): q* = 1 on the same three points.
    model = make_dsla(*box_loss_head(), smooth_label=False)
    maps = model.smooth_label_maps((IMAGE, IMAGE), batch([BOX], [BOX_CLASS])[0]["instances"])
    expected = torch.zeros(4, 4)
    for row, col in POSITIVES:
        expected[row, col] = 1.0
    torch.testing.assert_close(maps[0], expected)


def test_normalisers_go_through_the_all_reduce(storage, monkeypatch):
    # Both normalisers are averaged over the workers on every rank (docs/METHOD.md, "Losses"):
    # sum y (cls) then sum q* (box) pass through all_reduce_mean.
    import dsla.meta_arch

    seen = []

    def record(value):
        seen.append(value.item())
        return value

    monkeypatch.setattr(dsla.meta_arch, "all_reduce_mean", record)
    make_dsla(*box_loss_head())(batch([BOX], [BOX_CLASS]))
    y = [i * q for i, q in zip(IOU, Q_STAR)]
    assert seen == pytest.approx([sum(y), sum(Q_STAR)], rel=1e-6)


def test_normalisers_are_clamped_at_one(storage):
    # Box (4, 4, 14, 12), core zone off: only (8, 8) is inside; l, t, r, b = 4, 4, 6, 4 ->
    # q* = sqrt(4/6) < 1. Its predicted box (0, 0, 16, 16) holds the 10 x 8 box: IoU = 80/256.
    # Both sums are below 1, so both losses are divided by 1.
    q, iou = math.sqrt(2 / 3), 80 / 256
    model = make_dsla(*box_loss_head(), core_zone=False)
    model.train()
    losses = model(batch([[4.0, 4.0, 14.0, 12.0]], [BOX_CLASS]))
    y = iou * q
    expected_cls = 16 * bce(0.5, 0) * 0.25 + 15 * bce(0.75, 0) * 0.75 ** 2 \
        + bce(0.75, y) * (0.75 - y) ** 2
    assert losses["loss_dsla_cls"].item() == pytest.approx(expected_cls, rel=1e-5)
    assert losses["loss_dsla_box"].item() == pytest.approx(-q * math.log(iou), rel=1e-5)


def test_cls_loss_has_no_gradient_through_the_iou(storage):
    # The IoU in the cls target is a target, not a prediction: the cls loss must not reach the
    # distances, the box loss must.
    model = make_dsla(*box_loss_head())
    model.train()
    losses = model(batch([BOX], [BOX_CLASS]))
    distances = model.head.distances[0]
    (cls_grad,) = torch.autograd.grad(losses["loss_dsla_cls"], distances, allow_unused=True,
                                      retain_graph=True)
    assert cls_grad is None or (cls_grad == 0).all()
    (box_grad,) = torch.autograd.grad(losses["loss_dsla_box"], distances)
    assert box_grad.abs().sum() > 0


# --- inference ------------------------------------------------------------------------------------
#
# Scores are sigmoid(logits); every logit is -10 (sigma 4.5e-5) except:
#   A: point (8, 8),   class 0, logit 2    -> 0.8808, distances 8       -> box (0, 0, 16, 16)
#   B: point (16, 8),  class 0, logit 0    -> 0.5,    (11.5, 8, 4.5, 8) -> box (4.5, 0, 20.5, 16)
#      IoU(A, B) = 11.5 * 16 / (2 * 256 - 184) = 184 / 328 = 0.561
#   C: point (24, 16), class 1, logit 1    -> 0.7311, (4, 4, 20, 20)    -> (20, 12, 44, 36),
#      clipped to the 32 x 32 image: (20, 12, 32, 32)
#   D: point (0, 0),   class 1, score 0.04 (below the 0.05 threshold)
A_BOX, B_BOX, C_BOX = [0.0, 0.0, 16.0, 16.0], [4.5, 0.0, 20.5, 16.0], [20.0, 12.0, 32.0, 32.0]
SIGMA = {2.0: 1 / (1 + math.exp(-2.0)), 0.0: 0.5, 1.0: 1 / (1 + math.exp(-1.0))}


def inference_head():
    logits = grid(-10.0, NUM_CLASSES)
    logits[0, 1, 1], logits[0, 1, 2], logits[1, 2, 3] = 2.0, 0.0, 1.0
    logits[1, 0, 0] = math.log(0.04 / 0.96)
    distances = grid(8.0, 4)
    distances[:, 1, 2] = torch.tensor([11.5, 8.0, 4.5, 8.0])
    distances[:, 2, 3] = torch.tensor([4.0, 4.0, 20.0, 20.0])
    return [logits], [distances]


@pytest.mark.parametrize("nms, expected", [
    # NMS at 0.6 keeps B (IoU 0.561 with A); at 0.5 it removes B.
    (0.6, [(SIGMA[2.0], 0, A_BOX), (SIGMA[1.0], 1, C_BOX), (SIGMA[0.0], 0, B_BOX)]),
    (0.5, [(SIGMA[2.0], 0, A_BOX), (SIGMA[1.0], 1, C_BOX)]),
])
def test_inference_hand_computed(nms, expected):
    model = make_dsla(*inference_head(), test_nms_thresh=nms).eval()
    with torch.no_grad():
        inst = model(batch([], []))[0]["instances"]
    assert inst.image_size == (IMAGE, IMAGE)
    assert inst.scores.tolist() == pytest.approx([e[0] for e in expected], rel=1e-6)
    assert inst.pred_classes.tolist() == [e[1] for e in expected]
    torch.testing.assert_close(inst.pred_boxes.tensor, torch.tensor([e[2] for e in expected]))


def test_inference_rescales_to_the_requested_size_and_caps_detections():
    model = make_dsla(*inference_head(), max_detections_per_image=1).eval()
    with torch.no_grad():
        inst = model(batch([], [], out_size=64))[0]["instances"]
    assert inst.image_size == (64, 64) and len(inst) == 1
    assert inst.scores.tolist() == pytest.approx([SIGMA[2.0]])
    torch.testing.assert_close(inst.pred_boxes.tensor, 2 * torch.tensor([A_BOX]))


# --- candidate selection on a crowded level -------------------------------------------------------

def direct_detections(points, scores, distances, image_size, topk, thresh, nms, max_dets):
    """
    The authors' selection written plainly: per level the ``topk`` points with the highest
    best-class score, boxes clipped to the image; every (point, class) above ``thresh``; NMS per
    class; the ``max_dets`` best. Returns [(score, class, box)], best first.
    """
    boxes, kept_scores = [], []
    height, width = image_size
    for level_points, level_scores, level_dists in zip(points, scores, distances):
        order = torch.argsort(level_scores.max(dim=1).values, descending=True)[:topk]
        (x, y), (l, t, r, b) = level_points[order].T, level_dists[order].T
        boxes.append(torch.stack([(x - l).clamp(0, width), (y - t).clamp(0, height),
                                  (x + r).clamp(0, width), (y + b).clamp(0, height)], dim=1))
        kept_scores.append(level_scores[order])
    boxes, kept_scores = torch.cat(boxes), torch.cat(kept_scores)
    detections = []
    for c in range(kept_scores.shape[1]):
        idx = (kept_scores[:, c] > thresh).nonzero().flatten()
        for i in idx[torchvision.ops.nms(boxes[idx], kept_scores[idx, c], nms)].tolist():
            detections.append((kept_scores[i, c].item(), c, boxes[i].tolist()))
    detections.sort(key=lambda d: -d[0])
    return detections[:max_dets]


@pytest.mark.parametrize("nms, max_dets", [(1.0, 100000), (0.6, 100)])
def test_crowded_level_selects_points_then_classes(nms, max_dets):
    # 320 x 320 image, strides 8 and 16: 1600 and 400 points, 3 classes with random scores,
    # i.e. ~4500 candidate (point, class) pairs on the first level: ranking pairs (detectron2)
    # and ranking points (the authors) keep different candidates.
    strides, size, num_classes, topk = (8, 16), (320, 320), 3, 1000
    g = torch.Generator().manual_seed(0)
    points = [torch.stack(torch.meshgrid(torch.arange(0.0, 320, s), torch.arange(0.0, 320, s),
                                         indexing="xy"), dim=-1).reshape(-1, 2) for s in strides]
    scores = [torch.rand(len(p), num_classes, generator=g) for p in points]
    scores[0][::7, 1] = 0.05  # exactly the threshold: not a candidate (score > threshold)
    distances = [torch.rand(len(p), 4, generator=g) * 40 + 2 for p in points]
    model = make_dsla([grid(0, num_classes)], [grid(0, 4)], strides=strides,
                      num_classes=num_classes, test_nms_thresh=nms,
                      max_detections_per_image=max_dets, test_topk_candidates=topk)
    anchors = model.anchor_generator([torch.zeros(1, 0, 40, 40), torch.zeros(1, 0, 20, 20)])
    inst = model.inference_single_image(anchors, scores, distances, size)
    expected = direct_detections(points, scores, distances, size, topk, 0.05, nms, max_dets)
    if nms == 1.0:  # nothing suppressed: the count shows the rule (pairs would give <= 2000)
        assert len(expected) > 2 * topk
    assert inst.scores.tolist() == sorted(inst.scores.tolist(), reverse=True)
    # torch.rand repeats a few float32 values: compare in one order that also breaks ties.
    actual = sorted(zip(inst.scores.tolist(), inst.pred_classes.tolist(),
                        inst.pred_boxes.tensor.tolist()), reverse=True)
    expected = sorted(expected, reverse=True)
    assert [a[:2] for a in actual] == [e[:2] for e in expected]
    torch.testing.assert_close(torch.tensor([a[2] for a in actual]),
                               torch.tensor([e[2] for e in expected]))


# --- arguments ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, name", [
    ({"iou_coupling": "yes"}, "iou_coupling"),
    ({"box_loss_type": "l1"}, "box_loss_type"),
    ({"core_zone": "no"}, "core_zone"),
    ({"relaxation_factor": 1.0}, "relaxation_factor"),
    ({"qfl_beta": -1.0}, "qfl_beta"),
    ({"regress_ranges": [(0, 64), (64, 128)]}, "regress_ranges"),
    ({"head_in_features": ["p9"]}, "head_in_features"),
    ({"test_nms_thresh": 1.5}, "test_nms_thresh"),
    ({"test_topk_candidates": 0}, "test_topk_candidates"),
])
def test_constructor_checks_its_arguments(kwargs, name):
    with pytest.raises(UserError, match=f"DSLA argument {name} = "):
        make_dsla(*box_loss_head(), **kwargs)
