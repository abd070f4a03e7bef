"""Score–IoU consistency of trained models, from the detections their COCO evaluation wrote.

A training run of ``projects/DSLA/train_net.py`` ends with a COCO evaluation that writes every
detection to ``<run>/inference/<dataset>/coco_instances_results.json``; this module matches those
detections to the dataset's ground truth and correlates score with IoU, so no second inference
pass is needed. Matching and correlations are ``dsla.analysis``'s (shared with
``tools/analyze_consistency.py``): each detection takes its best IoU with a same-class box.
The headline number is the Spearman correlation over the detections matched to a box (IoU > 0);
the one over all detections (unmatched ones with IoU 0) is reported next to it.

    python benchmarks/consistency.py --name dsla benchmarks/results/runs/dsla_seed0 [RUN ...]

writes ``benchmarks/results/consistency_<name>.json`` and ``consistency_<name>.png``.

Shape letters: D = detections of one image, N = detections of the whole dataset.
"""
import argparse
import json
import os
import sys
from collections import defaultdict
from typing import Dict, Tuple

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS_DIR, log, write_results  # noqa: E402

DEFAULT_DATASET = "shapes_val"


def results_json_of(run_dir: str, dataset_name: str = DEFAULT_DATASET) -> str:
    """Where ``dsla.engine.Trainer``'s COCOEvaluator wrote the detections of ``run_dir``."""
    return os.path.join(run_dir, "inference", dataset_name, "coco_instances_results.json")


def load_detections(results_json: str, dataset_name: str) -> Dict[int, Tuple]:
    """
    Read a COCO results file back into per-image tensors.

    Args:
        results_json: COCO results (``image_id``, ``category_id`` (dataset id), xywh ``bbox``,
            ``score``), as written by detectron2's COCOEvaluator.
        dataset_name: registered dataset, for the dataset-id -> contiguous-class mapping.

    Returns:
        dict image_id -> (boxes Tensor[D, 4] xyxy, scores Tensor[D], classes Tensor[D] long).
    """
    from detectron2.data import MetadataCatalog

    to_contiguous = MetadataCatalog.get(dataset_name).thing_dataset_id_to_contiguous_id
    with open(results_json) as f:
        records = json.load(f)
    per_image = defaultdict(list)
    for r in records:
        x, y, w, h = r["bbox"]
        per_image[r["image_id"]].append((x, y, x + w, y + h, r["score"],
                                         to_contiguous[r["category_id"]]))
    out = {}
    for image_id, rows in per_image.items():
        table = torch.tensor(rows, dtype=torch.float64)
        out[image_id] = (table[:, :4].float(), table[:, 4], table[:, 5].long())
    return out


def score_iou_pairs(run_dir: str, dataset_name: str = DEFAULT_DATASET) -> Tuple[np.ndarray, ...]:
    """
    (score, IoU) of every detection of a run, IoU from ``dsla.analysis.match_detections``.

    Returns:
        scores (ndarray[N]), ious (ndarray[N]); IoU 0 for detections that match no box.
    """
    from detectron2.data import DatasetCatalog

    from dsla.analysis import ground_truth_of, match_detections

    detections = load_detections(results_json_of(run_dir, dataset_name), dataset_name)
    scores, ious = [], []
    # Dataset dicts hold contiguous classes and boxes in original image coordinates, like the
    # COCO results file.
    for record in DatasetCatalog.get(dataset_name):
        if record["image_id"] not in detections:
            continue
        boxes, image_scores, classes = detections[record["image_id"]]
        gt_boxes, gt_classes = ground_truth_of(record)
        image_ious, _ = match_detections(boxes, classes, gt_boxes, gt_classes)
        scores.append(image_scores.numpy())
        ious.append(image_ious.double().numpy())
    if not scores:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(scores), np.concatenate(ious)


