"""DSLA against FCOS with a convergence check; the protocol is docs/BENCHMARKS.md's "Protocol".

``comparison.json`` stores every finished run (metrics, AP curve, hash of its full config);
``comparison.md`` is rendered from it alone (also by ``update_docs.py``), loading no config.
``<output-dir>/runs/`` caches runs in progress; an interrupted run resumes from its checkpoint. A
stored run whose config now hashes differently ("config changed since the run") is never trained
again silently: training stops and names it; ``--retrain-changed`` retrains and replaces it.

    python benchmarks/comparison.py --jobs 2 --threads 1   # train what is missing, then report
    python benchmarks/comparison.py --status               # done / changed / partial / missing
    python benchmarks/comparison.py --quick --output-dir /tmp/cmp   # smoke test, 1 % schedule
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    CONFIGS, REPO, RESULTS_DIR, atomic_write, cpu_model, display_path, log, machine_info,
    markdown_table, thread_env, write_results,
)

_NO_RELAXATION = ["MODEL.DSLA.INTERVAL_RELAXATION_FACTOR", "0.0"]
_NO_COUPLING = ["MODEL.DSLA.IOU_COUPLING", "off"]
MODELS = {  # name: (config under configs/Shapes, overrides, description)
    "fcos_plain": ("fcos_plain_R_18_FPN_cpu.yaml", [], "FCOS, plain (the paper's baseline)"),
    "fcos": ("fcos_R_18_FPN_cpu.yaml", [], "FCOS with tricks (detectron2's)"),
    "dsla": ("dsla_R_18_FPN_cpu.yaml", [], "DSLA (R-50 1x head options)"),
    "dsla_tricks": ("dsla_tricks_R_18_FPN_cpu.yaml", [],
                    "DSLA-tricks (R-101 / Swin-S head options)"),
    "ladder0_hard_labels": ("dsla_R_18_FPN_cpu.yaml", ["MODEL.DSLA.SMOOTH_LABEL", "False",
                            "MODEL.DSLA.CORE_ZONE", "False", *_NO_RELAXATION, *_NO_COUPLING],
                            "rung 0: hard labels (QFL, q* = 1)"),
    "ladder1_core_zone": ("dsla_R_18_FPN_cpu.yaml", [*_NO_RELAXATION, *_NO_COUPLING],
                          "rung 1: + smooth labels with core zone"),
    "ladder2_relaxation": ("dsla_R_18_FPN_cpu.yaml", _NO_COUPLING,
                           "rung 2: + interval relaxation 0.2"),
}
MAIN_MODELS = ("fcos_plain", "fcos", "dsla", "dsla_tricks")
LADDER = ("ladder0_hard_labels", "ladder1_core_zone", "ladder2_relaxation", "dsla")
DATASETS = {"shapes": ("shapes_train", "shapes_val"),
            "crowded": ("shapes_crowded_train", "shapes_crowded_val")}
# (dataset, models, seeds, schedule factor), trained in this order. PHASE1 was fixed before any
# DSLA-vs-FCOS number was seen; PHASE2 after phase 1's verdicts were known, before any of its runs.
PHASE1 = (
    ("shapes", MAIN_MODELS, (0, 1, 2), 1.0),
    ("shapes", MAIN_MODELS, (0,), 1.5),
    ("crowded", MAIN_MODELS, (0, 1), 1.0),
    ("shapes", LADDER[:3], (0, 1), 1.0),
    ("crowded", MAIN_MODELS, (0,), 1.5),
)
PHASE2_ORDER = ("fcos_plain", "dsla", "fcos", "dsla_tricks")  # the claim-1 pair first
PHASE2 = (
    ("shapes", PHASE2_ORDER, (0,), 3.0),
    ("shapes", PHASE2_ORDER, (0,), 4.5),
    ("shapes", PHASE2_ORDER, (1, 2), 3.0),
    ("crowded", PHASE2_ORDER, (0,), 3.0),
    ("crowded", PHASE2_ORDER, (0,), 4.5),
    ("crowded", PHASE2_ORDER, (1,), 3.0),
)
PLAN = PHASE1 + PHASE2
QUICK_PLAN = (("shapes", MAIN_MODELS, (0,), 0.01),)
SCHEDULES = {"x3": "x4.5", "x1": "x1.5"}  # judged schedule: its 1.5x check; 3x is the answer
MAX_CHECKPOINT_PERIOD = 900  # an interrupted long run loses at most ~15 minutes
EVALS_PER_RUN = 4
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
PAIRS = (("dsla", "fcos_plain"), ("dsla_tricks", "fcos"))
RUN_KEYS = ("dataset", "model", "seed", "factor")
CHANGED = "config changed since the run"


def schedule_opts(cfg, factor: float) -> List[str]:
    """The config's schedule times ``factor`` (lr steps alike, warm-up unchanged), evaluated
    after every 1/EVALS_PER_RUN of it."""
    max_iter = int(round(cfg.SOLVER.MAX_ITER * factor))
    steps = tuple(int(round(s * factor)) for s in cfg.SOLVER.STEPS)
    period = max(max_iter // EVALS_PER_RUN, 1)
    return ["SOLVER.MAX_ITER", str(max_iter), "SOLVER.STEPS", str(steps),
            "TEST.EVAL_PERIOD", str(period),
            "SOLVER.CHECKPOINT_PERIOD", str(min(period, MAX_CHECKPOINT_PERIOD))]


def num_classes_opts(cfg, train_set: str) -> List[str]:
    """The class count of ``train_set`` for the heads (the configs say 4; ``crowded`` has 5).
    Both nodes the published runs set, plus the run's own head node if it is another one."""
    from dsla.config import head_config_node
    from dsla.data.datasets import num_classes_of

    keys = ["MODEL.DSLA.NUM_CLASSES", "MODEL.FCOS.NUM_CLASSES"]
    node = head_config_node(cfg)[0]
    keys += [f"{node}.NUM_CLASSES"] if node and f"{node}.NUM_CLASSES" not in keys else []
    n = str(num_classes_of(train_set))
    return [x for key in keys for x in (key, n)]


