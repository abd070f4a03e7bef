"""mmdetection -> detectron2 weight conversion (dsla.convert, tools/convert_mmdet_weights.py).

No real checkpoint is available offline, so the tests write synthetic checkpoints with the exact
key names and shapes of the authors' three released models (R-50 1x, R-101 2x DCN, Swin-S 3x;
laid out in ``mmdet_reference`` from mmdetection's definitions, independently of the converter's
rules) and check the converted models against ``mmdet_reference``'s forward pass, which is
written directly on the mmdetection weights and shares no code with ``dsla``.
"""
import copy
import math
import os
from typing import NamedTuple

import pytest
import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.backbone.swin import PatchMerging

from conftest import REPO
from dsla.cli import load_config
from dsla.tools import convert_mmdet_weights
from dsla.backbone import DeformBottleneck
from dsla.convert import (
    ConversionError,
    check_converted,
    config_hints,
    convert_mmdet_state_dict,
    describe_checkpoint,
    extract_state_dict,
    map_key,
    model_shapes,
    model_shapes_from_config,
    rename_state_dict,
    unfold_to_concat_order,
)
from dsla.errors import UserError
from dsla.head import DSLAHead
from mmdet_reference import (
    STRIDES,
    SWIN_S,
    _bottleneck,
    _patch_merging,
    neck_head_layout,
    r50_layout,
    r101_dcn_layout,
    random_state_dict,
    ref_fpn,
    ref_head,
    ref_resnet,
    ref_swin,
    resnet_layout,
    swin_s_layout,
)

CONFIG_DIR = os.path.join(REPO, "configs", "COCO-Detection")
R50 = os.path.join(CONFIG_DIR, "dsla_R_50_FPN_1x_mmdet.yaml")
R101 = os.path.join(CONFIG_DIR, "dsla_R_101_FPN_dcn_ms_2x_mmdet.yaml")
SWIN = os.path.join(CONFIG_DIR, "dsla_Swin_S_FPN_ms_3x_mmdet.yaml")
X101 = os.path.join(CONFIG_DIR, "dsla_X_101_64x4d_FPN_dcn_ms_2x.yaml")
# Non-square: every level has a non-square grid, and Swin's 64 x 96 first-stage tokens need window
# padding. Multiples of 128, so that P6 and P7 halve exactly; 224 x 320 (a multiple of 32 only,
# as the models pad) checks the rounded-up P6 / P7 below.
IMAGE_SIZE = (256, 384)


def load_cfg(path, *opts):
    return load_config(path, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", *opts], freeze=False)


def _as_double(state):
    return {k: v.double() if v.is_floating_point() else v for k, v in state.items()}


class Converted(NamedTuple):
    mmdet_state: dict  # the synthetic mmdetection state dict (float32)
    converted: dict  # detectron2 key -> tensor, as written for MODEL.WEIGHTS
    model: torch.nn.Module  # the config's model with the converted weights, float64, eval


def _convert_and_load(config, mmdet_state):
    """Build the config's model once, convert against it, load strictly."""
    model = build_model(load_cfg(config))
    converted = convert_mmdet_state_dict(mmdet_state, model_shapes(model))
    result = model.load_state_dict(converted, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return Converted(mmdet_state, converted, model.double().eval())


# ---------------------------------------------------------------------------------------------
# The three released models, each built once per session
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def r50(tmp_path_factory):
    """R-50 1x, converted through the command-line tool and loaded through MODEL.WEIGHTS."""
    tmp = tmp_path_factory.mktemp("r50")
    mmdet_state = random_state_dict(r50_layout())
    src, dst = str(tmp / "dsla_r50_mmdet.pth"), str(tmp / "dsla_r50_d2.pth")
    # A real file also holds meta and optimizer state, which the converter ignores.
    torch.save({"meta": {"epoch": 12, "CLASSES": ("person",) * 80, "mmdet_version": "2.x"},
                "state_dict": mmdet_state,
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.0001, "params": [0]}]}}, src)
    assert convert_mmdet_weights.main([src, dst, "--config-file", R50]) == 0
    written = torch.load(dst, map_location="cpu", weights_only=True)
    assert written["matching_heuristics"] is False and "__author__" in written
    model = build_model(load_cfg(R50))
    # MODEL.WEIGHTS goes through DetectionCheckpointer: exact names, no heuristic matching.
    DetectionCheckpointer(model).load(dst)
    assert torch.equal(model.head.cls_score.weight, mmdet_state["bbox_head.conv_cls.weight"])
    return Converted(mmdet_state, written["model"], model.double().eval())