def consistency_of(scores: np.ndarray, ious: np.ndarray) -> Dict:
    """
    ``dsla.analysis.correlations_by_rule`` of (score, IoU) pairs [N] (all detections, and
    ``iou_positive``: those matched to a box) plus the headline ``spearman_matched``.
    """
    from dsla.analysis import correlations_by_rule

    result = correlations_by_rule(scores, ious)
    result["spearman_matched"] = result["iou_positive"]["spearman"]
    return result


def plot_consistency(series: Dict[str, Tuple[np.ndarray, np.ndarray]], path: str,
                     title: str) -> None:
    """
    Scatter of score against IoU of the matched detections (IoU > 0), one colour per series
    (e.g. per seed), each labelled with its Spearman correlation.

    Args:
        series: label -> (scores ndarray[N], ious ndarray[N]).
        path: PNG to write.
        title: figure title.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on benchmark machines
    import matplotlib.pyplot as plt

    from dsla.analysis import spearman

    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    for label, (scores, ious) in series.items():
        matched = ious > 0
        rho = spearman(scores[matched], ious[matched])
        ax.scatter(ious[matched], scores[matched], s=3, alpha=0.25, rasterized=True,
                   label=f"{label} (Spearman {rho:.3f}, n={int(matched.sum())})")
    ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("IoU with the matched ground-truth box")
    ax.set_ylabel("detection score")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=7, markerscale=4)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def analyze_model(name: str, run_dirs: Dict[str, str], results_dir: str = RESULTS_DIR,
                  dataset_name: str = DEFAULT_DATASET) -> Dict:
    """
    Consistency of one model trained several times: correlations per run and a scatter plot
    ``<results_dir>/consistency_<name>.png`` with one colour per run.

    Args:
        name: model name used in the file name.
        run_dirs: label (e.g. "seed0") -> run directory.

    Returns:
        dict ``runs``: label -> :func:`consistency_of` result, and ``plot``: PNG file name.
    """
    per_run, series = {}, {}
    for label, run_dir in run_dirs.items():
        scores, ious = score_iou_pairs(run_dir, dataset_name)
        series[label] = (scores, ious)
        per_run[label] = consistency_of(scores, ious)
    os.makedirs(results_dir, exist_ok=True)
    png = os.path.join(results_dir, f"consistency_{name}.png")
    plot_consistency(series, png, f"{name}: score vs IoU on {dataset_name}")
    return {"runs": per_run, "plot": os.path.basename(png)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", help="training output directories")
    parser.add_argument("--name", required=True, help="model name for the output files")
    parser.add_argument("--dataset", default=DEFAULT_DATASET, help="registered test dataset")
    parser.add_argument("--output-dir", default=RESULTS_DIR)
    args = parser.parse_args(argv)
    import dsla  # noqa: F401  (registers the shapes datasets)

    # Label each run by its directory name, or by its path where two names are the same
    # (shapes/dsla/seed1_x3 and crowded/dsla/seed1_x3) so that no run is dropped.
    names = [os.path.basename(os.path.normpath(d)) for d in args.run_dirs]
    runs = {(n if names.count(n) == 1 else os.path.normpath(d)): d
            for n, d in zip(names, args.run_dirs)}
    missing = [results_json_of(d, args.dataset) for d in runs.values()
               if not os.path.isfile(results_json_of(d, args.dataset))]
    if missing:  # a wrong or unfinished run directory: the user's input, so one line
        raise SystemExit(f"error: no detections of {args.dataset} at {', '.join(missing)} "
                         "(the run's final COCO evaluation writes them)")
    result = analyze_model(args.name, runs, args.output_dir, args.dataset)
    def fmt(value):
        return "n/a" if value is None else f"{value:.3f}"

    lines = [f"- {label}: Spearman (matched) {fmt(r['spearman_matched'])} over "
             f"{r['iou_positive']['num_detections']} detections, all detections "
             f"{fmt(r['spearman'])} over {r['num_detections']}\n"
             for label, r in result["runs"].items()]
    write_results(f"consistency_{args.name}", result, "".join(lines), args.output_dir)
    log(f"plot: {os.path.join(args.output_dir, result['plot'])}")


if __name__ == "__main__":
    main()
