"""Convert the authors' mmdetection 2.x DSLA checkpoints into this project's detectron2 model.

The released checkpoints (DSLA_SPEC §8) hold a ResNet/ResNeXt backbone (optionally with DCNv1 in
some stages), an FPN with P6/P7 built on the P5 output, and the two-tower DSLA head (optionally
with a DCNv2 last conv). Renaming is enough; no tensor is transposed or rescaled, because:

- mmdetection's eval-mode ``BatchNorm2d`` and detectron2's ``FrozenBatchNorm2d`` both compute
  ``(x - running_mean) * weight / sqrt(running_var + eps) + bias`` with ``eps = 1e-5``, and the
  converted file carries no ``_metadata``, so FrozenBN loads ``running_var`` as stored;
- detectron2's ``DeformBottleneckBlock`` (``conv2_offset`` then ``conv2``) and mmcv's
  ``DeformConv2dPack`` (``conv2.conv_offset`` then ``conv2``) use the same offset layout, and the
  head's :class:`~dsla.head.DeformTowerConv` splits its 27 offset channels like mmcv's
  ``ModulatedDeformConv2dPack`` (two offset thirds, then the mask third through a sigmoid);
- mmdetection's FPN upsamples to the lateral's size and detectron2's by 2x, both nearest: the
  same whenever the input is padded to a multiple of 32 (C5's stride), as both frameworks do.

Every source key must be used and every model key filled (strict, see :func:`check_converted`):
a silently skipped tensor would keep its random initialisation and cost AP without any error.
"""
import os
import re
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Tuple

import torch

from detectron2.modeling import build_model

__all__ = [
    "ConversionError",
    "map_key",
    "extract_state_dict",
    "Renamed",
    "rename_state_dict",
    "check_converted",
    "convert_mmdet_state_dict",
    "to_detectron2_checkpoint",
    "model_shapes",
    "model_shapes_from_config",
    "read_checkpoint_file",
    "config_hints",
]

# mmdetection's FPN (start_level=1) has laterals for C3..C5; detectron2 names them by stage.
_FPN_FIRST_STAGE = 3
# mmdetection's fpn_convs 0-2 are the P3-P5 output convs, 3 and 4 the extra P6 and P7 convs.
_FPN_EXTRA_CONVS = {3: "backbone.top_block.p6", 4: "backbone.top_block.p7"}
# Buffers of training-mode BatchNorm that FrozenBatchNorm2d does not have: used, but not copied.
_DROPPED = re.compile(r".+\.num_batches_tracked")
_BN = r"(weight|bias|running_mean|running_var)"
_WB = r"(weight|bias)"
_MAX_LISTED = 50
# mmdetection config fields that matter for inference but not for the state dict (style: caffe
# vs pytorch = STRIDE_IN_1X1; img_norm_cfg: PIXEL_MEAN/STD and INPUT.FORMAT; norm_on_bbox).
_HINT = re.compile(r"\b(style|mean|std|to_rgb|norm_on_bbox|size_divisor)\s*=")


class ConversionError(ValueError):
    """The checkpoint does not fit the model: unused or missing keys, or shape mismatches."""


def _block(m) -> str:
    # mmdetection's layer1..layer4 are detectron2's res2..res5.
    return f"backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}"


def _fpn_output(m) -> Optional[str]:
    i = int(m[1])
    if i < _FPN_FIRST_STAGE:
        return f"backbone.fpn_output{i + _FPN_FIRST_STAGE}.{m[2]}"
    name = _FPN_EXTRA_CONVS.get(i)
    return f"{name}.{m[2]}" if name else None