@pytest.fixture(scope="module")
def r101():
    """R-101 2x: pytorch-style ResNet-101, DCNv1 in res3-res5, DCNv2 head, conv biases."""
    return _convert_and_load(R101, random_state_dict(r101_dcn_layout(), seed=1))


@pytest.fixture(scope="module")
def swin():
    """Swin-S 3x: mmdetection's Swin layout, DCNv2 head, conv biases."""
    return _convert_and_load(SWIN, random_state_dict(swin_s_layout(), seed=2))


def _image(seed, size=IMAGE_SIZE):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 3, *size, generator=g, dtype=torch.float64)


def _check_head_outputs(model, ref_logits, ref_dists, x):
    """The model's head outputs on the normalised image x equal the reference ones to 1e-4."""
    with torch.no_grad():
        feats = model.backbone(x)
        logits, dists = model.head([feats[f] for f in model.head_in_features])
    assert [tuple(t.shape[-2:]) for t in logits] == [
        (math.ceil(x.shape[-2] / s), math.ceil(x.shape[-1] / s)) for s in STRIDES]
    for out, ref in zip(logits + dists, ref_logits + ref_dists):
        assert out.shape == ref.shape
        assert torch.isfinite(ref).all() and ref.abs().max() > 1e-2  # not a degenerate test
        # Distances are computed in float32 by the head (overflow guard), hence not 1e-12.
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["r50", "r101", "swin"])
def test_converted_file_fills_the_model_exactly(name, request):
    c = request.getfixturevalue(name)
    n_dropped = sum(k.endswith("num_batches_tracked") for k in c.mmdet_state)
    assert len(c.converted) == len(c.mmdet_state) - n_dropped == len(c.model.state_dict())
    assert list(c.converted) == list(c.model.state_dict())


def test_r50_head_outputs_match_mmdet_forward(r50):
    sd, x = _as_double(r50.mmdet_state), _image(1)
    with torch.no_grad():
        ref = ref_head(ref_fpn(ref_resnet(x, sd, depth=50, style="caffe"), sd), sd)
    _check_head_outputs(r50.model, *ref, x)


def test_r50_head_outputs_match_mmdet_forward_at_a_multiple_of_32(r50):
    """224 x 320, as padding to 32 leaves such an image (docs/METHOD.md, "Input padding"): P5 is
    7 x 10, and P6 / P7 come out 4 x 5 and 2 x 3 in both frameworks."""
    sd, x = _as_double(r50.mmdet_state), _image(4, size=(224, 320))
    with torch.no_grad():
        ref = ref_head(ref_fpn(ref_resnet(x, sd, depth=50, style="caffe"), sd), sd)
    assert [tuple(t.shape[-2:]) for t in ref[0]][-2:] == [(4, 5), (2, 3)]
    _check_head_outputs(r50.model, *ref, x)


def test_r101_head_outputs_match_mmdet_forward(r101):
    """Pytorch-style ResNet-101 with mmcv DCNv1 in res3-res5 and a DCNv2 head (NORM_ON_BBOX)."""
    sd, x = _as_double(r101.mmdet_state), _image(2)
    with torch.no_grad():
        ref = ref_head(ref_fpn(ref_resnet(x, sd, depth=101, style="pytorch"), sd), sd,
                       norm_on_bbox=True)
    _check_head_outputs(r101.model, *ref, x)


def test_swin_head_outputs_match_mmdet_forward(swin):
    """mmdetection's Swin-S (unfold-order patch merging, shifted windows) and a DCNv2 head."""
    sd, x = _as_double(swin.mmdet_state), _image(3)
    with torch.no_grad():
        ref = ref_head(ref_fpn(ref_swin(x, sd, **SWIN_S), sd), sd, norm_on_bbox=True)
    _check_head_outputs(swin.model, *ref, x)


