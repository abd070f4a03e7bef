"""Convert the authors' mmdetection 2.x DSLA checkpoints into this project's detectron2 models.

The released checkpoints (R-50 1x, R-101 2x DCN, Swin-S 3x; docs/MODEL_ZOO.md) hold a backbone
(ResNet, optionally with DCNv1 in some stages, or Swin), an FPN with P6/P7 built on the P5 output,
and the two-tower DSLA head (optionally with a DCNv2 last conv and conv biases). Renaming is
enough for every tensor but one kind:

- mmdetection's eval-mode ``BatchNorm2d`` and detectron2's ``FrozenBatchNorm2d`` both compute
  ``(x - running_mean) * weight / sqrt(running_var + eps) + bias`` with ``eps = 1e-5``, and the
  converted file carries no ``_metadata``, so FrozenBN loads ``running_var`` as stored;
- mmcv's ``DeformConv2dPack`` (``conv2.conv_offset`` then ``conv2``) and this project's
  :class:`~dsla.backbone.DeformBottleneck` (``conv2_offset`` then ``conv2``) use the same offset
  layout (per kernel tap: vertical, then horizontal offset), and the head's
  :class:`~dsla.head.DeformTowerConv` splits its 27 offset channels like mmcv's
  ``ModulatedDeformConv2dPack`` (two offset thirds, then the mask third through a sigmoid);
- mmdetection's FPN upsamples to the lateral's size and detectron2's by 2x, both nearest: the
  same whenever the input is padded to a multiple of 32, as both frameworks do;
- mmdetection's Swin names its modules differently from detectron2's (the original Swin's), and
  its patch merging gathers each 2x2 neighbourhood with ``nn.Unfold``: the input channels of
  ``downsample.norm`` and ``downsample.reduction`` are in unfold order and are permuted back to
  the concatenation order detectron2 uses (:func:`unfold_to_concat_order`).

Every source key must be used and every model key filled (strict, see :func:`check_converted`):
a silently skipped tensor would keep its random initialisation and cost AP without any error.
The same conversion runs offline (``dsla-convert-mmdet``) and in memory when ``MODEL.WEIGHTS``
names an mmdetection file (:class:`dsla.checkpoint.DSLACheckpointer`); a checkpoint that does not
fit is described (:func:`describe_checkpoint`, :data:`RELEASED_MODELS`) with the config that fits.
"""
import os
import pickle
import re
import zipfile
from typing import Callable, Collection, Dict, List, Mapping, NamedTuple, Optional, Tuple

import torch

from detectron2.modeling import build_model

from .errors import UserError

__all__ = [
    "ConversionError",
    "Differences",
    "RELEASED_MODELS",
    "ReleasedModel",
    "unfold_to_concat_order",
    "map_key",
    "describe_checkpoint",
    "released_model",
    "layout_name",
    "mismatch_message",
    "is_mmdet_checkpoint",
    "mmdet_class_names",
    "extract_state_dict",
    "Renamed",
    "rename_state_dict",
    "find_differences",
    "check_converted",
    "convert_mmdet_state_dict",
    "to_detectron2_checkpoint",
    "model_shapes",
    "model_shapes_from_config",
    "read_checkpoint_file",
    "load_error",
    "UNREADABLE",
    "config_hints",
]

# mmdetection's FPN has laterals for the three inputs (C3..C5); detectron2 names them by stage.
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
_SWIN = "backbone.bottom_up"
# Submodules of one Swin block: mmdetection's name -> detectron2's (the original Swin's).
_SWIN_BLOCK_PARTS = {
    "norm1": "norm1",
    "attn.w_msa.qkv": "attn.qkv",
    "attn.w_msa.proj": "attn.proj",
    "norm2": "norm2",
    "ffn.layers.0.0": "mlp.fc1",
    "ffn.layers.1": "mlp.fc2",
}
_SWIN_BLOCK_RE = "|".join(re.escape(k) for k in _SWIN_BLOCK_PARTS)
# The index into the table is a deterministic buffer; copying it keeps mmdetection's exactly.
_SWIN_ATTN_TABLES = r"(relative_position_bias_table|relative_position_index)"


# What torch.load raises on a file that is not a (complete) checkpoint: a truncated zip archive
# (RuntimeError "PytorchStreamReader failed ...", or OSError from its reader), a truncated or
# foreign pickle (weights_only's unpickler raises KeyError for some text files), or one that
# weights_only refuses (UnpicklingError naming the global, see load_error).
UNREADABLE = (RuntimeError, OSError, EOFError, KeyError, pickle.UnpicklingError,
              zipfile.BadZipFile)
_REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")
_UNPICKLER_REASON = re.compile(r"WeightsUnpickler error:\s*(\S[^\n]*)")
# A head module of mmdetection's FCOS that DSLA (built on FCOS) does not have.
_FCOS_CENTERNESS = "bbox_head.conv_centerness"
_MAX_FOREIGN = 3


class Differences(NamedTuple):
    """How renamed mmdetection tensors differ from a model (:func:`find_differences`); each entry
    is a readable line naming the key(s)."""

    unused: List[str]  # checkpoint keys with no rule, or renamed to a key the model lacks
    missing: List[str]  # model keys no checkpoint key fills
    mismatched: List[str]  # renamed keys whose shape differs from the model's

    def __bool__(self):
        return bool(self.unused or self.missing or self.mismatched)

    def summary(self) -> str:
        """One line: the count and first entry of each kind, e.g. ``340 checkpoint keys unused,
        e.g. backbone.layer3.6.conv1.weight``."""
        parts = [(self.unused, "checkpoint keys unused"), (self.missing, "model keys missing"),
                 (self.mismatched, "shapes differ")]
        return "; ".join(f"{len(lines)} {what}, e.g. {lines[0]}" for lines, what in parts
                         if lines)


class ConversionError(UserError):
    """The checkpoint does not fit the model: unused or missing keys, or shape mismatches
    (``differences``, None for a checkpoint that cannot be converted at all)."""

    def __init__(self, message: str, differences: Optional[Differences] = None):
        super().__init__(message)
        self.differences = differences