def run_spec(dataset: str, model: str, seed: int, factor: float, runs_dir: str) -> Dict:
    """Config, overrides, output folder and config hash of one training run."""
    from dsla.cli import load_config

    config_name, switches, _ = MODELS[model]
    config = os.path.join(CONFIGS, "Shapes", config_name)
    cfg = load_config(config, switches)
    train, test = DATASETS[dataset]
    opts = ["SEED", str(seed), "DATASETS.TRAIN", f"('{train}',)", "DATASETS.TEST", f"('{test}',)",
            *num_classes_opts(cfg, train), *schedule_opts(cfg, factor), *switches]
    spec = {"dataset": dataset, "model": model, "seed": seed, "factor": factor, "config": config,
            "opts": opts, "test_set": test,
            "run_dir": os.path.join(runs_dir, dataset, model, f"seed{seed}_x{factor:g}")}
    spec["config_hash"] = config_hash(config, opts)
    return spec


def config_hash(config: str, opts: List[str]) -> str:
    """sha256 (16 hex digits) of the run's full merged config, without its output folder."""
    from dsla.cli import load_config

    dump = load_config(config, list(opts) + ["OUTPUT_DIR", ""]).dump()
    return hashlib.sha256(dump.encode()).hexdigest()[:16]


def run_name(run: Dict) -> str:
    return f"{run['dataset']}/{run['model']}/seed{run['seed']}_x{run['factor']:g}"


def run_key(run: Dict) -> tuple:
    return tuple(run[k] for k in RUN_KEYS)


def plan_keys(plan) -> List[tuple]:  # (dataset, model, seed, factor), in training order
    return [(d, m, s, f) for d, models, seeds, f in plan for s in seeds for m in models]


def read_cache(spec: Dict) -> Dict:
    """The run folder's ``benchmark_run.json`` (config hash, status, CPUs, cost), or {}."""
    path = os.path.join(spec["run_dir"], "benchmark_run.json")
    return json.load(open(path)) if os.path.isfile(path) else {}


