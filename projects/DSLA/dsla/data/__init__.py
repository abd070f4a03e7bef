"""Datasets for DSLA: the built-in synthetic ``shapes`` splits and user COCO-format datasets.

Importing this package registers ``shapes_train`` and ``shapes_val`` (generated on first use under
``default_shapes_root()``; see ``shapes.py``).
"""
from .datasets import (
    check_image_files,
    check_num_classes,
    check_training_data,
    load_coco_dataset,
    num_classes_of,
    register_coco_dataset,
    sanitize_dataset_dicts,
)
from .shapes import (
    SHAPES_CLASSES,
    SHAPES_SPLITS,
    default_shapes_root,
    generate_shapes_dataset,
    register_shapes_datasets,
    render_shapes_image,
)

__all__ = [
    "SHAPES_CLASSES",
    "SHAPES_SPLITS",
    "check_image_files",
    "check_num_classes",
    "check_training_data",
    "default_shapes_root",
    "generate_shapes_dataset",
    "load_coco_dataset",
    "num_classes_of",
    "register_coco_dataset",
    "register_shapes_datasets",
    "render_shapes_image",
    "sanitize_dataset_dicts",
]

register_shapes_datasets()
