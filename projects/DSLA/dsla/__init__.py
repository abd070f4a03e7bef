"""DSLA (Dynamic Smooth Label Assignment) for detectron2.

Importing this package registers, in detectron2's registries: the ``DSLA`` meta-architecture
and its baselines ``FCOSPlain`` and ``FCOSDetectron2`` (``dsla.baselines``), the
``build_dsla_resnet_fpn_backbone`` backbone, and the built-in datasets (``shapes_easy_*``,
``shapes_*``, ``shapes_crowded_*``). docs/METHOD.md describes the computation.

Shape letters, the same in every module and docstring:

    N       images of a batch
    L       FPN levels (5: P3-P7)
    Hi, Wi  height and width of the grid of level i
    Pi      points of level i (Hi·Wi)
    P       points of one image, all levels, level by level (sum of Pi)
    G       ground-truth boxes of one image
    C       foreground classes (the background label is C)
    E       candidate (box, point) pairs: pairs whose point passes the inside test
    K       positive points (q* > 0) of the batch
    D       detections (of one image, or of a dataset when said so)
"""
import warnings

# fvcore and detectron2 script a few helpers with torch.jit.script at import time, which torch
# 2.x flags as deprecated on every run; it is harmless for DSLA, so keep it out of users' logs.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated",
                        category=FutureWarning)

from . import data  # noqa: E402,F401  (registers the built-in datasets)
from .backbone import build_dsla_resnet_fpn_backbone  # noqa: E402
from .baselines import FCOSDetectron2, FCOSPlain  # noqa: E402
from .config import add_dsla_config  # noqa: E402
from .head import DSLAHead  # noqa: E402
from .meta_arch import DSLA  # noqa: E402

__version__ = "0.1.0"
__all__ = ["add_dsla_config", "build_dsla_resnet_fpn_backbone", "DSLA", "DSLAHead",
           "FCOSDetectron2", "FCOSPlain"]