# ---------------------------------------------------------------------------------------------
# The two layouts that are easy to get wrong, on small modules (and that the checks can fail)
# ---------------------------------------------------------------------------------------------
def test_patch_merging_permutation():
    """detectron2's PatchMerging with converted weights = mmdetection's unfold-based merging;
    skipping the permutation would not be."""
    c, h, w = 8, 4, 6
    g = torch.Generator().manual_seed(4)
    sd = {"m.norm.weight": torch.rand(4 * c, generator=g, dtype=torch.float64) + 0.5,
          "m.norm.bias": torch.randn(4 * c, generator=g, dtype=torch.float64),
          "m.reduction.weight": torch.randn(2 * c, 4 * c, generator=g, dtype=torch.float64)}
    x = torch.randn(2, h * w, c, generator=g, dtype=torch.float64)
    ref, _ = _patch_merging(x, (h, w), sd, "m")
    merging = PatchMerging(dim=c).double()
    for unpermuted in (False, True):
        merging.load_state_dict({k[2:]: v if unpermuted else unfold_to_concat_order(v)
                                 for k, v in sd.items()})
        with torch.no_grad():
            same = torch.allclose(merging(x, h, w), ref, rtol=1e-10, atol=1e-10)
        assert same != unpermuted
    # One neighbour's block of channels, by hand: unfold channel c * 4 + 1 is (row 0, col 1),
    # concatenation block 2 (x(0,0), x(1,0), x(0,1), x(1,1)).
    t = torch.arange(4 * c, dtype=torch.float64)
    assert unfold_to_concat_order(t)[2 * c:3 * c].tolist() == [4 * i + 1 for i in range(c)]


def _deform_bottleneck(stride, seed=5):
    """A small pytorch-style DCNv1 bottleneck: (DeformBottleneck, its mmdetection weights)."""
    layout = {k.replace("backbone.layer2.0", "b"): s for k, s in resnet_layout(
        50, dcn_stages=(1,)).items() if k.startswith("backbone.layer2.0.")}
    sd = _as_double(random_state_dict(layout, seed=seed))
    block = DeformBottleneck(256, 512, bottleneck_channels=128, stride=stride, norm="FrozenBN")
    renamed = rename_state_dict({f"backbone.layer2.0.{k[2:]}": v for k, v in sd.items()})
    prefix = "backbone.bottom_up.res3.0."
    block.load_state_dict({k[len(prefix):]: v for k, v in renamed.tensors.items()})
    return block.double().eval(), sd


def test_deform_bottleneck_matches_mmcv_dcn():
    """DCNv1 offsets: mmcv's (dy, dx) per kernel tap, read the same by torchvision's op. Offsets
    of ~1 pixel and a border sample in and out of the image; swapping two offset channels fails."""
    block, sd = _deform_bottleneck(stride=2)
    x = torch.randn(1, 256, 12, 20, generator=torch.Generator().manual_seed(6),
                    dtype=torch.float64)
    with torch.no_grad():
        ref = _bottleneck(x, sd, "b", stride=2, style="pytorch")
        torch.testing.assert_close(block(x), ref, rtol=1e-10, atol=1e-10)
        swapped = block.conv2_offset.weight.clone()
        swapped[[0, 1]] = swapped[[1, 0]]  # dy and dx of the first tap
        block.conv2_offset.weight.copy_(swapped)
        assert not torch.allclose(block(x), ref, rtol=1e-4, atol=1e-4)


