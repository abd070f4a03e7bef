"""Datasets for DSLA: the built-in synthetic ``shapes`` splits and user COCO-format datasets.

Importing this package makes detectron2's image reader scale 16-bit images to 8 bits
(``images.py``) and registers the built-in splits (``shapes_easy_*``, ``shapes_train`` /
``shapes_val``, ``shapes_crowded_*``: the styles ``easy``, ``standard`` and ``crowded``;
generated on first use under ``default_shapes_root()``; see ``shapes.py``).
"""
from .datasets import (
    bbox_problem,
    check_coco_json,
    check_image_files,
    check_num_classes,
    check_training_data,
    load_coco_dataset,
    num_classes_of,
    register_coco_dataset,
    sanitize_dataset_dicts,
)
from .images import (
    check_image_headers,
    image_problem,
    install_8bit_conversion,
    mode_problem,
    to_8bit,
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
    "bbox_problem",
    "check_coco_json",
    "check_image_files",
    "check_image_headers",
    "check_num_classes",
    "check_training_data",
    "default_shapes_root",
    "generate_shapes_dataset",
    "image_problem",
    "install_8bit_conversion",
    "load_coco_dataset",
    "mode_problem",
    "num_classes_of",
    "register_coco_dataset",
    "register_shapes_datasets",
    "render_shapes_image",
    "sanitize_dataset_dicts",
    "to_8bit",
]

register_shapes_datasets()
install_8bit_conversion()