def unfold_to_concat_order(t: torch.Tensor) -> torch.Tensor:
    """
    Reorder the last dimension of a Swin patch-merging tensor from mmdetection's unfold order to
    detectron2's concatenation order.

    mmdetection's ``PatchMerging`` gathers each 2x2 neighbourhood with ``nn.Unfold``: merged
    channel ``c * 4 + k`` holds channel c of neighbour k, with k over (row, col) = (0, 0),
    (0, 1), (1, 0), (1, 1). detectron2's (the original Swin's) concatenates whole neighbours
    x(0, 0), x(1, 0), x(0, 1), x(1, 1): merged channel ``k' * C + c``.

    Args:
        t: ``[..., 4C]``, e.g. ``downsample.reduction.weight`` ``[2C, 4C]`` or
            ``downsample.norm.weight`` ``[4C]``.

    Returns:
        ``[..., 4C]``, the same values in concatenation order.
    """
    *lead, merged = t.shape
    if merged % 4:
        raise ConversionError(f"A patch-merging tensor needs 4C channels, got {tuple(t.shape)}")
    by_neighbour = t.reshape(*lead, merged // 4, 4).transpose(-1, -2)  # [..., 4 (unfold), C]
    # Concatenation order (0,0), (1,0), (0,1), (1,1) is unfold order 0, 2, 1, 3.
    return by_neighbour[..., [0, 2, 1, 3], :].reshape(*lead, merged)


def _block(m) -> str:
    # mmdetection's layer1..layer4 are detectron2's res2..res5.
    return f"backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}"


def _fpn_output(m) -> Optional[str]:
    i = int(m[1])
    if i < _FPN_FIRST_STAGE:
        return f"backbone.fpn_output{i + _FPN_FIRST_STAGE}.{m[2]}"
    name = _FPN_EXTRA_CONVS.get(i)
    return f"{name}.{m[2]}" if name else None


class _Rule(NamedTuple):
    pattern: "re.Pattern"
    rename: Callable[[re.Match], Optional[str]]  # detectron2 key, None if the match is unused
    transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None


# (mmdetection key regex, detectron2 name builder[, value transform]); first full match wins, so
# the DCN offset rules come before the plain conv rules they would otherwise be shadowed by.
_RULE_SPECS = [
    # ResNet
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
    # Swin
    (rf"backbone\.patch_embed\.projection\.{_WB}", lambda m: f"{_SWIN}.patch_embed.proj.{m[1]}"),
    (rf"backbone\.patch_embed\.norm\.{_WB}", lambda m: f"{_SWIN}.patch_embed.norm.{m[1]}"),
    (rf"backbone\.stages\.(\d+)\.blocks\.(\d+)\.({_SWIN_BLOCK_RE})\.{_WB}",
     lambda m: f"{_SWIN}.layers.{m[1]}.blocks.{m[2]}.{_SWIN_BLOCK_PARTS[m[3]]}.{m[4]}"),
    (rf"backbone\.stages\.(\d+)\.blocks\.(\d+)\.attn\.w_msa\.{_SWIN_ATTN_TABLES}",
     lambda m: f"{_SWIN}.layers.{m[1]}.blocks.{m[2]}.attn.{m[3]}"),
    (rf"backbone\.stages\.(\d+)\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)",
     lambda m: f"{_SWIN}.layers.{m[1]}.downsample.{m[2]}", unfold_to_concat_order),
    (rf"backbone\.norm(\d)\.{_WB}", lambda m: f"{_SWIN}.norm{m[1]}.{m[2]}"),
    # FPN
    (rf"neck\.lateral_convs\.(\d)\.conv\.{_WB}",
     lambda m: f"backbone.fpn_lateral{int(m[1]) + _FPN_FIRST_STAGE}.{m[2]}"),
    (rf"neck\.fpn_convs\.(\d)\.conv\.{_WB}", _fpn_output),
    # DSLA head
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
_RULES = [_Rule(re.compile(spec[0]), *spec[1:]) for spec in _RULE_SPECS]


def _match(mmdet_key: str):
    for rule in _RULES:
        m = rule.pattern.fullmatch(mmdet_key)
        if m:
            return rule, m
    return None, None


def map_key(mmdet_key: str) -> Optional[str]:
    """
    The detectron2 name of one mmdetection key, e.g. ``backbone.layer2.0.downsample.1.weight``
    -> ``backbone.bottom_up.res3.0.shortcut.norm.weight``.

    Returns:
        the detectron2 key, or None when no rule covers it (the caller reports it as unused).
        ``num_batches_tracked`` keys are not mapped here; see :func:`rename_state_dict`.
    """
    rule, m = _match(mmdet_key)
    return rule.rename(m) if rule else None


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

    tensors: Dict[str, torch.Tensor]  # detectron2 key -> tensor (permuted where a rule says so)
    sources: Dict[str, str]  # detectron2 key -> the mmdetection key it came from
    unmapped: List[str]  # mmdetection keys no rule covers
    dropped: List[str]  # num_batches_tracked keys (used, nothing to copy into FrozenBN)


def rename_state_dict(mmdet_state: Mapping[str, torch.Tensor]) -> Renamed:
    """
    Rename every mmdetection key with the rules of :func:`map_key` and apply their value
    transforms (:func:`unfold_to_concat_order` for Swin's patch merging); no check against a
    model yet.

    Raises:
        ConversionError: when two source keys map to the same detectron2 key.
    """
    tensors, sources, unmapped, dropped = {}, {}, [], []
    for key, value in mmdet_state.items():
        if _DROPPED.fullmatch(key):
            dropped.append(key)
            continue
        rule, m = _match(key)
        new_key = rule.rename(m) if rule else None
        if new_key is None:
            unmapped.append(key)
        elif new_key in tensors:
            raise ConversionError(
                f"Keys {sources[new_key]!r} and {key!r} both map to {new_key!r}."
            )
        else:
            tensors[new_key] = rule.transform(value) if rule.transform else value
            sources[new_key] = key
    return Renamed(tensors, sources, unmapped, dropped)


def find_differences(renamed: Renamed, expected_shapes: Mapping[str, torch.Size],
                     may_differ: Collection[str] = ()) -> Differences:
    """
    Compare renamed tensors with the model's state dict: every source key used, every model key
    filled, every shape equal.

    Args:
        renamed: output of :func:`rename_state_dict`.
        expected_shapes: ``{detectron2 key: shape}`` of the target model (:func:`model_shapes`).
        may_differ: model keys whose shape may differ (the classifier when fine-tuning to
            another class count: the checkpointer re-initialises it, with a warning).
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
        if k in expected_shapes and k not in may_differ
        and tuple(v.shape) != tuple(expected_shapes[k])
    ]
    return Differences(unused, missing, mismatched)


def check_converted(renamed: Renamed, expected_shapes: Mapping[str, torch.Size],
                    checkpoint_summary: str = "", may_differ: Collection[str] = ()) -> None:
    """
    Check renamed tensors against the model's state dict (:func:`find_differences`).

    Args:
        renamed, expected_shapes, may_differ: as for :func:`find_differences`.
        checkpoint_summary: what the checkpoint holds (:func:`describe_checkpoint`), for the
            message.

    Raises:
        ConversionError: listing the unused source keys, the missing model keys and, for each
            shape mismatch, both keys and both shapes.
    """
    differences = find_differences(renamed, expected_shapes, may_differ)
    if differences:
        summary = f"\n  The checkpoint holds: {checkpoint_summary}." if checkpoint_summary else ""
        raise ConversionError(
            "The mmdetection checkpoint does not fit the model of this config (check the "
            "config: BACKBONE.NAME, RESNETS.DEPTH / NUM_GROUPS / DEFORM_ON_PER_STAGE, SWIN.*, "
            "DSLA.DCN_ON_LAST_CONV / CONV_BIAS / NUM_CLASSES; docs/MODEL_ZOO.md lists the "
            "config of each released checkpoint):" + summary
            + _section("checkpoint key(s) unused", differences.unused)
            + _section("model key(s) missing from the checkpoint", differences.missing)
            + _section("shape mismatch(es)", differences.mismatched),
            differences,
        )


def _numbered(keys, pattern: str) -> List[List[int]]:
    """The integer groups of every key that fully matches ``pattern``."""
    return [[int(g) for g in m.groups()] for m in map(re.compile(pattern).fullmatch, keys) if m]


def _blocks_per_stage(pairs: List[List[int]]) -> List[int]:
    """[[stage, block], ...] -> number of blocks of each stage, in stage order."""
    stages = sorted({s for s, _ in pairs})
    return [1 + max(b for s2, b in pairs if s2 == s) for s in stages]


def _describe_resnet(state: Mapping[str, torch.Tensor]) -> str:
    blocks = _blocks_per_stage(_numbered(state, r"backbone\.layer(\d)\.(\d+)\.conv1\.weight"))
    depth = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}.get(tuple(blocks))
    name = f"ResNet-{depth}" if depth else f"ResNet with {blocks} blocks per stage"
    conv2 = state.get("backbone.layer1.0.conv2.weight")
    if conv2 is not None and conv2.shape[0] != conv2.shape[1]:  # grouped 3x3: ResNeXt
        groups = conv2.shape[0] // conv2.shape[1]
        name = name.replace("ResNet", "ResNeXt") + f" {groups}x{conv2.shape[1]}d"
    dcn = sorted({g[0] for g in _numbered(
        state, r"backbone\.layer(\d)\.\d+\.conv2\.conv_offset\.weight")})
    return name + (f" with DCN in layer{', layer'.join(map(str, dcn))}" if dcn else "")


def describe_checkpoint(mmdet_state: Mapping[str, torch.Tensor]) -> str:
    """
    The architecture of an mmdetection DSLA checkpoint, read from its key names and shapes, to
    compare with the config when the checkpoint does not fit.

    Args:
        mmdet_state: ``{mmdetection key: Tensor}`` (:func:`extract_state_dict`).

    Returns:
        e.g. ``"ResNet-101 with DCN in layer2, layer3, layer4; head with DCN last tower convs,
        tower conv biases"`` or ``"Swin with [2, 2, 18, 2] blocks per stage; head ..."``.
    """
    swin = _numbered(mmdet_state, r"backbone\.stages\.(\d+)\.blocks\.(\d+)\.norm1\.weight")
    if swin:
        backbone = f"Swin with {_blocks_per_stage(swin)} blocks per stage"
    elif "backbone.conv1.weight" in mmdet_state:
        backbone = _describe_resnet(mmdet_state)
    else:
        backbone = "an unknown backbone"
    head = ["DCN last tower convs"] if _numbered(
        mmdet_state, r"bbox_head\.cls_convs\.(\d+)\.conv\.conv_offset\.weight") else []
    if "bbox_head.cls_convs.0.conv.bias" in mmdet_state:
        head.append("tower conv biases")
    return f"{backbone}; head with {', '.join(head) or 'plain tower convs'}"


class ReleasedModel(NamedTuple):
    """One of the authors' released checkpoints (docs/MODEL_ZOO.md) and this project's configs
    for it."""

    name: str
    config_name: str  # stem of configs/COCO-Detection/*.yaml and configs/lazy/COCO-Detection/*.py
    description: str  # describe_checkpoint() of its state dict
    stem: Tuple[str, Tuple[int, ...]]  # first backbone tensor and shape: widths the description
    # does not name (Swin-S and Swin-B have the same blocks per stage)

    @property
    def config(self) -> str:
        return f"configs/COCO-Detection/{self.config_name}.yaml"

    @property
    def lazy_config(self) -> str:
        return f"configs/lazy/COCO-Detection/{self.config_name}.py"


_DCN_HEAD = "head with DCN last tower convs, tower conv biases"
RELEASED_MODELS = (
    ReleasedModel("R-50 1x", "dsla_R_50_FPN_1x_mmdet", "ResNet-50; head with plain tower convs",
                  ("backbone.conv1.weight", (64, 3, 7, 7))),
    ReleasedModel("R-101 2x DCN", "dsla_R_101_FPN_dcn_ms_2x_mmdet",
                  f"ResNet-101 with DCN in layer2, layer3, layer4; {_DCN_HEAD}",
                  ("backbone.conv1.weight", (64, 3, 7, 7))),
    ReleasedModel("Swin-S 3x", "dsla_Swin_S_FPN_ms_3x_mmdet",
                  f"Swin with [2, 2, 18, 2] blocks per stage; {_DCN_HEAD}",
                  ("backbone.patch_embed.projection.weight", (96, 3, 4, 4))),
)


def released_model(mmdet_state: Mapping[str, torch.Tensor]) -> Optional[ReleasedModel]:
    """The released model whose layout ``mmdet_state`` has (any class count), or None."""
    description = describe_checkpoint(mmdet_state)
    for released in RELEASED_MODELS:
        key, shape = released.stem
        stem = mmdet_state.get(key)
        if (released.description == description and stem is not None
                and tuple(stem.shape) == shape):
            return released
    return None


def layout_name(mmdet_state: Mapping[str, torch.Tensor]) -> str:
    """E.g. ``"the released R-50 1x layout (ResNet-50; head with plain tower convs)"``."""
    released = released_model(mmdet_state)
    description = describe_checkpoint(mmdet_state)
    return (f"the released {released.name} layout ({description})" if released
            else f"a layout of no released model ({description})")


def _foreign_head_modules(mmdet_state: Mapping[str, torch.Tensor]) -> List[str]:
    """Modules outside the backbone and neck that no rule maps: the head of another detector."""
    modules = [k.rsplit(".", 1)[0] for k in mmdet_state
               if not k.startswith(("backbone.", "neck.")) and map_key(k) is None]
    return list(dict.fromkeys(modules))


def _looks_like(foreign: List[str]) -> str:
    """What the head modules that DSLA lacks say about a checkpoint."""
    if _FCOS_CENTERNESS in foreign:
        return ("it looks like FCOS (bbox_head.conv_centerness is FCOS's centerness branch, which "
                "DSLA does not have)")
    more = len(foreign) - _MAX_FOREIGN
    return (", ".join(foreign[:_MAX_FOREIGN]) + (f" (and {more} more)" if more > 0 else "")
            + " have no counterpart in DSLA")


def mismatch_message(source: str, mmdet_state: Mapping[str, torch.Tensor],
                     differences: Differences) -> str:
    """
    One line for an mmdetection checkpoint that does not fit the config's model: the file, what
    it looks like and which config fits it.

    Args:
        source: the checkpoint's path, for the message.
        mmdet_state: its state dict (:func:`extract_state_dict`).
        differences: how it differs from the model (:func:`find_differences`).
    """
    foreign = _foreign_head_modules(mmdet_state)
    if foreign:
        return (f"checkpoint {source} is an mmdetection checkpoint of another detector, not of "
                f"DSLA: {_looks_like(foreign)}; no config of this project loads it (the *_mmdet "
                "configs load the authors' DSLA checkpoints, docs/MODEL_ZOO.md).")
    released = released_model(mmdet_state)
    fits = (f"use --config-file {released.config} (LazyConfig: {released.lazy_config})"
            if released else "no released model's config fits it: set the config's backbone "
            "and head to match it")
    return (f"checkpoint {source} is an mmdetection DSLA checkpoint of {layout_name(mmdet_state)}"
            f" and does not fit this config's model ({differences.summary()}): {fits}.")


def is_mmdet_checkpoint(checkpoint) -> bool:
    """Whether ``checkpoint`` (a loaded file) is one of an mmdetection detector: a dict whose
    ``state_dict`` (or the dict itself, a bare state dict) holds ``neck.`` or ``bbox_head.``
    keys, names detectron2's models do not use."""
    if not isinstance(checkpoint, Mapping):
        return False
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, Mapping):
        return False
    names = (k[len("module."):] if k.startswith("module.") else k
             for k in state if isinstance(k, str))
    return any(k.startswith(("neck.", "bbox_head.")) for k in names)


def mmdet_class_names(checkpoint: Mapping) -> Optional[List[str]]:
    """The class names mmdetection stores in a checkpoint (``meta["CLASSES"]``), or None."""
    meta = checkpoint.get("meta") if isinstance(checkpoint, Mapping) else None
    names = meta.get("CLASSES") if isinstance(meta, Mapping) else None
    if isinstance(names, (list, tuple)) and names and all(isinstance(n, str) for n in names):
        return list(names)
    return None


def _section(title: str, lines: List[str]) -> str:
    if not lines:
        return ""
    shown = [f"\n    {s}" for s in lines[:_MAX_LISTED]]
    more = f"\n    ... and {len(lines) - _MAX_LISTED} more" if len(lines) > _MAX_LISTED else ""
    return f"\n  {len(lines)} {title}:" + "".join(shown) + more


def convert_mmdet_state_dict(
    mmdet_state: Mapping[str, torch.Tensor], expected_shapes: Mapping[str, torch.Size],
    may_differ: Collection[str] = (),
) -> Dict[str, torch.Tensor]:
    """
    Rename and strictly check an mmdetection state dict for a model with ``expected_shapes``.

    Args:
        may_differ: model keys whose shape may differ (see :func:`find_differences`); they are
            returned with the checkpoint's shape.

    Returns:
        ``{detectron2 key: Tensor}`` in the model's key order, loadable with ``strict=True``.

    Raises:
        ConversionError: see :func:`check_converted`; the message names the config of the
            released model whose layout the checkpoint has.
    """
    renamed = rename_state_dict(mmdet_state)
    summary = describe_checkpoint(mmdet_state)
    released = released_model(mmdet_state)
    if released:
        summary += (f". It has the layout of the released {released.name} model, whose config is "
                    f"{released.config}")
    check_converted(renamed, expected_shapes, summary, may_differ)
    return {k: renamed.tensors[k].detach().cpu().contiguous() for k in expected_shapes}


def to_detectron2_checkpoint(state_dict: Dict[str, torch.Tensor], **extra) -> dict:
    """
    Wrap a converted state dict as a file that ``DetectionCheckpointer`` (``MODEL.WEIGHTS``)
    loads with exact names: ``matching_heuristics`` False turns off its fuzzy name matching.
    ``extra`` entries (e.g. ``class_names``) are stored beside it.
    """
    return {
        "model": state_dict,
        "__author__": "DSLA authors (mmdetection), converted by dsla.convert",
        "matching_heuristics": False,
        **extra,
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
        UserError: ``path`` does not exist, or it is not a (complete) checkpoint.
        ConversionError: it holds objects that ``weights_only`` refuses.
    """
    if not os.path.isfile(path):
        raise UserError(f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except UNREADABLE as e:
        raise load_error(path, e, "If you trust the file, retry with --allow-pickle.") from e


def _first_line(error: Exception) -> str:
    """``"Type: first line of the message"``, for one-line messages about a library's error."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def load_error(path: str, error: Exception, pickle_hint: str) -> UserError:
    """
    The one-line error for ``torch.load`` failing on ``path`` with ``error`` (one of
    :data:`UNREADABLE`).

    Args:
        pickle_hint: what to do when ``weights_only`` refused a pickled object (e.g. numpy
            scalars in an old checkpoint's metadata), which a full unpickling would read.
    """
    refused = _REFUSED_GLOBAL.search(str(error))
    if refused:
        return ConversionError(f"cannot read checkpoint {path} with torch.load(weights_only=True): "
                               f"it pickles {refused[1]}. {pickle_hint}")
    # weights_only's message is a paragraph of advice; its unpickler's reason is the news.
    reason = _UNPICKLER_REASON.search(str(error))
    reason = f"{type(error).__name__}: {reason[1]}" if reason else _first_line(error)
    return UserError(f"cannot read checkpoint {path}: truncated or not a checkpoint ({reason})")


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
