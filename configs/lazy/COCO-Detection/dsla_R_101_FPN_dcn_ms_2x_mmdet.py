"""
Inference with the authors' released R-101 2x multi-scale DCN weights (46.6 box AP,
docs/MODEL_ZOO.md), as configs/COCO-Detection/dsla_R_101_FPN_dcn_ms_2x_mmdet.yaml (the
reference): pytorch-style ResNet-101 (stride in the 3x3 conv) with frozen BN and DCNv1 in
res3-res5 (dsla's DeformBottleneck); RGB input normalised by the ImageNet mean / std; head with
DCNv2 last tower convs, conv biases and relu(scale * x) * stride distances; test at 800 px.
Inference only (the training recipe is the yacs config). Pass the authors' file as it is (or a
converted one):

    dsla-lazy-train --config-file configs/lazy/COCO-Detection/dsla_R_101_FPN_dcn_ms_2x_mmdet.py \\
        --eval-only train.init_checkpoint=/path/to/file.pth
"""
from ..common.models import model
from ..common.train import dataloader, train

model.backbone.bottom_up.update(
    depth=101,
    stride_in_1x1=False,
    deform_on_per_stage=[False, True, True, True],
    deform_modulated=False,
    deform_num_groups=1,
)
model.head.update(norm_on_bbox=True, dcn_on_last_conv=True, conv_bias=True)
# The training settings of the checkpoint's log (they do not change inference).
model.update(cls_loss_weight=1.0, center_sampling_radius=1.5, box_loss_type="giou")
model.pixel_mean = [123.675, 116.28, 103.53]
model.pixel_std = [58.395, 57.12, 57.375]
model.input_format = "RGB"
dataloader.train.mapper.image_format = "RGB"  # the test mapper follows the train one

train.init_checkpoint = ""
train.output_dir = "output/lazy/dsla_R_101_FPN_dcn_ms_2x_mmdet"

__all__ = ["dataloader", "model", "train"]
