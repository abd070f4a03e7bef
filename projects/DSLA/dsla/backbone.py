"""ResNet-FPN backbone of DSLA: P3-P7 with P6 built from the P5 *output* (DSLA_SPEC §1).

detectron2's RetinaNet backbone builds P6 from C5; FCOS/DSLA (and the authors' mmdetection
configs, ``add_extra_convs="on_output"``) build it from P5, which changes the P6/P7 conv shapes
(256 input channels instead of 2048), so the released weights need this builder.
"""
from unittest import mock

import detectron2.modeling.backbone.resnet as d2_resnet
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import FPN, LastLevelP6P7
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, ResNet, build_resnet_backbone

from .layers import DeformConv2d, ModulatedDeformConv2d

__all__ = ["build_dsla_resnet_fpn_backbone"]


@BACKBONE_REGISTRY.register()
def build_dsla_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """
    ResNet (``MODEL.RESNETS``) + FPN (``MODEL.FPN``) with P6 = conv(P5), P7 = conv(relu(P6)).

    Returns:
        FPN: outputs ``p3``..``p7`` (strides 8..128) with ``MODEL.FPN.OUT_CHANNELS`` channels,
        ``size_divisibility`` 128 so that P7 aligns with the padded input.
    """
    # detectron2's DeformBottleneckBlock (MODEL.RESNETS.DEFORM_ON_PER_STAGE) looks these two
    # names up when it is built; give it the torchvision-backed ones (same parameters and keys).
    if cfg.MODEL.RESNETS.DEPTH in (18, 34) and cfg.MODEL.RESNETS.RES2_OUT_CHANNELS != 64:
        bottom_up = build_basic_block_resnet(cfg, input_shape)
    else:
        with mock.patch.multiple(d2_resnet, DeformConv=DeformConv2d,
                                 ModulatedDeformConv=ModulatedDeformConv2d):
            bottom_up = build_resnet_backbone(cfg, input_shape)
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    fpn = FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelP6P7(out_channels, out_channels, in_feature="p5"),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
    # Pad inputs to a multiple of P7's stride (DSLA_SPEC §8) so every level's grid is exactly
    # the padded size / stride; detectron2's FPN would pad to the last *input* stride (32).
    fpn._size_divisibility = fpn._out_feature_strides[fpn._out_features[-1]]
    return fpn


def build_basic_block_resnet(cfg, input_shape: ShapeSpec) -> ResNet:
    """
    ResNet-18/34 of any width, from detectron2's ``BasicStem`` and ``ResNet.make_stage``.

    detectron2's ``build_resnet_backbone`` fixes ``RES2_OUT_CHANNELS`` at 64 for these depths;
    the from-scratch CPU configs use a narrower network (``RES2_OUT_CHANNELS: 32``, stem
    ``STEM_OUT_CHANNELS: 32``), about 3x faster per iteration on a CPU. Channels double at every
    stage, as in the standard network.

    Returns:
        ResNet with the outputs ``MODEL.RESNETS.OUT_FEATURES``.
    """
    r = cfg.MODEL.RESNETS
    blocks_per_stage = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}[r.DEPTH]
    stem = BasicStem(in_channels=input_shape.channels, out_channels=r.STEM_OUT_CHANNELS,
                     norm=r.NORM)
    in_channels, out_channels, stages = r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS, []
    for i, num_blocks in enumerate(blocks_per_stage):
        first_stride = 1 if i == 0 else 2
        stages.append(ResNet.make_stage(
            BasicBlock, num_blocks, stride_per_block=[first_stride] + [1] * (num_blocks - 1),
            in_channels=in_channels, out_channels=out_channels, norm=r.NORM))
        in_channels, out_channels = out_channels, out_channels * 2
    return ResNet(stem, stages, out_features=r.OUT_FEATURES,
                  freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)
