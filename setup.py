#!/usr/bin/env python
"""Installs the ``dsla`` package (DSLA for detectron2) from ``projects/DSLA/dsla``.

detectron2 itself is not a requirement here: it is not on PyPI under its own name. ``make setup``
installs it (see README, "Installation"); users with their own detectron2 build run
``pip install -e .`` in that environment. The ``deploy`` extra (``pip install .[deploy]``) adds
what ``dsla-export --format onnx`` needs (docs/DEPLOY.md).
"""
from setuptools import find_packages, setup

setup(
    name="dsla-detectron2",
    version="0.1.0",
    description="DSLA: Dynamic Smooth Label Assignment for anchor-free detection, in detectron2",
    license="Apache-2.0",
    python_requires=">=3.9",
    package_dir={"": "projects/DSLA"},
    packages=find_packages("projects/DSLA", include=["dsla", "dsla.*"]),
    install_requires=[
        "torch>=2.0",
        "torchvision>=0.15",
        "numpy",
        "Pillow",
        "matplotlib",
        "scipy",
        "fvcore",
        "iopath",
        "pycocotools",
        "omegaconf>=2.1,<2.4",
        "hydra-core>=1.1",
        "yacs",
        "tabulate",
        "termcolor",
        "cloudpickle",
        "tqdm",
        "packaging",
        "tensorboard",
        "opencv-python-headless",
    ],
    extras_require={
        # dsla-export --format onnx writes with onnx and checks the file in onnxruntime.
        "deploy": ["onnx>=1.16", "onnxruntime>=1.17"],
    },
    entry_points={
        "console_scripts": [
            "dsla-train=dsla.engine:cli",
            "dsla-lazy-train=dsla.lazy_engine:cli",
            "dsla-demo=dsla.tools.demo:run",
            "dsla-predict=dsla.tools.predict:main",
            "dsla-visualize-assignment=dsla.tools.visualize_assignment:main",
            "dsla-analyze-consistency=dsla.tools.analyze_consistency:main",
            "dsla-export=dsla.tools.export_model:main",
            "dsla-convert-mmdet=dsla.tools.convert_mmdet_weights:main",
        ]
    },
)
