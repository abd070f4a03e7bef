"""Backbones of DSLA: ResNet-FPN and Swin-FPN, both giving P3-P7 with P6 built from the P5 output.

detectron2's RetinaNet backbone builds P6 from C5; FCOS and DSLA (the authors' mmdetection configs:
``add_extra_convs="on_output"``, ``relu_before_extra_convs=True``) build it from P5, which changes
the P6/P7 conv shapes (256 input channels instead of 2048), so the released weights need these
builders. The FPN is the same for every backbone; only its three inputs differ.

Shape letters: N = images, C = channels, H x W = input size (padded to a multiple of 128).
"""
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import StochasticDepth

from detectron2.layers import Conv2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import FPN, LastLevelP6P7
from detectron2.modeling.backbone.resnet import (
    BasicBlock,
    BasicStem,
    BottleneckBlock,
    ResNet,
    build_resnet_backbone,
)
from detectron2.modeling.backbone.swin import SwinTransformer

from .errors import UserError
from .layers import DeformConv2d, ModulatedDeformConv2d

__all__ = [
    "DeformBottleneck",
    "build_basic_block_resnet",
    "build_dsla_resnet",
    "build_dsla_resnet_fpn_backbone",
    "build_dsla_swin_fpn_backbone",
]

# Blocks per stage (res2..res5), as in detectron2's builder.
_BOTTLENECK_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
_BASIC_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


class DeformBottleneck(BottleneckBlock):
    """
    detectron2's bottleneck block with a deformable 3x3 conv: ``conv2`` samples its input at
    offsets (and, for DCNv2, with a mask) predicted by ``conv2_offset``, a plain 3x3 conv on the
    same input, zero-initialised so that training starts from the regular conv.

    Same constructor, parameters and key names as detectron2's ``DeformBottleneckBlock``
    (``conv2_offset.*``, ``conv2.weight``, ``conv2.norm.*``), but ``conv2`` runs
    ``torchvision.ops.deform_conv2d`` (:mod:`dsla.layers`), which needs no compiled detectron2
    and runs on CPU and GPU. The offset layout is mmcv's and torchvision's: per kernel tap
    ``i * 3 + j``, channel ``2 * tap`` is the vertical and ``2 * tap + 1`` the horizontal offset.

    ``forward(x [N, Cin, H, W]) -> [N, Cout, H / stride, W / stride]``.
    """

    def __init__(self, in_channels, out_channels, *, bottleneck_channels, stride=1, num_groups=1,
                 norm="BN", stride_in_1x1=False, dilation=1, deform_modulated=False,
                 deform_num_groups=1):
        super().__init__(in_channels, out_channels, bottleneck_channels=bottleneck_channels,
                         stride=stride, num_groups=num_groups, norm=norm,
                         stride_in_1x1=stride_in_1x1, dilation=dilation)
        plain = self.conv2
        geometry = dict(kernel_size=3, stride=plain.stride, padding=plain.padding,
                        dilation=plain.dilation)
        op = ModulatedDeformConv2d if deform_modulated else DeformConv2d
        self.conv2 = op(bottleneck_channels, bottleneck_channels, groups=num_groups,
                        deformable_groups=deform_num_groups, bias=False, norm=plain.norm,
                        **geometry)
        # Keep the MSRA initialisation BottleneckBlock gave the plain conv.
        self.conv2.weight = plain.weight
        self.deform_modulated = deform_modulated
        # 2 offsets (+ 1 mask value for DCNv2) per kernel tap and deformable group.
        per_tap = 3 if deform_modulated else 2
        self.conv2_offset = Conv2d(bottleneck_channels, per_tap * 9 * deform_num_groups,
                                   **geometry)
        nn.init.constant_(self.conv2_offset.weight, 0)
        nn.init.constant_(self.conv2_offset.bias, 0)

    def forward(self, x):
        out = F.relu_(self.conv1(x))
        offset = self.conv2_offset(out)
        if self.deform_modulated:
            # mmcv's and detectron2's DCNv2 layout: two offset thirds, then the mask logits.
            o1, o2, mask = torch.chunk(offset, 3, dim=1)
            out = self.conv2(out, torch.cat((o1, o2), dim=1), mask.sigmoid())
        else:
            out = self.conv2(out, offset)
        out = self.conv3(F.relu_(out))
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return F.relu_(out + shortcut)


