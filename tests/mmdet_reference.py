"""The authors' mmdetection DSLA models, written independently of ``dsla``: checkpoint layouts and a
forward pass computed directly on an mmdetection state dict.

This module imports torch only (no dsla, no detectron2, no torchvision ops), so that the
converted detectron2 models can be checked against it. It follows the semantics of mmdetection
2.x and mmcv 1.3 as used by the authors' logged runs:

- ResNet / ResNeXt (``style`` caffe: stride in conv1, pytorch: stride in conv2), eval-mode BN
  (eps 1e-5); mmcv's DCNv1 (``DeformConv2dPack``) as conv2 of some stages;
- Swin (``mmdet.models.backbones.SwinTransformer``): patch embedding, window attention with a
  relative position table indexed by the checkpoint's ``relative_position_index``, shifted
  windows with mmdetection's padding and region mask, patch merging with ``unfold`` (merged
  channel ``c * 4 + k``, neighbours k in row-major order), one LayerNorm per output;
- FPN: nearest upsampling to the lateral's size, P6 from the P5 output, P7 from relu(P6);
- DSLA head: GN towers (mmcv ``ConvModule``), optionally a DCNv2 (``ModulatedDeformConv2dPack``)
  last conv and conv biases; distances ``exp(scale * x)`` or ``relu(scale * x) * stride``.

Deformable convolution is computed here with explicit bilinear sampling, following mmcv's CUDA
kernel: per kernel tap ``t = i * kw + j``, offset channel ``2t`` is the vertical and ``2t + 1`` the
horizontal shift, mask channel ``t`` scales the sample; a sample point outside
``(-1, H) x (-1, W)`` reads 0, and so does each bilinear corner outside the image.

Shape letters: N = images, C = channels, H x W = a feature map, L = tokens, K = kernel taps.
"""
import math
import re

import torch
import torch.nn.functional as F

STAGE_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
STRIDES = (8, 16, 32, 64, 128)
EPS = 1e-5  # mmdetection's BatchNorm2d, GroupNorm and LayerNorm default
SWIN_S = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window=7,
              out_indices=(1, 2, 3))


# ---------------------------------------------------------------------------------------------
# Checkpoint layouts: {mmdetection key: shape}
# ---------------------------------------------------------------------------------------------
def _bn_layout(prefix, channels):
    shapes = {f"{prefix}.{n}": (channels,) for n in ("weight", "bias", "running_mean",
                                                     "running_var")}
    shapes[f"{prefix}.num_batches_tracked"] = ()
    return shapes


def resnet_layout(depth, groups=1, base_width=64, dcn_stages=()):
    """mmdetection ResNet / ResNeXt (``downsample`` = 1x1 conv + BN); ``dcn_stages`` index
    layer1..4 as 0..3 and make conv2 an mmcv DCNv1 (18 offset channels, with bias)."""
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
            if i in dcn_stages:
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


def swin_layout(embed_dim, depths, num_heads, window, out_indices, mlp_ratio=4):
    """mmdetection SwinTransformer (as in the authors' Swin-S log): per-stage blocks, patch
    merging after every stage but the last, a LayerNorm per output stage."""
    shapes = {"backbone.patch_embed.projection.weight": (embed_dim, 3, 4, 4),
              "backbone.patch_embed.projection.bias": (embed_dim,),
              "backbone.patch_embed.norm.weight": (embed_dim,),
              "backbone.patch_embed.norm.bias": (embed_dim,)}
    for s, (depth, heads) in enumerate(zip(depths, num_heads)):
        c = embed_dim * 2 ** s
        for b in range(depth):
            p = f"backbone.stages.{s}.blocks.{b}"
            for name, shape in (("norm1", (c,)), ("norm2", (c,)),
                                ("attn.w_msa.qkv", (3 * c, c)), ("attn.w_msa.proj", (c, c)),
                                ("ffn.layers.0.0", (mlp_ratio * c, c)),
                                ("ffn.layers.1", (c, mlp_ratio * c))):
                shapes[f"{p}.{name}.weight"] = shape
                shapes[f"{p}.{name}.bias"] = shape[:1]
            shapes[f"{p}.attn.w_msa.relative_position_bias_table"] = ((2 * window - 1) ** 2, heads)
            shapes[f"{p}.attn.w_msa.relative_position_index"] = (window ** 2, window ** 2)
        if s < len(depths) - 1:
            shapes[f"backbone.stages.{s}.downsample.norm.weight"] = (4 * c,)
            shapes[f"backbone.stages.{s}.downsample.norm.bias"] = (4 * c,)
            shapes[f"backbone.stages.{s}.downsample.reduction.weight"] = (2 * c, 4 * c)
    for i in out_indices:
        shapes[f"backbone.norm{i}.weight"] = (embed_dim * 2 ** i,)
        shapes[f"backbone.norm{i}.bias"] = (embed_dim * 2 ** i,)
    return shapes


