"""Every yaml under configs/ loads and builds its model; DCN configs also run a forward pass."""
import glob
import os

import pytest
import torch

from detectron2.modeling import build_model

from conftest import REPO
from dsla.cli import load_config

CONFIGS = sorted(
    os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"),
                                                recursive=True)
)


def load(path):
    return load_config(os.path.join(REPO, path), ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])


def test_configs_found():
    assert "configs/Base-DSLA.yaml" in CONFIGS
    assert len(CONFIGS) >= 10, CONFIGS


@pytest.mark.parametrize("path", CONFIGS)
def test_config_builds(path):
    cfg = load(path)
    model = build_model(cfg)
    arch = cfg.MODEL.META_ARCHITECTURE
    assert type(model).__name__ == arch
    assert model.head_in_features == ["p3", "p4", "p5", "p6", "p7"]
    # P6/P7 come from the 256-channel (or OUT_CHANNELS) P5 output, not from C5 (docs/METHOD.md,
    # "Network").
    assert model.backbone.top_block.p6.in_channels == cfg.MODEL.FPN.OUT_CHANNELS
    # Padded to 32 as the authors' code pads (docs/METHOD.md, "Input padding").
    assert model.backbone.size_divisibility == 32


@pytest.mark.parametrize("path", [p for p in CONFIGS if "dcn" in p or "R_101_FPN_ms_2x" in p])
def test_dcn_config_runs_forward_on_cpu(path):
    # detectron2's own deformable convs need its compiled _C; ours run through torchvision.
    cfg = load(path)
    model = build_model(cfg).eval()
    deformable = [n for n, m in model.named_modules() if type(m).__name__.endswith("DeformConv2d")]
    assert deformable, "config promises DCN but the model has none"
    with torch.no_grad():
        out = model([{"image": torch.rand(3, 128, 128) * 255}])
    assert "instances" in out[0]
