"""Backbones (dsla.backbone): the deformable ResNet builder against detectron2's, the Swin-FPN
builder and its stochastic depth; the schedules and AdamW weight-decay rules of the R-101 and
Swin-S recipes."""
import os

import pytest
import torch
from torchvision.ops import StochasticDepth

from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone, build_model
from detectron2.modeling.backbone.resnet import build_resnet_backbone

from conftest import REPO, tiny_cfg
from dsla.backbone import DeformBottleneck, build_dsla_resnet
from dsla.engine import Trainer
from dsla.errors import UserError
from dsla.layers import DeformConv2d, ModulatedDeformConv2d

SWIN_TRAIN = os.path.join(REPO, "configs", "COCO-Detection", "dsla_Swin_S_FPN_ms_3x.yaml")
R101_TRAIN = os.path.join(REPO, "configs", "COCO-Detection", "dsla_R_101_FPN_dcn_ms_2x.yaml")
# A small Swin (same structure as Swin-S, fewer and narrower blocks) for builder tests.
TINY_SWIN = ("MODEL.SWIN.EMBED_DIM", 16, "MODEL.SWIN.DEPTHS", [2, 2, 2, 2],
             "MODEL.SWIN.NUM_HEADS", [1, 2, 2, 4])


def _resnet_cfg(*opts):
    """The R-101 DCN recipe's ResNet settings at depth 50 (fast to build)."""
    return tiny_cfg("MODEL.RESNETS.DEPTH", 50, "MODEL.RESNETS.NORM", "FrozenBN", *opts,
                    config_file=R101_TRAIN)


@pytest.mark.parametrize("opts", [
    (),
    ("MODEL.RESNETS.NUM_GROUPS", 8, "MODEL.RESNETS.WIDTH_PER_GROUP", 8,
     "MODEL.RESNETS.STRIDE_IN_1X1", True, "MODEL.BACKBONE.FREEZE_AT", 4),
], ids=["R50-dcn-res3-5", "X50-caffe-frozen-res4"])
def test_deformable_resnet_is_detectron2s_resnet_plus_offsets(opts):
    """Same blocks, keys, shapes, strides and frozen parameters as detectron2's builder gives
    without DCN, plus one offset conv per deformable block."""
    cfg = _resnet_cfg(*opts)
    ours = build_dsla_resnet(cfg, ShapeSpec(channels=3))
    plain_cfg = cfg.clone()
    plain_cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE = [False] * 4
    theirs = build_resnet_backbone(plain_cfg, ShapeSpec(channels=3))
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    offsets = [k for k in ours_sd if "conv2_offset" in k]
    assert len(offsets) == 2 * (4 + 6 + 3)
    assert {k: v.shape for k, v in ours_sd.items() if k not in offsets} == {
        k: v.shape for k, v in theirs_sd.items()}
    trainable = lambda m: {n for n, p in m.named_parameters() if p.requires_grad}  # noqa: E731
    assert trainable(ours) - set(offsets) == trainable(theirs)
    assert ours.output_shape() == theirs.output_shape()
    blocks = [type(b) for stage in (ours.res2, ours.res3, ours.res4, ours.res5) for b in stage]
    assert blocks.count(DeformBottleneck) == 4 + 6 + 3 and isinstance(ours.res5[0].conv2,
                                                                        DeformConv2d)


def test_modulated_deformable_resnet_runs_and_starts_as_plain_conv():
    """DCNv2 blocks (DEFORM_MODULATED): zero-initialised offsets and mask logits, i.e. sampling
    at the regular grid with mask 0.5, so a block's conv2 is half the plain conv at start."""
    cfg = _resnet_cfg("MODEL.RESNETS.DEFORM_MODULATED", True)
    resnet = build_dsla_resnet(cfg, ShapeSpec(channels=3)).eval()
    block = resnet.res3[1]
    assert isinstance(block.conv2, ModulatedDeformConv2d)
    assert block.conv2_offset.out_channels == 27
    assert not block.conv2_offset.weight.any() and not block.conv2_offset.bias.any()
    x = torch.randn(1, 128, 8, 12)
    with torch.no_grad():
        plain = torch.nn.functional.conv2d(x, block.conv2.weight, padding=1)
        deform = block.conv2(x, torch.zeros(1, 18, 8, 12), torch.full((1, 9, 8, 12), 0.5))
        torch.testing.assert_close(deform, block.conv2.norm(0.5 * plain))
        outputs = resnet(torch.randn(1, 3, 64, 96))
    assert outputs["res5"].shape == (1, 2048, 2, 3)


