"""
DSLA on the built-in "shapes" dataset, trained from scratch on a CPU, as a LazyConfig: the recipe of
configs/Shapes/dsla_R_18_FPN_cpu.yaml (yacs, the reference; its comments say why each setting
differs from the COCO recipe): half-width ResNet-18 with BatchNorm, 64-channel FPN and head with 2
convs per tower, FPN regress ranges scaled to 256 px images, 4 classes, AdamW lr 0.004 with 100
warm-up iterations, 2400 iterations at batch 8, whole-model gradient clipping at 35, bfloat16
autocast for the training forward pass on the CPU (dsla.cpu_amp).

    dsla-lazy-train --config-file configs/lazy/Shapes/dsla_R_18_FPN_cpu.py
"""
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.model_zoo import get_config

from ..common.models import model
from ..common.schedule import warmup_multistep
from ..common.train import dataloader, train

model.backbone.bottom_up.update(
    depth=18,
    stem_out_channels=32,
    res2_out_channels=32,
    stride_in_1x1=False,
    norm="BN",
    freeze_at=0,
)
model.backbone.out_channels = 64
model.head.num_convs = 2
model.num_classes = 4
model.regress_ranges = [[0, 16], [16, 32], [32, 64], [64, 128], [128, 100000000]]
model.pixel_mean = [103.53, 116.28, 123.675]
model.pixel_std = [57.375, 57.12, 58.395]

dataloader.train.dataset.names = "shapes_train"
# The empty images (7 %) are useful negatives; DSLA's losses handle them (box loss 0).
dataloader.train.dataset.filter_empty = False
dataloader.train.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=(256,), max_size=256, sample_style="choice"),
    L(T.RandomFlip)(horizontal=True),
]
dataloader.train.total_batch_size = 8
dataloader.train.num_workers = 1
dataloader.test.dataset.names = "shapes_val"
dataloader.test.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=256, max_size=256, sample_style="choice"),
]
dataloader.test.num_workers = 1

# detectron2's AdamW with the base recipe's bias rule (lr x2, no decay), weight decay 1e-4.
optimizer = get_config("common/optim.py").AdamW
optimizer.update(lr=0.004, weight_decay=0.0001)
optimizer.params.update(bias_lr_factor=2.0, weight_decay_bias=0.0)

# 2400 iterations (19 epochs of the 1000 images), lr x0.1 after 80 % and 93 %.
train.max_iter = 2400
lr_multiplier = warmup_multistep(steps=(1920, 2240), max_iter=train.max_iter, warmup_iters=100,
                                 warmup_factor=0.001, warmup_method="linear")
train.checkpointer.period = 600
train.device = "cpu"
train.amp.enabled = True  # bfloat16 autocast on a CPU (dsla.cpu_amp)
train.seed = 0
train.output_dir = "output/lazy/shapes/dsla_R_18_FPN_cpu"

__all__ = ["dataloader", "lr_multiplier", "model", "optimizer", "train"]
