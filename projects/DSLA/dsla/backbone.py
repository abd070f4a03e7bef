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
from detectron2.modeling.backbone.resnet import build_resnet_backbone

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
