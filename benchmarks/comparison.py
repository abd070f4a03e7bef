"""DSLA against FCOS: a controlled comparison with a convergence check, on the built-in datasets.

Phase 1 of the protocol below (``PHASE1``) was fixed and committed before any DSLA-vs-FCOS
number of it was looked at; phase 2 (``PHASE2``) after 32 of phase 1's 34 runs and their
verdicts were known, before any run of it. The data and the recipe are those ``make demo``
trained until 2026-12-03 (``shapes``, ``configs/Shapes/dsla_R_18_FPN_cpu.yaml``; the demo has
trained on ``shapes_easy`` since), calibrated on DSLA alone. Do not change them to move a
result.

* **Four detectors**, one config each, same backbone (R-18-BN FPN, 64 channels), widths, data,
  schedule and seeds; only the meta-architecture / head options differ:
  ``fcos_plain`` (the FCOS the paper modifies: centerness branch on the classification tower,
  focal loss, IoU loss, no centre sampling, exp distances, score = cls x centerness),
  ``fcos`` (detectron2's FCOS: FCOS "with tricks"), ``dsla`` (the authors' R-50 1x head
  options) and ``dsla_tricks`` (the R-101 / Swin-S head options: GIoU, NORM_ON_BBOX, centre
  sampling 1.5, conv bias).
* **Runs**, phase 1 (``PHASE1``): on ``shapes`` the four detectors x seeds 0, 1, 2 at the
  recipe's schedule, each detector once more (seed 0) at 1.5x the schedule (lr steps scaled
  alike, warm-up unchanged) to show convergence; the ablation ladder (hard labels -> core
  zone -> relaxation; + coupling = ``dsla``) x seeds 0, 1; on the second dataset ``crowded``
  the four detectors x seeds 0, 1 and each once at 1.5x. Every run's heads get its training
  set's class count (``num_classes_opts``: 4 on ``shapes``, 5 on ``crowded``).
* **Runs**, phase 2 (``PHASE2``): phase 1 showed that 1.5x adds 2.0-3.3 AP to every detector on
  ``shapes`` and 3.8-6.1 AP to the two FCOS variants on ``crowded``, so 1x is not converged.
  Per dataset: the four detectors at 3x the schedule, seed 0; then their 4.5x checks (seed 0);
  then the other seeds at 3x; plain FCOS and DSLA first in each group. The targets are judged at
  3x too (``SCHEDULES``), beside the 1x verdicts; the 3x verdicts answer the question if every
  4.5x check adds at most 1 AP, otherwise neither schedule is converged and both are reported so.
  The ladder stays at 1x (not converged).
* **Curves**: COCO evaluation after every quarter of the schedule (``EVALS_PER_RUN``).
* **Metrics** per run: COCO AP, AP50, AP75, APs/m/l of the final model; Spearman rank
  correlation of score and IoU over the final detections matched to a same-class box; and the
  NMS claim directly: for each ground-truth box, among the model's pre-NMS candidates of its
  class with IoU >= 0.5, the IoU of the highest-scoring one (the one NMS keeps) against the best
  IoU among them: the mean IoU lost and the fraction of boxes losing >= 0.05
  (``dsla.analysis.nms_localisation_gap``).
* **Summary**: per detector and dataset, mean and min-max over seeds; per seed the paired
  differences dsla - fcos_plain and dsla_tricks - fcos; the targets (the paper's claims at our
  scale): mean DSLA >= mean FCOS-plain + 1.0 AP with DSLA ahead in every seed; mean DSLA-tricks
  >= mean FCOS (tricks); DSLA's mean IoU lost in NMS smaller than both FCOS variants'; and
  1.5x the schedule adds at most 1 AP for every detector; each judged at 1x and at 3x.

Runs are cached per (dataset, model, seed, schedule) under ``<output-dir>/runs/`` with the hash of
their full config; a re-run only trains what is missing (an interrupted run resumes from its
last checkpoint), so the table can be completed over several sittings. The cache is not
committed: on a new machine ``--restore`` re-creates the records of the runs a written report
holds (config unchanged), so only the missing runs are trained.

    python benchmarks/comparison.py                      # everything (about a day on 2 cores)
    python benchmarks/comparison.py --jobs 2 --threads 1 # two 1-thread runs at a time
    python benchmarks/comparison.py --only shapes        # one dataset
    python benchmarks/comparison.py --status             # what is done, what is missing
    python benchmarks/comparison.py --report             # tables from the finished runs only
    python benchmarks/comparison.py --restore benchmarks/results/comparison.json
"""
import argparse
import hashlib
import json
import os
import re
import resource
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    REPO, RESULTS_DIR, TRAIN_NET, cpu_model, display_path, log, machine_info, thread_env,
    write_results,
)

