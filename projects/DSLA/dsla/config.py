"""Config keys of the detectors: DSLA (``MODEL.DSLA``), plain FCOS (``MODEL.FCOS_PLAIN``) and
detectron2's FCOS (``MODEL.FCOS``); and the checks of their settings, shared by the config path
and the Python constructors.

Each setting is written once, in the tables below, as (constructor argument, config key,
default): the config nodes, the argument <-> key names used in errors, the reading of a config
(``from_config``), the constructors' defaults and the LazyConfig models are derived from them.
The defaults are the authors' R-50 1x COCO settings (docs/METHOD.md, "Released recipes") unless
a comment says otherwise. Nothing is read from ``cfg`` outside ``from_config``.
"""
import copy
import numbers
from typing import Any, Dict, NamedTuple, Tuple

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from .errors import UserError

IOU_COUPLING_MODES = ("on", "off", "iou_only")
BOX_LOSS_TYPES = ("iou", "giou")


class Setting(NamedTuple):
    """A constructor argument, the key it is read from in its detector's node, its default."""

    argument: str
    key: str
    default: Any


# The points, classes and inference of every detector here.
POINT_SETTINGS = (
    # Backbone features fed to the head, finest first (strides 8..128).
    Setting("head_in_features", "IN_FEATURES", ["p3", "p4", "p5", "p6", "p7"]),
    # Number of foreground classes (detectron2 counts no background class).
    Setting("num_classes", "NUM_CLASSES", 80),
    # Per-level [lo, hi] range of the scale measure m = max(l, t, r, b), one per IN_FEATURE
    # (the paper's ranges for P3-P7, docs/METHOD.md, "Points").
    Setting("regress_ranges", "REGRESS_RANGES",
            [[0, 64], [64, 128], [128, 256], [256, 512], [512, 100000000]]),
    # Inference (docs/METHOD.md, "Inference"): score threshold, points kept per level (by their
    # best class score), class-aware NMS IoU. Detections per image: TEST.DETECTIONS_PER_IMAGE.
    Setting("test_score_thresh", "SCORE_THRESH_TEST", 0.05),
    Setting("test_topk_candidates", "TOPK_CANDIDATES_TEST", 1000),
    Setting("test_nms_thresh", "NMS_THRESH_TEST", 0.6),
)

# The two towers of every detector's head.
TOWER_SETTINGS = (
    # Convs in each of the two towers (classification, regression).
    Setting("num_convs", "NUM_CONVS", 4),
    # Norm of the tower convs: "GN" (32 groups, the paper), "" for none, or any detectron2 norm.
    Setting("norm", "NORM", "GN"),
    # Prior foreground probability pi; cls bias = -log((1 - pi) / pi).
    Setting("prior_prob", "PRIOR_PROB", 0.01),
)

# DSLAHead's arguments (DSLA and plain FCOS), besides its input shapes and classes.
DSLA_HEAD_SETTINGS = TOWER_SETTINGS + (
    # Box distances: False -> exp(scale * x); True -> relu(scale * x) * stride.
    Setting("norm_on_bbox", "NORM_ON_BBOX", False),
    # Make the last conv of each tower a modulated deformable conv (DCNv2, torchvision op).
    Setting("dcn_on_last_conv", "DCN_ON_LAST_CONV", False),
    # Keep the conv bias in tower convs even when a norm follows (authors' strongest configs).
    Setting("conv_bias", "CONV_BIAS", False),
)

# Positive points and loss weights of DSLA and plain FCOS.
POINT_LOSS_SETTINGS = (
    # Centre-sampling radius R in strides (docs/METHOD.md, "Inside test"); 0 disables it
    # (positives = points inside the box).
    Setting("center_sampling_radius", "CENTER_SAMPLING_RADIUS", 0.0),
    # Weight of the classification loss (the authors' R-50 1x run used 2.0).
    Setting("cls_loss_weight", "CLS_LOSS_WEIGHT", 1.0),
    # Box loss: "iou" (-log IoU) or "giou" (1 - GIoU), weighted per point by its soft label
    # (DSLA: q*; plain FCOS: the centerness target).
    Setting("box_loss_type", "BOX_LOSS_TYPE", "iou"),
    # Weight of the box loss.
    Setting("box_loss_weight", "BOX_LOSS_WEIGHT", 1.0),
)

