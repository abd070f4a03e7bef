"""
Inference with the authors' released R-50 1x weights (38.1 box AP, docs/MODEL_ZOO.md), as
configs/COCO-Detection/dsla_R_50_FPN_1x_mmdet.yaml (the reference): the network of the R-50 1x
recipe, which already matches the authors' mmdetection model. Pass the authors' file as it
is (or a converted one):

    dsla-lazy-train --config-file configs/lazy/COCO-Detection/dsla_R_50_FPN_1x_mmdet.py \\
        --eval-only train.init_checkpoint=/path/to/file.pth
"""
from .dsla_R_50_FPN_1x import dataloader, lr_multiplier, model, optimizer, train

train.init_checkpoint = ""
train.output_dir = "output/lazy/dsla_R_50_FPN_1x_mmdet"

__all__ = ["dataloader", "lr_multiplier", "model", "optimizer", "train"]
