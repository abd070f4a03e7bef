"""The plain-FCOS baseline (dsla/baselines/fcos_plain.py): losses with empty / one-box ground
truth, every normaliser, weight and the centerness weighting pinned by hand-computed numbers, the
centerness branch on the classification tower, score = cls x centerness, and its configs
training."""
import math
import os
import subprocess
import sys

import pytest
import torch

from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.backbone import Backbone
from detectron2.structures import Boxes, ImageList, Instances

import dsla.baselines.fcos_plain as fcos_plain
from conftest import REPO, make_inputs, tiny_cfg
from dsla.data import generate_shapes_dataset
from dsla.baselines import FCOSPlain
from dsla.meta_arch import DSLA
from dsla.point_detector import PointDetector

PLAIN = os.path.join(REPO, "configs", "Shapes", "fcos_plain_R_18_FPN_cpu.yaml")
TRICKS = os.path.join(REPO, "configs", "Shapes", "dsla_tricks_R_18_FPN_cpu.yaml")
ONE_BOX = [[[20.0, 24.0, 90.0, 100.0]]]
LOSSES = ("loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr")


def _model(*opts, config_file=PLAIN):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(*opts, config_file=config_file))
    model.train()
    return model


def test_config_builds_plain_fcos():
    model = _model()
    # A sibling of DSLA, not a subclass.
    assert type(model) is FCOSPlain and isinstance(model, PointDetector)
    assert not isinstance(model, DSLA)
    assert model.center_sampling_radius == 0.0 and model.box_loss_type == "iou"
    assert model.cls_loss_weight == 1.0 and not model.head.norm_on_bbox
    assert (model.focal_loss_alpha, model.focal_loss_gamma) == (0.25, 2.0)
    assert model.head.centerness.weight.shape == (1, 64, 3, 3)


def test_empty_ground_truth_cls_positive_box_and_ctr_zero(storage):
    losses = _model()(make_inputs([[]]))
    assert set(losses) == set(LOSSES)
    assert losses["loss_fcos_cls"].item() > 0
    for name in ("loss_fcos_loc", "loss_fcos_ctr"):
        assert losses[name].item() == 0
        # Still part of the graph (DDP needs every rank to backpropagate).
        assert losses[name].requires_grad
    sum(losses.values()).backward()


def test_one_box_all_losses_positive_and_every_parameter_learns(storage):
    model = _model()
    losses = model(make_inputs(ONE_BOX, [[2]]))
    assert all(losses[name].item() > 0 for name in LOSSES), losses
    sum(losses.values()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad}"


def test_centerness_branch_sits_on_the_classification_tower():
    head = _model().head.eval()
    features = [torch.rand(1, 64, 8, 8) for _ in range(5)]
    with torch.no_grad():
        before = head(features)[2][0].clone()
        head.reg_convs[0].weight.mul_(3.0)
        assert torch.equal(head(features)[2][0], before)
        head.cls_convs[0].weight.mul_(3.0)
        assert not torch.allclose(head(features)[2][0], before)


class _OneLevel(Backbone):
    """A backbone stub: the input is the single stride-8 feature map."""

    def forward(self, x):
        return {"p3": x}

    def output_shape(self):
        return {"p3": ShapeSpec(channels=1, stride=8)}


# One 32 x 32 image, one level of stride 8 (4 x 4 points), box [2, 2, 26, 14] of class 1:
# the points strictly inside are (8, 8), (16, 8), (24, 8), i.e. flat indices 5, 6, 7, each with
# t = b = 6 and (l, r) = (6, 18), (14, 10), (22, 2). Their predicted (l, t, r, b):
GT_BOX = [2.0, 2.0, 26.0, 14.0]
POSITIVES = [5, 6, 7]
PRED_DISTS = [[6.0, 6.0, 12.0, 6.0], [10.0, 4.0, 10.0, 4.0], [20.0, 6.0, 2.0, 6.0]]
# -> boxes [2, 2, 20, 14], [6, 4, 26, 12], [4, 2, 26, 14]; IoUs with the gt box 216/288,
# 160/288, 264/288.
IOUS = [216 / 288, 160 / 288, 264 / 288]
CTR_TARGETS = [math.sqrt(6 / 18), math.sqrt(10 / 14), math.sqrt(2 / 22)]


def _hand_losses(logits, ctr_logits, alpha, gamma, num_pos, ctr_sum):
    """The three un-weighted losses, written from their definitions in plain torch."""
    p = logits.sigmoid()  # [16, 2]
    y = torch.zeros_like(p)
    y[POSITIVES, 1] = 1.0
    focal = -(alpha * y * (1 - p) ** gamma * p.log()
              + (1 - alpha) * (1 - y) * p ** gamma * (1 - p).log())
    iou_loss = sum(c * -math.log(i) for c, i in zip(CTR_TARGETS, IOUS))
    q = ctr_logits[POSITIVES].sigmoid()
    c = torch.tensor(CTR_TARGETS)
    bce = -(c * q.log() + (1 - c) * (1 - q).log())
    return focal.sum().item() / num_pos, iou_loss / ctr_sum, bce.sum().item() / num_pos


