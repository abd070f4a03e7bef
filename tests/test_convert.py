"""mmdetection -> detectron2 weight conversion (dsla.convert, tools/convert_mmdet_weights.py).

No real checkpoint is available offline, so the tests write synthetic checkpoints with the exact
key names and shapes of the authors' mmdetection models (laid out below from mmdetection's
ResNet/ResNeXt, FPN and head definitions, independently of the converter's rules) and check the
converted model against a forward pass written directly on the mmdetection weights.
"""
import importlib.util
import os
import re

import pytest
import torch
import torch.nn.functional as F
import torchvision

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model

from conftest import REPO
from dsla import add_dsla_config
from dsla.convert import (
    ConversionError,
    check_converted,
    config_hints,
    convert_mmdet_state_dict,
    extract_state_dict,
    map_key,
    model_shapes,
    model_shapes_from_config,
    rename_state_dict,
)
from dsla.head import DSLAHead

CONFIG_DIR = os.path.join(REPO, "configs", "COCO-Detection")
R50 = os.path.join(CONFIG_DIR, "dsla_R_50_FPN_1x_mmdet.yaml")
R101_DCN = os.path.join(CONFIG_DIR, "dsla_R_101_FPN_dcn_ms_2x_mmdet.yaml")
X101_DCN = os.path.join(CONFIG_DIR, "dsla_X_101_64x4d_FPN_dcn_ms_2x_mmdet.yaml")
SCRIPT = os.path.join(REPO, "projects", "DSLA", "tools", "convert_mmdet_weights.py")
STAGE_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
STRIDES = (8, 16, 32, 64, 128)
BN_EPS = 1e-5  # mmdetection's BatchNorm2d default


def load_cfg(path, *opts):
    cfg = get_cfg()
    add_dsla_config(cfg)
    cfg.merge_from_file(path)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", *opts])
    return cfg


# ---------------------------------------------------------------------------------------------
# The authors' checkpoint layout: {mmdetection key: shape}
# ---------------------------------------------------------------------------------------------
def _bn_layout(prefix, channels):
    shapes = {f"{prefix}.{n}": (channels,) for n in ("weight", "bias", "running_mean",
                                                     "running_var")}
    shapes[f"{prefix}.num_batches_tracked"] = ()
    return shapes