def write_cache(spec: Dict, **fields) -> Dict:
    cache = dict(read_cache(spec) or {"config_hash": spec["config_hash"]}, **fields)
    os.makedirs(spec["run_dir"], exist_ok=True)
    atomic_write(os.path.join(spec["run_dir"], "benchmark_run.json"), json.dumps(cache, indent=2))
    return cache


def run_state(spec: Dict, stored: Dict[tuple, Dict]) -> str:
    """"done", CHANGED, the cached status of a run in progress, or "missing"."""
    record, cache = stored.get(run_key(spec)), read_cache(spec)
    if record is not None:
        return "done" if record.get("config_hash") == spec["config_hash"] else CHANGED
    return cache.get("status", "missing") if cache.get("config_hash") == spec["config_hash"] \
        else "missing"


def check_not_changed(specs: List[Dict], stored: Dict[tuple, Dict]) -> None:
    """Refuse to train beside stored runs of another config: the table would mix configs."""
    from dsla.errors import UserError

    changed = [s for s in specs if run_state(s, stored) == CHANGED]
    if changed:
        s = changed[0]
        raise UserError(
            f"{len(changed)} stored runs of comparison.json were trained with another config "
            f"({CHANGED}; e.g. {run_name(s)}: hash {stored[run_key(s)]['config_hash']}, now "
            f"{s['config_hash']}); their results stay published. To train them again with the "
            "current configs, pass --retrain-changed")


def train(spec: Dict, threads: Optional[int]) -> bool:
    """Train the run in a subprocess, resuming a partial run of the same config; True if done."""
    cache, run_dir = read_cache(spec), spec["run_dir"]
    if os.path.isdir(run_dir) and cache.get("config_hash") != spec["config_hash"]:
        os.replace(run_dir, stale := run_dir + f".stale-{int(time.time())}")
        log(f"{run_name(spec)}: partial run of another config moved to {display_path(stale)}")
        cache = {}
    if cache.get("status") in ("trained", "analysed"):
        return True
    resume = bool(cache) and any(f.endswith(".pth") for f in os.listdir(run_dir))
    # The CPU of every attempt: bfloat16 autocast may round differently on another CPU.
    write_cache(spec, status="training", trained_on=cache.get("trained_on", []) + [cpu_model()])
    log(f"train {run_name(spec)}{' (resume)' if resume else ''}")
    cmd = [sys.executable, os.path.join(REPO, "projects", "DSLA", "train_net.py"),
           "--config-file", spec["config"], *(["--resume"] if resume else []), *spec["opts"],
           "OUTPUT_DIR", run_dir]
    start = time.perf_counter()
    with open(os.path.join(run_dir, "train.log"), "a") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=thread_env(threads), stdout=out,
                                stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    ok = os.waitstatus_to_exitcode(status) == 0
    write_cache(spec, status="trained" if ok else "failed", threads=threads, train={
        "wall_s": round(time.perf_counter() - start, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1)})
    if not ok:
        log(f"FAILED {run_name(spec)}: see {display_path(run_dir)}/train.log")
    return ok


def train_and_analyse(spec: Dict, threads: Optional[int]) -> Optional[Dict]:
    """The run's record for comparison.json (kept in its cache until the report stores it), or
    None if its training failed."""
    if not train(spec, threads):
        return None
    if "record" not in read_cache(spec):
        write_cache(spec, status="analysed", record={
            **{k: spec[k] for k in (*RUN_KEYS, "config_hash", "opts")},
            "config": display_path(spec["config"]), **analyse_run(spec)})
        log(f"done {run_name(spec)}")
    cache = read_cache(spec)
    return {**cache["record"], **{k: cache[k] for k in ("trained_on", "threads", "train")}}