@pytest.mark.parametrize("workers_scale", [1.0, 0.5])
def test_losses_hand_computed(storage, monkeypatch, workers_scale):
    # workers_scale 0.5 stands for the other workers having half as many positives / half the
    # centerness mass: both normalisers must go through all_reduce_mean. The ctr sum is then
    # 0.86, which mmdetection does not clamp to 1 (only to 1e-6).
    monkeypatch.setattr(fcos_plain, "all_reduce_mean", lambda v: v * workers_scale)
    model = FCOSPlain(
        backbone=_OneLevel(), head=torch.nn.Identity(), head_in_features=["p3"], num_classes=2,
        regress_ranges=[(0, 1e8)], focal_loss_alpha=0.3, focal_loss_gamma=1.5,
        cls_loss_weight=2.0, box_loss_weight=3.0, pixel_mean=[0.0], pixel_std=[1.0],
    )
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 2, generator=g)
    ctr_logits = torch.randn(16, generator=g)
    dists = torch.ones(16, 4)
    dists[POSITIVES] = torch.tensor(PRED_DISTS)
    predictions = [[logits.T.reshape(1, 2, 4, 4)], [dists.T.reshape(1, 4, 4, 4)],
                   [ctr_logits.reshape(1, 1, 4, 4)]]
    inst = Instances((32, 32), gt_boxes=Boxes(torch.tensor([GT_BOX])),
                     gt_classes=torch.tensor([1]))
    images = ImageList(torch.zeros(1, 1, 32, 32), [(32, 32)])
    losses = model.forward_training(images, [torch.zeros(1, 1, 4, 4)], predictions, [inst])
    cls, loc, ctr = _hand_losses(logits, ctr_logits, 0.3, 1.5, 3 * workers_scale,
                                 sum(CTR_TARGETS) * workers_scale)
    assert losses["loss_fcos_cls"].item() == pytest.approx(2.0 * cls, rel=1e-5)
    assert losses["loss_fcos_loc"].item() == pytest.approx(3.0 * loc, rel=1e-5)
    assert losses["loss_fcos_ctr"].item() == pytest.approx(ctr, rel=1e-5)


def test_focal_loss_hand_computed_and_float32_under_autocast():
    logits = torch.tensor([[0.5, -1.0], [2.0, 0.25]])
    labels = torch.tensor([1, 2])  # second row: background (C = 2)
    p = logits.sigmoid()
    # alpha 0.25, gamma 2: positives -alpha (1-p)^2 log p, negatives -(1-alpha) p^2 log(1-p).
    positive = -0.25 * (1 - p[0, 1]) ** 2 * p[0, 1].log()
    negatives = p[0, 0] ** 2 * (1 - p[0, 0]).log() + (p[1] ** 2 * (1 - p[1]).log()).sum()
    expected = positive - 0.75 * negatives
    assert fcos_plain.focal_loss_sum(logits, labels, 0.25, 2.0).item() == pytest.approx(
        expected.item(), rel=1e-6)
    # bfloat16 logits, with or without autocast: computed in float32 from the rounded values.
    half = torch.randn(64, 6, generator=torch.Generator().manual_seed(0)).bfloat16()
    labels = torch.arange(64) % 7
    reference = fcos_plain.focal_loss_sum(half.float(), labels, 0.25, 2.0).item()
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = fcos_plain.focal_loss_sum(half, labels, 0.25, 2.0)
        assert loss.dtype == torch.float32
        assert loss.item() == pytest.approx(reference, rel=1e-6)


def test_losses_float32_under_autocast(storage):
    model = _model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(make_inputs(ONE_BOX))
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("ctr_prob", [0.4, 0.9])
def test_score_is_cls_times_centerness(ctr_prob):
    model = _model("MODEL.FCOS_PLAIN.SCORE_THRESH_TEST", 0.0)
    model.eval()
    # Every class probability 0.5, every centerness probability ctr_prob, every distance
    # e^6 = 403 px: the boxes clip to the whole image and NMS keeps one per class.
    with torch.no_grad():
        model.head.cls_score.weight.zero_()
        model.head.cls_score.bias.zero_()
        model.head.centerness.weight.zero_()
        model.head.centerness.bias.fill_(math.log(ctr_prob / (1 - ctr_prob)))
        model.head.bbox_pred.bias.fill_(6.0)
        inst = model(make_inputs([[]]))[0]["instances"]
    assert sorted(inst.pred_classes.tolist()) == list(range(model.num_classes))
    # cls x ctr: not cls alone (0.5), not detectron2's sqrt(cls x ctr).
    assert inst.scores.tolist() == pytest.approx([0.5 * ctr_prob] * model.num_classes)
    assert inst.pred_boxes.tensor.tolist() == [[0.0, 0.0, 128.0, 128.0]] * model.num_classes


def test_tricks_config_trains_on_a_batch(storage):
    model = _model(config_file=TRICKS)
    assert type(model) is DSLA and model.box_loss_type == "giou"
    assert model.center_sampling_radius == 1.5 and model.head.norm_on_bbox
    assert model.head.cls_convs[0].bias is not None  # conv bias kept despite GN
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    batch = make_inputs(ONE_BOX + [[[5.0, 5.0, 40.0, 30.0]]], [[0], [1]])
    for _ in range(2):
        losses = model(batch)
        assert all(torch.isfinite(v) and v.item() > 0 for v in losses.values()), losses
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()


def test_plain_config_trains_and_evaluates_through_train_net(tmp_path):
    root = str(tmp_path / "data")
    train = generate_shapes_dataset(root, "train", num_images=4, seed=0, image_size=128)
    val = generate_shapes_dataset(root, "val", num_images=2, seed=1, image_size=128)
    args = [
        os.path.join(REPO, "projects", "DSLA", "train_net.py"), "--config-file", PLAIN,
        "--register-coco", "tiny_train", *train, "--register-coco", "tiny_val", *val,
        "DATASETS.TRAIN", "('tiny_train',)", "DATASETS.TEST", "('tiny_val',)",
        "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "128",
        "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "128", "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.MAX_ITER", "2", "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "(1000,)",
        "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(tmp_path / "out"),
    ]
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "loss_fcos_ctr" in (tmp_path / "out" / "metrics.json").read_text()
    assert (tmp_path / "out" / "eval_results.json").is_file()
