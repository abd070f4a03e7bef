"""Backbones of DSLA: ResNet-FPN and Swin-FPN, both giving P3-P7 with P6 built from the P5 output.

detectron2's RetinaNet backbone builds P6 from C5; FCOS and DSLA (the authors' mmdetection configs:
``add_extra_convs="on_output"``, ``relu_before_extra_convs=True``) build it from P5, which changes
the P6/P7 conv shapes (256 input channels instead of 2048), so the released weights need these
builders. The FPN is the same for every backbone; only its three inputs differ.

Shape letters: N = images, C = channels, H x W = input size (padded to a multiple of 32).
"""
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import StochasticDepth

from detectron2.layers import Conv2d, FrozenBatchNorm2d, ShapeSpec
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
    "FastPoolStem",
    "InPlaceBatchNorm2d",
    "InPlaceFrozenBatchNorm2d",
    "build_dsla_resnet",
    "build_dsla_resnet_fpn_backbone",
    "build_dsla_swin_fpn_backbone",
    "make_dsla_resnet",
    "make_dsla_swin",
    "make_p3_p7_fpn",
]

# Blocks per stage (res2..res5), as in detectron2's builder.
_BOTTLENECK_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
_BASIC_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


def _batch_norm_in_place(x, norm):
    """
    Eval-mode batch norm of ``x`` written over ``x``, where that is safe and exact: no gradient
    needed, on a CPU, ``x`` contiguous and of the norm's dtype; None elsewhere.

    ``F.batch_norm`` would run the same ATen kernel into a new tensor; on a CPU a new output of a
    large feature map costs more (allocation, first-touch page faults) than the normalisation.
    """
    if norm.weight is None or norm.running_mean is None:  # no affine or no running statistics
        return None
    grad = torch.is_grad_enabled() and (x.requires_grad or norm.weight.requires_grad)
    if (grad or x.device.type != "cpu" or x.dtype != norm.weight.dtype or not x.is_contiguous()
            or torch.jit.is_scripting() or torch.jit.is_tracing()):
        return None
    unused = x.new_empty(0)  # save_mean / save_invstd, not computed in eval mode
    return torch.ops.aten.native_batch_norm.out(
        x, norm.weight, norm.bias, norm.running_mean, norm.running_var, False, 0.0, norm.eps,
        out=x, save_mean=unused, save_invstd=x.new_empty(0))[0]


class InPlaceFrozenBatchNorm2d(FrozenBatchNorm2d):
    """detectron2's ``FrozenBatchNorm2d`` that normalises its input in place where that is exact
    (:func:`_batch_norm_in_place`). Only for a conv's norm, whose input nothing else reads."""

    def forward(self, x):
        out = _batch_norm_in_place(x, self)
        if out is not None:
            return out
        if not x.requires_grad:
            return super().forward(x)
        # detectron2's ``x * scale + bias`` with the sum written into the product: the same
        # values and gradient (the product's backward reads only ``scale``), one map less.
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        out = x * scale.reshape(1, -1, 1, 1).to(x.dtype)
        return out.add_(bias.reshape(1, -1, 1, 1).to(x.dtype))


class InPlaceBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that in eval mode normalises its input in place where that is exact
    (:func:`_batch_norm_in_place`). Only for a conv's norm, whose input nothing else reads."""

    def forward(self, x):
        out = None if self.training else _batch_norm_in_place(x, self)
        return super().forward(x) if out is None else out


class FastPoolStem(BasicStem):
    """
    detectron2's ``BasicStem`` (conv 7x7/2, norm, ReLU, max pool 3x3/2 with padding 1) whose max
    pool, where no gradient is needed, is taken as two separable passes of ``torch.maximum``
    over strided views: the same values (a maximum does not depend on the order it is taken in),
    about twice as fast on a CPU as ATen's ``max_pool2d``, which also computes the indices.
    """

    def forward(self, x):
        x = self.conv1(x)
        x = F.relu_(x)
        if x.requires_grad or torch.jit.is_scripting() or torch.jit.is_tracing():
            return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        return max_pool_3x3_stride_2(x)