def test_deform_on_basic_block_resnet_is_a_user_error():
    with pytest.raises(UserError, match="DEFORM_ON_PER_STAGE.*DEPTH = 18"):
        build_dsla_resnet(tiny_cfg("MODEL.RESNETS.DEFORM_ON_PER_STAGE", [False, True, True, True]),
                          ShapeSpec(channels=3))


@pytest.fixture(scope="module")
def tiny_swin_cfg():
    return tiny_cfg(*TINY_SWIN, config_file=SWIN_TRAIN)


def test_swin_fpn_levels(tiny_swin_cfg):
    backbone = build_backbone(tiny_swin_cfg).eval()
    bottom_up = backbone.bottom_up.output_shape()
    assert {k: (v.channels, v.stride) for k, v in bottom_up.items()} == {
        "p1": (32, 8), "p2": (64, 16), "p3": (128, 32)}
    assert backbone.size_divisibility == 32  # as the authors pad (docs/METHOD.md, "Input padding")
    with torch.no_grad():
        feats = backbone(torch.randn(1, 3, 128, 256))
    assert {k: tuple(v.shape) for k, v in feats.items()} == {
        f"p{i}": (1, 256, 128 // 2 ** i, 256 // 2 ** i) for i in range(3, 8)}


def test_swin_stochastic_depth_grows_linearly(tiny_swin_cfg):
    """Drop-path rates 0 .. DROP_PATH_RATE over the blocks (0.2 in the Swin-S recipe)."""
    swin = build_backbone(tiny_swin_cfg).bottom_up
    rates = [b.drop_path.p if isinstance(b.drop_path, StochasticDepth) else 0.0
             for layer in swin.layers for b in layer.blocks]
    assert rates == pytest.approx([0.2 * i / 7 for i in range(8)])
    assert all(b.drop_path.mode == "row" for layer in swin.layers for b in layer.blocks[1:])


@pytest.mark.parametrize("features", [["p0", "p1"], ["res3", "res4", "res5"]])
def test_swin_fpn_inputs_must_be_swin_stages(tiny_swin_cfg, features):
    cfg = tiny_swin_cfg.clone()
    cfg.MODEL.FPN.IN_FEATURES = features
    with pytest.raises(UserError, match="MODEL.FPN.IN_FEATURES"):
        build_backbone(cfg)


def test_swin_recipe_weight_decay(tiny_swin_cfg):
    """The authors' AdamW: lr 1e-4 everywhere; weight decay 0 on LayerNorms and relative
    position tables, 0.05 on everything else, biases included."""
    model = build_model(tiny_swin_cfg)
    optimizer = Trainer.build_optimizer(tiny_swin_cfg, model)
    assert isinstance(optimizer, torch.optim.AdamW)
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert {g["lr"] for g in optimizer.param_groups} == {1e-4}
    named = dict(model.named_parameters())
    block = "backbone.bottom_up.layers.2.blocks.1"
    for name, wd in [(f"{block}.attn.relative_position_bias_table", 0.0),
                     (f"{block}.norm1.weight", 0.0), (f"{block}.norm2.bias", 0.0),
                     ("backbone.bottom_up.norm3.weight", 0.0),
                     ("backbone.bottom_up.layers.0.downsample.norm.bias", 0.0),
                     (f"{block}.attn.qkv.weight", 0.05), (f"{block}.attn.qkv.bias", 0.05),
                     (f"{block}.mlp.fc2.bias", 0.05), ("backbone.fpn_lateral3.weight", 0.05),
                     ("head.cls_convs.3.conv_offset.weight", 0.05),
                     # The documented difference: detectron2 exempts norms by type, GN included.
                     ("head.cls_convs.0.norm.weight", 0.0)]:
        assert decay[id(named[name])] == wd, name


@pytest.mark.parametrize("config, epochs, steps", [
    (R101_TRAIN, 24, (16, 22)), (SWIN_TRAIN, 36, (27, 33))], ids=["R101", "Swin-S"])
def test_recipe_schedules_in_epochs(config, epochs, steps):
    """The logs' epochs: 7330 iterations (117266 train2017 images with boxes / batch 16)."""
    cfg = tiny_cfg(config_file=config)
    assert cfg.SOLVER.IMS_PER_BATCH == 16 and cfg.SOLVER.MAX_ITER == epochs * 7330
    assert tuple(cfg.SOLVER.STEPS) == tuple(7330 * e for e in steps)
    assert (cfg.SOLVER.WARMUP_METHOD, cfg.SOLVER.WARMUP_FACTOR, cfg.SOLVER.WARMUP_ITERS) == (
        "linear", 0.001, 1000)
    assert not cfg.SOLVER.CLIP_GRADIENTS.ENABLED
    assert (cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING) == ((640, 800), "choice")