def neck_head_layout(in_channels, num_classes=80, head_dcn=False, conv_bias=False, channels=256):
    """mmdetection FPN (three inputs, two extra convs on the output) and the DSLA head."""
    shapes = {}
    for i, c in enumerate(in_channels):
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


def r50_layout():
    """The authors' R-50 1x model: caffe ResNet-50, plain head."""
    return {**resnet_layout(50), **neck_head_layout((512, 1024, 2048))}


def r101_dcn_layout():
    """The authors' R-101 2x model: ResNet-101 with DCNv1 in layer2-4, DCNv2 head, conv bias."""
    return {**resnet_layout(101, dcn_stages=(1, 2, 3)),
            **neck_head_layout((512, 1024, 2048), head_dcn=True, conv_bias=True)}


def swin_s_layout():
    """The authors' Swin-S 3x model: Swin-S, FPN on 192/384/768 channels, R-101's head."""
    return {**swin_layout(**SWIN_S),
            **neck_head_layout((192, 384, 768), head_dcn=True, conv_bias=True)}


def relative_position_index(window):
    """mmdetection's ``WindowMSA`` buffer: entry (a, b) indexes the table row of the offset
    between tokens a and b of a window (row-major), (dy + w - 1) * (2w - 1) + (dx + w - 1)."""
    seq = (torch.arange(window)[:, None] * (2 * window - 1) + torch.arange(window)).reshape(1, -1)
    return (seq + seq.T).flip(1).contiguous()


# Values that must be positive and near 1: BN / GN / LN scales, running variances, level scales.
_POSITIVE = re.compile(r".*((bn\d|downsample\.1|gn|norm\d?)\.weight|running_var|\.scale)")


def _random_value(key, shape, g):
    """Random values scaled so that activations stay O(1) through 100 layers."""
    if key.endswith("num_batches_tracked"):
        return torch.tensor(1000, dtype=torch.long)
    if key.endswith("relative_position_index"):
        return relative_position_index(math.isqrt(shape[0]))
    if _POSITIVE.fullmatch(key):
        return torch.rand(shape, generator=g) + 0.5
    if len(shape) in (2, 4) and not key.endswith("relative_position_bias_table"):
        # Unit-variance outputs: raw box outputs of O(1) and DCN offsets of ~1 pixel, which
        # exercise the bilinear sampling.
        fan_in = math.prod(shape[1:])
        return torch.randn(shape, generator=g) / fan_in ** 0.5
    if key.endswith("relative_position_bias_table"):
        return torch.randn(shape, generator=g)  # position biases of O(1): they matter
    return torch.randn(shape, generator=g) * 0.1  # biases, running means


def random_state_dict(layout, seed=0, dtype=torch.float32):
    """A state dict with the keys and shapes of ``layout`` and random values (see above)."""
    g = torch.Generator().manual_seed(seed)
    state = {k: _random_value(k, s, g) for k, s in layout.items()}
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


# ---------------------------------------------------------------------------------------------
# mmcv deformable convolution, by explicit bilinear sampling
# ---------------------------------------------------------------------------------------------
def _sample(image, py, px):
    """``image`` [N, C, H, W] at real positions (py, px) [N, Ho, Wo] -> [N, C, Ho, Wo]."""
    n, c, h, w = image.shape
    inside = (py > -1) & (py < h) & (px > -1) & (px < w)
    y0, x0 = py.floor(), px.floor()
    flat = image.reshape(n, c, h * w)
    out = 0
    for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            valid = inside & (yy >= 0) & (yy <= h - 1) & (xx >= 0) & (xx <= w - 1)
            index = (yy.clamp(0, h - 1) * w + xx.clamp(0, w - 1)).long().reshape(n, 1, -1)
            corner = flat.gather(2, index.expand(n, c, -1)).reshape(n, c, *py.shape[1:])
            out = out + corner * (wy * wx * valid).unsqueeze(1)
    return out


