"""Config keys of DSLA (``MODEL.DSLA``) and of the FCOS baseline (``MODEL.FCOS``).

All defaults live here (STYLE.md convention 2); they are the authors' R-50 1x COCO settings of
DSLA_SPEC §7 unless a comment says otherwise. Nothing is read from ``cfg`` outside ``from_config``.
"""
from detectron2.config import CfgNode as CN

# The paper's regress ranges for P3-P7 (DSLA_SPEC §2).
_COCO_REGRESS_RANGES = [[0, 64], [64, 128], [128, 256], [256, 512], [512, 100000000]]
IOU_COUPLING_MODES = ("on", "off", "iou_only")
BOX_LOSS_TYPES = ("iou", "giou")


def _dense_head_node():
    """The keys DSLA and the FCOS baseline share, with DSLA's defaults."""
    node = CN()
    # Number of foreground classes (detectron2 counts no background class).
    node.NUM_CLASSES = 80
    # Backbone features fed to the head, finest first (strides 8..128, §1).
    node.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    # Convs in each of the two towers (classification, regression).
    node.NUM_CONVS = 4
    # Norm of the tower convs: "GN" (32 groups, the paper), "" for none, or any detectron2 norm.
    node.NORM = "GN"
    # Prior foreground probability pi; cls bias = -log((1 - pi) / pi).
    node.PRIOR_PROB = 0.01
    # Per-level [lo, hi] range of the scale measure m = max(l, t, r, b), one per IN_FEATURE (§2).
    node.REGRESS_RANGES = [list(r) for r in _COCO_REGRESS_RANGES]
    # Inference (§6): score threshold, candidates kept per level, class-aware NMS IoU.
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
    # Interval relaxation factor f (§3.5); 0 disables relaxation (hard FCOS-style ranges).
    _C.MODEL.DSLA.INTERVAL_RELAXATION_FACTOR = 0.2
    # Smooth labels (§3.6): q = centerness * scale score. False gives FCOS-style hard labels
    # (q* = 1 on every positive point); used by the first rung of the ablation ladder.
    _C.MODEL.DSLA.SMOOTH_LABEL = True
    # Centerness core zone (§3.4): points within stride/2 of the box centre get centerness 1.
    _C.MODEL.DSLA.CORE_ZONE = True
    # Centre-sampling radius R in strides (§3.2); 0 disables (positives = points inside the box).
    _C.MODEL.DSLA.CENTER_SAMPLING_RADIUS = 0.0
    # Dynamic IoU coupling of the cls target (§4): "on" (IoU * q), "off" (q), "iou_only" (IoU).
    _C.MODEL.DSLA.IOU_COUPLING = "on"
    # Quality Focal Loss exponent beta (§5).
    _C.MODEL.DSLA.QFL_BETA = 2.0
    # Weight of the classification loss (the authors' R-50 1x run used 2.0).
    _C.MODEL.DSLA.CLS_LOSS_WEIGHT = 1.0
    # Box loss: "iou" (-log IoU) or "giou" (1 - GIoU), weighted per point by q* (§5).
    _C.MODEL.DSLA.BOX_LOSS_TYPE = "iou"
    # Weight of the box loss.
    _C.MODEL.DSLA.BOX_LOSS_WEIGHT = 1.0
    # Box distances: False -> exp(scale * x); True -> relu(scale * x) * stride (§1).
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


def validate_dsla_config(cfg, in_feature_strides):
    """
    Check ``MODEL.DSLA`` values that would otherwise fail late or silently.

    Args:
        cfg (CfgNode): a config with ``MODEL.DSLA``.
        in_feature_strides (dict[str, int]): stride of every backbone output feature.

    Raises:
        ValueError: naming the offending key and value.
    """
    c = cfg.MODEL.DSLA
    missing = [f for f in c.IN_FEATURES if f not in in_feature_strides]
    _check(not missing, "MODEL.DSLA.IN_FEATURES", c.IN_FEATURES,
           f"backbone has no feature(s) {missing}; it outputs {sorted(in_feature_strides)}")
    _check(c.NUM_CLASSES >= 1, "MODEL.DSLA.NUM_CLASSES", c.NUM_CLASSES, "must be >= 1")
    ranges = [tuple(float(v) for v in r) for r in c.REGRESS_RANGES]
    _check(len(ranges) == len(c.IN_FEATURES), "MODEL.DSLA.REGRESS_RANGES", c.REGRESS_RANGES,
           f"needs one [lo, hi] per IN_FEATURE ({len(c.IN_FEATURES)}), got {len(ranges)}")
    _check(all(len(r) == 2 and 0 <= r[0] < r[1] for r in ranges), "MODEL.DSLA.REGRESS_RANGES",
           c.REGRESS_RANGES, "each range must be [lo, hi] with 0 <= lo < hi")
    _check(all(a[0] < b[0] and a[1] < b[1] for a, b in zip(ranges, ranges[1:])),
           "MODEL.DSLA.REGRESS_RANGES", c.REGRESS_RANGES, "ranges must increase level by level")
    _check(0.0 <= c.INTERVAL_RELAXATION_FACTOR < 1.0, "MODEL.DSLA.INTERVAL_RELAXATION_FACTOR",
           c.INTERVAL_RELAXATION_FACTOR, "must be in [0, 1)")
    _check(c.CENTER_SAMPLING_RADIUS >= 0, "MODEL.DSLA.CENTER_SAMPLING_RADIUS",
           c.CENTER_SAMPLING_RADIUS, "must be >= 0 (0 disables centre sampling)")
    _check(c.IOU_COUPLING in IOU_COUPLING_MODES, "MODEL.DSLA.IOU_COUPLING", c.IOU_COUPLING,
           f"must be one of {IOU_COUPLING_MODES}")
    _check(c.BOX_LOSS_TYPE in BOX_LOSS_TYPES, "MODEL.DSLA.BOX_LOSS_TYPE", c.BOX_LOSS_TYPE,
           f"must be one of {BOX_LOSS_TYPES}")
    _check(c.NUM_CONVS >= 1, "MODEL.DSLA.NUM_CONVS", c.NUM_CONVS, "must be >= 1")
    _check(0.0 < c.PRIOR_PROB < 1.0, "MODEL.DSLA.PRIOR_PROB", c.PRIOR_PROB, "must be in (0, 1)")
    _check(c.QFL_BETA >= 0, "MODEL.DSLA.QFL_BETA", c.QFL_BETA, "must be >= 0")
    _check(0.0 <= c.NMS_THRESH_TEST <= 1.0, "MODEL.DSLA.NMS_THRESH_TEST", c.NMS_THRESH_TEST,
           "must be in [0, 1]")
    _check(c.TOPK_CANDIDATES_TEST >= 1, "MODEL.DSLA.TOPK_CANDIDATES_TEST",
           c.TOPK_CANDIDATES_TEST, "must be >= 1")


def _check(ok, key, value, why):
    if not ok:
        raise ValueError(f"Invalid {key} = {value!r}: {why}.")
