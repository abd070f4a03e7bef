"""
The authors' R-50 1x recipe (38.1 box AP on COCO val; docs/MODEL_ZOO.md) as a LazyConfig:
configs/COCO-Detection/dsla_R_50_FPN_1x.yaml, the reference, says the same in yacs.

    dsla-lazy-train --config-file configs/lazy/COCO-Detection/dsla_R_50_FPN_1x.py --num-gpus 8
"""
from ..common.models import model
from ..common.schedule import warmup_multistep
from ..common.train import dataloader, optimizer, train

# 12 epochs of 7330 iterations at batch 16 (the authors' log), lr x0.1 after epochs 8 and 11,
# constant warm-up at 1/3 over 500 iterations.
train.max_iter = 87960
lr_multiplier = warmup_multistep(steps=(58640, 80630), max_iter=train.max_iter,
                                 warmup_iters=500, warmup_factor=0.3333333,
                                 warmup_method="constant")
train.init_checkpoint = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
train.output_dir = "output/lazy/dsla_R_50_FPN_1x"

__all__ = ["dataloader", "lr_multiplier", "model", "optimizer", "train"]