def _resnet_layout(depth, groups, base_width, dcn_stages):
    """mmdetection ResNet / ResNeXt (v1, ``downsample`` = 1x1 conv + BN); DCN = DCNv1 conv2."""
    shapes = {"backbone.conv1.weight": (64, 3, 7, 7), **_bn_layout("backbone.bn1", 64)}
    inplanes = 64
    for i, blocks in enumerate(STAGE_BLOCKS[depth]):
        planes = 64 * 2 ** i
        # mmdetection's ResNeXt Bottleneck: width = floor(planes * base_width / 64) * groups.
        width = planes if groups == 1 else planes * base_width // 64 * groups
        for k in range(blocks):
            p = f"backbone.layer{i + 1}.{k}"
            shapes[f"{p}.conv1.weight"] = (width, inplanes, 1, 1)
            shapes[f"{p}.conv2.weight"] = (width, width // groups, 3, 3)
            if i in dcn_stages:  # mmcv DeformConv2dPack: 2 offsets per tap, with bias
                shapes[f"{p}.conv2.conv_offset.weight"] = (18, width, 3, 3)
                shapes[f"{p}.conv2.conv_offset.bias"] = (18,)
            shapes[f"{p}.conv3.weight"] = (planes * 4, width, 1, 1)
            for j, c in ((1, width), (2, width), (3, planes * 4)):
                shapes.update(_bn_layout(f"{p}.bn{j}", c))
            if k == 0:
                shapes[f"{p}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                shapes.update(_bn_layout(f"{p}.downsample.1", planes * 4))
            inplanes = planes * 4
    return shapes


def _neck_head_layout(num_classes, head_dcn, conv_bias, channels=256):
    """mmdetection FPN (start_level 1, 2 extra convs on the output) and the DSLA head."""
    shapes = {}
    for i, c in enumerate((512, 1024, 2048)):
        shapes[f"neck.lateral_convs.{i}.conv.weight"] = (channels, c, 1, 1)
        shapes[f"neck.lateral_convs.{i}.conv.bias"] = (channels,)
    for i in range(5):
        shapes[f"neck.fpn_convs.{i}.conv.weight"] = (channels, channels, 3, 3)
        shapes[f"neck.fpn_convs.{i}.conv.bias"] = (channels,)
    for tower in ("cls", "reg"):
        for j in range(4):
            p = f"bbox_head.{tower}_convs.{j}"
            shapes[f"{p}.conv.weight"] = (channels, channels, 3, 3)
            if conv_bias:
                shapes[f"{p}.conv.bias"] = (channels,)
            if head_dcn and j == 3:  # mmcv ModulatedDeformConv2dPack: 2 offsets + 1 mask per tap
                shapes[f"{p}.conv.conv_offset.weight"] = (27, channels, 3, 3)
                shapes[f"{p}.conv.conv_offset.bias"] = (27,)
            shapes[f"{p}.gn.weight"] = (channels,)
            shapes[f"{p}.gn.bias"] = (channels,)
    shapes.update({"bbox_head.conv_cls.weight": (num_classes, channels, 3, 3),
                   "bbox_head.conv_cls.bias": (num_classes,),
                   "bbox_head.conv_reg.weight": (4, channels, 3, 3),
                   "bbox_head.conv_reg.bias": (4,)})
    shapes.update({f"bbox_head.scales.{i}.scale": () for i in range(5)})
    return shapes


def mmdet_layout(depth=50, groups=1, base_width=64, dcn_stages=(), head_dcn=False,
                 conv_bias=False, num_classes=80):
    """Keys and shapes of an mmdetection DSLA checkpoint; ``dcn_stages`` index layer1..4 as 0..3."""
    return {**_resnet_layout(depth, groups, base_width, dcn_stages),
            **_neck_head_layout(num_classes, head_dcn, conv_bias)}


# Keys whose values must be positive and near 1: BN / GN scales, running variances, level scales.
_POSITIVE = re.compile(r".*((bn\d|downsample\.1|gn)\.weight|running_var|\.scale)")


def _random_value(key, shape, g):
    """Random values scaled so that activations stay O(1) through 50 layers of eval-mode BN."""
    if key.endswith("num_batches_tracked"):
        return torch.tensor(1000, dtype=torch.long)
    if _POSITIVE.fullmatch(key):
        return torch.rand(shape, generator=g) + 0.5
    if len(shape) == 4:
        # Unit-variance outputs: raw box outputs of O(1) (distances exp(scale * x) of ~0.1-20)
        # and DCN offsets of ~1 pixel, which exercise the bilinear sampling.
        fan_in = shape[1] * shape[2] * shape[3]
        return torch.randn(shape, generator=g) / fan_in ** 0.5
    return torch.randn(shape, generator=g) * 0.1  # conv / BN / GN biases, running means


def random_mmdet_state_dict(layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: _random_value(k, s, g) for k, s in layout.items()}


# ---------------------------------------------------------------------------------------------
# Reference forward written on the mmdetection weights (plain torch.nn.functional)
# ---------------------------------------------------------------------------------------------
def _bn(x, sd, p):
    return F.batch_norm(x, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"],
                        sd[f"{p}.bias"], training=False, eps=BN_EPS)


def _bottleneck(x, sd, p, stride):
    """mmdetection caffe-style Bottleneck: the stride sits in the 1x1 conv1."""
    out = F.relu(_bn(F.conv2d(x, sd[f"{p}.conv1.weight"], stride=stride), sd, f"{p}.bn1"))
    out = F.relu(_bn(F.conv2d(out, sd[f"{p}.conv2.weight"], padding=1), sd, f"{p}.bn2"))
    out = _bn(F.conv2d(out, sd[f"{p}.conv3.weight"]), sd, f"{p}.bn3")
    if f"{p}.downsample.0.weight" in sd:
        x = _bn(F.conv2d(x, sd[f"{p}.downsample.0.weight"], stride=stride), sd, f"{p}.downsample.1")
    return F.relu(out + x)


def ref_resnet(x, sd, depth=50):
    """C3, C4, C5 of a caffe-style ResNet."""
    x = F.relu(_bn(F.conv2d(x, sd["backbone.conv1.weight"], stride=2, padding=3), sd,
                   "backbone.bn1"))
    x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
    outs = []
    for i, blocks in enumerate(STAGE_BLOCKS[depth]):
        for k in range(blocks):
            x = _bottleneck(x, sd, f"backbone.layer{i + 1}.{k}", 2 if k == 0 and i > 0 else 1)
        outs.append(x)
    return outs[1:]


def ref_fpn(cs, sd):
    """P3..P7: laterals, top-down nearest upsampling to the lateral's size, 3x3 outputs, P6/P7."""
    conv = lambda x, n, **kw: F.conv2d(x, sd[f"neck.{n}.conv.weight"], sd[f"neck.{n}.conv.bias"],
                                       **kw)
    lat = [conv(c, f"lateral_convs.{i}") for i, c in enumerate(cs)]
    for i in (2, 1):
        lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode="nearest")
    outs = [conv(v, f"fpn_convs.{i}", padding=1) for i, v in enumerate(lat)]
    outs.append(conv(outs[-1], "fpn_convs.3", stride=2, padding=1))
    outs.append(conv(F.relu(outs[-1]), "fpn_convs.4", stride=2, padding=1))
    return outs


def _tower_conv(x, sd, p):
    """mmcv ConvModule(conv, gn, relu); a DCNv2 conv takes offsets and a mask from conv_offset."""
    w, b = sd[f"{p}.conv.weight"], sd.get(f"{p}.conv.bias")
    if f"{p}.conv.conv_offset.weight" in sd:
        o = F.conv2d(x, sd[f"{p}.conv.conv_offset.weight"], sd[f"{p}.conv.conv_offset.bias"],
                     padding=1)
        o1, o2, mask = torch.chunk(o, 3, dim=1)
        x = torchvision.ops.deform_conv2d(x, torch.cat((o1, o2), 1), w, b, padding=1,
                                          mask=mask.sigmoid())
    else:
        x = F.conv2d(x, w, b, padding=1)
    return F.relu(F.group_norm(x, 32, sd[f"{p}.gn.weight"], sd[f"{p}.gn.bias"], eps=1e-5))


def ref_head(features, sd, norm_on_bbox=False):
    """Per level: logits [N, C, H, W] and distances [N, 4, H, W] in pixels."""
    logits, dists = [], []
    for lvl, (x, stride) in enumerate(zip(features, STRIDES)):
        c, r = x, x
        for j in range(4):
            c = _tower_conv(c, sd, f"bbox_head.cls_convs.{j}")
            r = _tower_conv(r, sd, f"bbox_head.reg_convs.{j}")
        logits.append(F.conv2d(c, sd["bbox_head.conv_cls.weight"], sd["bbox_head.conv_cls.bias"],
                               padding=1))
        raw = sd[f"bbox_head.scales.{lvl}.scale"] * F.conv2d(
            r, sd["bbox_head.conv_reg.weight"], sd["bbox_head.conv_reg.bias"], padding=1)
        dists.append(F.relu(raw) * stride if norm_on_bbox else raw.exp())
    return logits, dists


# ---------------------------------------------------------------------------------------------
# R-50: the authors' 38.1 AP model, converted through the command-line tool
# ---------------------------------------------------------------------------------------------
def _load_script():
    spec = importlib.util.spec_from_file_location("convert_mmdet_weights", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def r50(tmp_path_factory):
    """(mmdetection state dict, path of the converted file) for the R-50 layout."""
    tmp = tmp_path_factory.mktemp("r50")
    mmdet_sd = random_mmdet_state_dict(mmdet_layout(depth=50))
    src, dst = str(tmp / "dsla_r50_mmdet.pth"), str(tmp / "dsla_r50_d2.pth")
    # A real file also holds meta and optimizer state, which the converter ignores.
    torch.save({"meta": {"epoch": 12, "CLASSES": ("person",) * 80, "mmdet_version": "2.x"},
                "state_dict": mmdet_sd,
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.0001, "params": [0]}]}}, src)
    assert _load_script().main([src, dst, "--config-file", R50]) == 0
    return mmdet_sd, dst


