"""Hand-computed checks of the loss functions and the head (docs/METHOD.md, "Losses" and
"Network"); the losses of the whole model are in test_model_by_hand.py."""
import math

import pytest
import torch

from dsla.head import DSLAHead
from dsla.losses import box_iou_loss, quality_focal_loss

LN2 = math.log(2.0)


def test_qfl_hand_computed():
    # Two points, two classes, all logits 0 -> sigma = 0.5 everywhere.
    # Point 0 is positive for class 1 with y = 0.8:
    #   pos entry:  BCE(0.5, 0.8) * |0.8 - 0.5|^2 = ln2 * 0.09
    #   neg entry (class 0): BCE(0.5, 0) * 0.5^2 = ln2 * 0.25
    # Point 1 is background: 2 x ln2 * 0.25.
    logits = torch.zeros(2, 2)
    loss = quality_focal_loss(logits, torch.tensor([1, 2]), torch.tensor([0.8, 0.0]), beta=2.0)
    assert loss.item() == pytest.approx(LN2 * 0.09 + 3 * LN2 * 0.25, rel=1e-6)


def test_qfl_nonzero_logits_and_beta():
    # z = 2 for the target entry, y = 1, beta = 1: BCE = -log(sigmoid(2)), |1 - s| = 1 - s.
    # The other entry (z = -1) is a negative: -log(1 - sigmoid(-1)) * sigmoid(-1).
    s2, sm1 = torch.sigmoid(torch.tensor(2.0)).item(), torch.sigmoid(torch.tensor(-1.0)).item()
    expected = -math.log(s2) * (1 - s2) - math.log(1 - sm1) * sm1
    loss = quality_focal_loss(torch.tensor([[2.0, -1.0]]), torch.tensor([0]),
                              torch.tensor([1.0]), beta=1.0)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_qfl_zero_target_equals_background():
    # A positive whose coupled target is 0 is trained exactly like background (docs/METHOD.md,
    # "IoU coupling").
    logits = torch.randn(3, 4)
    as_pos = quality_focal_loss(logits, torch.tensor([2, 4, 4]), torch.zeros(3))
    as_bg = quality_focal_loss(logits, torch.tensor([4, 4, 4]), torch.zeros(3))
    assert as_pos.item() == pytest.approx(as_bg.item(), rel=1e-6)


