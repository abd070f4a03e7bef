"""Why the comparison's targets come out as they do: evidence from its finished runs.

Reads the runs of ``benchmarks/comparison.py`` (it trains nothing) and measures, per detector:

* **the NMS claim taken apart** (``dsla.analysis.nms_candidate_clusters``): for each
  ground-truth box, its cluster of pre-NMS candidates (same class, IoU >= 0.5); the cluster size;
  the IoU lost by keeping the highest score (the comparison's metric); the IoU a *random* pick
  would lose (best - mean IoU of the cluster: the chance level, which grows with the cluster
  size); the fraction of that chance loss the scores avoid (1 - lost / chance); and the
  score-IoU Spearman inside clusters of >= 3 candidates. The IoU lost is also split by cluster
  size, so that detectors are compared on boxes with as many candidates;
* **per-level recall**: ground-truth boxes binned by the FPN level their centre point is
  assigned to (max(w, h) / 2 against ``MODEL.DSLA.REGRESS_RANGES``), and per bin the recall at
  IoU 0.5 and 0.75 of the final detections (those COCOEvaluator saved) and their mean best IoU;
* **the positives by the source of their label**: each model labels the test set's points as
  in training; DSLA's positives are split into those that are positive without the interval
  relaxation (``unrelaxed``; plain FCOS's are all of this kind) and those positive only because
  of it, with their q*, the IoU of their boxes and their scores; and, per box, the IoU NMS would
  lose if the relaxation-only points were not candidates;
* **the training signal over training**: positives per image and mean IoU of the positives'
  predicted boxes, from the ``metrics.json`` of the runs that log them, as curves.

    python benchmarks/investigate.py                 # shapes, 1x runs: investigation.{json,md,png}
    python benchmarks/investigate.py --dataset crowded

Each run's numbers are cached next to the report (``<output-dir>/investigation/``) under the
run's config hash, so a re-run after more runs finish only analyses the new ones.
"""
import argparse
import json
import math
import os
import sys
from collections import defaultdict
from typing import Dict, List

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS_DIR, log, markdown_table, set_threads, write_results  # noqa: E402
import comparison  # noqa: E402

LEVELS = ("P3", "P4", "P5", "P6", "P7")
# Bump when a statistic changes, so that cached analyses are recomputed.
STATISTICS_VERSION = 2
CLUSTER_BINS = ((1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 6), (7, 9), (10, 10 ** 9))


def fpn_level(boxes, regress_ranges) -> np.ndarray:
    """
    Index of the FPN level whose regress range holds max(w, h) / 2, the largest distance from
    the box's exact centre to its sides. An approximation of where the box is learnt: the grid
    points near the centre have slightly larger distances, and the ranges include both ends.

    Args:
        boxes (array[G, 4]): xyxy. regress_ranges: [[lo, hi]] per level, in pixels.

    Returns:
        array[G] int: level index (0 = P3).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    half = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) / 2
    upper = np.array([hi for _, hi in regress_ranges[:-1]], dtype=np.float64)
    return np.searchsorted(upper, half, side="left")


def _final_detections(spec: Dict):
    """The run's saved final detections, as Instances per record of its test set."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from dsla.analysis import instances_from_coco_results

    test_set = spec["test_set"]
    path = os.path.join(spec["run_dir"], "inference", test_set, "coco_instances_results.json")
    with open(path) as f:
        results = json.load(f)
    records = DatasetCatalog.get(test_set)
    id_map = MetadataCatalog.get(test_set).thing_dataset_id_to_contiguous_id
    return dict(zip([r["image_id"] for r in records],
                    instances_from_coco_results(results, records, id_map)))


