"""DSLA (Dynamic Smooth Label Assignment) for detectron2.

Importing this package registers the ``DSLA`` and ``FCOS`` meta-architectures, the
``build_dsla_resnet_fpn_backbone`` backbone and the built-in ``shapes_*`` datasets.
"""
from .config import add_dsla_config

__version__ = "0.1.0"
__all__ = ["add_dsla_config"]
