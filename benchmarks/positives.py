"""Positive points per image of a DSLA config's labelling, with and without centre sampling.

Counts, on the first images of a dataset, the points DSLA's assignment labels positive
(``DSLA.label_points``, no training) for each centre-sampling radius given. Used in
docs/BENCHMARKS.md to show that centre sampling changes nothing with the CPU configs' regress
ranges.

    python benchmarks/positives.py [--config-file CFG] [--dataset NAME] [--images N] [--radii R ...]
"""
import argparse
import os
import sys

import torch

from detectron2.data import DatasetCatalog
from detectron2.structures import Boxes, Instances

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file",
                        default=os.path.join(REPO, "configs/Shapes/dsla_tricks_R_18_FPN_cpu.yaml"))
    parser.add_argument("--dataset", default="shapes_train")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--radii", type=float, nargs="+", default=[0.0, 1.5])
    args = parser.parse_args(argv)

    from dsla.analysis import ground_truth_of
    from dsla.cli import load_config
    from dsla.engine import Trainer

    cfg = load_config(args.config_file, [])
    model = Trainer.build_model(cfg).eval()
    size = cfg.INPUT.MAX_SIZE_TEST
    with torch.no_grad():
        features = model.backbone(torch.zeros(1, 3, size, size))
    anchors = model.anchor_generator([features[f] for f in model.head_in_features])
    gt = []
    for record in DatasetCatalog.get(args.dataset)[: args.images]:
        boxes, classes = ground_truth_of(record)
        inst = Instances((record["height"], record["width"]))
        inst.gt_boxes, inst.gt_classes = Boxes(boxes), classes
        gt.append(inst)
    for radius in args.radii:
        model.center_sampling_radius = radius
        labels, scores, _ = model.label_points(anchors, gt)
        pos = labels != model.num_classes
        print(f"{args.dataset}, {len(gt)} images, centre sampling radius {radius}: "
              f"{pos.sum().item() / len(gt):.2f} positive points per image, "
              f"mean q* {scores[pos].mean().item():.3f}")


if __name__ == "__main__":
    main()
