#!/usr/bin/env python
"""
DSLA training and evaluation script, in the style of detectron2's projects.

    python projects/DSLA/train_net.py --config-file configs/Shapes/dsla_R_18_FPN_cpu.yaml
    python projects/DSLA/train_net.py --config-file CFG --eval-only MODEL.WEIGHTS model_final.pth
    python projects/DSLA/train_net.py --config-file CFG --num-gpus 8 --resume
    python projects/DSLA/train_net.py --config-file CFG \\
        --register-coco my_train ann/train.json images/ DATASETS.TRAIN '("my_train",)'

The Trainer, setup() and main() live in :mod:`dsla.engine` so that the installed ``dsla-train``
console script runs the same code.
"""
from dsla.engine import Trainer, argument_parser, cli, main, setup  # noqa: F401

if __name__ == "__main__":
    cli()