SHAPES_DIR = os.path.join(REPO, "configs", "Shapes")
MODELS = {
    # name: (config file, overrides, description)
    "fcos_plain": ("fcos_plain_R_18_FPN_cpu.yaml", [], "FCOS, plain (the paper's baseline)"),
    "fcos": ("fcos_R_18_FPN_cpu.yaml", [], "FCOS with tricks (detectron2's)"),
    "dsla": ("dsla_R_18_FPN_cpu.yaml", [], "DSLA (R-50 1x head options)"),
    "dsla_tricks": ("dsla_tricks_R_18_FPN_cpu.yaml", [],
                    "DSLA-tricks (R-101 / Swin-S head options)"),
    "ladder0_hard_labels": ("dsla_R_18_FPN_cpu.yaml",
                            ["MODEL.DSLA.SMOOTH_LABEL", "False", "MODEL.DSLA.CORE_ZONE", "False",
                             "MODEL.DSLA.INTERVAL_RELAXATION_FACTOR", "0.0",
                             "MODEL.DSLA.IOU_COUPLING", "off"],
                            "rung 0: hard labels (QFL, q* = 1)"),
    "ladder1_core_zone": ("dsla_R_18_FPN_cpu.yaml",
                          ["MODEL.DSLA.INTERVAL_RELAXATION_FACTOR", "0.0",
                           "MODEL.DSLA.IOU_COUPLING", "off"],
                          "rung 1: + smooth labels with core zone"),
    "ladder2_relaxation": ("dsla_R_18_FPN_cpu.yaml", ["MODEL.DSLA.IOU_COUPLING", "off"],
                           "rung 2: + interval relaxation 0.2"),
}
MAIN_MODELS = ("fcos_plain", "fcos", "dsla", "dsla_tricks")
LADDER = ("ladder0_hard_labels", "ladder1_core_zone", "ladder2_relaxation", "dsla")
DATASETS = {
    "shapes": ("shapes_train", "shapes_val"),
    "crowded": ("shapes_crowded_train", "shapes_crowded_val"),
}
# (dataset, models, seeds, schedule factor), trained in this order, seed by seed, so that a
# partial benchmark holds complete comparisons.
# Phase 1: fixed before any comparison was run.
PHASE1 = (
    ("shapes", MAIN_MODELS, (0, 1, 2), 1.0),
    ("shapes", MAIN_MODELS, (0,), 1.5),
    ("crowded", MAIN_MODELS, (0, 1), 1.0),
    ("shapes", LADDER[:3], (0, 1), 1.0),
    ("crowded", MAIN_MODELS, (0,), 1.5),
)
# Phase 2 (the comparison at a longer schedule): fixed after 32 of phase 1's 34 runs and their
# verdicts were known (1.5x had added 2.0-6.1 AP to every detector run at it), before any
# phase-2 run. 3x with its 4.5x
# check for every detector, the claim-1 pair (plain FCOS, DSLA) first; the targets are then also
# judged at 3x, beside (not instead of) the 1x verdicts. Not extended further within this plan.
PHASE2_ORDER = ("fcos_plain", "dsla", "fcos", "dsla_tricks")
PHASE2 = (
    ("shapes", PHASE2_ORDER, (0,), 3.0),
    ("shapes", PHASE2_ORDER, (0,), 4.5),
    ("shapes", PHASE2_ORDER, (1, 2), 3.0),
    ("crowded", PHASE2_ORDER, (0,), 3.0),
    ("crowded", PHASE2_ORDER, (0,), 4.5),
    ("crowded", PHASE2_ORDER, (1,), 3.0),
)
PLAN = PHASE1 + PHASE2
# The schedules the targets are judged at, each with the 1.5x schedule that checks it.
SCHEDULES = {"x1": "x1.5", "x3": "x4.5"}
# Checkpoint at every evaluation, and at least this often, so that an interrupted long run
# loses at most ~15 minutes (phase 1's schedules checkpointed every 600 / 900 iterations).
MAX_CHECKPOINT_PERIOD = 900
# A smoke test of every code path (numbers meaningless): 1 % of the schedule, one seed.
QUICK_PLAN = (("shapes", MAIN_MODELS, (0,), 0.01),)
EVALS_PER_RUN = 4
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
PAIRS = (("dsla", "fcos_plain"), ("dsla_tricks", "fcos"))


# ----------------------------------------------------------------------------------------------
# Run specification and cache.
# ----------------------------------------------------------------------------------------------


def schedule_opts(config_file: str, factor: float) -> List[str]:
    """
    The config's schedule times ``factor`` (lr steps scaled alike, warm-up unchanged), with a
    COCO evaluation after every 1/EVALS_PER_RUN of it.
    """
    from dsla.cli import load_config

    solver = load_config(config_file, []).SOLVER
    max_iter = int(round(solver.MAX_ITER * factor))
    steps = tuple(int(round(s * factor)) for s in solver.STEPS)
    eval_period = max(max_iter // EVALS_PER_RUN, 1)
    return ["SOLVER.MAX_ITER", str(max_iter), "SOLVER.STEPS", str(steps),
            "TEST.EVAL_PERIOD", str(eval_period),
            "SOLVER.CHECKPOINT_PERIOD", str(min(eval_period, MAX_CHECKPOINT_PERIOD))]


def num_classes_opts(train_set: str) -> List[str]:
    """The class count of ``train_set`` for every detector's head (the configs say 4, the
    classes of ``shapes``; ``crowded`` has 5)."""
    from dsla.data.datasets import num_classes_of

    n = str(num_classes_of(train_set))
    return ["MODEL.DSLA.NUM_CLASSES", n, "MODEL.FCOS.NUM_CLASSES", n]


def run_spec(dataset: str, model: str, seed: int, factor: float, runs_dir: str) -> Dict:
    """Config, overrides, output directory and config hash of one training run."""
    config_name, switches, _ = MODELS[model]
    config = os.path.join(SHAPES_DIR, config_name)
    train, test = DATASETS[dataset]
    name = f"seed{seed}_x{factor:g}"
    run_dir = os.path.join(runs_dir, dataset, model, name)
    opts = ["SEED", str(seed), "DATASETS.TRAIN", f"('{train}',)",
            "DATASETS.TEST", f"('{test}',)", *num_classes_opts(train),
            *schedule_opts(config, factor), *switches]
    spec = {"dataset": dataset, "model": model, "seed": seed, "factor": factor,
            "config": config, "opts": opts, "run_dir": run_dir, "test_set": test}
    spec["config_hash"] = config_hash(spec)
    return spec


def config_hash(spec: Dict) -> str:
    """sha256 (16 hex digits) of the run's full config, without its output directory."""
    from dsla.cli import load_config

    cfg = load_config(spec["config"], spec["opts"] + ["OUTPUT_DIR", ""])
    return hashlib.sha256(cfg.dump().encode()).hexdigest()[:16]


def planned_specs(runs_dir: str, plan=PLAN) -> List[Dict]:
    """Every run of ``plan``, in plan order."""
    return [run_spec(d, m, s, f, runs_dir) for d, models, seeds, f in plan
            for s in seeds for m in models]


def read_record(spec: Dict) -> Optional[Dict]:
    """The run's ``benchmark_run.json`` if it was written for this very config, else None."""
    path = os.path.join(spec["run_dir"], "benchmark_run.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        record = json.load(f)
    return record if record.get("config_hash") == spec["config_hash"] else None


def is_done(spec: Dict) -> bool:
    record = read_record(spec)
    return record is not None and record.get("status") == "analysed"


def write_record(spec: Dict, **fields) -> Dict:
    """Merge ``fields`` into the run's record (atomic write) and return it."""
    record = read_record(spec) or {
        key: spec[key] for key in ("dataset", "model", "seed", "factor", "config_hash", "opts")}
    record["config"] = display_path(spec["config"])
    record.update(fields)
    os.makedirs(spec["run_dir"], exist_ok=True)
    path = os.path.join(spec["run_dir"], "benchmark_run.json")
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=2, allow_nan=False)
    os.replace(path + ".tmp", path)
    return record


# ----------------------------------------------------------------------------------------------
# Training and per-run analysis (each in its own subprocess).
# ----------------------------------------------------------------------------------------------


def _run_logged(cmd: List[str], log_path: str, threads: Optional[int]) -> Dict:
    """Run ``cmd`` with its output appended to ``log_path``; wall and CPU seconds, exit code."""
    start = time.perf_counter()
    with open(log_path, "a") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=thread_env(threads), stdout=out,
                                stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"returncode": proc.returncode, "wall_s": round(time.perf_counter() - start, 1),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 1)}