def per_box_rows(spec: Dict) -> Dict[str, List[float]]:
    """
    One row per ground-truth box of the run's test set: level, cluster statistics and the best
    IoU of a same-class final detection.

    Returns:
        dict of lists of length G_total: ``level``, ``count``, ``kept_iou``, ``best_iou``,
        ``mean_iou``, ``spearman`` (NaN where undefined), ``final_iou`` (0 with no detection).
    """
    import torch
    from detectron2.data.transforms import ResizeShortestEdge
    from detectron2.structures import pairwise_iou, Boxes

    from dsla.analysis import ground_truth_of, nms_candidate_clusters
    from dsla.cli import load_config

    cfg = load_config(os.path.join(spec["run_dir"], "config.yaml"), [])
    ranges = [list(r) for r in cfg.MODEL.DSLA.REGRESS_RANGES]
    finals = _final_detections(spec)
    rows = defaultdict(list)
    for record, inst in comparison.pre_nms_detections(spec["run_dir"], spec["test_set"]):
        gt_boxes, gt_classes = ground_truth_of(record)
        # Levels are decided in the resized image the model sees (the ranges are in its pixels).
        resized_h, _ = ResizeShortestEdge.get_output_shape(
            record["height"], record["width"], cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
        rows["level"] += fpn_level(gt_boxes.numpy() * resized_h / record["height"],
                                   ranges).tolist()
        clusters = nms_candidate_clusters(inst.pred_boxes.tensor, inst.scores,
                                          inst.pred_classes, gt_boxes, gt_classes)
        final = finals[record["image_id"]]
        iou = pairwise_iou(Boxes(gt_boxes), final.pred_boxes)  # [G, D]
        same = gt_classes[:, None] == final.pred_classes[None, :]
        best_final = torch.where(same, iou, torch.zeros_like(iou)).max(dim=1).values \
            if iou.shape[1] else torch.zeros(len(gt_boxes))
        rows["final_iou"] += best_final.tolist()
        for key, values in clusters.items():
            rows[key] += values.tolist()
    return dict(rows)


def _mean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def run_statistics(rows: Dict[str, List[float]]) -> Dict:
    """
    The investigation's numbers of one run from its :func:`per_box_rows` (lists of length
    G_total): over boxes with a cluster, mean cluster size, IoU lost, chance IoU lost, share of
    the chance loss avoided (ratio of the sums), mean in-cluster Spearman; the IoU lost per
    cluster size (``by_cluster_size``); recall, mean best IoU and cluster size per FPN level
    (``by_level``).
    """
    r = {k: np.asarray(v, dtype=np.float64) for k, v in rows.items()}
    has = r["count"] > 0
    lost, chance = (r["best_iou"] - r["kept_iou"])[has], (r["best_iou"] - r["mean_iou"])[has]
    out = {
        "num_gt": int(len(r["count"])),
        "cluster_size": float(r["count"][has].mean()),
        "iou_lost": float(lost.mean()),
        "chance_iou_lost": float(chance.mean()),
        "chance_loss_avoided": float(1 - lost.sum() / chance.sum()) if chance.sum() else None,
        "cluster_spearman": _mean(r["spearman"][has]),
        "by_cluster_size": {}, "by_level": {},
    }
    for lo, hi in CLUSTER_BINS:
        sel = has & (r["count"] >= lo) & (r["count"] <= hi)
        label = str(lo) if lo == hi else (f"{lo}-{hi}" if hi < 10 ** 9 else f">={lo}")
        out["by_cluster_size"][label] = {
            "boxes": int(sel.sum()),
            "iou_lost": float((r["best_iou"] - r["kept_iou"])[sel].mean()) if sel.any() else None}
    for index, name in enumerate(LEVELS):
        sel = r["level"] == index
        if sel.any():
            out["by_level"][name] = {
                "boxes": int(sel.sum()), "recall_50": float((r["final_iou"][sel] >= 0.5).mean()),
                "recall_75": float((r["final_iou"][sel] >= 0.75).mean()),
                "final_iou": float(r["final_iou"][sel].mean()),
                "cluster_size": float(r["count"][sel & has].mean()) if (sel & has).any()
                else None}
    return out


def _cache_key(spec: Dict) -> Dict:
    """What a cached analysis must match: this code's version, the run's config and weights."""
    weights = os.path.join(spec["run_dir"], "model_final.pth")
    return {"version": STATISTICS_VERSION, "config_hash": spec["config_hash"],
            "weights_mtime": os.path.getmtime(weights)}


def analysed(spec: Dict, cache_dir: str) -> Dict:
    """:func:`run_statistics` and :func:`zone_statistics` (``zones``, None for detectron2's
    FCOS, which labels points its own way) of a finished run, cached."""
    path = os.path.join(cache_dir, spec["dataset"], spec["model"],
                        os.path.basename(spec["run_dir"]) + ".json")
    key = _cache_key(spec)
    if os.path.isfile(path):
        with open(path) as f:
            cached = json.load(f)
        if cached.get("key") == key:
            return cached["statistics"]
    log(f"analysing {comparison.run_label(spec)}")
    stats = run_statistics(per_box_rows(spec))
    stats["zones"] = None if spec["model"] == "fcos" else zone_statistics(zone_rows(spec))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"key": key, "statistics": stats}, f, indent=1)
    return stats