# What DSLA adds to the points: smooth labels, IoU coupling, QFL.
DSLA_METHOD_SETTINGS = (
    # Smooth labels (docs/METHOD.md, "Smooth label"): q = centerness * scale score. False gives
    # FCOS-style hard labels (q* = 1 on every positive point); the ablation ladder's first rung.
    Setting("smooth_label", "SMOOTH_LABEL", True),
    # Interval relaxation factor f (docs/METHOD.md, "Scale score"); 0 disables relaxation (hard
    # FCOS-style ranges).
    Setting("relaxation_factor", "INTERVAL_RELAXATION_FACTOR", 0.2),
    # Centerness core zone (docs/METHOD.md, "Core zone"): points within stride/2 of the box
    # centre get centerness 1.
    Setting("core_zone", "CORE_ZONE", True),
    # Dynamic IoU coupling of the cls target (docs/METHOD.md, "IoU coupling"): "on" (IoU * q),
    # "off" (q), "iou_only" (IoU).
    Setting("iou_coupling", "IOU_COUPLING", "on"),
    # Quality Focal Loss exponent beta (docs/METHOD.md, "Losses").
    Setting("qfl_beta", "QFL_BETA", 2.0),
)
# DSLA's constructor arguments (its head: DSLA_HEAD_SETTINGS).
DSLA_SETTINGS = POINT_SETTINGS + POINT_LOSS_SETTINGS + DSLA_METHOD_SETTINGS

# Sigmoid focal loss of both FCOS baselines (Lin et al., ICCV 2017).
FOCAL_LOSS_SETTINGS = (
    # Weight alpha of the positive terms (1 - alpha for the negative ones).
    Setting("focal_loss_alpha", "FOCAL_LOSS_ALPHA", 0.25),
    # Focusing exponent gamma.
    Setting("focal_loss_gamma", "FOCAL_LOSS_GAMMA", 2.0),
)

# Plain FCOS's constructor arguments (its head: DSLA_HEAD_SETTINGS with a centerness branch).
FCOS_PLAIN_SETTINGS = POINT_SETTINGS + POINT_LOSS_SETTINGS + FOCAL_LOSS_SETTINGS

# detectron2's FCOS: its regress ranges are configurable here (detectron2 hard-codes 4x / 8x the
# stride); its head is detectron2's FCOSHead (TOWER_SETTINGS).
FCOS_DETECTRON2_SETTINGS = POINT_SETTINGS + FOCAL_LOSS_SETTINGS + (
    # Centre-sampling radius in strides (detectron2's FCOS always samples centres).
    Setting("center_sampling_radius", "CENTER_SAMPLING_RADIUS", 1.5),
)

# Each meta-architecture's config node and its (constructor, head) settings: the one place the
# command line, the tools and the checks look them up.
DETECTORS = {
    "DSLA": ("DSLA", DSLA_SETTINGS, DSLA_HEAD_SETTINGS),
    "FCOSPlain": ("FCOS_PLAIN", FCOS_PLAIN_SETTINGS, DSLA_HEAD_SETTINGS),
    "FCOSDetectron2": ("FCOS", FCOS_DETECTRON2_SETTINGS, TOWER_SETTINGS),
}
HEAD_CONFIG_NODES = {arch: node for arch, (node, _, _) in DETECTORS.items()}

# Constructor arguments read from detectron2's own keys; their defaults are detectron2's.
_DETECTRON2_DEFAULTS = get_cfg()
GENERAL_DEFAULTS = {
    # TEST.DETECTIONS_PER_IMAGE
    "max_detections_per_image": _DETECTRON2_DEFAULTS.TEST.DETECTIONS_PER_IMAGE,
    # INPUT.FORMAT: channel order of input images, used for visualisation.
    "input_format": _DETECTRON2_DEFAULTS.INPUT.FORMAT,
}


def defaults(settings: Tuple[Setting, ...]) -> Dict[str, Any]:
    """``{argument: default}`` of ``settings`` (copies, so callers may change them)."""
    return {s.argument: copy.deepcopy(s.default) for s in settings}


def argument_keys(settings: Tuple[Setting, ...], node_name: str) -> Dict[str, str]:
    """``{argument: full config key}``, e.g. ``{"num_classes": "MODEL.DSLA.NUM_CLASSES"}``."""
    return {s.argument: f"{node_name}.{s.key}" for s in settings}


def read_settings(settings: Tuple[Setting, ...], node: CN) -> Dict[str, Any]:
    """``{argument: value}`` of ``settings`` read from a config node."""
    return {s.argument: node[s.key] for s in settings}