def analyse_run(spec: Dict) -> Dict:
    """Final COCO numbers, the AP curve of the periodic evaluations, the score-IoU Spearman of
    the final detections matched to a box, the NMS localisation gap of the pre-NMS candidates."""
    with open(os.path.join(spec["run_dir"], "eval_results.json")) as f:
        bbox = json.load(f)["bbox"]
    curve = []
    with open(os.path.join(spec["run_dir"], "metrics.json")) as f:
        for row in map(json.loads, filter(str.strip, f)):
            if "bbox/AP" in row:
                curve.append({"iter": row["iteration"] + 1,
                              **{k: _finite(row.get(f"bbox/{k}")) for k in METRICS[:3]}})
    return {"bbox": {k: _finite(bbox.get(k)) for k in METRICS}, "curve": curve,
            "spearman_matched": matched_spearman(spec["run_dir"], spec["test_set"]),
            "nms": nms_gap_of_run(spec["run_dir"], spec["test_set"])}


def matched_spearman(run_dir: str, test_set: str) -> Optional[float]:
    """Score-IoU Spearman over the final detections (as the run's last COCO evaluation wrote
    them) that overlap a same-class box (``dsla.analysis``'s matching rule)."""
    import numpy as np
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from dsla.analysis import (correlations_by_rule, ground_truth_of, instances_from_coco_results,
                               match_detections)

    with open(os.path.join(run_dir, "inference", test_set, "coco_instances_results.json")) as f:
        results = json.load(f)
    records = DatasetCatalog.get(test_set)
    id_map = MetadataCatalog.get(test_set).thing_dataset_id_to_contiguous_id
    pairs = [(inst.scores.double().numpy(), match_detections(
        inst.pred_boxes.tensor, inst.pred_classes, *ground_truth_of(r))[0].double().numpy())
        for r, inst in zip(records, instances_from_coco_results(results, records, id_map))]
    return correlations_by_rule(*(np.concatenate(x) for x in zip(*pairs)))["iou_positive"][
        "spearman"]


def nms_gap_of_run(run_dir: str, test_set: str) -> Dict:
    """:func:`dsla.analysis.nms_localisation_gap` of the run's final model on ``test_set``, run
    with NMS off (IoU 1.0 suppresses nothing) and no top-k after it."""
    import torch
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.data import DatasetCatalog, build_detection_test_loader
    from detectron2.modeling import build_model

    from dsla.analysis import ground_truth_of, nms_localisation_gap, summarize_nms_gap
    from dsla.cli import load_config

    cfg = load_config(os.path.join(run_dir, "config.yaml"), [])
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(os.path.join(run_dir, "model_final.pth"))
    model.test_nms_thresh, model.max_detections_per_image = 1.0, 10 ** 9
    records = {r["image_id"]: r for r in DatasetCatalog.get(test_set)}
    gaps = []
    with torch.no_grad():
        for inputs in build_detection_test_loader(cfg, test_set):
            inst = model(inputs)[0]["instances"].to("cpu")
            gaps.append(nms_localisation_gap(inst.pred_boxes.tensor, inst.scores,
                                             inst.pred_classes,
                                             *ground_truth_of(records[inputs[0]["image_id"]])))
    return summarize_nms_gap(*(torch.cat(x) for x in zip(*gaps)))


def _finite(value) -> Optional[float]:
    """JSON-safe metric: None for NaN / missing (COCO reports NaN for empty size ranges)."""
    return None if value is None or value != value else float(value)


def group_runs(runs: List[Dict]) -> Dict[tuple, Dict[int, Dict]]:
    """``{(dataset, model, factor): {seed: run}}``."""
    groups: Dict = {}
    for r in runs:
        groups.setdefault((r["dataset"], r["model"], float(r["factor"])), {})[r["seed"]] = r
    return groups


def metric_of(run: Dict, key: str) -> Optional[float]:
    """A metric of one run: a COCO key, "spearman", "lost" or "worse" (NMS)."""
    if key in METRICS:
        return run["bbox"][key]
    return {"spearman": run["spearman_matched"], "lost": run["nms"]["mean_iou_lost"],
            "worse": run["nms"]["fraction_worse_0.05"]}[key]


