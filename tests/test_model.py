"""The DSLA meta-architecture built from the CPU config: losses with empty / one-box ground
truth, every option, training on a fixed batch, inference, crowded and positive-less images,
config validation. Hand-computed losses and detections are in test_model_by_hand.py."""
import math
import os

import pytest
import torch

from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from conftest import REPO, make_inputs, tiny_cfg
from dsla.errors import UserError
from dsla.meta_arch import DSLA

ONE_BOX = [[[20.0, 24.0, 90.0, 100.0]]]


def _model(*opts):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(*opts))
    model.train()
    return model


def test_empty_ground_truth_cls_positive_box_zero(storage):
    model = _model()
    losses = model(make_inputs([[]]))
    assert losses["loss_dsla_cls"].item() > 0
    assert losses["loss_dsla_box"].item() == 0
    # The zero box loss is still part of the graph (DDP needs every rank to backpropagate).
    assert losses["loss_dsla_box"].requires_grad
    sum(losses.values()).backward()


def test_one_box_both_losses_positive(storage):
    losses = _model()(make_inputs(ONE_BOX, [[2]]))
    assert losses["loss_dsla_cls"].item() > 0
    assert losses["loss_dsla_box"].item() > 0


OPTIONS = [
    (),
    ("MODEL.DSLA.IOU_COUPLING", "off"),
    ("MODEL.DSLA.IOU_COUPLING", "iou_only"),
    ("MODEL.DSLA.BOX_LOSS_TYPE", "giou"),
    ("MODEL.DSLA.NORM_ON_BBOX", True),
    ("MODEL.DSLA.DCN_ON_LAST_CONV", True),
    ("MODEL.DSLA.CONV_BIAS", True),
    ("MODEL.DSLA.CENTER_SAMPLING_RADIUS", 1.5),
    ("MODEL.DSLA.INTERVAL_RELAXATION_FACTOR", 0.0),
    ("MODEL.DSLA.CORE_ZONE", False),
    ("MODEL.DSLA.SMOOTH_LABEL", False),
    ("MODEL.DSLA.CLS_LOSS_WEIGHT", 2.0, "MODEL.DSLA.QFL_BETA", 1.0),
]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(map(str, o)) or "default")
def test_every_option_trains(storage, opts):
    model = _model(*opts)
    batch = make_inputs(ONE_BOX + [[[5.0, 5.0, 40.0, 30.0], [60.0, 50.0, 120.0, 126.0]]],
                        [[0], [1, 2]])
    losses = model(batch)
    assert all(torch.isfinite(v) and v.item() > 0 for v in losses.values()), losses
    sum(losses.values()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_iou_coupling_targets_hand_computed():
    model = _model()
    pred = torch.tensor([[0.0, 0, 10, 10], [0.0, 0, 10, 10]])
    gt = torch.tensor([[0.0, 0, 10, 20], [0.0, 0, 10, 10]])
    q = torch.tensor([0.6, 0.5])
    # IoUs 0.5 and 1.0.
    for mode, expected in [("on", [0.3, 0.5]), ("off", [0.6, 0.5]), ("iou_only", [0.5, 1.0])]:
        model.iou_coupling = mode
        y, iou = model.classification_targets(pred, gt, q)
        assert y.tolist() == pytest.approx(expected)
        assert iou.tolist() == pytest.approx([0.5, 1.0])


def test_iou_target_is_detached(storage):
    model = _model()
    pred = torch.tensor([[0.0, 0, 10, 10]], requires_grad=True)
    y, _ = model.classification_targets(pred, torch.tensor([[0.0, 0, 10, 20]]), torch.ones(1))
    assert not y.requires_grad


def test_trains_on_fixed_batch(storage):
    torch.manual_seed(0)
    model = _model()
    batch = make_inputs([[[10.0, 12.0, 70.0, 80.0], [64.0, 40.0, 120.0, 120.0]],
                         [[30.0, 30.0, 100.0, 60.0]]], [[0, 1], [2]])
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    totals = []
    for _ in range(12):
        loss = sum(model(batch).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        totals.append(loss.item())
    assert all(map(lambda v: v == v and abs(v) < 1e6, totals))
    assert sum(totals[-3:]) / 3 < 0.7 * sum(totals[:3]) / 3, totals


def test_inference_returns_instances():
    model = _model()
    model.eval()
    # Every class of every point scores 0.3 (above the 0.05 threshold), so there are detections:
    # the full model must return them, capped, rescaled to each requested size.
    with torch.no_grad():
        model.head.cls_score.weight.zero_()
        model.head.cls_score.bias.fill_(math.log(0.3 / 0.7))
    batch = make_inputs(ONE_BOX + ONE_BOX)
    batch[1]["height"], batch[1]["width"] = 256, 200  # rescaled to the requested size
    with torch.no_grad():
        out = model(batch)
    assert len(out) == 2
    for res, (h, w) in zip(out, [(128, 128), (256, 200)]):
        inst = res["instances"]
        assert isinstance(inst, Instances) and inst.image_size == (h, w)
        assert {"pred_boxes", "scores", "pred_classes"} <= set(inst.get_fields())
        assert len(inst) == 100
        torch.testing.assert_close(inst.scores, torch.full((100,), 0.3))
        assert ((inst.pred_classes >= 0) & (inst.pred_classes < model.num_classes)).all()
        boxes = inst.pred_boxes.tensor
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()


def test_inference_threshold_topk_nms_and_clip():
    model = _model("MODEL.DSLA.SCORE_THRESH_TEST", 0.0, "TEST.DETECTIONS_PER_IMAGE", 37,
                   "MODEL.DSLA.NMS_THRESH_TEST", 1.0)
    model.eval()
    # Every score 0.5 and every distance e^6 = 403 px: all boxes clip to the whole image.
    with torch.no_grad():
        model.head.cls_score.weight.zero_()
        model.head.cls_score.bias.zero_()
        model.head.bbox_pred.bias.fill_(6.0)
        batch = make_inputs([[]])
        no_nms = model(batch)[0]["instances"]
        model.test_nms_thresh = 0.6
        nms = model(batch)[0]["instances"]
    # NMS at IoU 1.0 removes nothing: the per-image cap applies.
    assert len(no_nms) == 37
    assert no_nms.pred_boxes.tensor.tolist() == [[0.0, 0.0, 128.0, 128.0]] * 37
    # Class-aware NMS: identical boxes collapse to one per class.
    assert sorted(nms.pred_classes.tolist()) == list(range(model.num_classes))


def test_empty_batch_zero_positive_and_crowded_images(storage):
    model = _model()
    # A 1-px box between points has no point strictly inside: an image with 0 positives.
    tiny = [[[3.0, 3.0, 4.0, 4.0]]]
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(1000, 2, generator=g) * 100
    wh = torch.rand(1000, 2, generator=g) * 27 + 1
    crowded = [torch.cat([xy, xy + wh], dim=1).tolist()]
    batch = make_inputs([[]] + tiny + crowded, [[], [0], [i % model.num_classes for i in range(1000)]])
    strides = (8, 16, 32, 64, 128)
    anchors = model.anchor_generator([torch.zeros(1, 1, 128 // s, 128 // s) for s in strides])
    labels = model.label_points(anchors, [b["instances"] for b in batch])[0]
    bg = model.num_classes
    assert (labels[0] == bg).all() and (labels[1] == bg).all() and (labels[2] != bg).any()
    losses = model(batch)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("MODEL.DSLA.REGRESS_RANGES", [[0, 64], [64, 128]], r"one \[lo, hi\] per head input"),
        ("MODEL.DSLA.REGRESS_RANGES", [[0, 64], [32, 16], [128, 256], [256, 512], [512, 1e8]],
         "REGRESS_RANGES"),
        ("MODEL.DSLA.REGRESS_RANGES", [[0, 64], [128, 256], [64, 128], [256, 512], [512, 1e8]],
         "increase"),
        ("MODEL.DSLA.INTERVAL_RELAXATION_FACTOR", 1.0, r"\[0, 1\)"),
        ("MODEL.DSLA.INTERVAL_RELAXATION_FACTOR", -0.1, r"\[0, 1\)"),
        ("MODEL.DSLA.IOU_COUPLING", "maybe", "IOU_COUPLING"),
        ("MODEL.DSLA.BOX_LOSS_TYPE", "l1", "BOX_LOSS_TYPE"),
        ("MODEL.DSLA.IN_FEATURES", ["p3", "p4", "p9", "p6", "p7"], "p9"),
        ("MODEL.DSLA.CENTER_SAMPLING_RADIUS", -1.0, "CENTER_SAMPLING_RADIUS"),
        ("MODEL.DSLA.NUM_CLASSES", 0, "NUM_CLASSES"),
        ("MODEL.DSLA.QFL_BETA", -2.0, "QFL_BETA"),
        ("MODEL.DSLA.BOX_LOSS_WEIGHT", -1.0, "BOX_LOSS_WEIGHT"),
        ("MODEL.DSLA.NMS_THRESH_TEST", 1.5, "NMS_THRESH_TEST"),
        ("MODEL.DSLA.PRIOR_PROB", 1.0, "PRIOR_PROB"),
        ("TEST.DETECTIONS_PER_IMAGE", 0, "DETECTIONS_PER_IMAGE"),
    ],
)
def test_bad_config_values_name_the_key(key, value, match):
    cfg = tiny_cfg()
    cfg.merge_from_list([key, value])
    with pytest.raises(UserError, match=match) as err:
        build_model(cfg)
    assert str(err.value).startswith(f"Invalid {key} = ")


def test_model_is_registered_dsla():
    from detectron2.modeling import META_ARCH_REGISTRY

    assert META_ARCH_REGISTRY.get("DSLA") is DSLA
    assert isinstance(_model(), DSLA)
    # The head has no centerness branch (docs/METHOD.md, "Network").
    assert not any("ctr" in n or "centerness" in n for n, _ in _model().named_parameters())


def test_points_have_no_half_stride_offset():
    model = _model()
    anchors = model.anchor_generator([torch.zeros(1, 1, 2, 3)])
    centres = anchors[0].get_centers()
    assert isinstance(anchors[0], Boxes)
    assert centres.tolist() == [[0, 0], [8, 0], [16, 0], [0, 8], [8, 8], [16, 8]]


def test_fcos_baseline_takes_smallest_box(storage):
    # detectron2's FCOS puts points at ((j + 0.5) s, (i + 0.5) s). Its point (48, 48) of P5
    # (stride 32, range [32, 64]) lies in both boxes:
    #   A = [0, 0, 100, 100]:   l = t = 48, r = b = 52 -> m = 52 (in range), centerness 0.92
    #   B = [40, 40, 100, 100]: l = t = 8,  r = b = 52 -> m = 52 (in range), centerness 0.15
    # and in both centre-sampling regions (1.5 x 32 = 48 px around the centres, clipped).
    # FCOS counts every positive the same: the smaller box (B, class 1) wins, not the better q.
    boxes = [[[0.0, 0.0, 100.0, 100.0], [40.0, 40.0, 100.0, 100.0]]]
    batch = make_inputs(boxes, [[0, 1]])
    torch.manual_seed(0)
    fcos = build_model(tiny_cfg(config_file=os.path.join(REPO, "configs", "Shapes",
                                                         "fcos_R_18_FPN_cpu.yaml"))).train()
    strides = (8, 16, 32, 64, 128)
    anchors = fcos.anchor_generator([torch.zeros(1, 1, 128 // s, 128 // s) for s in strides])
    centres = torch.cat([a.get_centers() for a in anchors])
    level = torch.cat([torch.full((len(a),), s) for a, s in zip(anchors, strides)])
    index = ((centres == torch.tensor([48.0, 48.0])).all(1) & (level == 32)).nonzero().item()
    labels, matched = fcos.label_anchors(anchors, [batch[0]["instances"]])
    assert labels[0][index].item() == 1
    assert matched[0][index].tolist() == boxes[0][1]
    # P4 point (40, 40): m = 60 for A is outside [16, 32], and it lies on the edge of B.
    index_p4 = ((centres == torch.tensor([40.0, 40.0])).all(1) & (level == 16)).nonzero().item()
    assert labels[0][index_p4].item() == fcos.num_classes  # background
    losses = fcos(batch)
    assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("smooth", [True, False])
def test_smooth_label_maps_are_the_training_labels(smooth):
    # The pictures of the assignment show what training uses: label_points on the model's grid.
    model = _model("MODEL.DSLA.SMOOTH_LABEL", smooth)
    inst = make_inputs([[[5.0, 5.0, 40.0, 30.0], [60.0, 50.0, 120.0, 126.0]]], [[1, 2]])[0][
        "instances"]
    strides = (8, 16, 32, 64, 128)
    anchors = model.anchor_generator([torch.zeros(1, 1, 128 // s, 128 // s) for s in strides])
    _, scores, _ = model.label_points(anchors, [inst])
    maps = model.smooth_label_maps((128, 128), inst)
    assert [tuple(m.shape) for m in maps] == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    assert torch.equal(torch.cat([m.flatten() for m in maps]), scores[0])
    assert (scores > 0).any()
    if not smooth:
        assert set(scores.unique().tolist()) == {0.0, 1.0}
    # An image whose size is not a multiple of the strides: ceil(H / s) x ceil(W / s) points.
    assert [tuple(m.shape) for m in model.smooth_label_maps((100, 60), inst)] == [
        (13, 8), (7, 4), (4, 2), (2, 1), (1, 1)]


def test_pads_to_32_as_the_authors_and_grids_follow(storage):
    """docs/METHOD.md, "Input padding": a 200x300 image is padded to 224x320 (not 256x384), P6
    and P7 are the ceil of the padded size / stride, and the points match the feature maps in
    training and inference."""
    from dsla.points import grid_sizes

    model = _model()
    inst = Instances((200, 300), gt_boxes=Boxes(torch.tensor(ONE_BOX[0])),
                     gt_classes=torch.tensor([1]))
    batch = [{"image": torch.rand(3, 200, 300) * 255, "height": 200, "width": 300,
              "instances": inst}]
    images = model.preprocess_image(batch)
    assert tuple(images.tensor.shape[-2:]) == (224, 320)
    features = model.backbone(images.tensor)
    sizes = [tuple(features[f].shape[-2:]) for f in model.head_in_features]
    assert sizes == grid_sizes((224, 320), [8, 16, 32, 64, 128])
    assert sizes[-2:] == [(4, 5), (2, 3)]
    losses = model(batch)
    assert losses["loss_dsla_box"].item() > 0
    model.eval()
    with torch.no_grad():
        assert model(batch)[0]["instances"].image_size == (200, 300)