def run_label(spec: Dict) -> str:
    """``dataset/model/seed<k>_x<f>``: how logs name a run."""
    return f"{spec['dataset']}/{spec['model']}/{os.path.basename(spec['run_dir'])}"


def train_and_analyse(spec: Dict, threads: Optional[int]) -> bool:
    """Train (resuming a partial run of the same config), then analyse; True on success."""
    label = run_label(spec)
    record = read_record(spec)
    if record is None or record.get("status") not in ("trained", "analysed"):
        # Any checkpoint of this config's partial run: train_net.py --resume picks the newest
        # readable one (and refuses a fresh run into a folder that holds checkpoints).
        resume = record is not None and os.path.isdir(spec["run_dir"]) and any(
            f.endswith(".pth") for f in os.listdir(spec["run_dir"]))
        if record is None and os.path.isdir(spec["run_dir"]):
            # Another config trained here before: start over rather than mix checkpoints.
            os.replace(spec["run_dir"], spec["run_dir"] + f".stale-{int(time.time())}")
        # The CPU of every attempt: runs compared with each other may span machines.
        write_record(spec, status="training",
                     trained_on=(record or {}).get("trained_on", []) + [cpu_model()])
        log(f"train {label}{' (resume)' if resume else ''}")
        cmd = [sys.executable, TRAIN_NET, "--config-file", spec["config"],
                *(["--resume"] if resume else []), *spec["opts"], "OUTPUT_DIR", spec["run_dir"]]
        result = _run_logged(cmd, os.path.join(spec["run_dir"], "train.log"), threads)
        if result["returncode"] != 0:
            write_record(spec, status="failed", train=result)
            log(f"FAILED {label}: see {display_path(spec['run_dir'])}/train.log")
            return False
        write_record(spec, status="trained", train=result, threads=threads)
    cmd = [sys.executable, os.path.abspath(__file__), "--analyse-run", spec["run_dir"],
           "--test-set", spec["test_set"]]
    result = _run_logged(cmd, os.path.join(spec["run_dir"], "analysis.log"), threads)
    if result["returncode"] != 0:
        log(f"analysis FAILED {label}: see {display_path(spec['run_dir'])}/analysis.log")
        return False
    with open(os.path.join(spec["run_dir"], "analysis.json")) as f:
        write_record(spec, status="analysed", analysis_cost=result, **json.load(f))
    log(f"done {label}")
    return True


def analyse_run(run_dir: str, test_set: str) -> Dict:
    """
    Metrics of a finished run: final COCO numbers, the AP curve from its periodic evaluations,
    the score-IoU Spearman of its final detections and the NMS localisation gap of its pre-NMS
    candidates (the model re-run on ``test_set`` with NMS switched off).
    """
    from consistency import consistency_of, score_iou_pairs

    with open(os.path.join(run_dir, "eval_results.json")) as f:
        bbox = json.load(f)["bbox"]
    scores, ious = score_iou_pairs(run_dir, test_set)
    return {
        "bbox": {k: _finite(bbox.get(k)) for k in METRICS},
        "curve": read_curve(run_dir),
        "spearman_matched": consistency_of(scores, ious)["spearman_matched"],
        "nms": nms_gap_of_run(run_dir, test_set),
    }


def read_curve(run_dir: str) -> List[Dict]:
    """``[{"iter", "AP", "AP50", "AP75"}]`` of every evaluation logged in ``metrics.json``."""
    curve = []
    with open(os.path.join(run_dir, "metrics.json")) as f:
        for line in f:
            row = json.loads(line)
            if "bbox/AP" in row:
                curve.append({"iter": row["iteration"] + 1,
                              **{k: _finite(row.get(f"bbox/{k}")) for k in ("AP", "AP50", "AP75")}})
    return curve