def deform_conv(x, offset, weight, bias=None, *, stride=1, padding=1, mask=None):
    """
    mmcv's DCNv1 (``mask`` None) / DCNv2, one deformable group, dilation 1.

    Args:
        x: [N, C, H, W]. offset: [N, 2K, Ho, Wo]. weight: [O, C / groups, kh, kw].
        mask: [N, K, Ho, Wo] (already through the sigmoid) or None.

    Returns:
        [N, O, Ho, Wo].
    """
    n, c, _, _ = x.shape
    o, c_per_group, kh, kw = weight.shape
    groups = c // c_per_group
    ho, wo = offset.shape[-2:]
    base_y = (torch.arange(ho, dtype=x.dtype) * stride - padding).view(1, ho, 1)
    base_x = (torch.arange(wo, dtype=x.dtype) * stride - padding).view(1, 1, wo)
    columns = []
    for i in range(kh):
        for j in range(kw):
            t = i * kw + j
            v = _sample(x, base_y + i + offset[:, 2 * t], base_x + j + offset[:, 2 * t + 1])
            columns.append(v if mask is None else v * mask[:, t:t + 1])
    columns = torch.stack(columns, 2).reshape(n, groups, c_per_group, kh * kw, ho, wo)
    w = weight.reshape(groups, o // groups, c_per_group, kh * kw)
    out = torch.einsum("ngckyx,gock->ngoyx", columns, w).reshape(n, o, ho, wo)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


# ---------------------------------------------------------------------------------------------
# ResNet
# ---------------------------------------------------------------------------------------------
def _bn(x, sd, p):
    return F.batch_norm(x, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"],
                        sd[f"{p}.bias"], training=False, eps=EPS)


def _conv2(x, sd, p, stride):
    """conv2 of a bottleneck: a 3x3 conv, or mmcv's DeformConv2dPack when it has conv_offset."""
    w = sd[f"{p}.conv2.weight"]
    groups = x.shape[1] // w.shape[1]
    if f"{p}.conv2.conv_offset.weight" not in sd:
        return F.conv2d(x, w, stride=stride, padding=1, groups=groups)
    offset = F.conv2d(x, sd[f"{p}.conv2.conv_offset.weight"], sd[f"{p}.conv2.conv_offset.bias"],
                      stride=stride, padding=1)
    return deform_conv(x, offset, w, stride=stride, padding=1)


def _bottleneck(x, sd, p, stride, style):
    s1, s3 = (stride, 1) if style == "caffe" else (1, stride)
    out = F.relu(_bn(F.conv2d(x, sd[f"{p}.conv1.weight"], stride=s1), sd, f"{p}.bn1"))
    out = F.relu(_bn(_conv2(out, sd, p, s3), sd, f"{p}.bn2"))
    out = _bn(F.conv2d(out, sd[f"{p}.conv3.weight"]), sd, f"{p}.bn3")
    if f"{p}.downsample.0.weight" in sd:
        x = _bn(F.conv2d(x, sd[f"{p}.downsample.0.weight"], stride=stride), sd, f"{p}.downsample.1")
    return F.relu(out + x)


def ref_resnet(x, sd, depth, style):
    """C3, C4, C5 of an mmdetection ResNet with eval-mode BN."""
    x = F.relu(_bn(F.conv2d(x, sd["backbone.conv1.weight"], stride=2, padding=3), sd,
                   "backbone.bn1"))
    x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
    outs = []
    for i, blocks in enumerate(STAGE_BLOCKS[depth]):
        for k in range(blocks):
            x = _bottleneck(x, sd, f"backbone.layer{i + 1}.{k}", 2 if k == 0 and i > 0 else 1,
                            style)
        outs.append(x)
    return outs[1:]


# ---------------------------------------------------------------------------------------------
# Swin
# ---------------------------------------------------------------------------------------------
def _ln(x, sd, p):
    return F.layer_norm(x, x.shape[-1:], sd[f"{p}.weight"], sd[f"{p}.bias"], eps=EPS)


def _linear(x, sd, p):
    return F.linear(x, sd[f"{p}.weight"], sd.get(f"{p}.bias"))


def _windows(x, window):
    """[N, Hp, Wp, C] -> [N * nW, window * window, C], windows in row-major order."""
    n, hp, wp, c = x.shape
    x = x.view(n, hp // window, window, wp // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def _unwindow(windows, n, hp, wp, window):
    """Inverse of :func:`_windows`: [N * nW, window * window, C] -> [N, Hp, Wp, C]."""
    x = windows.view(n, hp // window, wp // window, window, window, -1).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, hp, wp, -1)


def _shift_mask(hp, wp, window, shift):
    """[nW, L, L]: 0 between tokens of the same region of the shifted map, -100 otherwise."""
    def region(size):
        ids = torch.zeros(size, dtype=torch.long)
        ids[size - window:size - shift] = 1
        ids[size - shift:] = 2
        return ids

    labels = (region(hp)[:, None] * 3 + region(wp)[None, :]).view(1, hp, wp, 1)
    labels = _windows(labels, window).squeeze(-1)
    same = labels[:, :, None] == labels[:, None, :]
    return torch.where(same, 0.0, -100.0)


def _window_attention(x, sd, p, heads, mask):
    """mmdetection's WindowMSA on windows x [B, L, C]; mask [nW, L, L] or None."""
    b, length, c = x.shape
    qkv = _linear(x, sd, f"{p}.qkv").reshape(b, length, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * (c // heads) ** -0.5, qkv[1], qkv[2]
    attn = q @ k.transpose(-2, -1)
    table = sd[f"{p}.relative_position_bias_table"]
    index = sd[f"{p}.relative_position_index"].reshape(-1)
    attn = attn + table[index].view(length, length, heads).permute(2, 0, 1).unsqueeze(0)
    if mask is not None:
        nw = mask.shape[0]
        attn = (attn.view(b // nw, nw, heads, length, length) + mask[None, :, None].to(x.dtype))
        attn = attn.view(b, heads, length, length)
    out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(b, length, c)
    return _linear(out, sd, f"{p}.proj")


def _shifted_window_attention(x, hw, sd, p, heads, window, shift):
    """mmdetection's ShiftWindowMSA: pad to whole windows, roll by -shift, attend, undo."""
    n, _, c = x.shape
    h, w = hw
    x = F.pad(x.view(n, h, w, c), (0, 0, 0, (-w) % window, 0, (-h) % window))
    hp, wp = x.shape[1:3]
    mask = None
    if shift:
        x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
        mask = _shift_mask(hp, wp, window, shift)
    out = _window_attention(_windows(x, window), sd, f"{p}.w_msa", heads, mask)
    out = _unwindow(out, n, hp, wp, window)
    if shift:
        out = torch.roll(out, shifts=(shift, shift), dims=(1, 2))
    return out[:, :h, :w].reshape(n, h * w, c)


def _swin_block(x, hw, sd, p, heads, window, shift):
    x = x + _shifted_window_attention(_ln(x, sd, f"{p}.norm1"), hw, sd, f"{p}.attn", heads,
                                      window, shift)
    hidden = F.gelu(_linear(_ln(x, sd, f"{p}.norm2"), sd, f"{p}.ffn.layers.0.0"))
    return x + _linear(hidden, sd, f"{p}.ffn.layers.1")


def _patch_merging(x, hw, sd, p):
    """mmdetection's PatchMerging: 2x2 neighbourhoods gathered with unfold (channel c * 4 + k)."""
    n, _, c = x.shape
    h, w = hw
    assert h % 2 == 0 and w % 2 == 0, "inputs are multiples of 128: no odd sizes"
    x = F.unfold(x.view(n, h, w, c).permute(0, 3, 1, 2), kernel_size=2, stride=2)
    x = _ln(x.transpose(1, 2), sd, f"{p}.norm")
    return F.linear(x, sd[f"{p}.reduction.weight"]), (h // 2, w // 2)


def ref_swin(x, sd, embed_dim, depths, num_heads, window, out_indices):
    """The outputs of ``out_indices`` ([N, C_i, H_i, W_i]) of mmdetection's Swin Transformer."""
    assert x.shape[-2] % 4 == 0 and x.shape[-1] % 4 == 0, "no patch-embedding padding needed"
    x = F.conv2d(x, sd["backbone.patch_embed.projection.weight"],
                 sd["backbone.patch_embed.projection.bias"], stride=4)
    n, c, h, w = x.shape
    x = _ln(x.flatten(2).transpose(1, 2), sd, "backbone.patch_embed.norm")
    outs = []
    for s, (depth, heads) in enumerate(zip(depths, num_heads)):
        for b in range(depth):
            shift = window // 2 if b % 2 else 0
            x = _swin_block(x, (h, w), sd, f"backbone.stages.{s}.blocks.{b}", heads, window, shift)
        if s in out_indices:
            out = _ln(x, sd, f"backbone.norm{s}")
            outs.append(out.transpose(1, 2).reshape(n, embed_dim * 2 ** s, h, w))
        if s < len(depths) - 1:
            x, (h, w) = _patch_merging(x, (h, w), sd, f"backbone.stages.{s}.downsample")
    return outs


# ---------------------------------------------------------------------------------------------
# FPN and head
# ---------------------------------------------------------------------------------------------
def ref_fpn(cs, sd):
    """P3..P7: laterals, top-down nearest upsampling to the lateral's size, 3x3 outputs, P6/P7."""
    def conv(x, name, **kwargs):
        return F.conv2d(x, sd[f"neck.{name}.conv.weight"], sd[f"neck.{name}.conv.bias"], **kwargs)

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
        x = deform_conv(x, torch.cat((o1, o2), 1), w, b, padding=1, mask=mask.sigmoid())
    else:
        x = F.conv2d(x, w, b, padding=1)
    return F.relu(F.group_norm(x, 32, sd[f"{p}.gn.weight"], sd[f"{p}.gn.bias"], eps=EPS))


def ref_head(features, sd, norm_on_bbox=False):
    """Per level: logits [N, C, H, W] and distances [N, 4, H, W] in pixels (test mode)."""
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