def max_pool_3x3_stride_2(x):
    """
    ``F.max_pool2d(x, kernel_size=3, stride=2, padding=1)`` without indices or gradient.

    Args:
        x: ``[N, C, H, W]``.

    Returns:
        ``[N, C, (H - 1) // 2 + 1, (W - 1) // 2 + 1]``.
    """
    out_h, out_w = (x.shape[-2] - 1) // 2 + 1, (x.shape[-1] - 1) // 2 + 1
    padded = F.pad(x, (1, 1, 1, 1), value=float("-inf"))  # padding never wins, as in max_pool2d
    cols = torch.maximum(padded[..., 0:2 * out_w - 1:2], padded[..., 1:2 * out_w:2])
    cols = torch.maximum(cols, padded[..., 2:2 * out_w + 1:2], out=cols)
    rows = torch.maximum(cols[..., 0:2 * out_h - 1:2, :], cols[..., 1:2 * out_h:2, :])
    return torch.maximum(rows, cols[..., 2:2 * out_h + 1:2, :], out=rows)


def _norms_in_place(resnet: ResNet) -> ResNet:
    """Makes every ``FrozenBatchNorm2d`` / ``BatchNorm2d`` of ``resnet`` (all are conv norms)
    its in-place subclass; same parameters and buffers, so checkpoints load unchanged."""
    in_place = {FrozenBatchNorm2d: InPlaceFrozenBatchNorm2d, nn.BatchNorm2d: InPlaceBatchNorm2d}
    for module in resnet.modules():
        if type(module) in in_place:
            # Subclasses without state of their own: switching the class keeps the tensors.
            module.__class__ = in_place[type(module)]
    return resnet


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
    The ResNet of ``MODEL.RESNETS`` (and ``MODEL.BACKBONE.FREEZE_AT``): :func:`make_dsla_resnet`
    with the keys detectron2's ``build_resnet_backbone`` reads.

    Returns:
        ResNet: outputs ``MODEL.RESNETS.OUT_FEATURES`` (``res2``..``res5``, strides 4..32).
    """
    r = cfg.MODEL.RESNETS
    _refuse_deform_on_basic_blocks(r.DEPTH, r.DEFORM_ON_PER_STAGE,
                                   "MODEL.RESNETS.DEPTH", "MODEL.RESNETS.DEFORM_ON_PER_STAGE")
    return make_dsla_resnet(
        depth=r.DEPTH, norm=r.NORM, stride_in_1x1=r.STRIDE_IN_1X1,
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT, out_features=r.OUT_FEATURES,
        in_channels=input_shape.channels, stem_out_channels=r.STEM_OUT_CHANNELS,
        res2_out_channels=r.RES2_OUT_CHANNELS, num_groups=r.NUM_GROUPS,
        width_per_group=r.WIDTH_PER_GROUP, res5_dilation=r.RES5_DILATION,
        deform_on_per_stage=r.DEFORM_ON_PER_STAGE, deform_modulated=r.DEFORM_MODULATED,
        deform_num_groups=r.DEFORM_NUM_GROUPS,
    )


def make_dsla_resnet(*, depth, norm="FrozenBN", stride_in_1x1=True, freeze_at=2,
                     out_features=("res3", "res4", "res5"), in_channels=3, stem_out_channels=64,
                     res2_out_channels=256, num_groups=1, width_per_group=64, res5_dilation=1,
                     deform_on_per_stage=(False, False, False, False), deform_modulated=False,
                     deform_num_groups=1) -> ResNet:
    """
    detectron2's ResNet (``BasicStem`` + ``ResNet.make_stage``), built as its
    ``build_resnet_backbone`` builds it from the ``MODEL.RESNETS`` keys of the same names, except
    that the stages of ``deform_on_per_stage`` use :class:`DeformBottleneck` (detectron2 hard-wires
    its own deformable block, whose op needs the compiled ``detectron2._C``), and that
    ResNet-18/34 may have any width: the from-scratch CPU configs use half of it
    (``res2_out_channels=32``, ``stem_out_channels=32``), about 2.4x faster per training step on a
    CPU. Keyword arguments only, for LazyConfig (``LazyCall(make_dsla_resnet)(depth=50, ...)``).

    Returns:
        ResNet: outputs ``out_features`` (``res2``..``res5``, strides 4..32).
    """
    _refuse_deform_on_basic_blocks(depth, deform_on_per_stage, "depth", "deform_on_per_stage")
    stem = FastPoolStem(in_channels, stem_out_channels, norm=norm)
    if depth in _BASIC_BLOCKS:
        stages = _basic_block_stages(depth, stem_out_channels, res2_out_channels, norm)
    else:
        deform = dict(deform_modulated=deform_modulated, deform_num_groups=deform_num_groups)
        stages = _bottleneck_stages(
            depth, stem_out_channels, res2_out_channels, num_groups * width_per_group,
            deform_on_per_stage, deform, stride_in_1x1=stride_in_1x1, num_groups=num_groups,
            norm=norm, res5_dilation=res5_dilation)
    return _norms_in_place(
        ResNet(stem, stages, out_features=list(out_features), freeze_at=freeze_at))


def _refuse_deform_on_basic_blocks(depth, deform_on_per_stage, depth_name, deform_name):
    """Deformable stages need bottleneck blocks; the names say which keys or arguments to fix."""
    if any(deform_on_per_stage) and depth not in _BOTTLENECK_BLOCKS:
        raise UserError(f"{deform_name} = {list(deform_on_per_stage)} needs a bottleneck ResNet "
                        f"({depth_name} 50, 101 or 152), got {depth_name} = {depth}")


def _basic_block_stages(depth, in_channels, out_channels, norm):
    """ResNet-18/34 stages res2..res5; channels double at every stage, as in the standard
    network (detectron2's builder instead fixes res2 at 64 channels for these depths)."""
    stages = []
    for idx, num_blocks in enumerate(_BASIC_BLOCKS[depth]):
        first_stride = 1 if idx == 0 else 2
        stages.append(ResNet.make_stage(
            BasicBlock, num_blocks, stride_per_block=[first_stride] + [1] * (num_blocks - 1),
            in_channels=in_channels, out_channels=out_channels, norm=norm))
        in_channels, out_channels = out_channels, out_channels * 2
    return stages


def _bottleneck_stages(depth, in_channels, out_channels, bottleneck_channels, deform_on_per_stage,
                       deform, *, res5_dilation, **block_kwargs):
    """ResNet-50/101/152 stages res2..res5 as detectron2's ``build_resnet_backbone`` makes them;
    stage ``idx`` is deformable (``deform``: DeformBottleneck's extra arguments) where
    ``deform_on_per_stage[idx]``."""
    stages = []
    for idx, num_blocks in enumerate(_BOTTLENECK_BLOCKS[depth]):
        dilation = res5_dilation if idx == 3 else 1
        first_stride = 1 if idx == 0 or dilation == 2 else 2
        kwargs = dict(bottleneck_channels=bottleneck_channels, dilation=dilation,
                      block_class=BottleneckBlock, **block_kwargs)
        if deform_on_per_stage[idx]:
            kwargs.update(block_class=DeformBottleneck, **deform)
        stages.append(ResNet.make_stage(
            num_blocks=num_blocks, stride_per_block=[first_stride] + [1] * (num_blocks - 1),
            in_channels=in_channels, out_channels=out_channels, **kwargs))
        in_channels, out_channels = out_channels, out_channels * 2
        bottleneck_channels *= 2
    return stages


def _p3_p7_fpn(cfg, bottom_up) -> FPN:
    """:func:`make_p3_p7_fpn` with ``MODEL.FPN``."""
    f = cfg.MODEL.FPN
    return make_p3_p7_fpn(bottom_up, in_features=f.IN_FEATURES, out_channels=f.OUT_CHANNELS,
                          norm=f.NORM, fuse_type=f.FUSE_TYPE)


def make_p3_p7_fpn(bottom_up, *, in_features, out_channels=256, norm="", fuse_type="sum") -> FPN:
    """
    detectron2's FPN over the three ``in_features`` of ``bottom_up`` (strides 8, 16, 32), with
    P6 = conv(P5) and P7 = conv(relu(P6)).

    Returns:
        FPN: outputs ``p3``..``p7`` (strides 8..128) with ``out_channels`` channels.
    """
    fpn = FPN(
        bottom_up=bottom_up,
        in_features=list(in_features),
        out_channels=out_channels,
        norm=norm,
        top_block=LastLevelP6P7(out_channels, out_channels, in_feature="p5"),
        fuse_type=fuse_type,
    )
    # Inputs are padded to a multiple of 32, P5's stride, as the authors' code pads them
    # (mmdetection's Pad, size_divisor=32): every level down to P5 is exactly the padded size /
    # stride, so the top-down 2x upsampling lands on the lateral's size, and P6/P7 are
    # ceil(size / stride), the points of dsla.points.grid_sizes. Padding further would add
    # convolution work on padded rows and columns and move the border features away from the
    # authors' (docs/METHOD.md, "Input padding").
    return fpn


@BACKBONE_REGISTRY.register()
def build_dsla_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """
    ResNet (``MODEL.RESNETS``, see :func:`build_dsla_resnet`) + FPN (``MODEL.FPN``), P3-P7.

    Returns:
        FPN: ``p3``..``p7`` (strides 8..128), ``size_divisibility`` 32.
    """
    return _p3_p7_fpn(cfg, build_dsla_resnet(cfg, input_shape))


def _swin_out_indices(out_features, name):
    """Stage indices of the Swin outputs ``out_features`` (``p0``..``p3``); ``name`` is the key
    or argument that holds them, for the error."""
    names = [f"p{i}" for i in range(4)]
    if len(out_features) != 3 or any(f not in names for f in out_features):
        raise UserError(f"{name} = {list(out_features)}: a Swin backbone names its stage "
                        f"outputs {names}; P3-P5 need three of them, e.g. ['p1', 'p2', 'p3']")
    return tuple(names.index(f) for f in out_features)


@BACKBONE_REGISTRY.register()
def build_dsla_swin_fpn_backbone(cfg, input_shape: ShapeSpec):
    """
    :func:`make_dsla_swin` (``MODEL.SWIN``) + the same FPN as the ResNet backbone, fed by the
    stage outputs of ``MODEL.FPN.IN_FEATURES`` (Swin-S: ``p1``..``p3``).

    Returns:
        FPN: ``p3``..``p7`` (strides 8..128), ``size_divisibility`` 32.
    """
    s, in_features = cfg.MODEL.SWIN, cfg.MODEL.FPN.IN_FEATURES
    _swin_out_indices(in_features, "MODEL.FPN.IN_FEATURES")
    bottom_up = make_dsla_swin(
        out_features=in_features, in_channels=input_shape.channels, embed_dim=s.EMBED_DIM,
        depths=s.DEPTHS, num_heads=s.NUM_HEADS, window_size=s.WINDOW_SIZE,
        mlp_ratio=s.MLP_RATIO, drop_path_rate=s.DROP_PATH_RATE,
    )
    return _p3_p7_fpn(cfg, bottom_up)


def make_dsla_swin(*, out_features=("p1", "p2", "p3"), in_channels=3, embed_dim=96,
                   depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=7, mlp_ratio=4.0,
                   drop_path_rate=0.2) -> SwinTransformer:
    """
    detectron2's Swin Transformer as the authors' Swin-S has it (defaults: Swin-S; patch size 4,
    qkv bias, no absolute position embedding), with stochastic depth through torchvision.
    Keyword arguments only, for LazyConfig.

    Returns:
        SwinTransformer: outputs ``out_features`` (Swin-S ``p1``..``p3``: 192/384/768 channels at
        strides 8/16/32, each after its own LayerNorm).
    """
    swin = SwinTransformer(
        patch_size=4, in_chans=in_channels, embed_dim=embed_dim, depths=list(depths),
        num_heads=list(num_heads), window_size=window_size, mlp_ratio=mlp_ratio,
        drop_path_rate=0.0, out_indices=_swin_out_indices(out_features, "out_features"),
    )
    _add_stochastic_depth(swin, drop_path_rate)
    return swin


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