# ----------------------------------------------------------------------------------------------
# DSLA's positives split by where their label comes from (trained model on the test set).
# ----------------------------------------------------------------------------------------------


def _dense_outputs(model, inputs):
    """Every point's box and per-class score (as inference ranks them), and the anchors, of one
    test image (DSLA or plain FCOS).

    Returns:
        anchors (L Boxes [Pi, 4]), boxes [P, 4] xyxy (resized image), scores [P, C].
    """
    from detectron2.layers import cat

    images = model.preprocess_image(inputs)
    features = model.backbone(images.tensor)
    features = [features[f] for f in model.head_in_features]
    predictions = model.head(features)
    # Plain FCOS's head adds centerness logits; its score is cls x centerness (dsla.fcos_plain).
    dims = [model.num_classes, 4, 1][:len(predictions)]
    outputs = model._transpose_dense_predictions(predictions, dims)
    anchors = model.anchor_generator(features)
    points = cat([a.tensor for a in anchors])
    boxes = model.box2box_transform.apply_deltas(cat(outputs[1], dim=1)[0], points)
    scores = cat(outputs[0], dim=1)[0].sigmoid()
    if len(outputs) == 3:
        scores = scores * cat(outputs[2], dim=1)[0].sigmoid()
    return anchors, boxes, scores


def _resized_gt(record, image_size):
    """The record's ground truth as Instances in the coordinates of the resized test image."""
    import torch
    from detectron2.structures import Boxes, Instances

    from dsla.analysis import ground_truth_of

    boxes, classes = ground_truth_of(record)
    scale = torch.tensor([image_size[1] / record["width"], image_size[0] / record["height"]] * 2)
    return Instances(image_size, gt_boxes=Boxes(boxes * scale), gt_classes=classes)


def zone_rows(spec: Dict) -> Dict[str, List[float]]:
    """
    The test set's points, labelled as in training by the model's own ``label_points`` (DSLA's
    smooth labels or plain FCOS's hard ones), each positive marked by the source of its label:
    ``unrelaxed`` (also positive with relaxation factor 0; all of plain FCOS's) or
    ``relaxation`` (positive only because the regress ranges are relaxed). For the positives:
    q* (plain FCOS: its centerness target), the IoU of the predicted box with g*, the score for
    g*'s class (what NMS ranks). For the ground-truth boxes: :func:`_cluster_counterfactual`.

    Returns:
        dict of lists; length K_total (positives): ``relaxed`` (0/1), ``q``, ``iou``,
        ``score``; length G_total (boxes): ``lost_all``, ``lost_without``, ``share_relaxed``,
        ``kept_relaxed``; ``images``: [number of images].
    """
    import torch
    from detectron2.data import DatasetCatalog, build_detection_test_loader
    from detectron2.structures import Boxes
    from detectron2.structures.boxes import matched_pairwise_iou

    cfg, model = comparison.load_final_model(spec["run_dir"])
    records = {r["image_id"]: r for r in DatasetCatalog.get(spec["test_set"])}
    rows, relaxation = defaultdict(list), model.relaxation_factor
    with torch.no_grad():
        for inputs in build_detection_test_loader(cfg, spec["test_set"]):
            gt = _resized_gt(records[inputs[0]["image_id"]], tuple(inputs[0]["image"].shape[-2:]))
            anchors, boxes, scores = _dense_outputs(model, inputs)
            labels, q, matched = (x[0] for x in model.label_points(anchors, [gt]))
            model.relaxation_factor = 0.0
            unrelaxed = model.label_points(anchors, [gt])[0][0]
            model.relaxation_factor = relaxation
            pos = labels != model.num_classes
            relaxed_only = pos & (unrelaxed == model.num_classes)  # [P]
            rows["relaxed"] += relaxed_only[pos].float().tolist()
            rows["q"] += q[pos].tolist()
            rows["iou"] += matched_pairwise_iou(Boxes(boxes[pos]), Boxes(matched[pos])).tolist()
            rows["score"] += scores[pos, labels[pos]].tolist()
            for key, values in _cluster_counterfactual(gt, boxes, scores, relaxed_only,
                                                       model.test_score_thresh).items():
                rows[key] += values.tolist()
    rows["images"] = [len(records)]
    return dict(rows)