def spread(values) -> Dict:
    """mean / min / max / n of the values that are not None."""
    finite = [float(v) for v in values if v is not None]
    if not finite:
        return {"mean": None, "min": None, "max": None, "n": 0}
    return {"mean": sum(finite) / len(finite), "min": min(finite), "max": max(finite),
            "n": len(finite)}


def paired(groups: Dict, dataset: str, a: str, b: str, factor: float, key: str = "AP"):
    """``{seed: a - b}`` of ``key`` on the seeds both have."""
    ra, rb = groups.get((dataset, a, factor), {}), groups.get((dataset, b, factor), {})
    return {s: metric_of(ra[s], key) - metric_of(rb[s], key) for s in sorted(set(ra) & set(rb))}


def convergence(groups: Dict, dataset: str, schedule: str) -> Dict[str, Dict[int, float]]:
    """Per main detector: ``{seed: AP at the 1.5x check - AP at the schedule}``."""
    base, long = float(schedule[1:]), float(SCHEDULES[schedule][1:])
    out = {}
    for m in MAIN_MODELS:
        gains = {s: r["bbox"]["AP"] - groups[(dataset, m, base)][s]["bbox"]["AP"]
                 for s, r in groups.get((dataset, m, long), {}).items()
                 if s in groups.get((dataset, m, base), {})}
        if gains:
            out[m] = gains
    return out


def verdicts(groups: Dict, dataset: str, schedule: str) -> Dict[str, Optional[bool]]:
    """The paper's claims at our scale, fixed before the runs: True (met), False (missed),
    None (not measured yet)."""
    factor = float(schedule[1:])
    p1, p2 = (paired(groups, dataset, a, b, factor) for a, b in PAIRS)
    lost = {m: spread(metric_of(r, "lost") for r in groups.get((dataset, m, factor), {})
                      .values())["mean"] for m in ("dsla", "fcos_plain", "fcos")}
    gains = [g for per_seed in convergence(groups, dataset, schedule).values()
             for g in per_seed.values()]
    # One check over 1 AP already decides "every detector"; otherwise all four must be in.
    converged = (False if any(g > 1.0 for g in gains) else
                 True if len(convergence(groups, dataset, schedule)) == len(MAIN_MODELS) else None)
    return {
        "claim1": bool(sum(p1.values()) / len(p1) >= 1.0 and all(d > 0 for d in p1.values()))
        if p1 else None,
        "tricks": bool(sum(p2.values()) >= 0) if p2 else None,
        "claim2": None if None in lost.values() else
        bool(lost["dsla"] < lost["fcos_plain"] and lost["dsla"] < lost["fcos"]),
        "converged": converged,
    }


VERDICT_TEXT = {
    "claim1": "mean DSLA ≥ mean FCOS-plain + 1.0 AP, DSLA ahead in every seed",
    "tricks": "mean DSLA-tricks ≥ mean FCOS (tricks)",
    "claim2": "DSLA's mean IoU lost in NMS < both FCOS variants'",
    "converged": "1.5× this schedule adds ≤ 1 AP (every detector)",
}
PAPER_TEXT = ("The paper, for comparison (COCO val2017 box AP, ImageNet-pretrained R-50, 1x "
              "schedule): plain FCOS 36.6 → DSLA 38.1 (+1.5).\n")


def _fmt(stats: Dict, digits: int = 1, scale: float = 1.0) -> str:
    """``mean (min–max)`` of a :func:`spread`, ``mean`` alone for one value."""
    if stats["mean"] is None:
        return "n/a"
    m, lo, hi = (stats[k] * scale for k in ("mean", "min", "max"))
    one = f"{m:.{digits}f}"
    return one if stats["n"] == 1 else f"{one} ({lo:.{digits}f}–{hi:.{digits}f})"


