"""
Inference with the authors' released Swin-S 3x multi-scale weights (49.2 box AP,
docs/MODEL_ZOO.md), as configs/COCO-Detection/dsla_Swin_S_FPN_ms_3x_mmdet.yaml (the reference):
Swin-S (embed 96, depths 2-2-18-2, heads 3-6-12-24, window 7) whose stages 2-4 feed the FPN; RGB
input normalised by the ImageNet mean / std; head with DCNv2 last tower convs, conv biases and
relu(scale * x) * stride distances; test at 800 px. Inference only (the training recipe is the
yacs config). Pass the authors' file as it is (or a converted one):

    dsla-lazy-train --config-file configs/lazy/COCO-Detection/dsla_Swin_S_FPN_ms_3x_mmdet.py \\
        --eval-only train.init_checkpoint=/path/to/file.pth
"""
from detectron2.config import LazyCall as L

from dsla.backbone import make_dsla_swin

from .dsla_R_101_FPN_dcn_ms_2x_mmdet import dataloader, model, train

model.backbone.bottom_up = L(make_dsla_swin)(
    out_features=["p1", "p2", "p3"],
    embed_dim=96,
    depths=[2, 2, 18, 2],
    num_heads=[3, 6, 12, 24],
    window_size=7,
    mlp_ratio=4.0,
    drop_path_rate=0.2,
)
train.output_dir = "output/lazy/dsla_Swin_S_FPN_ms_3x_mmdet"

__all__ = ["dataloader", "model", "train"]
