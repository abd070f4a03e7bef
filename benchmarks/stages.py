"""Time of one inference and one training step (forward + losses + backward) of DSLA, detectron2's
FCOS with the same widths and DSLA of another checkout (``--baseline``), each side in its own
process, alternating: medians of plain runs, then one run under torch.profiler split into stages.
Random weights (the head's so that inference keeps detections), images and boxes; CPU.

    git worktree add ../baseline e0c65af && python benchmarks/stages.py --baseline ../baseline
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from common import REPO, RESULTS_DIR, cpu_model, log, write_results

R50 = "configs/COCO-Detection/dsla_R_50_FPN_1x_mmdet.yaml"
DEMO = "configs/Shapes/dsla_R_18_FPN_demo.yaml"
FCOS = ["MODEL.META_ARCHITECTURE", "FCOSDetectron2"]
MODELS = ("R-50", "R-50 800x1216", "R-50 768x1280", "demo")  # 768x1280: main pads it alike
CONV_KERNELS = ("aten::mkldnn_convolution", "aten::_slow_conv2d_forward",
                "aten::convolution_backward", "aten::_slow_conv2d_backward")
STAGES = {"infer": ["preprocess", "backbone", "FPN", "head", "selection", "NMS", "postprocess"],
          "train": ["preprocess", "backbone", "FPN", "head", "targets", "losses", "backward"]}


def _labelled(fn, label):
    from torch.profiler import record_function

    def wrapped(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)
    return wrapped


def _build(config, opts):
    """The model with seeded random weights, its stages wrapped in profiler ranges."""
    import torch
    import dsla  # noqa: F401  (registers the meta-architectures)
    from detectron2.modeling import build_model
    from dsla.cli import load_config

    torch.manual_seed(0)
    model = build_model(load_config(os.path.join(REPO, config), [*opts, "MODEL.DEVICE", "cpu"]))
    with torch.no_grad():  # past the score threshold, so that selection and NMS have work
        for p in [p for p in model.head.parameters() if p.dim() > 1]:
            p.normal_(0.0, 0.05)
    named = {"preprocess_image": "preprocess", "label_points": "targets",
             "label_anchors": "targets", "losses": "losses", "forward_inference": "selection+"}
    for name, label in named.items():
        if hasattr(model, name):
            setattr(model, name, _labelled(getattr(model, name), label))
    for module, label in ((model.backbone.bottom_up, "backbone"), (model.backbone, "backbone+"),
                          (model.head, "head")):
        module.forward = _labelled(module.forward, label)
    return model


def _inputs(size, boxes, classes, seed):
    """One random image of ``size``, ``boxes`` random boxes (sides 16..512 px) inside it."""
    import torch
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    h, w = size
    side = torch.minimum(16 * 32 ** torch.rand(boxes, 2, generator=g),
                         torch.tensor([w - 1.0, h - 1.0]))
    x0y0 = torch.rand(boxes, 2, generator=g) * (torch.tensor([w, h]) - side)
    inst = Instances(size, gt_boxes=Boxes(torch.cat([x0y0, x0y0 + side], 1)),
                     gt_classes=torch.randint(0, classes, (boxes,), generator=g))
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
    return [{"image": image, "height": h, "width": w, "instances": inst}]


def _stages(prof, mode, wall):
    """Seconds per stage from the profiler ranges (FPN = backbone+ minus backbone, ...)."""
    t = {e.key: e.cpu_time_total / 1e6 for e in prof.key_averages()}  # one entry per key
    s = {k: t.get(k, 0.0) for k in STAGES[mode]}
    s["FPN"] = t.get("backbone+", 0.0) - s["backbone"]
    if mode == "infer":
        s["NMS"] = t.get("torchvision::nms", 0.0)
        s["selection"] = t.get("selection+", 0.0) - s["NMS"]
    s["other"] = wall - sum(s.values())
    conv = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in CONV_KERNELS)
    return {**{k: round(v, 4) for k, v in s.items()}, "conv": round(conv / 1e6, 4)}


def _run_case(case, models):
    """Times ``case["iters"]`` plain iterations (after ``warmup``), then profiles one more for the
    stages: the profiler's own cost stays out of the timings."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function
    from detectron2.utils.events import EventStorage

    key = (case["config"], tuple(case["opts"]))
    model = models[key] = models.get(key) or _build(case["config"], case["opts"])
    inputs = _inputs(case["size"], case["boxes"], case["classes"], seed=1)
    train, walls = case["mode"] == "train", []
    model.train(train)

    def step():
        model.zero_grad(set_to_none=True)
        out = model(inputs)
        if train:
            with record_function("backward"):
                sum(out.values()).backward()
        return out

    with EventStorage(0), torch.set_grad_enabled(train):
        for i in range(case["warmup"] + case["iters"]):
            t0 = time.perf_counter()
            out = step()
            walls += [time.perf_counter() - t0] if i >= case["warmup"] else []
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            step()
            profiled = time.perf_counter() - t0
    inst = None if train else out[0]["instances"]
    result = {k: float(v) for k, v in out.items()} if train else torch.cat(
        [inst.pred_boxes.tensor, inst.scores[:, None], inst.pred_classes[:, None]], 1).tolist()
    return {"walls": walls, "stages": _stages(prof, case["mode"], profiled), "output": result}