# (mmdetection key regex, detectron2 name builder); first full match wins, so the DCN offset
# rules come before the plain conv rules they would otherwise be shadowed by.
_RULE_SPECS: List[Tuple[str, Callable[[re.Match], Optional[str]]]] = [
    (r"backbone\.conv1\.weight", lambda m: "backbone.bottom_up.stem.conv1.weight"),
    (rf"backbone\.bn1\.{_BN}", lambda m: f"backbone.bottom_up.stem.conv1.norm.{m[1]}"),
    (rf"backbone\.layer(\d)\.(\d+)\.conv(\d)\.conv_offset\.{_WB}",
     lambda m: f"{_block(m)}.conv{m[3]}_offset.{m[4]}"),
    (r"backbone\.layer(\d)\.(\d+)\.conv(\d)\.weight", lambda m: f"{_block(m)}.conv{m[3]}.weight"),
    (rf"backbone\.layer(\d)\.(\d+)\.bn(\d)\.{_BN}",
     lambda m: f"{_block(m)}.conv{m[3]}.norm.{m[4]}"),
    (r"backbone\.layer(\d)\.(\d+)\.downsample\.0\.weight",
     lambda m: f"{_block(m)}.shortcut.weight"),
    (rf"backbone\.layer(\d)\.(\d+)\.downsample\.1\.{_BN}",
     lambda m: f"{_block(m)}.shortcut.norm.{m[3]}"),
    (rf"neck\.lateral_convs\.(\d)\.conv\.{_WB}",
     lambda m: f"backbone.fpn_lateral{int(m[1]) + _FPN_FIRST_STAGE}.{m[2]}"),
    (rf"neck\.fpn_convs\.(\d)\.conv\.{_WB}", _fpn_output),
    (rf"bbox_head\.(cls|reg)_convs\.(\d+)\.conv\.conv_offset\.{_WB}",
     lambda m: f"head.{m[1]}_convs.{m[2]}.conv_offset.{m[3]}"),
    (rf"bbox_head\.(cls|reg)_convs\.(\d+)\.conv\.{_WB}",
     lambda m: f"head.{m[1]}_convs.{m[2]}.{m[3]}"),
    (rf"bbox_head\.(cls|reg)_convs\.(\d+)\.gn\.{_WB}",
     lambda m: f"head.{m[1]}_convs.{m[2]}.norm.{m[3]}"),
    (rf"bbox_head\.conv_cls\.{_WB}", lambda m: f"head.cls_score.{m[1]}"),
    (rf"bbox_head\.conv_reg\.{_WB}", lambda m: f"head.bbox_pred.{m[1]}"),
    (r"bbox_head\.scales\.(\d+)\.scale", lambda m: f"head.scales.{m[1]}.scale"),
]
_RULES = [(re.compile(p), f) for p, f in _RULE_SPECS]


def map_key(mmdet_key: str) -> Optional[str]:
    """
    The detectron2 name of one mmdetection key, e.g. ``backbone.layer2.0.downsample.1.weight``
    -> ``backbone.bottom_up.res3.0.shortcut.norm.weight``.

    Returns:
        the detectron2 key, or None when no rule covers it (the caller reports it as unused).
        ``num_batches_tracked`` keys are not mapped here; see :func:`rename_state_dict`.
    """
    for pattern, build in _RULES:
        m = pattern.fullmatch(mmdet_key)
        if m:
            return build(m)
    return None


def extract_state_dict(checkpoint: Mapping) -> Dict[str, torch.Tensor]:
    """
    The model weights of a loaded mmdetection checkpoint.

    Args:
        checkpoint: ``{"state_dict": ..., "meta": ..., "optimizer": ...}`` (``meta`` and
            ``optimizer`` are ignored) or a bare ``{key: Tensor}`` state dict.

    Returns:
        ``{mmdetection key: Tensor}``, without the ``module.`` prefix of a (Distributed)DataParallel
        wrapper.
    """
    if not isinstance(checkpoint, Mapping):
        raise ConversionError(f"Expected a dict checkpoint, got {type(checkpoint).__name__}.")
    state = checkpoint.get("state_dict", checkpoint)
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConversionError(
            "No 'state_dict' entry, and these entries are not tensors, so this is not a bare "
            f"state dict either: {bad[:10]}"
        )
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


class Renamed(NamedTuple):
    """Result of :func:`rename_state_dict`."""

    tensors: Dict[str, torch.Tensor]  # detectron2 key -> tensor
    sources: Dict[str, str]  # detectron2 key -> the mmdetection key it came from
    unmapped: List[str]  # mmdetection keys no rule covers
    dropped: List[str]  # num_batches_tracked keys (used, nothing to copy into FrozenBN)


def rename_state_dict(mmdet_state: Mapping[str, torch.Tensor]) -> Renamed:
    """
    Rename every mmdetection key with :func:`map_key`; no check against a model yet.

    Raises:
        ConversionError: when two source keys map to the same detectron2 key.
    """
    tensors, sources, unmapped, dropped = {}, {}, [], []
    for key, value in mmdet_state.items():
        if _DROPPED.fullmatch(key):
            dropped.append(key)
            continue
        new_key = map_key(key)
        if new_key is None:
            unmapped.append(key)
        elif new_key in tensors:
            raise ConversionError(
                f"Keys {sources[new_key]!r} and {key!r} both map to {new_key!r}."
            )
        else:
            tensors[new_key] = value
            sources[new_key] = key
    return Renamed(tensors, sources, unmapped, dropped)


