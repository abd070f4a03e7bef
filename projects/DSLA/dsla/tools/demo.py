"""
``make demo``: the main job on the built-in dataset, end to end on a CPU.

1. generates the ``shapes`` dataset if it is not on disk yet (deterministic, ~15 s);
2. trains DSLA (``configs/Shapes/dsla_R_18_FPN_cpu.yaml``) from scratch, logging losses and ETA
   (TensorBoard events in the output folder);
3. evaluates on ``shapes_val`` with detectron2's COCOEvaluator;
4. draws predictions on validation images into a PNG and prints where everything is.

A second run resumes from the last checkpoint (so a finished run only re-evaluates).

    dsla-demo [--config-file CFG] [--output DIR] [KEY VALUE ...]    (what make demo runs)
"""
import json
import os
import sys

import numpy as np
from PIL import Image

from detectron2.data import DatasetCatalog

from dsla.cli import exit_on_user_error, load_config, tool_parser
from dsla.engine import argument_parser, main
from dsla.tools import REPO
from dsla.visualization import image_grid, predict_images

DEFAULT_CONFIG = os.path.join(REPO, "configs", "Shapes", "dsla_R_18_FPN_cpu.yaml")


def parse_args(argv=None):
    parser = tool_parser(__doc__, config_default=DEFAULT_CONFIG, register_coco=False)
    parser.add_argument("--output", default=os.path.join(REPO, "output", "demo"), metavar="DIR",
                        help="output folder (checkpoints, logs, metrics, PNG)")
    parser.add_argument("--num-images", type=int, default=8,
                        help="validation images drawn into predictions.png")
    return parser.parse_args(argv)


def draw_validation_predictions(config_file, opts, output_dir, num_images):
    """Draw the final model's predictions on the first ``num_images`` of DATASETS.TEST[0]."""
    weights = os.path.join(output_dir, "model_final.pth")
    cfg = load_config(config_file, list(opts) + ["MODEL.WEIGHTS", weights], require_weights=True)
    dataset = cfg.DATASETS.TEST[0]
    paths = [d["file_name"] for d in DatasetCatalog.get(dataset)[:num_images]]
    # DSLA scores are IoU-coupled quality scores, lower than plain class confidences.
    drawings = predict_images(cfg, paths, dataset_name=dataset, score_threshold=0.2)
    out = os.path.join(output_dir, "predictions.png")
    Image.fromarray(image_grid(drawings, columns=4)).save(out)
    return out


def run(argv=None):
    args = parse_args(argv)
    opts = list(args.opts) + ["OUTPUT_DIR", args.output]
    train_args = argument_parser().parse_args(
        ["--config-file", args.config_file, "--resume", *opts]
    )
    with exit_on_user_error():  # a bad override or data file: one line, not a traceback
        main(train_args)
        png = draw_validation_predictions(args.config_file, opts, args.output, args.num_images)
    with open(os.path.join(args.output, "eval_results.json")) as f:
        bbox = next(iter(json.load(f).values()))
    print("\n==== DSLA demo finished ====")
    print("box AP {AP:.1f} | AP50 {AP50:.1f} | AP75 {AP75:.1f} | APs {APs:.1f} | APm {APm:.1f} | "
          "APl {APl:.1f}".format(**{k: float(np.nan_to_num(v)) for k, v in bbox.items()}))
    print(f"metrics:     {os.path.join(args.output, 'eval_results.json')}")
    print(f"training log: {os.path.join(args.output, 'log.txt')} (per-iteration: metrics.json)")
    print(f"predictions: {png}")
    print(f"checkpoint:  {os.path.join(args.output, 'model_final.pth')}")
    print(f"TensorBoard: tensorboard --logdir {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(run())
