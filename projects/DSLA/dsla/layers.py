"""Deformable convolutions computed with ``torchvision.ops.deform_conv2d``.

detectron2's ``DeformConv`` / ``ModulatedDeformConv`` need its compiled ``_C`` extension (absent
from the pure-Python wheel and on Python > 3.10). These classes take the same constructor
arguments and keep the same parameter names (``weight``, ``bias``, ``norm``), so detectron2's
``DeformBottleneckBlock`` can build with them and checkpoints load unchanged; torchvision's op
runs on CPU and GPU.
"""
import math

import torch
import torchvision
from torch import nn
from torch.nn.modules.utils import _pair

__all__ = ["ModulatedDeformConv2d", "DeformConv2d"]


class ModulatedDeformConv2d(nn.Module):
    """
    DCNv2: ``forward(x [N, Cin, H, W], offset [N, 2*dg*k*k, H', W'], mask [N, dg*k*k, H', W'])``
    returns ``[N, Cout, H', W']`` (then ``norm`` and ``activation`` if given).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, deformable_groups=1, bias=True, norm=None, activation=None):
        super().__init__()
        assert in_channels % groups == 0, (in_channels, groups)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.groups, self.deformable_groups = groups, deformable_groups
        self.norm, self.activation = norm, activation
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, *self.kernel_size)
        )
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x, offset, mask=None):
        x = torchvision.ops.deform_conv2d(
            x, offset, self.weight, self.bias, stride=self.stride, padding=self.padding,
            dilation=self.dilation, mask=mask,
        )
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"groups={self.groups}, deformable_groups={self.deformable_groups}, "
                f"bias={self.bias is not None}")


class DeformConv2d(ModulatedDeformConv2d):
    """DCNv1 (no mask): ``forward(x, offset)``; no bias by default, like detectron2's."""

    def __init__(self, *args, bias=False, **kwargs):
        super().__init__(*args, bias=bias, **kwargs)

    def forward(self, x, offset):
        return super().forward(x, offset, None)
