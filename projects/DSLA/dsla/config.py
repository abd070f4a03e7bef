"""Config keys of DSLA (``MODEL.DSLA``) and of the FCOS baseline (``MODEL.FCOS``), and the
checks of DSLA's settings shared by the config path and the Python constructor.

All defaults live here; they are the authors' R-50 1x COCO settings (docs/METHOD.md, "Released
recipes") unless a comment says otherwise. Nothing is read from ``cfg`` outside ``from_config``.
"""
import numbers

from detectron2.config import CfgNode as CN

from .errors import UserError

# The paper's regress ranges for P3-P7 (docs/METHOD.md, "Points").
_COCO_REGRESS_RANGES = [[0, 64], [64, 128], [128, 256], [256, 512], [512, 100000000]]
IOU_COUPLING_MODES = ("on", "off", "iou_only")
BOX_LOSS_TYPES = ("iou", "giou")
# The config node holding each meta-architecture's head keys (NUM_CLASSES, inference settings):
# the one place the command line, the tools and the checks look them up.
HEAD_CONFIG_NODES = {"DSLA": "DSLA", "FCOS": "FCOS", "FCOSPlain": "DSLA"}


def head_config_node(cfg):
    """
    The head keys of ``cfg``'s meta-architecture.

    Returns:
        (name, node): e.g. ``("MODEL.DSLA", cfg.MODEL.DSLA)``, or ``(None, None)`` for a
        meta-architecture of another project.
    """
    node = HEAD_CONFIG_NODES.get(cfg.MODEL.META_ARCHITECTURE)
    return (f"MODEL.{node}", cfg.MODEL[node]) if node else (None, None)


def _dense_head_node():
    """The keys DSLA and the FCOS baseline share, with DSLA's defaults."""
    node = CN()
    # Number of foreground classes (detectron2 counts no background class).
    node.NUM_CLASSES = 80
    # Backbone features fed to the head, finest first (strides 8..128).
    node.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    # Convs in each of the two towers (classification, regression).
    node.NUM_CONVS = 4
    # Norm of the tower convs: "GN" (32 groups, the paper), "" for none, or any detectron2 norm.
    node.NORM = "GN"
    # Prior foreground probability pi; cls bias = -log((1 - pi) / pi).
    node.PRIOR_PROB = 0.01
    # Per-level [lo, hi] range of the scale measure m = max(l, t, r, b), one per IN_FEATURE.
    node.REGRESS_RANGES = [list(r) for r in _COCO_REGRESS_RANGES]
    # Inference (docs/METHOD.md, "Inference"): score threshold, points kept per level (by their
    # best class score), class-aware NMS IoU.
    # Detections per image come from TEST.DETECTIONS_PER_IMAGE (100).
    node.SCORE_THRESH_TEST = 0.05
    node.TOPK_CANDIDATES_TEST = 1000
    node.NMS_THRESH_TEST = 0.6
    return node