def load_final_model(run_dir: str):
    """``(cfg, model)``: the run's config and its final weights, in eval mode."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from dsla.cli import load_config

    cfg = load_config(os.path.join(run_dir, "config.yaml"), [])
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(os.path.join(run_dir, "model_final.pth"))
    return cfg, model


def pre_nms_detections(run_dir: str, test_set: str):
    """
    Yields ``(dataset record, Instances)`` for every image of ``test_set``: the run's final
    model with NMS switched off (IoU 1.0 suppresses nothing) and no top-k after it, so the
    Instances are every candidate that passed the score threshold and the pre-NMS top-k.
    """
    import torch
    from detectron2.data import DatasetCatalog, build_detection_test_loader

    cfg, model = load_final_model(run_dir)
    model.test_nms_thresh, model.max_detections_per_image = 1.0, 10 ** 9
    records = {r["image_id"]: r for r in DatasetCatalog.get(test_set)}
    with torch.no_grad():
        for inputs in build_detection_test_loader(cfg, test_set):
            yield records[inputs[0]["image_id"]], model(inputs)[0]["instances"].to("cpu")


def nms_gap_of_run(run_dir: str, test_set: str) -> Dict:
    """:func:`dsla.analysis.nms_localisation_gap` of the run's final model on ``test_set``."""
    import torch

    from dsla.analysis import ground_truth_of, nms_localisation_gap, summarize_nms_gap

    kept, best = [], []
    for record, inst in pre_nms_detections(run_dir, test_set):
        gt_boxes, gt_classes = ground_truth_of(record)
        k, b = nms_localisation_gap(inst.pred_boxes.tensor, inst.scores, inst.pred_classes,
                                    gt_boxes, gt_classes)
        kept.append(k)
        best.append(b)
    return summarize_nms_gap(torch.cat(kept), torch.cat(best))


def _finite(value) -> Optional[float]:
    """JSON-safe metric: None for NaN / missing (COCO reports NaN for empty size ranges)."""
    return None if value is None or value != value else float(value)


# ----------------------------------------------------------------------------------------------
# Summary: statistics over seeds, paired differences, targets.
# ----------------------------------------------------------------------------------------------


def spread(values) -> Dict:
    """mean / min / max / n of the values that are not None."""
    import numpy as np

    finite = [float(v) for v in values if v is not None]
    if not finite:
        return {"mean": None, "min": None, "max": None, "n": 0}
    return {"mean": float(np.mean(finite)), "min": min(finite), "max": max(finite),
            "n": len(finite)}


def group_runs(records: List[Dict]) -> Dict:
    """``{dataset: {model: {factor: {seed: record}}}}`` of finished runs."""
    groups: Dict = {}
    for r in records:
        key = f"x{r['factor']:g}"
        groups.setdefault(r["dataset"], {}).setdefault(r["model"], {}).setdefault(key, {})[
            r["seed"]] = r
    return groups


SIGNAL_KEYS = ("num_gt_per_image", "num_pos_per_image", "pos_iou_mean", "pos_q_mean",
               "pos_cls_target_mean")


def training_signal(run_dir: str, last_fraction: float = 0.1) -> Dict[str, float]:
    """
    What the classifier was trained towards, from the run's ``metrics.json``: the means over the
    last ``last_fraction`` of the iterations of the scalars the DSLA models log (positives per
    image; IoU of the positives' predicted boxes; their mean smooth label q*; their mean
    classification target, IoU * q* with coupling). Keys a model does not log are absent.
    """
    rows = []
    with open(os.path.join(run_dir, "metrics.json")) as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    last_iter = max((r.get("iteration", 0) for r in rows), default=0)
    start = last_iter * (1.0 - last_fraction)
    out = {}
    for key in SIGNAL_KEYS:
        values = [v for r in rows if r.get("iteration", 0) >= start
                  for prefix in ("dsla/", "fcos/") if (v := r.get(prefix + key)) is not None]
        if values:
            out[key] = sum(values) / len(values)
    return out


def summarize_group(runs: Dict[int, Dict]) -> Dict:
    """Mean and min-max over seeds of every metric of one (dataset, model, schedule)."""
    rows = list(runs.values())
    summary = {k: spread(r["bbox"][k] for r in rows) for k in METRICS}
    summary["spearman_matched"] = spread(r["spearman_matched"] for r in rows)
    for key in ("mean_iou_lost", "fraction_worse_0.05"):
        summary[f"nms_{key}"] = spread(r["nms"][key] for r in rows)
    for key in SIGNAL_KEYS:
        summary[f"signal_{key}"] = spread(r.get("signal", {}).get(key) for r in rows)
    summary["seeds"] = sorted(runs)
    return summary


def paired_differences(model_runs: Dict, a: str, b: str, schedule: str = "x1") -> Optional[Dict]:
    """Per-seed ``a - b`` of AP and the NMS IoU lost, on the seeds both have at ``schedule``."""
    runs_a = model_runs.get(a, {}).get(schedule, {})
    runs_b = model_runs.get(b, {}).get(schedule, {})
    seeds = sorted(set(runs_a) & set(runs_b))
    if not seeds:
        return None
    diff = {s: {k: _diff(runs_a[s]["bbox"][k], runs_b[s]["bbox"][k]) for k in METRICS}
            for s in seeds}
    for s in seeds:
        diff[s]["nms_mean_iou_lost"] = _diff(runs_a[s]["nms"]["mean_iou_lost"],
                                             runs_b[s]["nms"]["mean_iou_lost"])
    return {"seeds": seeds, "per_seed": diff,
            "AP": spread(diff[s]["AP"] for s in seeds)}


def _diff(a, b):
    return None if a is None or b is None else a - b


def convergence(model_runs: Dict, schedule: str = "x1") -> Dict:
    """Per model: AP at 1.5x ``schedule`` minus AP at ``schedule``, on the seeds run at both."""
    out = {}
    for model, by_factor in model_runs.items():
        long, base = by_factor.get(SCHEDULES[schedule], {}), by_factor.get(schedule, {})
        seeds = sorted(set(long) & set(base))
        if seeds:
            out[model] = {s: _diff(long[s]["bbox"]["AP"], base[s]["bbox"]["AP"]) for s in seeds}
    return out


