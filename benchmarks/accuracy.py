"""DSLA against FCOS (and DSLA's ablation ladder) on the built-in shapes dataset, equal budget.

Every model is trained by ``projects/DSLA/train_net.py`` in its own subprocess with the same
backbone, widths, data, schedule and seed (the shapes configs differ only in the
meta-architecture; the ladder only in ``MODEL.DSLA`` switches), then evaluated on ``shapes_val``
by the training's final COCO evaluation (``eval_results.json``). The detections that evaluation
wrote also give each run's score–IoU consistency (``consistency.py``).

    python benchmarks/accuracy.py              # 400 iterations per run, seeds 0 and 1
    python benchmarks/accuracy.py --iters 5 --seeds 0 --output-dir /tmp/acc    # smoke test

Runs go to ``<output-dir>/runs/<model>_seed<s>`` (git-ignored); the summary to
``<output-dir>/accuracy.json`` / ``accuracy.md`` and ``consistency_<model>.png``. ``--only``
restricts what is trained; the summary covers every model whose runs (same settings) are done, so
``--only ladder`` after a DSLA/FCOS run adds the ladder to the same report.
"""
import argparse
import json
import operator
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    REPO, RESULTS_DIR, SHAPES_CONFIGS, TRAIN_NET, display_path, format_spread, log, machine_info,
    markdown_table, summarize, target_line, thread_env, write_results,
)

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
# The ladder adds DSLA's parts one at a time (paper's ablation); rung 3 (+ IoU coupling) is the
# full DSLA config, i.e. the "dsla" run itself, so it is not trained twice.
_DSLA_SWITCHES = ("MODEL.DSLA.SMOOTH_LABEL", "MODEL.DSLA.CORE_ZONE",
                  "MODEL.DSLA.INTERVAL_RELAXATION_FACTOR", "MODEL.DSLA.IOU_COUPLING")
MODELS = {
    "fcos": ("fcos", [], "FCOS (detectron2: focal loss, GIoU, centerness)"),
    "ladder0_hard_labels": ("dsla", ["False", "False", "0.0", "off"],
                            "rung 0: hard labels (QFL, q* = 1)"),
    "ladder1_core_zone": ("dsla", ["True", "True", "0.0", "off"],
                          "rung 1: + smooth labels with core zone"),
    "ladder2_relaxation": ("dsla", ["True", "True", "0.2", "off"],
                           "rung 2: + interval relaxation 0.2"),
    "dsla": ("dsla", [], "rung 3: + IoU coupling = full DSLA"),
}
GROUPS = {"dsla": ["dsla"], "fcos": ["fcos"],
          "ladder": ["ladder0_hard_labels", "ladder1_core_zone", "ladder2_relaxation"]}
LADDER = ["ladder0_hard_labels", "ladder1_core_zone", "ladder2_relaxation", "dsla"]


def base_schedule(config_file: str):
    """(MAX_ITER, STEPS, WARMUP_ITERS) of a config, read through detectron2's config system."""
    from detectron2.config import get_cfg

    from dsla import add_dsla_config

    cfg = get_cfg()
    add_dsla_config(cfg)
    cfg.merge_from_file(config_file)
    return cfg.SOLVER.MAX_ITER, tuple(cfg.SOLVER.STEPS), cfg.SOLVER.WARMUP_ITERS


def schedule_overrides(iters: int) -> List[str]:
    """
    The config's schedule compressed to ``iters`` iterations: lr steps and warm-up keep their
    fractions of the schedule, so a shorter benchmark is the same recipe, only shorter.
    """
    max_iter, steps, warmup = base_schedule(SHAPES_CONFIGS["dsla"])
    # detectron2 needs strictly increasing milestones below MAX_ITER; a very short smoke-test
    # schedule may lose a step.
    scaled = {round(s * iters / max_iter) for s in steps}
    scaled_steps = tuple(sorted(s for s in scaled if 0 < s < iters))
    scaled_warmup = max(1, round(warmup * iters / max_iter))
    return ["SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", str(scaled_steps),
            "SOLVER.WARMUP_ITERS", str(scaled_warmup)]


def run_spec(model: str, seed: int, iters: int, runs_dir: str) -> Dict:
    """Config, overrides and output directory of one training run."""
    config_key, switch_values, _ = MODELS[model]
    switches = [x for kv in zip(_DSLA_SWITCHES, switch_values) for x in kv]
    run_dir = os.path.join(runs_dir, f"{model}_seed{seed}")
    opts = ["SEED", str(seed), *schedule_overrides(iters), *switches, "OUTPUT_DIR", run_dir]
    return {"model": model, "seed": seed, "config": SHAPES_CONFIGS[config_key], "opts": opts,
            "run_dir": run_dir}


