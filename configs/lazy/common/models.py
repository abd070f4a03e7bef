"""
The DSLA model of the authors' R-50 1x recipe (Su et al., Pattern Recognition 2022; docs/METHOD.md,
"Released recipes") as a LazyConfig ``model``: caffe-style ResNet-50 with frozen BN and stem+res2
frozen, the FPN with P3-P7 (P6 from the P5 output), the DSLA head (2 towers of 4 conv+GN+ReLU, no
centerness), and DSLA's defaults for assignment, losses and inference (``dsla.config``, the
same defaults as the yacs keys). The same network as configs/COCO-Detection/dsla_R_50_FPN_1x.yaml
(yacs, the reference); every argument is listed so that ``key=value`` overrides can reach it.
"""
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec

from dsla import DSLA, DSLAHead
from dsla.backbone import make_dsla_resnet, make_p3_p7_fpn
from dsla.config import DSLA_HEAD_SETTINGS, DSLA_SETTINGS, GENERAL_DEFAULTS, defaults

# The head runs on P3-P7; its input shapes follow the FPN's width.
_STRIDES = (8, 16, 32, 64, 128)

model = L(DSLA)(
    backbone=L(make_p3_p7_fpn)(
        bottom_up=L(make_dsla_resnet)(
            depth=50,
            norm="FrozenBN",
            stride_in_1x1=True,
            freeze_at=2,
            out_features=["res3", "res4", "res5"],
        ),
        in_features="${.bottom_up.out_features}",
        out_channels=256,
    ),
    head=L(DSLAHead)(
        # ``....`` climbs from a ShapeSpec through the list and the head to the model.
        input_shape=[L(ShapeSpec)(channels="${....backbone.out_channels}", stride=s)
                     for s in _STRIDES],
        num_classes="${..num_classes}",
        **defaults(DSLA_HEAD_SETTINGS),
    ),
    **defaults(DSLA_SETTINGS),
    **GENERAL_DEFAULTS,
    # detectron2's MSRA ImageNet weights: BGR, caffe mean, std absorbed into conv1.
    pixel_mean=[102.9801, 115.9465, 122.7717],
    pixel_std=[1.0, 1.0, 1.0],
)
# The authors' R-50 1x run weighted the classification loss by 2 (their training log).
model.cls_loss_weight = 2.0