def build_dsla_resnet(cfg, input_shape: ShapeSpec) -> ResNet:
    """
    ``MODEL.RESNETS`` as detectron2's ``build_resnet_backbone`` reads it, except that the stages
    of ``DEFORM_ON_PER_STAGE`` use :class:`DeformBottleneck` (detectron2 hard-wires its own
    deformable block, whose op needs the compiled ``detectron2._C``), and that ResNet-18/34 may
    have any width (:func:`build_basic_block_resnet`). Otherwise this is detectron2's builder.

    Returns:
        ResNet: outputs ``MODEL.RESNETS.OUT_FEATURES`` (``res2``..``res5``, strides 4..32).
    """
    r = cfg.MODEL.RESNETS
    if any(r.DEFORM_ON_PER_STAGE) and r.DEPTH not in _BOTTLENECK_BLOCKS:
        raise UserError(f"MODEL.RESNETS.DEFORM_ON_PER_STAGE = {r.DEFORM_ON_PER_STAGE} needs a "
                        f"bottleneck ResNet (DEPTH 50, 101 or 152), got DEPTH = {r.DEPTH}")
    if r.DEPTH in _BASIC_BLOCKS and r.RES2_OUT_CHANNELS != 64:
        return build_basic_block_resnet(cfg, input_shape)
    if not any(r.DEFORM_ON_PER_STAGE):
        return build_resnet_backbone(cfg, input_shape)
    stem = BasicStem(input_shape.channels, r.STEM_OUT_CHANNELS, norm=r.NORM)
    in_channels, out_channels = r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS
    bottleneck_channels = r.NUM_GROUPS * r.WIDTH_PER_GROUP
    stages = []
    for idx, num_blocks in enumerate(_BOTTLENECK_BLOCKS[r.DEPTH]):
        dilation = r.RES5_DILATION if idx == 3 else 1
        first_stride = 1 if idx == 0 or dilation == 2 else 2
        kwargs = dict(bottleneck_channels=bottleneck_channels, stride_in_1x1=r.STRIDE_IN_1X1,
                      dilation=dilation, num_groups=r.NUM_GROUPS, norm=r.NORM,
                      block_class=BottleneckBlock)
        if r.DEFORM_ON_PER_STAGE[idx]:
            kwargs.update(block_class=DeformBottleneck, deform_modulated=r.DEFORM_MODULATED,
                          deform_num_groups=r.DEFORM_NUM_GROUPS)
        stages.append(ResNet.make_stage(
            num_blocks=num_blocks, stride_per_block=[first_stride] + [1] * (num_blocks - 1),
            in_channels=in_channels, out_channels=out_channels, **kwargs))
        in_channels, out_channels = out_channels, out_channels * 2
        bottleneck_channels *= 2
    return ResNet(stem, stages, out_features=r.OUT_FEATURES, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)


def build_basic_block_resnet(cfg, input_shape: ShapeSpec) -> ResNet:
    """
    ResNet-18/34 of any width, from detectron2's ``BasicStem`` and ``ResNet.make_stage``.

    detectron2's ``build_resnet_backbone`` fixes ``RES2_OUT_CHANNELS`` at 64 for these depths;
    the from-scratch CPU configs use half that width (``RES2_OUT_CHANNELS: 32``,
    ``STEM_OUT_CHANNELS: 32``), about 2.4x faster per training step on a CPU. Channels double at
    every stage, as in the standard network.

    Returns:
        ResNet: outputs ``MODEL.RESNETS.OUT_FEATURES`` (``res2``..``res5``, strides 4..32).
    """
    r = cfg.MODEL.RESNETS
    stem = BasicStem(input_shape.channels, r.STEM_OUT_CHANNELS, norm=r.NORM)
    in_channels, out_channels, stages = r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS, []
    for idx, num_blocks in enumerate(_BASIC_BLOCKS[r.DEPTH]):
        first_stride = 1 if idx == 0 else 2
        stages.append(ResNet.make_stage(
            BasicBlock, num_blocks, stride_per_block=[first_stride] + [1] * (num_blocks - 1),
            in_channels=in_channels, out_channels=out_channels, norm=r.NORM))
        in_channels, out_channels = out_channels, out_channels * 2
    return ResNet(stem, stages, out_features=r.OUT_FEATURES, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)