def _record(spec: Dict) -> Optional[Dict]:
    path = os.path.join(spec["run_dir"], "benchmark_run.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _write_record(spec: Dict, **fields) -> None:
    os.makedirs(spec["run_dir"], exist_ok=True)
    record = {"config": os.path.relpath(spec["config"], REPO), "opts": spec["opts"], **fields}
    with open(os.path.join(spec["run_dir"], "benchmark_run.json"), "w") as f:
        json.dump(record, f, indent=2)


def is_finished(spec: Dict) -> bool:
    """A run is done when it finished with exactly these settings and left its metrics."""
    record = _record(spec)
    return (record is not None and record.get("status") == "finished"
            and record["opts"] == spec["opts"]
            and os.path.isfile(os.path.join(spec["run_dir"], "eval_results.json")))


def train(spec: Dict, threads: Optional[int], resume_existing: bool) -> bool:
    """
    Train and evaluate one run in a subprocess (fresh process: no state leaks between runs).
    With ``resume_existing`` an interrupted run with the same settings continues from its last
    checkpoint (``--resume``). Returns True on success; the log is ``<run_dir>/train.log``.
    """
    record = _record(spec)
    resume = resume_existing and record is not None and record["opts"] == spec["opts"]
    cmd = [sys.executable, TRAIN_NET, "--config-file", spec["config"],
           *(["--resume"] if resume else []), *spec["opts"]]
    _write_record(spec, status="started", command=cmd)
    log(f"training {os.path.basename(spec['run_dir'])}{' (resumed)' if resume else ''}")
    start = time.perf_counter()
    with open(os.path.join(spec["run_dir"], "train.log"), "a") as out:
        proc = subprocess.run(cmd, cwd=REPO, env=thread_env(threads), stdout=out,
                              stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        _write_record(spec, status="failed", command=cmd, returncode=proc.returncode)
        log(f"FAILED ({proc.returncode}) after {wall:.0f} s; see {spec['run_dir']}/train.log")
        return False
    _write_record(spec, status="finished", command=cmd, wall_s=round(wall, 1), threads=threads)
    log(f"done in {wall:.0f} s")
    return True


def read_metrics(run_dir: str) -> Dict[str, float]:
    """
    The COCO box metrics of a run (in %). detectron2 reports NaN for every metric when the
    model made no detection at all (e.g. after a very short schedule); that is an AP of 0.
    """
    from consistency import results_json_of

    with open(os.path.join(run_dir, "eval_results.json")) as f:
        bbox = json.load(f)["bbox"]
    with open(results_json_of(run_dir)) as f:
        no_detections = len(json.load(f)) == 0
    return {k: 0.0 if no_detections else bbox.get(k) for k in METRICS}


def summarize_model(model: str, specs: List[Dict], results_dir: str) -> Dict:
    """
    Metrics of one model over its finished runs: per-seed COCO numbers, mean and spread, and
    the score–IoU consistency of every run (with the scatter plot).
    """
    from consistency import analyze_model

    runs = {}
    for spec in specs:
        runs[f"seed{spec['seed']}"] = {
            "bbox": read_metrics(spec["run_dir"]),
            "wall_s": _record(spec).get("wall_s"),
            "run_dir": display_path(spec["run_dir"]),
        }
    consistency = analyze_model(model, {f"seed{s['seed']}": s["run_dir"] for s in specs},
                                results_dir)
    for label, corr in consistency["runs"].items():
        runs[label]["consistency"] = corr
    spearman = [r["consistency"]["spearman_matched"] for r in runs.values()]
    spearman_all = [r["consistency"]["spearman"] for r in runs.values()]
    return {
        "description": MODELS[model][2],
        "config": os.path.relpath(specs[0]["config"], REPO),
        "overrides": specs[0]["opts"][2:-2],  # without SEED and OUTPUT_DIR
        "runs": runs,
        "metrics": {k: summarize(r["bbox"][k] for r in runs.values()) for k in METRICS},
        "spearman_matched": summarize(spearman),
        "spearman_all": summarize(spearman_all),
        "plot": consistency["plot"],
    }


def check_targets(models: Dict) -> Dict:
    """The issue's accuracy targets: DSLA AP >= FCOS AP and a higher score–IoU correlation."""
    def compare(dsla_value, fcos_value, op):
        return None if dsla_value is None or fcos_value is None else op(dsla_value, fcos_value)

    if "dsla" not in models or "fcos" not in models:
        return {"dsla_ap_ge_fcos": None, "dsla_spearman_gt_fcos": None}
    dsla, fcos = models["dsla"], models["fcos"]
    return {
        "dsla_ap_ge_fcos": compare(dsla["metrics"]["AP"]["mean"], fcos["metrics"]["AP"]["mean"],
                                   operator.ge),
        "dsla_spearman_gt_fcos": compare(dsla["spearman_matched"]["mean"],
                                         fcos["spearman_matched"]["mean"], operator.gt),
    }


def _row(name: str, summary: Dict) -> List[str]:
    cells = [format_spread(summary["metrics"][k]) for k in METRICS]
    return [name, *cells, format_spread(summary["spearman_matched"], 3),
            format_spread(summary["spearman_all"], 3)]


def render_markdown(result: Dict) -> str:
    """accuracy.md: the DSLA/FCOS table, the ladder table and the targets."""
    models, s = result["models"], result["settings"]
    header = ["model", *METRICS, "Spearman (matched)", "Spearman (all dets)"]
    text = (f"Shapes (`shapes_train` → `shapes_val`), R-18-GN FPN, {s['iters']} iterations × "
            f"batch 8, seeds {', '.join(map(str, s['seeds']))}; mean (min–max) over seeds. Spearman = rank "
            "correlation of score and IoU of the detections matched to a same-class box.\n\n")
    text += markdown_table(header, [_row(m.upper(), models[m]) for m in ("fcos", "dsla")
                                    if m in models])
    ladder = [m for m in LADDER if m in models]
    if ladder:
        text += "\nAblation ladder (each rung adds one part of DSLA):\n\n"
        text += markdown_table(["rung", *METRICS, "Spearman (matched)", "Spearman (all dets)"],
                               [_row(models[m]["description"], models[m]) for m in ladder])
    plots = ", ".join(f"[{m}]({models[m]['plot']})" for m in models)
    text += f"\nScore–IoU scatter plots (all seeds): {plots}.\n"
    t = result["targets"]
    text += "\nTargets:\n\n"
    text += target_line("DSLA AP ≥ FCOS AP (mean over seeds)", t["dsla_ap_ge_fcos"])
    text += target_line("DSLA score–IoU Spearman > FCOS", t["dsla_spearman_gt_fcos"])
    return text


def parse_args(argv=None):
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # The benchmark budget: 400 iterations x 8 images per run, so that the 10 runs fit in about
    # 50 minutes of a 2-core CPU as two 1-thread streams (make demo trains 650).
    parser.add_argument("--iters", type=int, default=400,
                        help="training iterations per run (default 400; 0: the config's "
                        "MAX_ITER); lr steps and warm-up are scaled with it")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--only", nargs="+", choices=sorted(GROUPS), default=sorted(GROUPS),
                        help="which runs to train (default all); the report covers all done")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP/MKL threads of each training subprocess (default: inherited)")
    parser.add_argument("--resume-existing", action="store_true",
                        help="skip finished runs with the same settings, resume interrupted ones")
    parser.add_argument("--output-dir", default=RESULTS_DIR,
                        help="results directory; runs go to <output-dir>/runs")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import dsla  # noqa: F401  (registers the shapes datasets for the consistency analysis)

    iters = args.iters or base_schedule(SHAPES_CONFIGS["dsla"])[0]
    runs_dir = os.path.join(args.output_dir, "runs")
    specs = {m: [run_spec(m, s, iters, runs_dir) for s in args.seeds] for m in MODELS}
    failed = []
    for model in [m for group in args.only for m in GROUPS[group]]:
        for spec in specs[model]:
            if args.resume_existing and is_finished(spec):
                log(f"{os.path.basename(spec['run_dir'])}: finished earlier, reused")
            elif not train(spec, args.threads, args.resume_existing):
                failed.append(spec["run_dir"])
    done = {m: ss for m, ss in specs.items() if all(is_finished(s) for s in ss)}
    models = {m: summarize_model(m, ss, args.output_dir) for m, ss in done.items()}
    result = {
        "machine": machine_info("cpu"),
        "settings": {"iters": iters, "seeds": args.seeds, "threads": args.threads,
                     "train": "shapes_train", "test": "shapes_val",
                     "schedule_overrides": schedule_overrides(iters)},
        "models": models,
        "targets": check_targets(models),
        "failed_runs": [display_path(d) for d in failed],
    }
    write_results("accuracy", result, render_markdown(result), args.output_dir)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
