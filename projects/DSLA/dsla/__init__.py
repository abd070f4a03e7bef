"""DSLA (Dynamic Smooth Label Assignment) for detectron2.

Importing this package registers, in detectron2's registries: the ``DSLA`` and ``FCOS``
meta-architectures, the ``build_dsla_resnet_fpn_backbone`` backbone, and the built-in
``shapes_train`` / ``shapes_val`` datasets.
"""
from . import data  # noqa: F401  (registers the built-in datasets)
from .backbone import build_dsla_resnet_fpn_backbone
from .config import add_dsla_config
from .fcos import FCOS
from .head import DSLAHead
from .meta_arch import DSLA

__version__ = "0.1.0"
__all__ = ["add_dsla_config", "build_dsla_resnet_fpn_backbone", "DSLA", "DSLAHead", "FCOS"]