def model_table(runs_of: Dict[str, Dict[int, Dict]]) -> str:
    """One row per model (``{model: {seed: run}}``): mean (min–max) over its seeds."""
    header = ["model", "seeds", *METRICS, "Spearman", "NMS IoU lost", "NMS ≥0.05 worse"]
    rows = []
    for m, runs in runs_of.items():
        s = {k: spread(metric_of(r, k) for r in runs.values())
             for k in (*METRICS, "spearman", "lost", "worse")}
        rows.append([MODELS[m][2], len(runs), *(_fmt(s[k]) for k in METRICS),
                     _fmt(s["spearman"], 3), _fmt(s["lost"], 3), _fmt(s["worse"], 1, 100) + " %"])
    return markdown_table(header, rows)


def ladder_text(groups: Dict, dataset: str) -> str:
    """The ablation ladder on the seeds its rungs share (plain FCOS alongside), and each rung's
    per-seed step over the one below it."""
    present = [m for m in LADDER if (dataset, m, 1.0) in groups]
    if not any(m in present for m in LADDER[:3]):
        return ""
    seeds = set.intersection(*(set(groups[(dataset, m, 1.0)]) for m in present))
    shown = present + ["fcos_plain"] * (seeds <= set(groups.get((dataset, "fcos_plain", 1.0), {})))
    table = model_table({m: {s: groups[(dataset, m, 1.0)][s] for s in sorted(seeds)}
                         for m in shown})
    rows = []
    for a, b in zip(present, present[1:]):
        ap, lost = (paired(groups, dataset, b, a, 1.0, key) for key in ("AP", "lost"))
        ap, lost = ({s: d[s] for s in sorted(seeds)} for d in (ap, lost))
        rows.append([f"{MODELS[b][2].split(':')[0]} − {MODELS[a][2].split(':')[0]}",
                     ", ".join(map(str, ap)), ", ".join(f"{d:+.1f}" for d in ap.values()),
                     ", ".join(f"{d:+.4f}" for d in lost.values())])
    return (f"\nAblation ladder, seeds {', '.join(map(str, sorted(seeds)))} (each rung adds one "
            "part of DSLA):\n\n" + table + "\nEach rung over the one below it (same seed):\n\n"
            + markdown_table(["step", "seeds", "AP per seed", "NMS IoU lost per seed"], rows))


def schedule_text(groups: Dict, dataset: str, schedule: str) -> str:
    """One dataset at one judged schedule: detectors, paired differences, check, verdicts."""
    factor, long = float(schedule[1:]), SCHEDULES[schedule]
    train, test = DATASETS[dataset]
    text = f"\n#### `{train}` → `{test}`, {schedule[1:]}× the recipe's schedule\n\n"
    text += model_table({m: groups[(dataset, m, factor)] for m in MAIN_MODELS
                         if (dataset, m, factor) in groups})
    rows = [[f"{a} − {b}", ", ".join(f"seed {s}: {d:+.1f}" for s, d in p.items()),
             _fmt(spread(p.values()))]
            for a, b in PAIRS if (p := paired(groups, dataset, a, b, factor))]
    if rows:
        text += "\nPaired differences (same seed):\n\n" + markdown_table(
            ["difference", "AP per seed", "mean (min–max)"], rows)
    rows = [[MODELS[m][2], s, f"{groups[(dataset, m, factor)][s]['bbox']['AP']:.1f}",
             f"{groups[(dataset, m, float(long[1:]))][s]['bbox']['AP']:.1f}", f"{g:+.1f}"]
            for m, per_seed in convergence(groups, dataset, schedule).items()
            for s, g in per_seed.items()]
    if rows:
        text += (f"\nConvergence check ({long[1:]}× the schedule):\n\n" + markdown_table(
            ["model", "seed", f"AP at {schedule[1:]}×", f"AP at {long[1:]}×", "gain"], rows))
    if schedule == "x1":
        text += ladder_text(groups, dataset)
    text += f"\nCriteria at {schedule[1:]}× (fixed before the runs):\n\n"
    for key, met in verdicts(groups, dataset, schedule).items():
        what = VERDICT_TEXT[key].replace("this schedule", f"this schedule ({long[1:]}× vs "
                                         f"{schedule[1:]}×)")
        text += f"- {what}: {({True: '**met**', False: '**missed**'}).get(met, 'not measured')}\n"
    return text