def ladder_summary(model_runs: Dict) -> Optional[Dict]:
    """The ablation ladder compared like with like: every rung (DSLA the last, plain FCOS for
    reference) summarised on the seeds all present rungs share, and each rung's per-seed step
    over the one below it (AP and NMS IoU lost)."""
    present = [m for m in LADDER if model_runs.get(m, {}).get("x1")]
    if not any(m in present for m in LADDER[:3]):
        return None
    seeds = sorted(set.intersection(*(set(model_runs[m]["x1"]) for m in present)))
    shown = present + (["fcos_plain"] if set(seeds) <= set(model_runs.get("fcos_plain", {})
                                                          .get("x1", {})) else [])
    models = {m: {"x1": summarize_group({s: model_runs[m]["x1"][s] for s in seeds})}
              for m in shown}
    steps = {f"{b}-{a}": paired_differences(model_runs, b, a)
             for a, b in zip(present, present[1:])}
    return {"seeds": seeds, "models": models, "steps": steps}


def check_targets(summary: Dict) -> Dict:
    """The paper's claims at our scale, per dataset and judged schedule (``SCHEDULES``, those with
    a finished run): True (met), False (missed), None (not measured yet)."""
    return {dataset: {schedule: targets_at(data["at"][schedule])
                      for schedule in SCHEDULES if schedule in data["at"]}
            for dataset, data in summary.items()}


def targets_at(data: Dict) -> Dict:
    """The targets from one schedule's models, paired differences and convergence check."""
    models, pairs = data["models"], data["paired"]
    t = {}
    p = pairs.get("dsla-fcos_plain")
    t["dsla_ge_fcos_plain_plus_1_every_seed"] = None if p is None else bool(
        p["AP"]["mean"] >= 1.0 and all(d["AP"] > 0 for d in p["per_seed"].values()))
    p = pairs.get("dsla_tricks-fcos")
    t["dsla_tricks_ge_fcos"] = None if p is None else bool(p["AP"]["mean"] >= 0)
    lost = {m: models.get(m, {}).get("nms_mean_iou_lost", {}).get("mean")
            for m in ("dsla", "fcos_plain", "fcos")}
    t["dsla_nms_iou_lost_below_both_fcos"] = None if None in lost.values() else bool(
        lost["dsla"] < lost["fcos_plain"] and lost["dsla"] < lost["fcos"])
    gains = [g for per_seed in data["convergence"].values() for g in per_seed.values()]
    complete = set(data["convergence"]) >= set(MAIN_MODELS)
    # One check over 1 AP already misses "every detector"; otherwise all four checks must be in.
    over = any(g is not None and g > 1.0 for g in gains)
    t["converged_1p5x_adds_at_most_1_ap"] = False if over else None if not complete else bool(
        all(g is not None for g in gains))
    return t


def summarize(records: List[Dict]) -> Dict:
    """Everything the report needs, from the finished run records."""
    summary = {}
    for dataset, model_runs in group_runs(records).items():
        summary[dataset] = {
            "models": {m: {f: summarize_group(runs) for f, runs in by_factor.items()}
                       for m, by_factor in model_runs.items()},
            "at": {schedule: schedule_summary(model_runs, schedule) for schedule in SCHEDULES
                   if any(schedule in by_factor for by_factor in model_runs.values())},
            "ladder": ladder_summary(model_runs),
        }
    return summary


def schedule_summary(model_runs: Dict, schedule: str) -> Dict:
    """What the targets at ``schedule`` are judged on: its models, paired differences and the
    1.5x check."""
    return {
        "models": {m: summarize_group(by_factor[schedule])
                   for m, by_factor in model_runs.items() if schedule in by_factor},
        "paired": {f"{a}-{b}": p for a, b in PAIRS
                   if (p := paired_differences(model_runs, a, b, schedule)) is not None},
        "convergence": convergence(model_runs, schedule),
    }


# ----------------------------------------------------------------------------------------------
# Report: Markdown tables and the AP-vs-iteration curves.
# ----------------------------------------------------------------------------------------------


def _fmt(stats: Dict, digits: int = 1, scale: float = 1.0) -> str:
    """``mean (min–max)`` of a :func:`spread` dict."""
    if not stats or stats.get("mean") is None:
        return "n/a"
    m, lo, hi = (stats[k] * scale for k in ("mean", "min", "max"))
    return f"{m:.{digits}f}" if stats["n"] == 1 else f"{m:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"


def model_table(data: Dict, models, factor: str = "x1") -> str:
    """One row per model: COCO metrics, Spearman, NMS IoU lost, fraction losing >= 0.05."""
    header = ["model", "seeds", *METRICS, "Spearman", "NMS IoU lost", "NMS ≥0.05 worse"]
    rows = []
    for m in models:
        s = data["models"].get(m, {}).get(factor)
        if s is None:
            continue
        rows.append([MODELS[m][2], len(s["seeds"]), *(_fmt(s[k]) for k in METRICS),
                     _fmt(s["spearman_matched"], 3), _fmt(s["nms_mean_iou_lost"], 3),
                     _fmt(s["nms_fraction_worse_0.05"], 1, 100) + " %"])
    return _table(header, rows)


def signal_table(data: Dict, models) -> str:
    """Training-signal statistics of :func:`training_signal`, mean (min–max) over seeds."""
    header = ["model", "positives / image", "IoU of positives", "q* of positives",
              "cls target of positives"]
    keys = ("num_pos_per_image", "pos_iou_mean", "pos_q_mean", "pos_cls_target_mean")
    rows = [[MODELS[m][2], *(_fmt(s[f"signal_{k}"], 2) for k in keys)]
            for m in models if (s := data["models"].get(m, {}).get("x1")) is not None
            and any(s[f"signal_{k}"]["n"] for k in keys)]
    return _table(header, rows) if rows else ""