def worker(job):
    import torch
    import detectron2.modeling.meta_arch.dense_detector as dense
    torch.set_num_threads(job["threads"])
    dense.detector_postprocess = _labelled(dense.detector_postprocess, "postprocess")
    models = {}  # built once per (config, opts) in this process
    return [dict(case, **_run_case(case, models)) for case in job["cases"]]


def _case(name, mode, config, opts=(), size=(800, 1333), boxes=20, classes=80, iters=1, warmup=1):
    return dict(locals(), opts=list(opts), size=list(size))


def _spawn(tree, threads, cases):
    job = json.dumps({"threads": threads, "cases": cases})
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", job],
                         env=dict(os.environ, PYTHONPATH=os.path.join(tree, "projects", "DSLA")),
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def plan(rounds):
    """(side, threads, cases) runs; the A/B pairs come first, in alternating order."""
    dsla_cases = [_case("R-50", "infer", R50, iters=2), _case("R-50", "train", R50),
                  _case("R-50 800x1216", "infer", R50, size=(800, 1216), iters=2),
                  _case("R-50 800x1216", "train", R50, size=(800, 1216)),
                  _case("R-50 768x1280", "infer", R50, size=(768, 1280)),
                  _case("R-50 768x1280", "train", R50, size=(768, 1280)),
                  _case("demo", "infer", DEMO, size=(256, 256), classes=3, iters=10, warmup=3),
                  _case("demo", "train", DEMO, size=(256, 256), classes=3, iters=5, warmup=3)]
    fcos_cases = [dict(c, name=c["name"] + " FCOS", opts=FCOS) for c in dsla_cases]
    pair = [("base", 1, dsla_cases), ("new", 1, dsla_cases + fcos_cases)]
    runs = [run for r in range(rounds) for run in (pair[::-1] if r % 2 else pair)]
    scale = [_case(f"R-50 {n} boxes", "train", R50, boxes=n) for n in (100, 500)]
    two_threads = [dict(c, iters=1) for c in dsla_cases[:2] + fcos_cases[:2]]
    return runs + [("new", 1, scale), ("new", 2, two_threads)]


