"""The points of DSLA's feature levels (docs/METHOD.md, "Points"): one point per location of
level i at (j·s, i·s), without the half-stride offset of detectron2's FCOS.

Every grid of points in the package comes from here: detectron2's ``DefaultAnchorGenerator``
with one square anchor of side s per location and ``offset=0`` has exactly these centres, and
it lets detectron2's decoding helpers (``Box2BoxTransformLinear``) treat points as anchors.
Shape letters are those of docs/METHOD.md ("Shape letters").
"""
import math
from typing import List, Sequence, Tuple

import torch
from torch import Tensor

from detectron2.modeling.anchor_generator import DefaultAnchorGenerator

__all__ = ["grid_anchors", "grid_points", "grid_sizes", "point_generator"]


def point_generator(strides: Sequence[int]) -> DefaultAnchorGenerator:
    """
    Args:
        strides: L strides, one per level.

    Returns:
        an anchor generator whose anchor centres are the points (j·s, i·s) of every level.
    """
    strides = [int(s) for s in strides]
    return DefaultAnchorGenerator(
        sizes=[[s] for s in strides], aspect_ratios=[1.0], strides=strides, offset=0.0)


def grid_sizes(image_size: Tuple[int, int], strides: Sequence[int]) -> List[Tuple[int, int]]:
    """
    Args:
        image_size: (H, W) in pixels.
        strides: L strides.

    Returns:
        L sizes (Hi, Wi) = (ceil(H / s), ceil(W / s)): the points that fall on the image.
    """
    height, width = image_size
    return [(math.ceil(height / s), math.ceil(width / s)) for s in strides]


def grid_anchors(generator: DefaultAnchorGenerator, sizes: Sequence[Tuple[int, int]]):
    """
    The generator's anchors on grids of the given sizes, without feature maps.

    Args:
        generator: e.g. from :func:`point_generator`, or a model's ``anchor_generator``.
        sizes: L grid sizes (Hi, Wi).

    Returns:
        list[Boxes]: L Boxes of Pi = Hi·Wi anchors, row-major (as the head's outputs).
    """
    # The generator reads only the shapes of its inputs; empty tensors carry them for free.
    device = next(iter(generator.cell_anchors)).device
    return generator([torch.empty((0, 0, h, w), device=device) for h, w in sizes])


def grid_points(image_size: Tuple[int, int], strides: Sequence[int]) -> List[Tensor]:
    """
    Args:
        image_size: (H, W) in pixels.
        strides: L strides.

    Returns:
        L float32 tensors [Pi, 2], the (x, y) of the points of each level that fall on the
        image, row-major.
    """
    anchors = grid_anchors(point_generator(strides), grid_sizes(image_size, strides))
    return [a.get_centers() for a in anchors]