def test_r50_loads_strictly(r50):
    mmdet_sd, path = r50
    converted = torch.load(path, map_location="cpu", weights_only=True)
    assert converted["matching_heuristics"] is False and "__author__" in converted
    model = build_model(load_cfg(R50))
    result = model.load_state_dict(converted["model"], strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    n_dropped = sum(k.endswith("num_batches_tracked") for k in mmdet_sd)
    assert len(converted["model"]) == len(mmdet_sd) - n_dropped == len(model.state_dict())
    # MODEL.WEIGHTS goes through DetectionCheckpointer: exact names, no heuristic matching.
    model = build_model(load_cfg(R50))
    DetectionCheckpointer(model).load(path)
    assert torch.equal(model.head.cls_score.weight, mmdet_sd["bbox_head.conv_cls.weight"])
    assert torch.equal(model.backbone.bottom_up.res5[2].conv3.norm.running_var,
                       mmdet_sd["backbone.layer4.2.bn3.running_var"])


def test_r50_head_outputs_match_mmdet_forward(r50):
    mmdet_sd, path = r50
    model = build_model(load_cfg(R50))
    DetectionCheckpointer(model).load(path)
    model = model.double().eval()
    sd = {k: v.double() if v.is_floating_point() else v for k, v in mmdet_sd.items()}
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        feats = model.backbone(x)
        logits, dists = model.head([feats[f] for f in model.head_in_features])
        ref_logits, ref_dists = ref_head(ref_fpn(ref_resnet(x, sd), sd), sd)
    assert [t.shape[-1] for t in logits] == [16, 8, 4, 2, 1]
    for out, ref in zip(logits + dists, ref_logits + ref_dists):
        assert out.shape == ref.shape
        assert torch.isfinite(ref).all() and ref.abs().max() > 1e-3  # not a degenerate test
        # Distances are computed in float32 by the head (overflow guard), hence 1e-6.
        torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Strictness
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def r50_shapes():
    return model_shapes_from_config(load_cfg(R50))


@pytest.fixture(scope="module")
def r50_zeros():
    return {k: torch.zeros(s, dtype=torch.long if k.endswith("tracked") else torch.float32)
            for k, s in mmdet_layout(depth=50).items()}


def test_missing_key_is_reported(r50_zeros, r50_shapes):
    sd = dict(r50_zeros)
    del sd["backbone.layer3.5.bn2.running_var"]
    with pytest.raises(ConversionError) as e:
        convert_mmdet_state_dict(sd, r50_shapes)
    assert "1 model key(s) missing" in str(e.value)
    assert "backbone.bottom_up.res4.5.conv2.norm.running_var" in str(e.value)
    assert "unused" not in str(e.value) and "mismatch" not in str(e.value)


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


def test_script_fails_with_message(tmp_path, capsys):
    src = str(tmp_path / "bad.pth")
    torch.save({"state_dict": {"backbone.patch_embed.proj.weight": torch.zeros(96, 3, 4, 4)}}, src)
    assert _load_script().main([src, str(tmp_path / "out.pth"), "--config-file", R50]) == 1
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
    ("neck.fpn_convs.5.conv.weight", None),
    ("bbox_head.conv_centerness.weight", None),
])
def test_map_key(src, dst):
    assert map_key(src) == dst