def _cluster_counterfactual(gt, boxes, scores, relaxed_only, score_thresh: float) -> Dict:
    """
    Per ground-truth box, its cluster among *all* points (every point whose score for the box's
    class is above ``score_thresh`` and whose box has IoU >= 0.5; the per-level top-k before NMS
    is ignored), and the IoU lost by keeping the highest score with and without the points that
    are positive only because of the relaxation: what NMS would lose if those points had not
    become candidates.

    Args:
        gt: Instances with ``gt_boxes`` [G, 4], ``gt_classes`` [G]; boxes [P, 4]; scores [P, C];
            relaxed_only [P] bool.

    Returns:
        dict of Tensor[G]: ``lost_all``, ``lost_without`` (NaN where that cluster is empty),
        ``share_relaxed`` (of the cluster's members), ``kept_relaxed`` (1 if the kept member is
        relaxation-only; NaN for an empty cluster).
    """
    import torch
    from detectron2.structures import Boxes, pairwise_iou

    iou = pairwise_iou(gt.gt_boxes, Boxes(boxes))  # [G, P]
    box_scores = scores[:, gt.gt_classes].T  # [G, P]
    valid = (iou >= 0.5) & (box_scores > score_thresh)
    nan = torch.tensor(float("nan"))
    out = {}
    for key, members in (("lost_all", valid), ("lost_without", valid & ~relaxed_only[None])):
        kept_idx = torch.where(members, box_scores, -torch.inf).argmax(dim=1)  # [G]
        kept = iou.gather(1, kept_idx[:, None]).squeeze(1)
        best = torch.where(members, iou, torch.zeros_like(iou)).max(dim=1).values
        out[key] = torch.where(members.any(dim=1), best - kept, nan)
        if key == "lost_all":
            out["kept_relaxed"] = torch.where(members.any(dim=1),
                                              relaxed_only[kept_idx].float(), nan)
    count = valid.sum(dim=1).float()
    out["share_relaxed"] = torch.where(count > 0, (valid & relaxed_only[None]).sum(dim=1) / count,
                                       nan)
    return out


def zone_statistics(rows: Dict[str, List[float]]) -> Dict:
    """
    From :func:`zone_rows`: per source of the label (``unrelaxed``, ``relaxation``) the
    positives per image, mean q*, IoU, score, and the share whose box has IoU < 0.5 but scores
    >= 0.05 (a candidate that reaches NMS with a poor box); and ``clusters``: over boxes whose
    cluster is not empty either way, the mean IoU lost with and without the relaxation-only
    points, their mean share of a cluster and how often NMS keeps one.
    """
    r = {k: np.asarray(v, dtype=np.float64) for k, v in rows.items()}
    out = {}
    for name, sel in (("unrelaxed", r["relaxed"] == 0), ("relaxation", r["relaxed"] == 1)):
        out[name] = {"per_image": float(sel.sum() / r["images"][0]),
                     **{k: float(r[k][sel].mean()) if sel.any() else None
                        for k in ("q", "iou", "score")},
                     "poor_but_scored": float(((r["iou"] < 0.5) & (r["score"] >= 0.05))[sel].mean())
                     if sel.any() else None}
    both = ~np.isnan(r["lost_all"]) & ~np.isnan(r["lost_without"])
    means = {"lost_all": "lost_all", "lost_without_relaxation": "lost_without",
             "share_relaxed": "share_relaxed", "kept_relaxed": "kept_relaxed"}
    out["clusters"] = {"boxes": int(both.sum()),
                       **{k: float(r[v][both].mean()) if both.any() else None
                          for k, v in means.items()}}
    return out


# ----------------------------------------------------------------------------------------------
# Training signal over training (from metrics.json).
# ----------------------------------------------------------------------------------------------

# Scalar names per detector family: positives per image, mean IoU of the positives' boxes.
SIGNAL_SCALARS = {
    "num_pos_per_image": ("dsla/num_pos_per_image", "fcos/num_pos_per_image", "num_pos_anchors"),
    "pos_iou_mean": ("dsla/pos_iou_mean", "fcos/pos_iou_mean"),
}