def check_converted(renamed: Renamed, expected_shapes: Mapping[str, torch.Size]) -> None:
    """
    Check renamed tensors against the model's state dict: every source key used, every model key
    filled, every shape equal.

    Args:
        renamed: output of :func:`rename_state_dict`.
        expected_shapes: ``{detectron2 key: shape}`` of the target model (:func:`model_shapes`).

    Raises:
        ConversionError: listing the unused source keys, the missing model keys and, for each
            shape mismatch, both keys and both shapes.
    """
    unused = list(renamed.unmapped) + [
        f"{renamed.sources[k]} -> {k} (not in the model)"
        for k in renamed.tensors if k not in expected_shapes
    ]
    missing = [k for k in expected_shapes if k not in renamed.tensors]
    mismatched = [
        f"{renamed.sources[k]} -> {k}: checkpoint {tuple(v.shape)} vs model "
        f"{tuple(expected_shapes[k])}"
        for k, v in renamed.tensors.items()
        if k in expected_shapes and tuple(v.shape) != tuple(expected_shapes[k])
    ]
    if unused or missing or mismatched:
        raise ConversionError(
            "The mmdetection checkpoint does not fit the model of this config "
            "(check the config: RESNETS.DEPTH / NUM_GROUPS, DEFORM_ON_PER_STAGE, "
            "DSLA.DCN_ON_LAST_CONV / CONV_BIAS / NUM_CLASSES):"
            + _section("checkpoint key(s) unused", unused)
            + _section("model key(s) missing from the checkpoint", missing)
            + _section("shape mismatch(es)", mismatched)
        )


def _section(title: str, lines: List[str]) -> str:
    if not lines:
        return ""
    shown = [f"\n    {s}" for s in lines[:_MAX_LISTED]]
    more = f"\n    ... and {len(lines) - _MAX_LISTED} more" if len(lines) > _MAX_LISTED else ""
    return f"\n  {len(lines)} {title}:" + "".join(shown) + more


def convert_mmdet_state_dict(
    mmdet_state: Mapping[str, torch.Tensor], expected_shapes: Mapping[str, torch.Size]
) -> Dict[str, torch.Tensor]:
    """
    Rename and strictly check an mmdetection state dict for a model with ``expected_shapes``.

    Returns:
        ``{detectron2 key: Tensor}`` in the model's key order, loadable with ``strict=True``.

    Raises:
        ConversionError: see :func:`check_converted`.
    """
    renamed = rename_state_dict(mmdet_state)
    check_converted(renamed, expected_shapes)
    return {k: renamed.tensors[k].detach().cpu().contiguous() for k in expected_shapes}


def to_detectron2_checkpoint(state_dict: Dict[str, torch.Tensor]) -> dict:
    """
    Wrap a converted state dict as a file that ``DetectionCheckpointer`` (``MODEL.WEIGHTS``)
    loads with exact names: ``matching_heuristics`` False turns off its fuzzy name matching.
    """
    return {
        "model": state_dict,
        "__author__": "DSLA authors (mmdetection), converted by dsla.convert",
        "matching_heuristics": False,
    }


def model_shapes(model: torch.nn.Module) -> Dict[str, torch.Size]:
    """``{key: shape}`` of ``model.state_dict()`` (persistent parameters and buffers)."""
    return {k: v.shape for k, v in model.state_dict().items()}


def model_shapes_from_config(cfg) -> Dict[str, torch.Size]:
    """
    Build the model of a DSLA config on the CPU and return :func:`model_shapes` of it.

    Args:
        cfg (CfgNode): a config with the DSLA keys (``add_dsla_config``) merged; not modified.
    """
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    return model_shapes(build_model(cfg))


def read_checkpoint_file(path: str, allow_pickle: bool = False) -> Mapping:
    """
    Read an mmdetection checkpoint file (pass the result to :func:`extract_state_dict` and
    :func:`config_hints`).

    Args:
        path: a ``.pth`` file written by mmdetection (``torch.save``).
        allow_pickle: unpickle arbitrary objects (only for trusted files). By default only
            tensors and plain containers are read (``weights_only``), which is enough for
            ``state_dict``, ``meta`` and ``optimizer`` of mmdetection 2.x checkpoints.

    Raises:
        FileNotFoundError: ``path`` does not exist. ConversionError: it cannot be read.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, ... depending on version
        if allow_pickle:
            raise
        raise ConversionError(
            f"Could not read {path} with weights_only=True ({type(e).__name__}: {e}). If you "
            "trust the file, retry with --allow-pickle."
        ) from e


def config_hints(checkpoint: Mapping) -> List[str]:
    """
    Lines of the training config stored in an mmdetection checkpoint (``meta["config"]``) that
    decide the inference settings but leave no trace in the weights' keys or shapes: backbone
    style (where the stride sits), input normalisation and channel order, distance mode.

    Returns:
        the matching config lines, stripped; empty when the checkpoint has no config text.
    """
    meta = checkpoint.get("meta") if isinstance(checkpoint, Mapping) else None
    text = meta.get("config") if isinstance(meta, Mapping) else None
    if not isinstance(text, str):
        return []
    return [line.strip() for line in text.splitlines() if _HINT.search(line)]
