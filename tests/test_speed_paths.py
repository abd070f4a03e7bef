"""The CPU fast paths of the backbone and the allocator setting give exactly the values of the
detectron2 modules they replace (dsla.backbone, dsla.cpu_memory)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling.backbone.resnet import BasicStem

from dsla.backbone import (
    FastPoolStem,
    InPlaceBatchNorm2d,
    InPlaceFrozenBatchNorm2d,
    make_dsla_resnet,
    max_pool_3x3_stride_2,
)
from dsla.cpu_memory import keep_freed_memory

from conftest import make_inputs, tiny_cfg


def _random_norm(cls, channels=5):
    norm = cls(channels)
    g = torch.Generator().manual_seed(0)
    for name in ("weight", "bias", "running_mean"):
        getattr(norm, name).data.copy_(torch.randn(channels, generator=g))
    norm.running_var.data.copy_(torch.rand(channels, generator=g) + 0.1)
    return norm.eval()


@pytest.mark.parametrize("plain, fast", [(FrozenBatchNorm2d, InPlaceFrozenBatchNorm2d),
                                         (nn.BatchNorm2d, InPlaceBatchNorm2d)])
def test_in_place_norm_is_bit_identical_and_in_place(plain, fast):
    ref_norm = _random_norm(plain)
    norm = copy.deepcopy(ref_norm)
    norm.__class__ = fast
    x = torch.randn(2, 5, 33, 47) * 4
    expected = ref_norm(x.clone())
    with torch.no_grad():
        inp = x.clone()
        out = norm(inp)
    assert torch.equal(out, expected)
    assert out.data_ptr() == inp.data_ptr()  # written over the input, nothing allocated
    # Where a gradient is needed the input is left alone; values and gradient are unchanged.
    y, ref_y = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, ref_out = norm(y), ref_norm(ref_y)
    grad = torch.randn(out.shape)
    out.backward(grad)
    ref_out.backward(grad)
    assert torch.equal(out, ref_out) and torch.equal(y.detach(), x)
    assert torch.equal(y.grad, ref_y.grad)


@pytest.mark.parametrize("shape", [(1, 3, 8, 8), (2, 4, 7, 10), (1, 2, 1, 1), (1, 3, 16, 5)])
def test_max_pool_equals_max_pool2d(shape):
    x = torch.randn(shape) - 2.0  # negative values: the padding must never win
    x.view(-1)[0] = float("-inf")
    assert torch.equal(max_pool_3x3_stride_2(x), F.max_pool2d(x, 3, stride=2, padding=1))


def test_fast_stem_equals_basic_stem():
    torch.manual_seed(0)
    stem = FastPoolStem(3, 8, norm="FrozenBN")
    plain = BasicStem(3, 8, norm="FrozenBN")
    plain.load_state_dict(stem.state_dict())
    x = torch.randn(1, 3, 37, 50)
    with torch.no_grad():
        assert torch.equal(stem(x), plain(x))


@pytest.mark.parametrize("norm, depth", [("FrozenBN", 50), ("BN", 18)])
def test_resnet_with_fast_paths_equals_plain_resnet(norm, depth):
    """Whole ResNet: the in-place norms and the stem's pool give the values of detectron2's."""
    torch.manual_seed(0)
    fast = make_dsla_resnet(depth=depth, norm=norm, freeze_at=0, stem_out_channels=16,
                            res2_out_channels=32 if depth == 18 else 64,
                            width_per_group=16).eval()
    assert not any(type(m) in (FrozenBatchNorm2d, nn.BatchNorm2d) for m in fast.modules())
    plain = copy.deepcopy(fast)
    for m in plain.modules():
        if isinstance(m, (InPlaceFrozenBatchNorm2d, InPlaceBatchNorm2d, FastPoolStem)):
            m.__class__ = m.__class__.__bases__[0]
    for m in fast.modules():  # non-trivial statistics, as a trained model has
        if hasattr(m, "running_var"):
            m.running_var.data.uniform_(0.5, 2.0)
            m.running_mean.data.normal_()
    plain.load_state_dict(fast.state_dict())
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        got, expected = fast(x), plain(x)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_keep_freed_memory_is_idempotent():
    assert keep_freed_memory() == keep_freed_memory()


def test_cpu_forward_keeps_freed_memory(monkeypatch):
    from detectron2.modeling import build_model

    import dsla.point_detector

    calls = []
    monkeypatch.setattr(dsla.point_detector, "keep_freed_memory", lambda: calls.append(1))
    model = build_model(tiny_cfg()).eval()
    with torch.no_grad():
        model(make_inputs([[]], size=64))
    assert calls == [1]