def ladder_text(ladder: Dict) -> str:
    """The ladder's table on its shared seeds, then each rung's per-seed step over the last."""
    seeds = ", ".join(str(s) for s in ladder["seeds"])
    text = (f"\nAblation ladder, seeds {seeds} (each rung adds one part of DSLA; DSLA and plain "
            "FCOS on the same seeds):\n\n" + model_table(ladder, LADDER + ("fcos_plain",)))
    rows = []
    for name, p in ladder["steps"].items():
        if p is not None:
            rung = " − ".join(MODELS[m][2].split(":")[0] for m in name.split("-"))
            ap = ", ".join(f"{d['AP']:+.1f}" for d in p["per_seed"].values())
            lost = ", ".join(f"{d['nms_mean_iou_lost']:+.4f}" for d in p["per_seed"].values())
            rows.append([rung, ", ".join(str(s) for s in p["seeds"]), ap, lost])
    header = ["step", "seeds", "AP per seed", "NMS IoU lost per seed"]
    return text + "\nEach rung over the one below it (same seed):\n\n" + _table(header, rows)


def paired_table(data: Dict) -> str:
    """Per-seed AP differences of the two pairs, and their mean (min–max)."""
    rows = []
    for name, p in data["paired"].items():
        per_seed = ", ".join(f"seed {s}: {d['AP']:+.1f}" for s, d in p["per_seed"].items())
        rows.append([name.replace("-", " − "), per_seed, _fmt(p["AP"])])
    return _table(["difference", "AP per seed", "mean (min–max)"], rows)


def convergence_table(data: Dict, schedule: str = "x1") -> str:
    """Per model and seed: AP at 1.5x ``schedule`` minus AP at ``schedule``."""
    rows = []
    for m, per_seed in data["convergence"].items():
        for s, gain in per_seed.items():
            rows.append([MODELS[m][2], s, f"{gain:+.1f}" if gain is not None else "n/a"])
    long, base = SCHEDULES[schedule][1:], schedule[1:]
    return _table(["model", "seed", f"AP({long}×) − AP({base}×)"], rows)


def _table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]) + "\n"


TARGET_TEXT = {
    "dsla_ge_fcos_plain_plus_1_every_seed": "mean DSLA ≥ mean FCOS-plain + 1.0 AP, DSLA ahead in "
                                            "every seed",
    "dsla_tricks_ge_fcos": "mean DSLA-tricks ≥ mean FCOS (tricks)",
    "dsla_nms_iou_lost_below_both_fcos": "DSLA's mean IoU lost in NMS < both FCOS variants'",
    "converged_1p5x_adds_at_most_1_ap": "1.5× this schedule adds ≤ 1 AP (every detector)",
}


# The paper's numbers (COCO val, ImageNet-pretrained backbones), beside ours for scale.
PAPER_TEXT = (
    "\nThe paper, for comparison (COCO val2017 box AP, ImageNet-pretrained R-50, 1x schedule): "
    "plain FCOS 36.6 → DSLA 38.1 (+1.5).\n"
)


def render_markdown(result: Dict) -> str:
    """comparison.md: per dataset the model table, paired differences, convergence, targets."""
    progress = ", ".join(f"{name}: " + ("complete" if done == planned else
                                        f"{done} of {planned} runs finished")
                         for name, (done, planned) in result["phases"].items())
    text = "" if result["runs_finished"] == result["runs_planned"] else (
        f"\n**Partial results** ({progress}). A verdict at a schedule whose runs are not all "
        "finished is on the seeds finished so far and may change when the rest are run.\n")
    for dataset, data in result["summary"].items():
        train, test = DATASETS[dataset]
        text += f"\n#### `{train}` → `{test}`\n"
        for schedule in data["at"]:
            done, planned = schedule_progress(result["runs"], result["protocol"]["plan"],
                                              dataset, schedule)
            text += schedule_text(data, schedule, result["targets"][dataset][schedule],
                                  "" if done >= planned else
                                  f" (provisional: {done} of {planned} runs finished)")
    text += PAPER_TEXT
    text += f"\nCurves: [comparison_curves.png](comparison_curves.png). {result['cost_line']}\n"
    short = [f"{r['dataset']}/{r['model']}/seed{r['seed']} x{r['factor']:g} "
             f"({len(r['curve'])})" for r in result["runs"] if len(r["curve"]) < EVALS_PER_RUN]
    if short:
        # A run killed during an evaluation resumes after it: that point of its curve is lost.
        text += (f"\nRuns whose curve has fewer than {EVALS_PER_RUN} evaluations: "
                 f"{', '.join(short)}.\n")
    return text


def schedule_progress(records: List[Dict], plan, dataset: str, schedule: str) -> List[int]:
    """``[finished, planned]`` runs of the four detectors on ``dataset`` at ``schedule`` and at
    its 1.5x check: what the verdicts at ``schedule`` rest on."""
    factors = {float(schedule[1:]), float(SCHEDULES[schedule][1:])}
    planned = {run for run in plan_runs(plan)
               if run[0] == dataset and run[1] in MAIN_MODELS and run[3] in factors}
    return [len(planned & plan_runs_of(records)), len(planned)]


def plan_runs(plan) -> set:
    """``{(dataset, model, seed, factor)}`` of every run of ``plan``."""
    return {(d, m, s, f) for d, models, seeds, f in plan for s in seeds for m in models}


def plan_runs_of(records: List[Dict]) -> set:
    """``{(dataset, model, seed, factor)}`` of finished run records."""
    return {(r["dataset"], r["model"], r["seed"], r["factor"]) for r in records}


