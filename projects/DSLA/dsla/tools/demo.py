"""
``make demo``: the main job on the built-in dataset, end to end on a CPU.

1. generates the ``shapes_easy`` dataset if it is not on disk yet (deterministic, ~15 s);
2. trains DSLA (``configs/Shapes/dsla_R_18_FPN_demo.yaml``) from scratch, logging losses and ETA
   (TensorBoard events in the output folder);
3. evaluates on ``shapes_easy_val`` with detectron2's COCOEvaluator;
4. predicts on the whole validation split: precision and recall of the detections above the
   picture's score threshold (IoU 0.5), and a PNG of the first validation images with ground
   truth (thin white) and predictions (thick, class and score); prints where everything is.

A second run resumes from the last checkpoint (so a finished run only re-evaluates).

    dsla-demo [--config-file CFG] [--output DIR] [KEY VALUE ...]    (what make demo runs)
"""
import json
import os
import sys

from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image

from dsla.analysis import ground_truth_of, instances_from_coco_results, precision_recall
from dsla.cli import exit_on_user_error, load_config, tool_parser
from dsla.engine import argument_parser, main
from dsla.tools import REPO
from dsla.visualization import draw_instances, image_grid

DEFAULT_CONFIG = os.path.join(REPO, "configs", "Shapes", "dsla_R_18_FPN_demo.yaml")


def parse_args(argv=None):
    parser = tool_parser(__doc__, config_default=DEFAULT_CONFIG, register_coco=False)
    parser.add_argument("--output", default=os.path.join(REPO, "output", "demo"), metavar="DIR",
                        help="output folder (checkpoints, logs, metrics, PNG)")
    parser.add_argument("--num-images", type=int, default=8,
                        help="validation images drawn into predictions.png")
    # DSLA scores are IoU-coupled quality scores, lower than plain class confidences, hence 0.4
    # (docs/BENCHMARKS.md, "Calibration", gives the measurements).
    parser.add_argument("--score-threshold", type=float, default=0.4,
                        help="detections drawn, and counted for precision/recall")
    return parser.parse_args(argv)


def evaluate_picture(cfg, num_images, score_threshold):
    """
    From the detections the final evaluation saved (no second inference): precision and recall
    on the whole DATASETS.TEST[0] split of the detections scoring >= ``score_threshold`` (IoU
    0.5), and a picture of the first ``num_images`` with their ground truth (thin white) under
    the predictions (thick, "class score%").

    Returns:
        (path of predictions.png, the precision/recall dict of dsla.analysis.precision_recall)
    """
    dataset = cfg.DATASETS.TEST[0]
    records, metadata = DatasetCatalog.get(dataset), MetadataCatalog.get(dataset)
    saved = os.path.join(cfg.OUTPUT_DIR, "inference", dataset, "coco_instances_results.json")
    with open(saved) as f:
        detections = instances_from_coco_results(json.load(f), records,
                                                 metadata.thing_dataset_id_to_contiguous_id)
    ground_truth = [ground_truth_of(d) for d in records]
    pr = precision_recall(detections, ground_truth, score_threshold, iou_threshold=0.5)
    pr.update(score_threshold=score_threshold, iou_threshold=0.5, dataset=dataset)
    drawings = [draw_instances(read_image(d["file_name"], format="RGB"), inst, metadata,
                               score_threshold, gt_boxes=gt[0], scale=2.0)
                for d, inst, gt in zip(records[:num_images], detections, ground_truth)]
    out = os.path.join(cfg.OUTPUT_DIR, "predictions.png")
    Image.fromarray(image_grid(drawings, columns=4)).save(out)
    with open(os.path.join(cfg.OUTPUT_DIR, "picture_metrics.json"), "w") as f:
        json.dump(pr, f, indent=2)
    return out, pr


def print_summary(output_dir, png, pr):
    with open(os.path.join(output_dir, "eval_results.json")) as f:
        bbox = next(iter(json.load(f).values()))
    print("\n==== DSLA demo finished ====")
    # An AP COCO cannot define (no box of that size) is null in the JSON: shown as "n/a".
    print("box " + " | ".join(
        f"{k} " + ("n/a" if bbox.get(k) is None else f"{bbox[k]:.1f}")
        for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")))
    print(f"picture detections (score >= {pr['score_threshold']}, IoU {pr['iou_threshold']}) on "
          f"{pr['dataset']}: precision {pr['precision']:.3f} "
          f"({pr['true_positives']}/{pr['detections']}), recall {pr['recall']:.3f} "
          f"({pr['true_positives']}/{pr['ground_truth']})")
    print(f"metrics:      {os.path.join(output_dir, 'eval_results.json')}, "
          f"{os.path.join(output_dir, 'picture_metrics.json')}")
    print(f"training log: {os.path.join(output_dir, 'log.txt')} (per-iteration: metrics.json)")
    print(f"predictions:  {png} (ground truth thin white, predictions thick with class and score)")
    print(f"checkpoint:   {os.path.join(output_dir, 'model_final.pth')}")
    print(f"TensorBoard:  tensorboard --logdir {output_dir}")


def run(argv=None):
    args = parse_args(argv)
    opts = list(args.opts) + ["OUTPUT_DIR", args.output]
    train_args = argument_parser().parse_args(
        ["--config-file", args.config_file, "--resume", *opts]
    )
    with exit_on_user_error():  # a bad override or data file: one line, not a traceback
        main(train_args)
        cfg = load_config(args.config_file, opts)
        png, pr = evaluate_picture(cfg, args.num_images, args.score_threshold)
    print_summary(args.output, png, pr)
    return 0


if __name__ == "__main__":
    sys.exit(run())