# ---------------------------------------------------------------------------------------------
# DCN layouts: R-101 DCN (46.6 AP) and X-101-64x4d DCN (strongest recipe)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config, layout", [
    (R101_DCN, dict(depth=101, dcn_stages=(1, 2, 3))),
    (X101_DCN, dict(depth=101, groups=64, base_width=4, dcn_stages=(2, 3), head_dcn=True,
                    conv_bias=True)),
], ids=["R101_dcn", "X101_64x4d_dcn"])
def test_dcn_layout_covers_model(config, layout):
    expected = model_shapes_from_config(load_cfg(config))
    sd = {k: torch.zeros(s) for k, s in mmdet_layout(**layout).items()}
    converted = convert_mmdet_state_dict(sd, expected)
    assert list(converted) == list(expected)
    offsets = [k for k in converted if "offset" in k]
    assert len(offsets) == 2 * (sum(STAGE_BLOCKS[101][i] for i in layout["dcn_stages"])
                                + 2 * layout.get("head_dcn", False))


def test_dcn_head_matches_mmcv_forward():
    """X-101 head (DCNv2 last conv, conv bias, NORM_ON_BBOX) against mmcv's DCNv2 semantics."""
    cfg = load_cfg(X101_DCN)
    head = DSLAHead(cfg, [ShapeSpec(channels=256, stride=s) for s in STRIDES]).double().eval()
    layout = _neck_head_layout(80, head_dcn=True, conv_bias=True)
    sd = random_mmdet_state_dict({k: s for k, s in layout.items() if k.startswith("bbox_head")})
    sd = {k: v.double() for k, v in sd.items()}
    expected = {f"head.{k}": s for k, s in model_shapes(head).items()}
    renamed = rename_state_dict(sd)
    check_converted(renamed, expected)
    head.load_state_dict({k[len("head."):]: v for k, v in renamed.tensors.items()}, strict=True)
    g = torch.Generator().manual_seed(2)
    feats = [torch.randn(1, 256, 16 // 2 ** i, 16 // 2 ** i, generator=g, dtype=torch.float64)
             for i in range(5)]
    with torch.no_grad():
        logits, dists = head(feats)
        ref_logits, ref_dists = ref_head(feats, sd, norm_on_bbox=True)
    for out, ref in zip(logits + dists, ref_logits + ref_dists):
        torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)


def test_missing_checkpoint_is_a_one_line_error(tmp_path):
    spec = importlib.util.spec_from_file_location("convert_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit) as e:
        script.main([str(tmp_path / "none.pth"), str(tmp_path / "out.pth")])
    assert str(e.value) == f"error: checkpoint file not found: {tmp_path / 'none.pth'}"
    assert not (tmp_path / "out.pth").exists()