def _node(settings: Tuple[Setting, ...]) -> CN:
    node = CN()
    for s in settings:
        node[s.key] = copy.deepcopy(s.default)
    return node


# DSLA's constructor arguments and the config keys they come from.
DSLA_ARGUMENT_KEYS = {**argument_keys(DSLA_SETTINGS, "MODEL.DSLA"),
                      "max_detections_per_image": "TEST.DETECTIONS_PER_IMAGE"}


def add_dsla_config(cfg):
    """
    Add the keys of every detector here (``MODEL.DSLA``, ``MODEL.FCOS_PLAIN``, ``MODEL.FCOS``),
    of the Swin backbone (``MODEL.SWIN``) and ``SOLVER.OPTIMIZER`` to a detectron2 config
    (in place).

    Args:
        cfg (CfgNode): typically ``detectron2.config.get_cfg()``.
    """
    for node, settings, head_settings in DETECTORS.values():
        cfg.MODEL[node] = _node(settings + head_settings)
    # Optimizer: "SGD" (detectron2's, the paper's recipes) or "ADAMW" (faster from scratch on CPU).
    cfg.SOLVER.OPTIMIZER = "SGD"
    _add_swin_config(cfg)


def _add_swin_config(cfg):
    """``MODEL.SWIN`` (backbone ``build_dsla_swin_fpn_backbone``, defaults = the authors' Swin-S)
    and ``SOLVER.NO_WEIGHT_DECAY_PARAMS`` (their AdamW recipe)."""
    cfg.MODEL.SWIN = CN()
    # Channels of the patch embedding (stage 1); stage i has EMBED_DIM * 2**i.
    cfg.MODEL.SWIN.EMBED_DIM = 96
    # Transformer blocks per stage.
    cfg.MODEL.SWIN.DEPTHS = [2, 2, 18, 2]
    # Attention heads per stage.
    cfg.MODEL.SWIN.NUM_HEADS = [3, 6, 12, 24]
    # Side of the square attention windows, in tokens.
    cfg.MODEL.SWIN.WINDOW_SIZE = 7
    # Hidden width of each block's MLP, as a multiple of the block's channels.
    cfg.MODEL.SWIN.MLP_RATIO = 4.0
    # Stochastic depth: the rate grows linearly from 0 (first block) to this (last block).
    cfg.MODEL.SWIN.DROP_PATH_RATE = 0.2
    # Names of parameters (as their module names them) trained without weight decay by the AdamW
    # path of dsla.engine.Trainer, e.g. Swin's relative position tables; norms: WEIGHT_DECAY_NORM.
    cfg.SOLVER.NO_WEIGHT_DECAY_PARAMS = []


def head_config_node(cfg):
    """
    The head keys of ``cfg``'s meta-architecture.

    Returns:
        (name, node): e.g. ``("MODEL.DSLA", cfg.MODEL.DSLA)``, or ``(None, None)`` for a
        meta-architecture of another project.
    """
    node = HEAD_CONFIG_NODES.get(cfg.MODEL.META_ARCHITECTURE)
    return (f"MODEL.{node}", cfg.MODEL[node]) if node else (None, None)


def detector_arguments(cfg, arch: str) -> Dict[str, Any]:
    """
    The constructor arguments of meta-architecture ``arch`` read from ``cfg``: its settings
    (:data:`DETECTORS`), detections per image and pixel normalisation (not its backbone, head
    or input format).
    """
    node, settings, _ = DETECTORS[arch]
    return {
        **read_settings(settings, cfg.MODEL[node]),
        "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
        "pixel_mean": cfg.MODEL.PIXEL_MEAN,
        "pixel_std": cfg.MODEL.PIXEL_STD,
    }


def head_arguments(cfg, arch: str) -> Dict[str, Any]:
    """The head arguments of meta-architecture ``arch`` read from ``cfg``, with its classes."""
    node, _, head_settings = DETECTORS[arch]
    return {**read_settings(head_settings, cfg.MODEL[node]),
            "num_classes": cfg.MODEL[node].NUM_CLASSES}