def test_dcn_head_matches_mmcv_forward():
    """DCNv2 last tower convs (27 channels: 18 offsets then 9 mask logits), conv biases,
    NORM_ON_BBOX; the head of the R-101 and Swin-S models, on small maps."""
    cfg = load_cfg(R101)
    head = DSLAHead(cfg, [ShapeSpec(channels=256, stride=s) for s in STRIDES]).double().eval()
    layout = neck_head_layout((512, 1024, 2048), head_dcn=True, conv_bias=True)
    sd = _as_double(random_state_dict({k: s for k, s in layout.items()
                                       if k.startswith("bbox_head")}))
    renamed = rename_state_dict(sd)
    check_converted(renamed, {f"head.{k}": s for k, s in model_shapes(head).items()})
    head.load_state_dict({k[len("head."):]: v for k, v in renamed.tensors.items()}, strict=True)
    g = torch.Generator().manual_seed(2)
    feats = [torch.randn(1, 256, 16 // 2 ** i, 24 // 2 ** i, generator=g, dtype=torch.float64)
             for i in range(5)]
    with torch.no_grad():
        logits, dists = head(feats)
        ref_logits, ref_dists = ref_head(feats, sd, norm_on_bbox=True)
    for out, ref in zip(logits + dists, ref_logits + ref_dists):
        torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The inference configs say what the authors' logs say
# ---------------------------------------------------------------------------------------------
IMAGENET_RGB = ("RGB", [123.675, 116.28, 103.53], [58.395, 57.12, 57.375])
CAFFE_BGR = ("BGR", [102.9801, 115.9465, 122.7717], [1.0, 1.0, 1.0])


@pytest.mark.parametrize("config, norm, backbone, head", [
    (R50, CAFFE_BGR, ("build_dsla_resnet_fpn_backbone", True), (False, False, False)),
    (R101, IMAGENET_RGB, ("build_dsla_resnet_fpn_backbone", False), (True, True, True)),
    (SWIN, IMAGENET_RGB, ("build_dsla_swin_fpn_backbone", None), (True, True, True)),
], ids=["R50", "R101", "Swin-S"])
def test_inference_config_matches_training_log(config, norm, backbone, head):
    """Input channel order and normalisation (img_norm_cfg), ResNet style (caffe: stride in the
    1x1 conv), head options (norm_on_bbox, dcn_on_last_conv, conv_bias) and test scale."""
    cfg = load_cfg(config)
    assert (cfg.INPUT.FORMAT, cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD) == norm
    name, stride_in_1x1 = backbone
    assert cfg.MODEL.BACKBONE.NAME == name
    if stride_in_1x1 is not None:
        assert cfg.MODEL.RESNETS.STRIDE_IN_1X1 == stride_in_1x1
    d = cfg.MODEL.DSLA
    assert (d.NORM_ON_BBOX, d.DCN_ON_LAST_CONV, d.CONV_BIAS) == head
    assert (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST) == (800, 1333)


# ---------------------------------------------------------------------------------------------
# Strictness and messages
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def r50_shapes():
    return model_shapes_from_config(load_cfg(R50))


@pytest.fixture(scope="module")
def r50_zeros():
    return {k: torch.zeros(s, dtype=torch.long if k.endswith("tracked") else torch.float32)
            for k, s in r50_layout().items()}


def test_missing_key_is_reported(r50_zeros, r50_shapes):
    sd = dict(r50_zeros)
    del sd["backbone.layer3.5.bn2.running_var"]
    with pytest.raises(ConversionError) as e:
        convert_mmdet_state_dict(sd, r50_shapes)
    assert "1 model key(s) missing" in str(e.value)
    assert "backbone.bottom_up.res4.5.conv2.norm.running_var" in str(e.value)
    assert "unused" not in str(e.value) and "mismatch" not in str(e.value)
    assert isinstance(e.value, UserError)


def test_extra_keys_are_reported(r50_zeros, r50_shapes):
    sd = dict(r50_zeros)
    sd["bbox_head.conv_centerness.weight"] = torch.zeros(1, 256, 3, 3)  # no rule
    sd["backbone.layer2.0.conv2.conv_offset.weight"] = torch.zeros(18, 128, 3, 3)  # not in model
    with pytest.raises(ConversionError) as e:
        convert_mmdet_state_dict(sd, r50_shapes)
    msg = str(e.value)
    assert "2 checkpoint key(s) unused" in msg and "bbox_head.conv_centerness.weight" in msg
    assert "backbone.layer2.0.conv2.conv_offset.weight -> " \
           "backbone.bottom_up.res3.0.conv2_offset.weight (not in the model)" in msg
    assert "missing" not in msg


def test_shape_mismatch_is_reported(r50_zeros, r50_shapes):
    sd = dict(r50_zeros)
    sd["bbox_head.conv_cls.weight"] = torch.zeros(81, 256, 3, 3)
    with pytest.raises(ConversionError) as e:
        convert_mmdet_state_dict(sd, r50_shapes)
    assert ("bbox_head.conv_cls.weight -> head.cls_score.weight: checkpoint (81, 256, 3, 3) "
            "vs model (80, 256, 3, 3)") in str(e.value)


def test_wrong_config_names_what_the_checkpoint_holds(swin, r101):
    """A Swin-S checkpoint with the R-101 config: the message says what the checkpoint is."""
    with pytest.raises(ConversionError) as e:
        convert_mmdet_state_dict(swin.mmdet_state, model_shapes(r101.model))
    msg = str(e.value)
    assert ("The checkpoint holds: Swin with [2, 2, 18, 2] blocks per stage; head with DCN last "
            "tower convs, tower conv biases.") in msg
    assert "checkpoint key(s) unused" in msg and "model key(s) missing" in msg


def test_describe_checkpoint():
    zeros = lambda layout: {k: torch.zeros(s) for k, s in layout.items()}  # noqa: E731
    assert describe_checkpoint(zeros(r50_layout())) == "ResNet-50; head with plain tower convs"
    assert describe_checkpoint(zeros(r101_dcn_layout())) == (
        "ResNet-101 with DCN in layer2, layer3, layer4; head with DCN last tower convs, tower "
        "conv biases")
    x101 = resnet_layout(101, groups=64, base_width=4, dcn_stages=(2, 3))
    assert describe_checkpoint(zeros(x101)) == (
        "ResNeXt-101 64x4d with DCN in layer3, layer4; head with plain tower convs")


def test_script_fails_with_message(tmp_path, capsys):
    src = str(tmp_path / "bad.pth")
    torch.save({"state_dict": {"backbone.patch_embed.proj.weight": torch.zeros(96, 3, 4, 4)}}, src)
    assert convert_mmdet_weights.main([src, str(tmp_path / "out.pth"), "--config-file", R50]) == 1
    err = capsys.readouterr().err
    assert "backbone.patch_embed.proj.weight" in err and "model key(s) missing" in err
    assert not (tmp_path / "out.pth").exists()


def test_extract_state_dict_variants():
    t = torch.zeros(1)
    assert extract_state_dict({"state_dict": {"a": t}, "meta": {}}) == {"a": t}
    assert extract_state_dict({"a": t}) == {"a": t}
    assert extract_state_dict({"module.a": t}) == {"a": t}
    with pytest.raises(ConversionError, match="not a bare state dict"):
        extract_state_dict({"meta": {}, "optimizer": {}})


def test_config_hints():
    config = """model = dict(
    backbone=dict(type='ResNet', depth=50, num_stages=4,
                  style='caffe'),
    bbox_head=dict(type='DSLAHead', num_classes=80, norm_on_bbox=False))
img_norm_cfg = dict(
    mean=[102.9801, 115.9465, 122.7717], std=[1.0, 1.0, 1.0], to_rgb=False)
"""
    assert config_hints({"meta": {"config": config}, "state_dict": {}}) == [
        "style='caffe'),",
        "bbox_head=dict(type='DSLAHead', num_classes=80, norm_on_bbox=False))",
        "mean=[102.9801, 115.9465, 122.7717], std=[1.0, 1.0, 1.0], to_rgb=False)",
    ]
    assert config_hints({"state_dict": {}}) == [] and config_hints({"a": torch.zeros(1)}) == []


@pytest.mark.parametrize("src, dst", [
    ("backbone.bn1.running_mean", "backbone.bottom_up.stem.conv1.norm.running_mean"),
    ("backbone.layer1.0.downsample.0.weight", "backbone.bottom_up.res2.0.shortcut.weight"),
    ("backbone.layer4.1.conv2.conv_offset.bias", "backbone.bottom_up.res5.1.conv2_offset.bias"),
    ("neck.lateral_convs.2.conv.bias", "backbone.fpn_lateral5.bias"),
    ("neck.fpn_convs.0.conv.weight", "backbone.fpn_output3.weight"),
    ("neck.fpn_convs.4.conv.weight", "backbone.top_block.p7.weight"),
    ("bbox_head.reg_convs.3.conv.conv_offset.weight", "head.reg_convs.3.conv_offset.weight"),
    ("bbox_head.cls_convs.1.gn.bias", "head.cls_convs.1.norm.bias"),
    ("bbox_head.conv_reg.bias", "head.bbox_pred.bias"),
    ("backbone.patch_embed.projection.weight", "backbone.bottom_up.patch_embed.proj.weight"),
    ("backbone.stages.2.blocks.17.attn.w_msa.relative_position_bias_table",
     "backbone.bottom_up.layers.2.blocks.17.attn.relative_position_bias_table"),
    ("backbone.stages.0.blocks.1.attn.w_msa.qkv.bias",
     "backbone.bottom_up.layers.0.blocks.1.attn.qkv.bias"),
    ("backbone.stages.3.blocks.0.ffn.layers.0.0.weight",
     "backbone.bottom_up.layers.3.blocks.0.mlp.fc1.weight"),
    ("backbone.stages.3.blocks.1.ffn.layers.1.bias",
     "backbone.bottom_up.layers.3.blocks.1.mlp.fc2.bias"),
    ("backbone.stages.1.downsample.reduction.weight",
     "backbone.bottom_up.layers.1.downsample.reduction.weight"),
    ("backbone.norm3.bias", "backbone.bottom_up.norm3.bias"),
    ("neck.fpn_convs.5.conv.weight", None),
    ("bbox_head.conv_centerness.weight", None),
    ("backbone.stages.0.blocks.0.attn.w_msa.relative_position_bias_table.extra", None),
])
def test_map_key(src, dst):
    assert map_key(src) == dst


def test_x101_recipe_layout_maps_onto_its_model():
    """The X-101 recipe has no released weights; its mmdetection layout still maps one-to-one."""
    expected = model_shapes_from_config(load_cfg(X101))
    layout = {**resnet_layout(101, groups=64, base_width=4, dcn_stages=(2, 3)),
              **neck_head_layout((512, 1024, 2048), head_dcn=True, conv_bias=True)}
    converted = convert_mmdet_state_dict({k: torch.zeros(s) for k, s in layout.items()}, expected)
    assert list(converted) == list(expected)


def test_missing_checkpoint_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit) as e:
        convert_mmdet_weights.main([str(tmp_path / "none.pth"), str(tmp_path / "out.pth")])
    assert str(e.value) == f"error: checkpoint file not found: {tmp_path / 'none.pth'}"
    assert not (tmp_path / "out.pth").exists()