def test_losses_float32_under_autocast():
    logits = torch.randn(5, 3, dtype=torch.bfloat16, requires_grad=True)
    boxes = torch.tensor([[0.0, 0, 10, 10]], dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        qfl = quality_focal_loss(logits, torch.tensor([0, 3, 3, 1, 3]), torch.rand(5))
        box = box_iou_loss(boxes, boxes + 1, torch.ones(1))
    assert qfl.dtype == torch.float32 and box.dtype == torch.float32
    qfl.backward()
    assert logits.grad is not None


def test_iou_loss_hand_computed():
    # pred 10x10 inside target 10x20: IoU = 100 / 200 -> -log(0.5) = ln2, weight 0.5.
    pred = torch.tensor([[0.0, 0, 10, 10]])
    target = torch.tensor([[0.0, 0, 10, 20]])
    loss = box_iou_loss(pred, target, torch.tensor([0.5]), "iou")
    assert loss.item() == pytest.approx(0.5 * LN2, rel=1e-6)
    # Disjoint boxes: IoU 0 is clamped at 1e-6.
    far = box_iou_loss(pred, pred + 100, torch.tensor([1.0]), "iou")
    assert far.item() == pytest.approx(-math.log(1e-6), rel=1e-5)


def test_giou_loss_hand_computed():
    # Same pair: enclosing box = target (200), union 200 -> GIoU = IoU = 0.5, loss 0.5.
    pred = torch.tensor([[0.0, 0, 10, 10], [0.0, 0, 10, 10]])
    # Second pair: [20, 0, 30, 10], IoU 0, enclosure 30x10=300, union 200 -> GIoU = -1/3.
    target = torch.tensor([[0.0, 0, 10, 20], [20.0, 0, 30, 10]])
    loss = box_iou_loss(pred, target, torch.tensor([1.0, 2.0]), "giou")
    assert loss.item() == pytest.approx(0.5 + 2.0 * (1 + 1 / 3), rel=1e-5)


def test_unknown_box_loss_type():
    with pytest.raises(ValueError, match="diou"):
        box_iou_loss(torch.zeros(1, 4), torch.zeros(1, 4), torch.ones(1), "diou")


def _head(**kwargs):
    from detectron2.layers import ShapeSpec

    shapes = [ShapeSpec(channels=32, stride=s) for s in (8, 16, 32)]
    return DSLAHead(input_shape=shapes, num_classes=3, norm="GN", **kwargs)


def test_head_init_and_shapes():
    torch.manual_seed(0)
    head = _head()
    features = [torch.randn(2, 32, 16 // (2**i), 20 // (2**i)) for i in range(3)]
    logits, dists = head(features)
    assert [tuple(x.shape) for x in logits] == [(2, 3, 16, 20), (2, 3, 8, 10), (2, 3, 4, 5)]
    assert [tuple(x.shape) for x in dists] == [(2, 4, 16, 20), (2, 4, 8, 10), (2, 4, 4, 5)]
    # Prior init: every class starts at probability 0.01.
    assert head.cls_score.bias.detach().sigmoid().allclose(torch.full((3,), 0.01))
    assert all(s.scale.item() == 1.0 for s in head.scales)
    # Tower convs have no bias when GN follows; weights ~ N(0, 0.01).
    assert head.cls_convs[0].bias is None
    assert 0.005 < head.cls_convs[0].weight.std().item() < 0.015
    # exp mode: distances are positive pixels; the Scale multiplies the raw output.
    assert all((d > 0).all() for d in dists)
    with torch.no_grad():
        head.scales[0].scale.fill_(0.0)
    assert head(features)[1][0].allclose(torch.ones(2, 4, 16, 20))


def test_head_norm_on_bbox_multiplies_stride():
    torch.manual_seed(0)
    head = _head(norm_on_bbox=True)
    with torch.no_grad():
        head.bbox_pred.weight.zero_()
        head.bbox_pred.bias.copy_(torch.tensor([1.0, -1.0, 2.0, 0.5]))
    features = [torch.randn(1, 32, 4, 4) for _ in range(3)]
    dists = head(features)[1]
    for d, stride in zip(dists, (8, 16, 32)):
        expected = torch.tensor([1.0, 0.0, 2.0, 0.5]) * stride  # relu(x) * stride
        assert d[0, :, 1, 1].allclose(expected)


def test_head_dcn_and_conv_bias():
    torch.manual_seed(0)
    head = _head(dcn_on_last_conv=True, conv_bias=True)
    from dsla.head import DeformTowerConv

    assert isinstance(head.cls_convs[-1], DeformTowerConv)
    assert head.cls_convs[0].bias is not None
    features = [torch.randn(1, 32, 8, 8, requires_grad=True) for _ in range(3)]
    logits, dists = head(features)
    (sum(x.sum() for x in logits) + sum(x.sum() for x in dists)).backward()
    assert head.cls_convs[-1].conv_offset.weight.grad is not None
    # With zero offsets (the init) and mask 0.5, DCNv2 is a plain conv at half strength.
    from dsla.layers import ModulatedDeformConv2d

    dcn = ModulatedDeformConv2d(32, 16, kernel_size=3, stride=1, padding=1, bias=True)
    torch.nn.init.normal_(dcn.weight)
    torch.nn.init.normal_(dcn.bias)
    x = torch.randn(1, 32, 6, 6)
    got = dcn(x, torch.zeros(1, 18, 6, 6), torch.full((1, 9, 6, 6), 0.5))
    w_only = torch.nn.functional.conv2d(x, dcn.weight, None, padding=1)
    assert got.allclose(0.5 * w_only + dcn.bias.view(1, -1, 1, 1), atol=1e-4)
