"""The baselines DSLA is compared with, each a sibling of DSLA with its own config node:

- ``FCOSPlain`` (``MODEL.FCOS_PLAIN``): plain FCOS, the detector the paper modifies
  (mmdetection's ``fcos_r50_caffe_fpn_gn-head_1x``); shares DSLA's points, head and inference
  through :class:`dsla.point_detector.PointDetector`.
- ``FCOSDetectron2`` (``MODEL.FCOS``): detectron2's FCOS with its tricks, buildable from yacs
  configs, with configurable regress ranges.

Both label points with FCOS's rule (``fcos_targets.py``).
"""
from .fcos_detectron2 import FCOSDetectron2
from .fcos_plain import FCOSPlain

__all__ = ["FCOSDetectron2", "FCOSPlain"]