def schedule_text(data: Dict, schedule: str, targets: Dict, status: str = "") -> str:
    """One dataset's tables and verdicts at one judged schedule (the ladder and the training
    signal are at 1x only); ``status`` follows the targets' heading."""
    at, long = data["at"][schedule], SCHEDULES[schedule]
    text = f"\n##### At {schedule[1:]}× the recipe's schedule\n\n"
    text += model_table(data, MAIN_MODELS, schedule)
    if schedule == "x1" and data.get("ladder"):
        text += ladder_text(data["ladder"])
    if at["paired"]:
        text += "\nPaired differences (same seed):\n\n" + paired_table(at)
    signal = signal_table(data, MAIN_MODELS + LADDER[:3]) if schedule == "x1" else ""
    if signal:
        text += ("\nTraining signal, mean over the last 10 % of the iterations (positives "
                 "and their targets as the models log them; n/a: not logged):\n\n" + signal)
    if at["convergence"]:
        text += (f"\nConvergence (seed 0: AP at {long[1:]}× minus AP at {schedule[1:]}×):\n\n"
                 + convergence_table(at, schedule))
        text += (f"\nThe same detectors at {long[1:]}× (seed 0 only; the verdicts below are on "
                 f"the {schedule[1:]}× runs):\n\n" + model_table(data, MAIN_MODELS, long))
    text += f"\nTargets at {schedule[1:]}×{status}:\n\n"
    for key, met in targets.items():
        verdict = {True: "**met**", False: "**missed**", None: "not measured yet"}[met]
        if status and met is False and key == "converged_1p5x_adds_at_most_1_ap":
            # Checks are seed 0 only, so more runs cannot take a check over 1 AP back.
            verdict += " (final: a check already adds more than 1 AP)"
        what = TARGET_TEXT[key].replace("this schedule", f"this schedule ({long[1:]}× vs "
                                        f"{schedule[1:]}×)")
        text += f"- {what}: {verdict}\n"
    return text


# Line style of each schedule factor in the curves.
LINESTYLES = {1.0: "-", 1.5: "--", 3.0: "-.", 4.5: ":"}
LINESTYLE_NAMES = {"-": "solid", "--": "dashed", "-.": "dash-dot", ":": "dotted"}
OTHER_LINESTYLE = (0, (1, 4))  # a sparse dotted line: any other factor (e.g. --quick's 0.01)


