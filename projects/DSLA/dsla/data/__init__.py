"""Datasets for DSLA: the built-in synthetic ``shapes`` splits and user COCO-format datasets.

Importing this package registers the built-in splits (``shapes_easy_*``, ``shapes_train`` /
``shapes_val``, ``shapes_crowded_*``: the styles ``easy``, ``standard`` and ``crowded``;
generated on first use under ``default_shapes_root()``; see ``shapes.py``).
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
    SHAPES_SPLITS,
    STYLES,
    default_shapes_root,
    generate_shapes_dataset,
    register_shapes_datasets,
    render_shapes_image,
)

__all__ = [
    "SHAPES_SPLITS",
    "STYLES",
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