def add_dsla_config(cfg):
    """
    Add the DSLA keys (``MODEL.DSLA``), the FCOS-baseline keys (``MODEL.FCOS``) and
    ``SOLVER.OPTIMIZER`` to a detectron2 config (in place).

    Args:
        cfg (CfgNode): typically ``detectron2.config.get_cfg()``.
    """
    _C = cfg
    _C.MODEL.DSLA = _dense_head_node()
    # Interval relaxation factor f (docs/METHOD.md, "Scale score"); 0 disables relaxation (hard
    # FCOS-style ranges).
    _C.MODEL.DSLA.INTERVAL_RELAXATION_FACTOR = 0.2
    # Smooth labels (docs/METHOD.md, "Smooth label"): q = centerness * scale score. False gives
    # FCOS-style hard labels (q* = 1 on every positive point); the ablation ladder's first rung.
    _C.MODEL.DSLA.SMOOTH_LABEL = True
    # Centerness core zone (docs/METHOD.md, "Core zone"): points within stride/2 of the box
    # centre get centerness 1.
    _C.MODEL.DSLA.CORE_ZONE = True
    # Centre-sampling radius R in strides (docs/METHOD.md, "Inside test"); 0 disables it
    # (positives = points inside the box).
    _C.MODEL.DSLA.CENTER_SAMPLING_RADIUS = 0.0
    # Dynamic IoU coupling of the cls target (docs/METHOD.md, "IoU coupling"): "on" (IoU * q),
    # "off" (q), "iou_only" (IoU).
    _C.MODEL.DSLA.IOU_COUPLING = "on"
    # Quality Focal Loss exponent beta (docs/METHOD.md, "Losses").
    _C.MODEL.DSLA.QFL_BETA = 2.0
    # Weight of the classification loss (the authors' R-50 1x run used 2.0).
    _C.MODEL.DSLA.CLS_LOSS_WEIGHT = 1.0
    # Box loss: "iou" (-log IoU) or "giou" (1 - GIoU), weighted per point by q*.
    _C.MODEL.DSLA.BOX_LOSS_TYPE = "iou"
    # Weight of the box loss.
    _C.MODEL.DSLA.BOX_LOSS_WEIGHT = 1.0
    # Box distances: False -> exp(scale * x); True -> relu(scale * x) * stride.
    _C.MODEL.DSLA.NORM_ON_BBOX = False
    # Make the last conv of each tower a modulated deformable conv (DCNv2, torchvision op).
    _C.MODEL.DSLA.DCN_ON_LAST_CONV = False
    # Keep the conv bias in tower convs even when a norm follows (authors' strongest configs).
    _C.MODEL.DSLA.CONV_BIAS = False

    # Optimizer: "SGD" (detectron2's, the paper's recipes) or "ADAMW" (faster from scratch on CPU).
    _C.SOLVER.OPTIMIZER = "SGD"

    _add_swin_config(_C)

    # detectron2's own FCOS (baseline for benchmarks): the shared keys above (its regress ranges
    # are configurable here, detectron2 hard-codes 4x / 8x the stride) plus its own.
    _C.MODEL.FCOS = _dense_head_node()
    # Centre-sampling radius in strides (detectron2's FCOS always samples centres).
    _C.MODEL.FCOS.CENTER_SAMPLING_RADIUS = 1.5
    # Sigmoid focal loss alpha and gamma; also read by the plain-FCOS baseline (FCOSPlain), whose
    # other keys are the shared MODEL.DSLA ones (head, ranges, box loss, weights, inference).
    _C.MODEL.FCOS.FOCAL_LOSS_ALPHA = 0.25
    _C.MODEL.FCOS.FOCAL_LOSS_GAMMA = 2.0


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


def dense_detector_kwargs(cfg, node):
    """
    Constructor arguments of detectron2 dense detectors (DSLA and FCOS) read from ``cfg``:
    inference settings of ``node`` (``cfg.MODEL.DSLA`` or ``cfg.MODEL.FCOS``), detections per
    image and pixel normalisation.

    Returns:
        dict: ``test_score_thresh``, ``test_topk_candidates``, ``test_nms_thresh``,
        ``max_detections_per_image``, ``pixel_mean``, ``pixel_std``.
    """
    return {
        "test_score_thresh": node.SCORE_THRESH_TEST,
        "test_topk_candidates": node.TOPK_CANDIDATES_TEST,
        "test_nms_thresh": node.NMS_THRESH_TEST,
        "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
        "pixel_mean": cfg.MODEL.PIXEL_MEAN,
        "pixel_std": cfg.MODEL.PIXEL_STD,
    }


# DSLA's constructor arguments and the config keys they come from: one set of checks names the
# key for a config and the argument for a model built in Python.
DSLA_ARGUMENT_KEYS = {
    "head_in_features": "MODEL.DSLA.IN_FEATURES",
    "num_classes": "MODEL.DSLA.NUM_CLASSES",
    "regress_ranges": "MODEL.DSLA.REGRESS_RANGES",
    "smooth_label": "MODEL.DSLA.SMOOTH_LABEL",
    "relaxation_factor": "MODEL.DSLA.INTERVAL_RELAXATION_FACTOR",
    "core_zone": "MODEL.DSLA.CORE_ZONE",
    "center_sampling_radius": "MODEL.DSLA.CENTER_SAMPLING_RADIUS",
    "iou_coupling": "MODEL.DSLA.IOU_COUPLING",
    "qfl_beta": "MODEL.DSLA.QFL_BETA",
    "cls_loss_weight": "MODEL.DSLA.CLS_LOSS_WEIGHT",
    "box_loss_type": "MODEL.DSLA.BOX_LOSS_TYPE",
    "box_loss_weight": "MODEL.DSLA.BOX_LOSS_WEIGHT",
    "test_score_thresh": "MODEL.DSLA.SCORE_THRESH_TEST",
    "test_topk_candidates": "MODEL.DSLA.TOPK_CANDIDATES_TEST",
    "test_nms_thresh": "MODEL.DSLA.NMS_THRESH_TEST",
    "max_detections_per_image": "TEST.DETECTIONS_PER_IMAGE",
}