def plot_curves(records: List[Dict], path: str) -> None:
    """AP against iteration, one panel per dataset, one colour per detector, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = [d for d in DATASETS if any(r["dataset"] == d for r in records)]
    fig, axes = plt.subplots(1, max(len(datasets), 1), figsize=(6 * max(len(datasets), 1), 4.5),
                             dpi=100, squeeze=False)
    colours = dict(zip(MAIN_MODELS + LADDER[:3], plt.get_cmap("tab10").colors))
    for ax, dataset in zip(axes[0], datasets):
        seen = set()
        for r in sorted(records, key=lambda r: (r["model"], r["seed"], r["factor"])):
            if r["dataset"] != dataset or r["model"] not in MAIN_MODELS:
                continue
            it = [p["iter"] for p in r["curve"]]
            ap = [p["AP"] for p in r["curve"]]
            ax.plot(it, ap, marker="o", markersize=3, color=colours[r["model"]],
                    linestyle=LINESTYLES.get(r["factor"], OTHER_LINESTYLE), linewidth=1,
                    label=None if r["model"] in seen else MODELS[r["model"]][2])
            seen.add(r["model"])
        factors = sorted({r["factor"] for r in records if r["dataset"] == dataset})
        ax.set_title(DATASETS[dataset][1] + " (" + ", ".join(
            f"{LINESTYLE_NAMES.get(LINESTYLES.get(f), 'sparse dots')}: {f:g}×" for f in factors)
            + ")",
            fontsize=9)
        ax.set_xlabel("iteration")
        ax.set_ylabel("box AP")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=sorted(DATASETS), default=None,
                        help="datasets whose runs to train (default: all); the report covers "
                        "every finished run")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at the same time")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP/MKL threads of each run (default: inherited)")
    parser.add_argument("--status", action="store_true", help="list done / missing runs, exit")
    parser.add_argument("--report", action="store_true", help="report finished runs, train none")
    parser.add_argument("--output-dir", default=RESULTS_DIR,
                        help="results directory; runs go to <output-dir>/runs")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 1 %% of the schedule, seed 0, the four detectors on "
                        "shapes (use with --output-dir elsewhere)")
    parser.add_argument("--restore", metavar="REPORT_JSON",
                        help="re-create the records of the finished runs of a written "
                        "comparison.json whose config is unchanged and that have none here "
                        "(runs lost with their machine), train none, exit")
    parser.add_argument("--analyse-run", metavar="RUN_DIR", help=argparse.SUPPRESS)
    parser.add_argument("--test-set", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def last_attempt_start(run_dir: str) -> int:
    """The iteration the run's last training attempt started from (0 unless it was resumed),
    from its ``log.txt``: a killed attempt never reports its CPU time, so a resumed run's
    ``train.cpu_s`` covers only the iterations from there on."""
    starts = [0]
    path = os.path.join(run_dir, "log.txt")
    if os.path.isfile(path):
        with open(path) as f:
            starts += [int(m.group(1)) for m in re.finditer(
                r"Starting training from iteration (\d+)", f.read())]
    return starts[-1]


def cost_line(records: List[Dict], planned: int, cpu_s: float) -> str:
    """How many runs are finished and what they cost, naming the runs whose cost is partial."""
    spent = sum(r["train"]["cpu_s"] + r["analysis_cost"]["cpu_s"] for r in records)
    line = (f"{len(records)} of {planned} planned runs finished; CPU time of the finished "
            f"runs {spent / 3600:.1f} h (this invocation: {cpu_s / 3600:.2f} h).")
    resumed = [r for r in records if r.get("resumed_from_iter")]
    if resumed:
        names = ", ".join(f"{r['dataset']}/{r['model']}/seed{r['seed']} x{r['factor']:g} from "
                          f"iteration {r['resumed_from_iter']}" for r in resumed)
        runs = "1 resumed run counts" if len(resumed) == 1 else f"{len(resumed)} resumed runs count"
        line += (f" {runs} only their last attempt's CPU time ({names}), so the total is a lower "
                 f"bound.")
    return line + cpu_models_text(records)


def cpu_models_text(records: List[Dict]) -> str:
    """Which CPU models trained the runs (numerics, e.g. bfloat16 autocast, may differ between
    them), where recorded; "" if no run recorded one."""
    counts = Counter(" + ".join(dict.fromkeys(r["trained_on"])) for r in records
                     if r.get("trained_on"))
    if not counts:
        return ""
    parts = [f"{cpu}: {n} run{'s' * (n != 1)}" for cpu, n in sorted(counts.items())]
    unknown = sum(1 for r in records if not r.get("trained_on"))
    if unknown:
        parts.append(f"not recorded: {unknown} run{'s' * (unknown != 1)}")
    return f" Trained on: {'; '.join(parts)}."


PHASES = {"phase 1 (1× and 1.5×)": PHASE1, "phase 2 (3× and 4.5×)": PHASE2}


def phase_progress(records: List[Dict], phases=PHASES) -> Dict[str, List[int]]:
    """``{phase: [finished, planned]}`` runs of each phase of the plan."""
    done = plan_runs_of(records)
    return {name: [len(plan_runs(plan) & done), len(plan_runs(plan))]
            for name, plan in phases.items()}


def report(specs: List[Dict], output_dir: str, cpu_s: float, phases=PHASES) -> Dict:
    """Write comparison.{json,md} and comparison_curves.png from the finished runs."""
    records = [report_record(s) for s in specs if is_done(s)]
    cost = cost_line(records, len(specs), cpu_s)
    summary = summarize(records)
    result = {"machine": machine_info("cpu"), "protocol": {"plan": PLAN, "models": MODELS,
              "judged_schedules": SCHEDULES,
              "datasets": DATASETS, "evals_per_run": EVALS_PER_RUN},
              "runs": records, "summary": summary, "targets": check_targets(summary),
              "cost_line": cost, "runs_finished": len(records), "runs_planned": len(specs),
              "phases": phase_progress(records, phases)}
    os.makedirs(output_dir, exist_ok=True)
    plot_curves(records, os.path.join(output_dir, "comparison_curves.png"))
    write_results("comparison", result, render_markdown(result), output_dir)
    log(cost)
    return result


# What a report needs of a run record (summarize, cost_line, report_record).
RUN_KEYS = ("dataset", "model", "seed", "factor")
RECORD_KEYS = {"bbox", "curve", "spearman_matched", "nms", "train", "analysis_cost", "signal",
               "resumed_from_iter"}


def report_record(spec: Dict) -> Dict:
    """The run's record with its training signal and resume point, read from the run's files,
    or kept from the record where it was restored from a report (its files are elsewhere)."""
    record = read_record(spec)
    if "restored_from" in record:
        return record
    return dict(record, signal=training_signal(spec["run_dir"]),
                resumed_from_iter=last_attempt_start(spec["run_dir"]))


def restore_records(specs: List[Dict], report_path: str) -> Dict[str, List[str]]:
    """
    Re-create the run cache from a written report (``comparison.json``): every finished
    (``analysed``) run of the report whose config hash is the one planned now and whose run
    directory holds no record gets its record back, so a fresh clone (or a new machine) completes
    the table without re-training what the report already holds. Its checkpoints and logs are
    not restored, so tools that reload the model (``investigate.py``) still need the run itself.
    Returns the run names ``{"restored", "kept", "stale"}``: written; a record (of any config)
    already here, left untouched; not planned now, config changed since, or not finished.
    """
    with open(report_path) as f:
        records = json.load(f)["runs"]
    by_run = {tuple(s[k] for k in RUN_KEYS): s for s in specs}
    out = {"restored": [], "kept": [], "stale": []}
    for record in records:
        key = tuple(record.get(k) for k in RUN_KEYS)
        spec = by_run.get(key)
        name = (f"{key[0]}/{key[1]}/seed{key[2]}_x{key[3]:g}" if None not in key
                else f"a run without {', '.join(RUN_KEYS)}")
        if (spec is None or spec["config_hash"] != record.get("config_hash")
                or record.get("status") != "analysed" or not RECORD_KEYS <= set(record)):
            out["stale"].append(name)
        elif os.path.isfile(os.path.join(spec["run_dir"], "benchmark_run.json")):
            out["kept"].append(name)
        else:
            write_record(spec, **dict(record, restored_from=display_path(report_path)))
            out["restored"].append(name)
    return out


def main(argv=None):
    args = parse_args(argv)
    import dsla  # noqa: F401  (registers the datasets and models)

    if args.analyse_run:
        result = analyse_run(args.analyse_run, args.test_set)
        with open(os.path.join(args.analyse_run, "analysis.json"), "w") as f:
            json.dump(result, f, indent=2, allow_nan=False)
        return 0
    runs_dir = os.path.join(args.output_dir, "runs")
    specs = planned_specs(runs_dir, QUICK_PLAN if args.quick else PLAN)
    if args.restore:
        done = restore_records([s for s in specs if args.only is None or s["dataset"] in args.only],
                               args.restore)
        for key, names in done.items():
            log(f"{key}: {len(names)}" + (f" ({', '.join(names)})" if key == "stale" and names
                                          else ""))
        return 0
    todo = [s for s in specs if not is_done(s) and (args.only is None or s["dataset"] in args.only)]
    if args.status:
        for s in specs:
            state = "done" if is_done(s) else (read_record(s) or {}).get("status", "missing")
            print(f"{state:9s} {display_path(s['run_dir'])}")
        return 0
    failed = []
    if not args.report:
        log(f"{len(todo)} runs to train ({len(specs) - len(todo)} cached), {args.jobs} at a time")
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            ok = list(pool.map(lambda s: train_and_analyse(s, args.threads), todo))
        failed = [s["run_dir"] for s, good in zip(todo, ok) if not good]
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    report(specs, args.output_dir, usage.ru_utime + usage.ru_stime,
           {"quick": QUICK_PLAN} if args.quick else PHASES)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
