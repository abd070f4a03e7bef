"""Shared fixtures: tiny DSLA configs and batches that run in seconds on a CPU."""
import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_CONFIG = os.path.join(REPO, "configs", "Shapes", "dsla_R_18_FPN_cpu.yaml")


def tiny_cfg(*opts, config_file=CPU_CONFIG):
    """The CPU shapes config on the CPU, plus ``KEY VALUE`` opts (not frozen)."""
    from dsla.cli import load_config

    return load_config(config_file, ["MODEL.DEVICE", "cpu", *opts], freeze=False)


def make_inputs(boxes_per_image, classes_per_image=None, size=128, seed=0):
    """
    A batch in detectron2's input format: one dict per image with a random image and
    ``instances`` holding the given xyxy boxes (a list of lists per image).
    """
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    batch = []
    for i, boxes in enumerate(boxes_per_image):
        inst = Instances((size, size))
        inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        classes = classes_per_image[i] if classes_per_image else [0] * len(boxes)
        inst.gt_classes = torch.tensor(classes, dtype=torch.long)
        image = torch.rand(3, size, size, generator=g) * 255
        batch.append({"image": image, "instances": inst, "height": size, "width": size})
    return batch


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory):
    """``--register-coco`` arguments of a 12-image train (``tiny_train``) and 6-image val
    (``tiny_val``) split of the built-in generator, 128 px."""
    from dsla.data import generate_shapes_dataset

    root = str(tmp_path_factory.mktemp("shapes"))
    train = generate_shapes_dataset(root, "train", num_images=12, seed=0, image_size=128)
    val = generate_shapes_dataset(root, "val", num_images=6, seed=1, image_size=128)
    return ["--register-coco", "tiny_train", *train, "--register-coco", "tiny_val", *val]


@pytest.fixture
def storage():
    from detectron2.utils.events import EventStorage

    with EventStorage() as s:
        yield s


sys.path.insert(0, os.path.join(REPO, "benchmarks"))