def validate_config(cfg, arch: str, in_feature_strides):
    """
    Check the settings of meta-architecture ``arch`` in ``cfg`` (its node and
    ``TEST.DETECTIONS_PER_IMAGE``) before anything is built.

    Args:
        cfg (CfgNode): a config with the keys of :func:`add_dsla_config`.
        arch (str): a key of :data:`DETECTORS`.
        in_feature_strides (dict[str, int]): stride of every backbone output feature.

    Raises:
        UserError: naming the offending key and value.
    """
    node, settings, head_settings = DETECTORS[arch]
    args = {**detector_arguments(cfg, arch), **read_settings(head_settings, cfg.MODEL[node])}
    names = {**argument_keys(settings + head_settings, f"MODEL.{node}"),
             "max_detections_per_image": "TEST.DETECTIONS_PER_IMAGE"}
    validate_arguments(args, in_feature_strides, names=names)


def _non_negative(value) -> bool:
    return _is_number(value) and value >= 0


def _fraction(value) -> bool:
    return _is_number(value) and 0.0 <= value <= 1.0


def _positive_int(value) -> bool:
    return _is_int(value) and value >= 1


# The check of every setting that has one besides features and ranges: (test, why).
_RULES = {
    "num_classes": (_positive_int, "must be an integer >= 1"),
    "smooth_label": (lambda v: isinstance(v, bool), "must be True or False"),
    "core_zone": (lambda v: isinstance(v, bool), "must be True or False"),
    "relaxation_factor": (lambda v: _is_number(v) and 0.0 <= v < 1.0, "must be in [0, 1)"),
    "iou_coupling": (lambda v: v in IOU_COUPLING_MODES, f"must be one of {IOU_COUPLING_MODES}"),
    "box_loss_type": (lambda v: v in BOX_LOSS_TYPES, f"must be one of {BOX_LOSS_TYPES}"),
    "center_sampling_radius": (_non_negative, "must be >= 0 (0 disables centre sampling)"),
    "qfl_beta": (_non_negative, "must be >= 0"),
    "cls_loss_weight": (_non_negative, "must be >= 0"),
    "box_loss_weight": (_non_negative, "must be >= 0"),
    "test_score_thresh": (_fraction, "must be in [0, 1]"),
    "test_nms_thresh": (_fraction, "must be in [0, 1]"),
    "test_topk_candidates": (_positive_int, "must be an integer >= 1"),
    "max_detections_per_image": (_positive_int, "must be an integer >= 1"),
    "num_convs": (_positive_int, "must be an integer >= 1"),
    "prior_prob": (lambda v: _is_number(v) and 0.0 < v < 1.0, "must be in (0, 1)"),
}


def validate_arguments(args, in_feature_strides=None, names=None, detector="DSLA"):
    """
    Check a detector's settings, whether they come from a config or from Python: every
    argument of ``args`` that has a rule, and the features and ranges if ``args`` has
    ``head_in_features``.

    Args:
        args (dict): constructor arguments by name (e.g. the keys of :data:`DSLA_ARGUMENT_KEYS`);
            others are ignored.
        in_feature_strides (dict[str, int]): stride of every backbone output feature (needed
            with ``head_in_features``).
        names (dict[str, str] or None): how to name each argument in an error (e.g.
            :data:`DSLA_ARGUMENT_KEYS` for config keys); None names the constructor argument.
        detector (str): the class named with a constructor argument.

    Raises:
        UserError: naming the offending key or argument and its value.
    """
    def check(arg, ok, why):
        _check(ok, names[arg] if names else f"{detector} argument {arg}", args[arg], why)

    if "head_in_features" in args:
        features = args["head_in_features"]
        missing = [f for f in features if f not in in_feature_strides]
        check("head_in_features", len(features) >= 1 and not missing,
              f"backbone has no feature(s) {missing}; it outputs {sorted(in_feature_strides)}")
        _check_regress_ranges(args["regress_ranges"], len(features), check)
    for arg, (test, why) in _RULES.items():
        if arg in args:
            check(arg, test(args[arg]), why)


def _check_regress_ranges(ranges, num_features, check):
    """Regress ranges: one [lo, hi] per head input feature, 0 <= lo < hi, increasing."""
    check("regress_ranges", len(ranges) == num_features,
          f"needs one [lo, hi] per head input feature ({num_features}), got {len(ranges)}")
    pairs = [tuple(r) for r in ranges]
    check("regress_ranges", all(len(r) == 2 and all(map(_is_number, r)) and 0 <= r[0] < r[1]
                                for r in pairs), "each range must be [lo, hi] with 0 <= lo < hi")
    check("regress_ranges", all(a[0] < b[0] and a[1] < b[1] for a, b in zip(pairs, pairs[1:])),
          "ranges must increase level by level")


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check(ok, key, value, why):
    if not ok:
        raise UserError(f"Invalid {key} = {value!r}: {why}.")
