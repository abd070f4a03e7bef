"""The DSLA head: a classification tower and a regression tower, no centerness branch
(docs/METHOD.md, "Network").

Shape letters (docs/METHOD.md, "Shape letters"): N images, C classes, L levels, Hi x Wi the grid
of level i; Cin the feature channels.
"""
import math
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm

from .layers import ModulatedDeformConv2d

__all__ = ["DSLAHead", "Scale", "DeformTowerConv"]


class Scale(nn.Module):
    """A learnable scalar multiplier, one per FPN level, initialised to ``init_value``."""

    def __init__(self, init_value: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(init_value)))

    def forward(self, x):
        return x * self.scale


class DeformTowerConv(ModulatedDeformConv2d):
    """
    3x3 modulated deformable conv (DCNv2) whose offsets and mask come from a plain conv on the
    same input (``conv_offset``, zero-initialised so training starts as a regular conv).

    ``forward(x [N, Cin, H, W]) -> [N, Cout, H, W]`` (after norm and activation).
    """

    def __init__(self, in_channels, out_channels, *, bias, norm, activation):
        super().__init__(in_channels, out_channels, kernel_size=3, stride=1, padding=1,
                         bias=bias, norm=norm, activation=activation)
        # 2 offsets + 1 mask value per kernel tap.
        self.conv_offset = nn.Conv2d(in_channels, 27, kernel_size=3, stride=1, padding=1)
        nn.init.constant_(self.conv_offset.weight, 0)
        nn.init.constant_(self.conv_offset.bias, 0)

    def forward(self, x):
        o1, o2, mask = torch.chunk(self.conv_offset(x), 3, dim=1)
        return super().forward(x, torch.cat((o1, o2), dim=1), mask.sigmoid())


def _tower(in_channels, num_convs, norm, conv_bias, dcn_on_last_conv):
    layers = []
    for i in range(num_convs):
        # A conv followed by a norm needs no bias unless the checkpoint has one (CONV_BIAS).
        # The ReLU overwrites the norm's (or conv's) fresh output, which neither backward reads:
        # same values, one feature map less to allocate.
        kwargs = dict(bias=conv_bias or not norm, norm=get_norm(norm, in_channels),
                      activation=F.relu_)
        if dcn_on_last_conv and i == num_convs - 1:
            layers.append(DeformTowerConv(in_channels, in_channels, **kwargs))
        else:
            layers.append(Conv2d(in_channels, in_channels, 3, stride=1, padding=1, **kwargs))
    return nn.Sequential(*layers)


class DSLAHead(nn.Module):
    """
    Shared head over all levels. ``forward`` returns class logits and box distances in pixels.
    """

    @configurable
    def __init__(
        self,
        *,
        input_shape: List[ShapeSpec],
        num_classes: int,
        num_convs: int = 4,
        norm: str = "GN",
        prior_prob: float = 0.01,
        norm_on_bbox: bool = False,
        dcn_on_last_conv: bool = False,
        conv_bias: bool = False,
        centerness: bool = False,
    ):
        """
        Args:
            input_shape: one ShapeSpec per level (all with the same channels; strides used for
                ``norm_on_bbox``).
            num_classes: C, foreground classes.
            num_convs, norm: tower depth and the norm after each tower conv.
            prior_prob: initial foreground probability of every class logit.
            norm_on_bbox: distances are ``relu(scale * x) * stride`` instead of ``exp(scale * x)``.
            dcn_on_last_conv: last conv of each tower is a DCNv2.
            conv_bias: keep conv biases in the towers even with a norm.
            centerness: add plain FCOS's centerness conv (3x3 -> 1) on the classification tower
                (the plain-FCOS baseline, ``fcos_plain.py``; DSLA has none).
        """
        super().__init__()
        channels = {s.channels for s in input_shape}
        assert len(channels) == 1, f"All head inputs need the same channels, got {channels}"
        in_channels = channels.pop()
        self.strides = [s.stride for s in input_shape]
        self.norm_on_bbox = norm_on_bbox
        self.cls_convs = _tower(in_channels, num_convs, norm, conv_bias, dcn_on_last_conv)
        self.reg_convs = _tower(in_channels, num_convs, norm, conv_bias, dcn_on_last_conv)
        self.cls_score = nn.Conv2d(in_channels, num_classes, 3, stride=1, padding=1)
        self.bbox_pred = nn.Conv2d(in_channels, 4, 3, stride=1, padding=1)
        self.scales = nn.ModuleList([Scale(1.0) for _ in input_shape])
        # mmdetection's plain FCOS puts centerness on the cls tower (``centerness_on_reg=False``).
        self.centerness = nn.Conv2d(in_channels, 1, 3, stride=1, padding=1) if centerness else None
        self._init_weights(prior_prob)

    def _init_weights(self, prior_prob):
        for tower in (self.cls_convs, self.reg_convs):
            for conv in tower:
                nn.init.normal_(conv.weight, mean=0, std=0.01)
                if conv.bias is not None:
                    nn.init.constant_(conv.bias, 0)
        for conv in (self.cls_score, self.bbox_pred, self.centerness):
            if conv is None:
                continue
            nn.init.normal_(conv.weight, mean=0, std=0.01)
            nn.init.constant_(conv.bias, 0)
        # Start with every class at probability prior_prob, so the loss of the many background
        # points does not swamp the first iterations (RetinaNet's prior init).
        nn.init.constant_(self.cls_score.bias, -math.log((1 - prior_prob) / prior_prob))

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]):
        c = cfg.MODEL.DSLA
        return {
            "input_shape": input_shape,
            "num_classes": c.NUM_CLASSES,
            "num_convs": c.NUM_CONVS,
            "norm": c.NORM,
            "prior_prob": c.PRIOR_PROB,
            "norm_on_bbox": c.NORM_ON_BBOX,
            "dcn_on_last_conv": c.DCN_ON_LAST_CONV,
            "conv_bias": c.CONV_BIAS,
        }

    def forward(self, features: List[torch.Tensor]):
        """
        Args:
            features: L tensors ``[N, Cin, Hi, Wi]``, finest level first.

        Returns:
            logits: L tensors ``[N, C, Hi, Wi]``.
            distances: L tensors ``[N, 4, Hi, Wi]``, (l, t, r, b) in input-image pixels.
            centerness: only with ``centerness=True``, L tensors ``[N, 1, Hi, Wi]`` of logits.
        """
        assert len(features) == len(self.scales), (len(features), len(self.scales))
        logits, distances, centerness = [], [], []
        for feature, scale, stride in zip(features, self.scales, self.strides):
            cls_feature = self.cls_convs(feature)
            logits.append(self.cls_score(cls_feature))
            if self.centerness is not None:
                centerness.append(self.centerness(cls_feature))
            # float32: exp of a half-precision value overflows for distances > 65504 / e.
            raw = scale(self.bbox_pred(self.reg_convs(feature))).float()
            distances.append(F.relu(raw) * stride if self.norm_on_bbox else raw.exp())
        if self.centerness is not None:
            return logits, distances, centerness
        return logits, distances