def render_markdown(result: Dict) -> str:
    """comparison.md, from comparison.json's ``runs``, ``protocol`` and ``machine`` alone."""
    runs, m = result["runs"], result["machine"]
    planned = len(plan_keys(result["protocol"]["plan"]))
    cpu_h = sum(r["train"]["cpu_s"] + r.get("analysis_cost", {}).get("cpu_s", 0)
                for r in runs) / 3600
    threads = ", ".join(sorted({str(r.get("threads")) for r in runs}))
    # Which CPUs trained the runs: bfloat16 autocast may round differently between them.
    cpus = Counter(" + ".join(dict.fromkeys(r.get("trained_on") or ["not recorded"])) for r in runs)
    cpus = "; ".join(f"{cpu}: {n}" for cpu, n in sorted(cpus.items()))
    text = (f"{len(runs)} of {planned} planned runs; mean (min–max) over seeds. Trained on CPUs "
            f"({cpus}), threads per run: {threads}; Python {m['python']}, torch "
            f"{m['torch']}, detectron2 {m['detectron2']}; {cpu_h:.1f} CPU-hours (a resumed run "
            "counts its last attempt).\n")
    if len(runs) < planned:
        text += ("\n**Partial results**: the verdicts are on the runs finished so far "
                 "(`comparison.py --status` lists the rest).\n")
    groups = group_runs(runs)
    for dataset in DATASETS:
        for schedule in SCHEDULES:
            if any((dataset, m, float(schedule[1:])) in groups for m in MAIN_MODELS):
                text += schedule_text(groups, dataset, schedule)
    return text + "\n" + PAPER_TEXT


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at the same time")
    parser.add_argument("--threads", type=int, default=None, help="OMP/MKL threads of each run")
    parser.add_argument("--status", action="store_true", help="list each run's state, exit")
    parser.add_argument("--retrain-changed", action="store_true",
                        help=f"train again the stored runs whose {CHANGED}")
    parser.add_argument("--output-dir", default=RESULTS_DIR,
                        help="results folder; runs in progress go to <output-dir>/runs")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 %% of the schedule")
    return parser.parse_args(argv)


def run(args) -> int:
    """Train what the plan misses, store it in comparison.json, write the report."""
    plan = QUICK_PLAN if args.quick else PLAN
    path = os.path.join(args.output_dir, "comparison.json")
    stored = {run_key(r): r for r in (json.load(open(path))["runs"] if os.path.isfile(path)
                                      else [])}
    specs = [run_spec(*key, os.path.join(args.output_dir, "runs")) for key in plan_keys(plan)]
    if args.status:
        for s in specs:
            print(f"{run_state(s, stored):30s} {run_name(s)}")
        return 0
    if not args.retrain_changed:
        check_not_changed(specs, stored)
    todo = [s for s in specs if run_state(s, stored) != "done"]
    log(f"{len(todo)} runs to train ({len(specs) - len(todo)} stored), {args.jobs} at a time")
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        records = list(pool.map(lambda s: train_and_analyse(s, args.threads), todo))
    stored.update({run_key(r): r for r in records if r is not None})
    order = {key: i for i, key in enumerate(plan_keys(plan))}
    runs = sorted(stored.values(), key=lambda r: order.get(run_key(r), len(order)))
    result = {"machine": machine_info("cpu"), "protocol": {"plan": plan, "models": MODELS,
              "datasets": DATASETS, "evals_per_run": EVALS_PER_RUN}, "runs": runs}
    write_results("comparison", result, render_markdown(result), args.output_dir)
    return 1 if None in records else 0


def main(argv=None):
    args = parse_args(argv)
    import dsla  # noqa: F401  (registers the datasets and models)
    from dsla.cli import exit_on_user_error

    with exit_on_user_error():
        return run(args)


if __name__ == "__main__":
    sys.exit(main())