def _p3_p7_fpn(cfg, bottom_up) -> FPN:
    """
    detectron2's FPN over the three ``MODEL.FPN.IN_FEATURES`` of ``bottom_up`` (strides 8, 16,
    32), with P6 = conv(P5) and P7 = conv(relu(P6)).

    Returns:
        FPN: outputs ``p3``..``p7`` (strides 8..128) with ``MODEL.FPN.OUT_CHANNELS`` channels.
    """
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    fpn = FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelP6P7(out_channels, out_channels, in_feature="p5"),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
    # Pad inputs to a multiple of P7's stride so that every level's grid is exactly the padded
    # size / stride (docs/MODEL_ZOO.md); detectron2's FPN pads to its last *input* stride (32).
    fpn._size_divisibility = fpn._out_feature_strides[fpn._out_features[-1]]
    return fpn


@BACKBONE_REGISTRY.register()
def build_dsla_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """
    ResNet (``MODEL.RESNETS``, see :func:`build_dsla_resnet`) + FPN (``MODEL.FPN``), P3-P7.

    Returns:
        FPN: ``p3``..``p7`` (strides 8..128), ``size_divisibility`` 128.
    """
    return _p3_p7_fpn(cfg, build_dsla_resnet(cfg, input_shape))


def _swin_out_indices(in_features):
    """Stage indices of the Swin outputs named in ``MODEL.FPN.IN_FEATURES`` (``p0``..``p3``)."""
    names = [f"p{i}" for i in range(4)]
    if len(in_features) != 3 or any(f not in names for f in in_features):
        raise UserError(f"MODEL.FPN.IN_FEATURES = {list(in_features)}: a Swin backbone names its "
                        f"stage outputs {names}; P3-P5 need three of them, e.g. ['p1', 'p2', 'p3']")
    return tuple(names.index(f) for f in in_features)


@BACKBONE_REGISTRY.register()
def build_dsla_swin_fpn_backbone(cfg, input_shape: ShapeSpec):
    """
    detectron2's Swin Transformer (``MODEL.SWIN``; patch size 4, qkv bias, no absolute position
    embedding, as the authors' Swin-S) + the same FPN as the ResNet backbone, fed by the stage
    outputs of ``MODEL.FPN.IN_FEATURES`` (Swin-S: ``p1``..``p3``, 192/384/768 channels at strides
    8/16/32, each after its own LayerNorm).

    Returns:
        FPN: ``p3``..``p7`` (strides 8..128), ``size_divisibility`` 128.
    """
    s = cfg.MODEL.SWIN
    bottom_up = SwinTransformer(
        patch_size=4, in_chans=input_shape.channels, embed_dim=s.EMBED_DIM, depths=s.DEPTHS,
        num_heads=s.NUM_HEADS, window_size=s.WINDOW_SIZE, mlp_ratio=s.MLP_RATIO,
        drop_path_rate=0.0, out_indices=_swin_out_indices(cfg.MODEL.FPN.IN_FEATURES),
    )
    _add_stochastic_depth(bottom_up, s.DROP_PATH_RATE)
    return _p3_p7_fpn(cfg, bottom_up)


def _add_stochastic_depth(swin: SwinTransformer, max_rate: float) -> None:
    """
    Give block b of the B blocks the drop-path rate ``max_rate * b / (B - 1)`` (the linear rule
    of Swin and of the authors' mmdetection model). detectron2's Swin would import timm for this;
    torchvision's ``StochasticDepth(mode="row")`` is the same operation (drop the residual branch
    of a whole sample, scale the kept ones by 1 / (1 - rate); identity at inference).
    """
    blocks = [block for layer in swin.layers for block in layer.blocks]
    for block, rate in zip(blocks, torch.linspace(0, max_rate, len(blocks)).tolist()):
        if rate > 0:
            block.drop_path = StochasticDepth(rate, mode="row")