def summarize(runs):
    """{(side, threads, name, mode): {median, walls, stages of the median run, output}}."""
    groups = {}
    for side, threads, results in runs:
        for r in results:
            groups.setdefault((side, threads, r["name"], r["mode"]), []).append(r)
    table = {}
    for key, rs in groups.items():
        walls = [w for r in rs for w in r["walls"]]
        med = min(rs, key=lambda r: abs(r["walls"][-1] - statistics.median(walls)))
        table[key] = {"median_s": statistics.median(walls), "walls": walls,
                      "stages": med["stages"], "output": rs[0]["output"]}
    for (side, *rest), v in table.items():  # detections / losses of the port vs main
        base = table.get(("base", *rest))
        v["max_abs_diff_vs_main"] = max_diff(v["output"], base["output"]) if base else None
    return table


def max_diff(a, b):
    """Max abs difference of two loss dicts or two detection lists (inf if counts differ)."""
    if isinstance(a, dict) or len(a) != len(b):
        return max(abs(a[k] - b[k]) for k in a) if isinstance(a, dict) else float("inf")
    return max((abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)), default=0.0)


def render(table, machine, command):
    lines = [f"`{command}`", "", f"Machine: {machine}. One thread; R-50 800x1333 unless named, 20 "
             "boxes; demo 256x256. Medians of wall seconds without the profiler. Last column: "
             "detections or losses, port against main.", "", "| model | mode | main (s) | port (s) "
             "| port/main | FCOS (s) | port/FCOS | max abs diff |", "|---" * 8 + "|"]
    for name, mode in [(n, m) for n in MODELS for m in ("infer", "train")]:
        b, n = table[("base", 1, name, mode)], table[("new", 1, name, mode)]
        f = table[("new", 1, name + " FCOS", mode)]
        t, m, ft = n["median_s"], b["median_s"], f["median_s"]
        lines.append(f"| {name} | {mode} | {m:.3f} | {t:.3f} | **{t / m:.2f}** | {ft:.3f} | "
                     f"**{t / ft:.2f}** | {n['max_abs_diff_vs_main']:.2e} |")
    for mode in ("infer", "train"):
        cols = [k for k in sorted(table, key=str) if k[3] == mode]
        stages = STAGES[mode] + ["other"]
        lines += ["", f"Stages of one {mode} step (s; torch.profiler, one extra run after the "
                  f"timed ones, of the process nearest the median; 1 and 2 threads; "
                  f"R-50 N boxes: N boxes per image instead of 20; {machine}):", "",
                  "| side | threads | model | " + " | ".join(stages) + " | total | of which "
                  "convolution kernels |", "|---" * (len(stages) + 5) + "|"]
        for k in cols:
            s = table[k]["stages"]
            total = sum(s[x] for x in stages)
            conv = f"{s['conv']:.3f} ({s['conv'] / total:.0%})"
            cells = [f"{s[x]:.3f}" for x in stages] + [f"{total:.3f}", conv]
            lines.append(f"| {'main' if k[0] == 'base' else 'port'} | {k[1]} | {k[2]} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", help="another checkout of this repository (e.g. main)")
    parser.add_argument("--rounds", type=int, default=3, help="A/B rounds (each: both sides)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if not args.baseline:
        parser.error("--baseline DIR is required (e.g. git worktree add DIR e0c65af)")
    import torch
    runs, load = [], [os.getloadavg()[0]]
    for side, threads, cases in plan(args.rounds):
        log(f"{side}, {threads} thread(s): " + ", ".join(sorted({c['name'] for c in cases})))
        tree = args.baseline if side == "base" else REPO
        runs.append((side, threads, _spawn(tree, threads, cases)))
        load.append(os.getloadavg()[0])
    table = summarize(runs)
    machine = (f"{cpu_model()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, load "
               f"average (1 min) {min(load):.1f}-{max(load):.1f}")
    command = f"python benchmarks/stages.py --baseline BASELINE --rounds {args.rounds}"
    results = {" | ".join(map(str, k)): {n: x for n, x in v.items() if n != "output"}
               for k, v in table.items()}
    md = render(table, machine, command)
    write_results("stages", {"command": command, "machine": machine, "results": results}, md,
                  RESULTS_DIR)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
