"""
Does the score rank boxes by localisation quality? Score-IoU consistency of a trained model.

Runs the model on a dataset (detectron2's test loader and ``inference_on_dataset``), evaluates
COCO box AP, and matches every detection to the ground-truth box of its class that it overlaps
most (IoU 0 if none; all detections above the model's score threshold are kept, see
``dsla.analysis``). Writes to DIR:

    consistency.json   Spearman and Pearson correlation of score vs IoU (all detections, and
                       those with IoU > 0), number of detections, COCO AP numbers
    score_vs_iou.png   scatter of score against IoU, with the mean score per IoU bin
    coco_eval/         COCOEvaluator's files (detections in COCO json format)

An existing, non-empty DIR is replaced only with --overwrite.

    dsla-analyze-consistency \\
        --config-file configs/Shapes/dsla_R_18_FPN_demo.yaml --dataset shapes_easy_val \\
        --output out/consistency MODEL.WEIGHTS output/demo/model_final.pth
"""
import os
import sys
from typing import Dict

import numpy as np
from matplotlib.figure import Figure  # files only: no pyplot, no GUI backend

from detectron2.data import DatasetCatalog, DatasetMapper, build_detection_test_loader
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators, inference_on_dataset
from detectron2.utils.logger import setup_logger

import dsla  # noqa: F401  (registers the meta-architectures and the built-in datasets)
from dsla.analysis import ScoreIoUEvaluator
from dsla.cli import (
    exit_on_user_error,
    json_safe,
    load_config,
    load_model,
    register_datasets,
    tool_parser,
    write_json,
)
from dsla.errors import UserError
from dsla.outputs import add_overwrite_argument, check_output_path

IOU_BINS = np.linspace(0.0, 1.0, 11)


def parse_args(argv=None):
    parser = tool_parser(__doc__, weights="MODEL.WEIGHTS is required",
                         output_help="folder for consistency.json, score_vs_iou.png, coco_eval/")
    add_overwrite_argument(parser)
    parser.add_argument("--dataset", default=None,
                        help="registered dataset (default: the config's DATASETS.TEST[0])")
    return parser.parse_args(argv)


def evaluate(cfg, model, dataset: str, output_dir: str):
    """
    Run ``model`` (eval mode, the weights of ``cfg``) on ``dataset``.

    Returns:
        results (dict: ``bbox`` COCO metrics, ``consistency`` correlations) and the
        :class:`ScoreIoUEvaluator` holding the per-detection ``scores`` / ``ious`` ([N]).
    """
    dicts = DatasetCatalog.get(dataset)
    if not dicts:
        raise UserError(f"dataset '{dataset}' has no images")
    loader = build_detection_test_loader(dicts, mapper=DatasetMapper(cfg, is_train=False),
                                         num_workers=cfg.DATALOADER.NUM_WORKERS)
    pairs = ScoreIoUEvaluator(dicts)
    coco = COCOEvaluator(dataset, tasks=("bbox",), output_dir=os.path.join(output_dir, "coco_eval"))
    results = inference_on_dataset(model, loader, DatasetEvaluators([coco, pairs]))
    return results, pairs


def plot_score_vs_iou(scores: np.ndarray, ious: np.ndarray, summary: Dict, title: str):
    """
    Args:
        scores, ious: [N] per detection. summary: ``correlations_by_rule`` output.
        title: first title line.

    Returns:
        a matplotlib Figure: scatter (IoU on x, score on y) plus the mean score per IoU bin.
    """
    fig = Figure(figsize=(5.0, 4.2), layout="constrained")
    ax = fig.subplots()
    ax.scatter(ious, scores, s=4, alpha=0.35, color="tab:blue", lw=0, label="detection")
    bins = np.clip(np.digitize(ious, IOU_BINS[1:-1]), 0, len(IOU_BINS) - 2)
    centres = (IOU_BINS[:-1] + IOU_BINS[1:]) / 2
    means = [scores[bins == b].mean() if np.any(bins == b) else np.nan for b in range(len(centres))]
    ax.plot(centres, means, "o-", color="tab:red", ms=4, label="mean score per IoU bin")
    ax.set(xlim=(-0.02, 1.02), ylim=(0, 1.02), xlabel="IoU with best same-class ground truth",
           ylabel="detection score")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(f"{title}\nN = {summary['num_detections']}, Spearman {_fmt(summary['spearman'])}"
                 f", Pearson {_fmt(summary['pearson'])}", fontsize=9)
    return fig


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def run(args) -> Dict:
    cfg = load_config(args.config_file, args.opts, require_weights=True)
    register_datasets(args)
    dataset = args.dataset or (cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else None)
    if not dataset:
        raise UserError("no dataset: pass --dataset NAME (the config has no DATASETS.TEST)")
    if dataset not in DatasetCatalog.list():
        raise UserError(f"unknown dataset '{dataset}' (not registered in DatasetCatalog)")
    check_output_path(args.output, overwrite=args.overwrite, kind="folder")
    model, _ = load_model(cfg)  # strict: weights that do not fit stop before anything is written
    os.makedirs(args.output, exist_ok=True)
    results, pairs = evaluate(cfg, model, dataset, args.output)
    report = json_safe({
        "dataset": dataset,
        "config_file": args.config_file,
        "weights": cfg.MODEL.WEIGHTS,
        **results["consistency"],
        "coco_bbox": {k: float(v) for k, v in results.get("bbox", {}).items()},
    })
    write_json(os.path.join(args.output, "consistency.json"), report)
    fig = plot_score_vs_iou(pairs.scores, pairs.ious, report, f"{dataset}: score vs IoU")
    fig.savefig(os.path.join(args.output, "score_vs_iou.png"), dpi=80)
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logger(name="detectron2", abbrev_name="d2")  # progress and the COCO AP table
    with exit_on_user_error():
        report = run(args)
    bbox = report["coco_bbox"]
    print(f"{report['num_detections']} detections: Spearman {_fmt(report['spearman'])}, "
          f"Pearson {_fmt(report['pearson'])}; box AP {_fmt(bbox.get('AP'))}")
    print(f"Wrote {os.path.join(args.output, 'consistency.json')} and score_vs_iou.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