def test_swin_imagenet_weights_load_by_name_suffix(swin, tmp_path):
    """The training config's MODEL.WEIGHTS: the official Swin-S ImageNet file (original key
    names, a classifier and its final norm) loads into every backbone tensor but the per-output
    norms, through detectron2's ``?matching_heuristics=True``."""
    backbone = {k[len("backbone.bottom_up."):]: v for k, v in swin.converted.items()
                if k.startswith("backbone.bottom_up.")
                and not k.startswith("backbone.bottom_up.norm")}
    official = {k: torch.randn(v.shape) if v.is_floating_point() else v.clone()
                for k, v in backbone.items()}
    official.update({"norm.weight": torch.ones(768), "norm.bias": torch.zeros(768),
                     "head.weight": torch.zeros(1000, 768), "head.bias": torch.zeros(1000)})
    path = str(tmp_path / "swin_small_patch4_window7_224.pth")
    torch.save({"model": official}, path)
    model = copy.deepcopy(swin.model).float()
    DetectionCheckpointer(model).load(path + "?matching_heuristics=True")
    state = model.state_dict()
    loaded = [k for k, v in official.items()
              if f"backbone.bottom_up.{k}" in state
              and torch.equal(state[f"backbone.bottom_up.{k}"], v.float())]
    assert len(loaded) == len(backbone) > 300
