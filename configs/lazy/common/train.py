"""``train``, ``optimizer`` and ``dataloader`` shared by the DSLA LazyConfigs: detectron2's common
pieces (``common/train.py``, ``common/optim.py``, ``common/data/coco.py``) with the settings of
configs/Base-DSLA.yaml (yacs, the reference): SGD with bias lr x2 and no bias decay, whole-model
gradient clipping at 35, boxes only, single-scale 800 px training, no evaluation during training.
"""
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.model_zoo import get_config

dataloader = get_config("common/data/coco.py").dataloader
dataloader.train.dataset.filter_empty = True  # detectron2's default, stated so overrides reach it
dataloader.train.mapper.use_instance_mask = False
dataloader.train.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=(800,), max_size=1333, sample_style="choice"),
    L(T.RandomFlip)(horizontal=True),
]
dataloader.test.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=800, max_size=1333, sample_style="choice"),
]
# COCO evaluation results land where the yacs entry writes them.
dataloader.evaluator.output_dir = "${...train.output_dir}/inference"

optimizer = get_config("common/optim.py").SGD
optimizer.lr = 0.01
optimizer.params.base_lr = "${..lr}"
# The authors' recipe: bias lr x2, no weight decay on biases (or norms, detectron2's default).
optimizer.params.bias_lr_factor = 2.0
optimizer.params.weight_decay_bias = 0.0

train = get_config("common/train.py").train
train.eval_period = 0  # evaluate once, after training (as the yacs entry with TEST.EVAL_PERIOD 0)
train.checkpointer.period = 10000
train.seed = -1
# Gradient norm of the whole model clipped at 35 (mmdetection's grad_clip), not per parameter:
# dsla.lazy_engine wraps the optimizer (as the yacs entry does for CLIP_TYPE "full_model").
train.grad_clip = dict(enabled=True, max_norm=35.0, norm_type=2.0)