def dsla_arguments_from_config(cfg):
    """
    Returns:
        dict: DSLA's constructor arguments read from ``cfg``: those of
        :data:`DSLA_ARGUMENT_KEYS`, ``pixel_mean`` and ``pixel_std``.
    """
    c = cfg.MODEL.DSLA
    return {
        "head_in_features": c.IN_FEATURES,
        "num_classes": c.NUM_CLASSES,
        "regress_ranges": c.REGRESS_RANGES,
        "smooth_label": c.SMOOTH_LABEL,
        "relaxation_factor": c.INTERVAL_RELAXATION_FACTOR,
        "core_zone": c.CORE_ZONE,
        "center_sampling_radius": c.CENTER_SAMPLING_RADIUS,
        "iou_coupling": c.IOU_COUPLING,
        "qfl_beta": c.QFL_BETA,
        "cls_loss_weight": c.CLS_LOSS_WEIGHT,
        "box_loss_type": c.BOX_LOSS_TYPE,
        "box_loss_weight": c.BOX_LOSS_WEIGHT,
        **dense_detector_kwargs(cfg, c),
    }


def validate_dsla_config(cfg, in_feature_strides):
    """
    Check ``MODEL.DSLA`` (and ``TEST.DETECTIONS_PER_IMAGE``) before anything is built.

    Args:
        cfg (CfgNode): a config with ``MODEL.DSLA``.
        in_feature_strides (dict[str, int]): stride of every backbone output feature.

    Raises:
        UserError: naming the offending key and value.
    """
    c = cfg.MODEL.DSLA
    validate_dsla_arguments(dsla_arguments_from_config(cfg), in_feature_strides,
                            names=DSLA_ARGUMENT_KEYS)
    _check(_is_int(c.NUM_CONVS) and c.NUM_CONVS >= 1, "MODEL.DSLA.NUM_CONVS", c.NUM_CONVS,
           "must be an integer >= 1")
    _check(_is_number(c.PRIOR_PROB) and 0.0 < c.PRIOR_PROB < 1.0, "MODEL.DSLA.PRIOR_PROB",
           c.PRIOR_PROB, "must be in (0, 1)")


def validate_dsla_arguments(args, in_feature_strides, names=None):
    """
    Check DSLA's settings, whether they come from a config or from Python.

    Args:
        args (dict): constructor arguments of DSLA by name (the keys of :data:`DSLA_ARGUMENT_KEYS`).
        in_feature_strides (dict[str, int]): stride of every backbone output feature.
        names (dict[str, str] or None): how to name each argument in an error (e.g.
            :data:`DSLA_ARGUMENT_KEYS` for config keys); None names the constructor argument.

    Raises:
        UserError: naming the offending key or argument and its value.
    """
    def check(arg, ok, why):
        _check(ok, names[arg] if names else f"DSLA argument {arg}", args[arg], why)

    features = args["head_in_features"]
    missing = [f for f in features if f not in in_feature_strides]
    check("head_in_features", len(features) >= 1 and not missing,
          f"backbone has no feature(s) {missing}; it outputs {sorted(in_feature_strides)}")
    check("num_classes", _is_int(args["num_classes"]) and args["num_classes"] >= 1,
          "must be an integer >= 1")
    _check_regress_ranges(args["regress_ranges"], len(features), check)
    for flag in ("smooth_label", "core_zone"):
        check(flag, isinstance(args[flag], bool), "must be True or False")
    factor = args["relaxation_factor"]
    check("relaxation_factor", _is_number(factor) and 0.0 <= factor < 1.0, "must be in [0, 1)")
    check("iou_coupling", args["iou_coupling"] in IOU_COUPLING_MODES,
          f"must be one of {IOU_COUPLING_MODES}")
    check("box_loss_type", args["box_loss_type"] in BOX_LOSS_TYPES,
          f"must be one of {BOX_LOSS_TYPES}")
    for arg, why in [("center_sampling_radius", "must be >= 0 (0 disables centre sampling)"),
                     ("qfl_beta", "must be >= 0"), ("cls_loss_weight", "must be >= 0"),
                     ("box_loss_weight", "must be >= 0")]:
        check(arg, _is_number(args[arg]) and args[arg] >= 0, why)
    for arg in ("test_score_thresh", "test_nms_thresh"):
        check(arg, _is_number(args[arg]) and 0.0 <= args[arg] <= 1.0, "must be in [0, 1]")
    for arg in ("test_topk_candidates", "max_detections_per_image"):
        check(arg, _is_int(args[arg]) and args[arg] >= 1, "must be an integer >= 1")


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