def signal_curves(run_dir: str, window: int = 10) -> Dict[str, Dict[str, List[float]]]:
    """
    ``{scalar: {"iter": [...], "value": [...]}}`` of the SIGNAL_SCALARS the run logs, as
    running means over ``window`` logged points (the per-batch values are noisy).
    """
    by_iter = {}
    with open(os.path.join(run_dir, "metrics.json")) as f:
        for line in f:
            row = json.loads(line)
            # A resumed run logs its last iterations again: keep the latest of each.
            by_iter[row.get("iteration")] = {**by_iter.get(row.get("iteration"), {}), **row}
    rows = [by_iter[i] for i in sorted(i for i in by_iter if i is not None)]
    curves = {}
    for name, keys in SIGNAL_SCALARS.items():
        points = [(r["iteration"] + 1, r[k]) for r in rows for k in keys if k in r]
        if len(points) >= window:
            it, value = zip(*points)
            smooth = np.convolve(value, np.ones(window) / window, mode="valid")
            curves[name] = {"iter": list(it[window - 1:]), "value": smooth.tolist()}
    return curves


def plot_signal(curves: Dict[str, Dict[int, Dict]], path: str) -> None:
    """Positives per image and IoU of the positives against iteration, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), dpi=100)
    colours = dict(zip(comparison.MAIN_MODELS, plt.get_cmap("tab10").colors))
    titles = {"num_pos_per_image": "positives per image (running mean)",
              "pos_iou_mean": "mean IoU of the positives' predicted boxes"}
    for ax, (name, title) in zip(axes, titles.items()):
        for model, by_seed in curves.items():
            for seed, c in sorted(by_seed.items()):
                if name in c:
                    ax.plot(c[name]["iter"], c[name]["value"], color=colours[model], linewidth=1,
                            label=comparison.MODELS[model][2] if seed == min(by_seed) else None)
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Summary over seeds and report.
# ----------------------------------------------------------------------------------------------


def _spread(values) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ({min(values):.3f}–{max(values):.3f})"


def _nms_table(runs: Dict[str, List[Dict]], seeds: Dict[str, str]) -> str:
    """The NMS claim taken apart: the kept candidate against a random pick, per detector."""
    return markdown_table(
        ["detector", "seeds", "candidates per box", "IoU lost (kept)", "IoU lost (random pick)",
         "chance loss avoided", "Spearman in cluster"],
        [[_name(m), seeds[m], *[_spread([r[k] for r in runs[m]]) for k in
          ("cluster_size", "iou_lost", "chance_iou_lost", "chance_loss_avoided",
           "cluster_spearman")]] for m in runs])


def _cluster_size_table(runs: Dict[str, List[Dict]]) -> str:
    """The IoU lost per cluster size; [n] = boxes in the bin, summed over seeds."""
    bins = list(next(iter(runs.values()))[0]["by_cluster_size"])
    return markdown_table(
        ["detector", *[f"{b} candidates" for b in bins]],
        [[_name(m), *[_spread([r["by_cluster_size"][b]["iou_lost"] for r in runs[m]]) +
                      f" [{sum(r['by_cluster_size'][b]['boxes'] for r in runs[m])}]"
                      for b in bins]] for m in runs])


def _level_table(runs: Dict[str, List[Dict]]) -> str:
    """Recall, mean best IoU and cluster size of the final detections per FPN level."""
    rows = []
    for level in LEVELS:
        for m in runs:
            per = [r["by_level"][level] for r in runs[m] if level in r["by_level"]]
            if per:
                rows.append([level, per[0]["boxes"], _name(m),
                             *[_spread([p[k] for p in per]) for k in
                               ("recall_50", "recall_75", "final_iou", "cluster_size")]])
    return markdown_table(["level", "boxes", "detector", "recall IoU 0.5", "recall IoU 0.75",
                           "mean best IoU", "candidates per box"], rows)


def _zone_tables(runs: Dict[str, List[Dict]]) -> str:
    """The positives by the source of their label, and NMS without the relaxation-only ones."""
    rows, counter = [], []
    for m in runs:
        zones = [r["zones"] for r in runs[m] if r.get("zones")]
        for zone in ("unrelaxed", "relaxation"):
            if zones and zones[0][zone]["per_image"]:
                rows.append([_name(m), zone, *[_spread([z[zone][k] for z in zones]) for k in
                                               ("per_image", "q", "iou", "score",
                                                "poor_but_scored")]])
        if zones and zones[0]["relaxation"]["per_image"]:
            counter.append([_name(m), *[_spread([z["clusters"][k] for z in zones]) for k in
                                        ("share_relaxed", "kept_relaxed", "lost_all",
                                         "lost_without_relaxation")]])
    return (markdown_table(["detector", "label", "positives per image", "mean q*",
                            "IoU of their boxes", "mean score", "IoU < 0.5 with score >= 0.05"],
                           rows)
            + "\n\n**NMS without the relaxation-only points**: each box's cluster among all "
            "points (score above the threshold, IoU >= 0.5), with and without the points that "
            "are positive only because of the relaxation\n\n"
            + markdown_table(["detector", "relaxation-only share of a cluster",
                              "kept candidate relaxation-only", "IoU lost (all points)",
                              "IoU lost (without them)"], counter))


def _name(model: str) -> str:
    return comparison.MODELS[model][2]


def render_markdown(dataset: str, factor: str, stats: Dict[str, Dict[int, Dict]]) -> str:
    """The investigation's tables and its figure, for docs/BENCHMARKS.md."""
    runs = {m: list(stats[m].values()) for m in comparison.MAIN_MODELS if m in stats}
    seeds = {m: ", ".join(str(s) for s in sorted(stats[m])) for m in runs}
    name_png = f"investigation_{dataset}_x{factor.rstrip('x')}_signal.png"
    return (f"Runs of `benchmarks/comparison.py` on `{dataset}` at the {factor} schedule; mean "
            "(min–max) over the seeds listed.\n\n"
            "**NMS: what the scores keep, against a random pick from the same cluster**\n\n"
            + _nms_table(runs, seeds)
            + "\n\n**IoU lost by NMS, by cluster size** (boxes with as many candidates; [n] = "
            "boxes in the bin over all seeds)\n\n" + _cluster_size_table(runs)
            + "\n\n**Per FPN level** (the level of the box's centre point): the final "
            "detections\n\n" + _level_table(runs)
            + "\n\n**The positive points on the test set**, labelled as in training by each "
            "model's own rule, split by the source of the label (unrelaxed: positive with "
            "relaxation factor 0 too; relaxation: positive only because DSLA relaxes the "
            "regress ranges; q* is plain FCOS's centerness target); score = what NMS ranks "
            "(DSLA: the class probability; plain FCOS: cls × centerness, not comparable with "
            "DSLA's)\n\n" + _zone_tables(runs)
            + f"\n\n![positives and their IoU over training]({name_png})\n\n"
            "Positives per image and the mean IoU of their predicted boxes over training "
            "(running means; detectron2's FCOS logs only the former).\n")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=sorted(comparison.DATASETS), default="shapes")
    parser.add_argument("--factor", type=float, default=1.0, help="schedule factor of the runs")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads")
    parser.add_argument("--output-dir", default=RESULTS_DIR,
                        help="where the comparison's runs are (<output-dir>/runs) and the "
                        "report goes")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    set_threads(args.threads)
    import dsla  # noqa: F401  (registers the datasets and models)

    runs_dir = os.path.join(args.output_dir, "runs")
    plan = comparison.PLAN + comparison.QUICK_PLAN
    specs = [s for s in comparison.planned_specs(runs_dir, plan)
             if s["dataset"] == args.dataset and s["factor"] == args.factor
             and s["model"] in comparison.MAIN_MODELS and comparison.is_done(s)]
    # A run restored from a report (comparison.py --restore) has no checkpoint to reload here.
    restored = [s for s in specs if "restored_from" in comparison.read_record(s)]
    if restored:
        log(f"skipped {len(restored)} runs restored from a report, no checkpoint here (train them "
            f"again to investigate them): " + ", ".join(comparison.run_label(s) for s in restored))
    specs = [s for s in specs if s not in restored]
    if not specs:
        raise SystemExit(f"No finished {args.dataset} runs at {args.factor:g}x with their "
                         f"checkpoints in {runs_dir}.")
    cache = os.path.join(args.output_dir, "investigation")
    stats, curves = defaultdict(dict), defaultdict(dict)
    for spec in specs:
        stats[spec["model"]][spec["seed"]] = analysed(spec, cache)
        curves[spec["model"]][spec["seed"]] = signal_curves(spec["run_dir"])
    name = f"investigation_{args.dataset}_x{args.factor:g}"
    plot_signal(curves, os.path.join(args.output_dir, f"{name}_signal.png"))
    write_results(name, {"dataset": args.dataset, "factor": args.factor, "runs": stats},
                  render_markdown(args.dataset, f"{args.factor:g}x", stats), args.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
