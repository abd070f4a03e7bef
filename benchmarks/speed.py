"""Training-step time, inference time and peak memory of DSLA against FCOS, as ratios to FCOS.

Two settings:

* ``shapes``: the built-in CPU config (``configs/Shapes/*_R_18_FPN_cpu.yaml``: 256 px shapes
  images, R-18-GN, training batch 8), real images of ``shapes_train`` / ``shapes_val``; weights of
  the comparison benchmark's seed-0 runs on ``shapes`` when they exist (trained detectors do realistic amounts of
  post-processing), else the configs' random initialisation.
* ``coco``: ``configs/COCO-Detection/{dsla,fcos}_R_50_FPN_1x.yaml`` at 800×1333 with
  ``MODEL.WEIGHTS ""`` (random init, nothing to download), training batch 2 of synthetic images
  with 10 random boxes each.

Time: both models live in one process and their iterations alternate (DSLA, FCOS, DSLA, FCOS,
...), so load from other jobs hits both alike; warm-up iterations are dropped and the median of
the rest is reported. A training step is forward + backward + optimizer step (the optimizer of
``dsla.engine.Trainer``, incl. gradient clipping); inference is one image per call, eval mode.
Memory: a fresh subprocess per model and mode runs the same loop (so the other model's
allocations cannot count). On CPU: the process's peak RSS during the loop (VmHWM, reset just
before the loop; whole process: libraries + weights + activations) and its increase over the RSS
before the loop (the loop's own share); on CUDA ``torch.cuda.max_memory_allocated``.

    python benchmarks/speed.py                       # both settings, CPU
    python benchmarks/speed.py --settings shapes --train-iters 5 --infer-iters 5 --no-memory
    python benchmarks/speed.py --device cuda

writes ``benchmarks/results/speed.json`` and ``speed.md``.
"""
import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    COCO_CONFIGS, REPO, RESULTS_DIR, SHAPES_CONFIGS, display_path, log, machine_info,
    markdown_table, median, python_command, set_threads, target_line, thread_env, write_results,
)

MODELS = ("dsla", "fcos")
SETTINGS = {
    "shapes": {"title": "shapes 256 px, R-18-GN FPN", "configs": SHAPES_CONFIGS, "opts": [],
               "train_batch": 8, "warmup": 3, "train_iters": 20, "infer_iters": 30},
    "coco": {"title": "800×1333, R-50 FPN (random init)", "configs": COCO_CONFIGS,
             "opts": ["MODEL.WEIGHTS", ""], "train_batch": 2, "warmup": 1, "train_iters": 3,
             "infer_iters": 5},
}
# Targets stated in the issue: ratios DSLA / FCOS.
TRAIN_TARGET, INFER_TARGET = 1.05, 1.0
COCO_SIZE, COCO_BOXES, COCO_CLASSES = (800, 1333), 10, 80
POOL = 4  # distinct batches / images cycled through, so no iteration repeats the previous input


def build_cfg(config_file: str, opts: List[str], device: str):
    """Frozen config: detectron2 defaults + DSLA keys + ``config_file`` + ``opts`` + device."""
    from dsla.cli import load_config

    return load_config(config_file, [*opts, "MODEL.DEVICE", device])


def build_model(cfg, weights: Optional[str]):
    """The model of ``cfg``; seeded so that DSLA and FCOS start from the same backbone weights."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model as d2_build_model

    torch.manual_seed(0)
    model = d2_build_model(cfg)
    if weights:
        DetectionCheckpointer(model).load(weights)
    return model


def shapes_inputs(cfg, train: bool, count: int) -> List[Dict]:
    """``count`` mapped dataset dicts of shapes_train (with instances) or shapes_val."""
    from detectron2.data import DatasetCatalog, DatasetMapper

    name = cfg.DATASETS.TRAIN[0] if train else cfg.DATASETS.TEST[0]
    mapper = DatasetMapper(cfg, is_train=train)
    return [mapper(d) for d in DatasetCatalog.get(name)[:count]]


def synthetic_inputs(count: int, seed: int = 0) -> List[Dict]:
    """
    ``count`` random 800×1333 images, each with COCO_BOXES random boxes (sides log-uniform in
    16-512 px, inside the image) of random classes: the assignment sees a COCO-like load.
    """
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    h, w = COCO_SIZE
    inputs = []
    for _ in range(count):
        size = torch.exp(torch.empty(COCO_BOXES, 2).uniform_(0, 1, generator=g)
                         * torch.log(torch.tensor(32.0))) * 16
        size = torch.minimum(size, torch.tensor([w - 1.0, h - 1.0]))
        x0y0 = torch.rand(COCO_BOXES, 2, generator=g) * (torch.tensor([w, h]) - size)
        inst = Instances((h, w), gt_boxes=Boxes(torch.cat([x0y0, x0y0 + size], dim=1)),
                         gt_classes=torch.randint(0, COCO_CLASSES, (COCO_BOXES,), generator=g))
        image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
        inputs.append({"image": image, "height": h, "width": w, "instances": inst})
    return inputs


def make_inputs(setting: str, cfg, train: bool) -> List:
    """Training: POOL batches (lists of dicts); inference: POOL single-image lists."""
    batch = SETTINGS[setting]["train_batch"] if train else 1
    if setting == "shapes":
        dicts = shapes_inputs(cfg, train, POOL * batch)
    else:
        dicts = synthetic_inputs(POOL * batch)
    if not train:
        for d in dicts:
            d.pop("instances", None)
    return [dicts[i * batch:(i + 1) * batch] for i in range(POOL)]


def _sync(device: str) -> None:
    # CUDA kernels run asynchronously: wait for them so that the time covers the work.
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_step_fn(cfg, model, batches: List) -> Callable[[], None]:
    """One SGD step per call: forward, backward, the Trainer's optimizer step."""
    from dsla.engine import Trainer

    optimizer = Trainer.build_optimizer(cfg, model)
    cycle = itertools.cycle(batches)

    def step():
        model.train()
        loss = sum(model(next(cycle)).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        _sync(cfg.MODEL.DEVICE)

    return step


def infer_step_fn(cfg, model, images: List, detections: List[int]) -> Callable[[], None]:
    """One single-image inference per call; appends the number of detections to ``detections``."""
    cycle = itertools.cycle(images)

    def step():
        model.eval()
        with torch.no_grad():
            outputs = model(next(cycle))
        _sync(cfg.MODEL.DEVICE)
        detections.append(len(outputs[0]["instances"]))

    return step


def time_interleaved(steps: Dict[str, Callable[[], None]], warmup: int,
                     iters: int) -> Dict[str, List[float]]:
    """
    Call the steps in turn (A, B, A, B, ...) ``warmup + iters`` times each; return the wall
    times of the last ``iters`` calls of each, in seconds.
    """
    from detectron2.utils.events import EventStorage

    times = {name: [] for name in steps}
    with EventStorage(0):  # the detectors log scalars during training
        for i in range(warmup + iters):
            for name, step in steps.items():
                start = time.perf_counter()
                step()
                if i >= warmup:
                    times[name].append(time.perf_counter() - start)
    return times


def shapes_weights(weights_dir: str) -> Dict[str, Optional[str]]:
    """Seed-0 weights of the comparison benchmark for both models, or None for both (random
    init)."""
    paths = {m: os.path.join(weights_dir, "shapes", m, "seed0_x1", "model_final.pth")
             for m in MODELS}
    if all(os.path.isfile(p) for p in paths.values()):
        return paths
    return {m: None for m in MODELS}


def setting_weights(setting: str, weights_dir: str) -> Dict[str, Optional[str]]:
    """Weights per model: trained shapes weights if available; COCO always random init."""
    return shapes_weights(weights_dir) if setting == "shapes" else {m: None for m in MODELS}


def time_setting(setting: str, device: str, weights: Dict, iters: Dict) -> Dict:
    """
    Inference first (on the untouched weights), then training steps; both models interleaved.

    Returns:
        dict ``train`` / ``infer`` -> model -> {median_s, times_s}, plus ``ratio`` (DSLA / FCOS)
        and, for inference, the mean number of detections per image.
    """
    spec = SETTINGS[setting]
    cfgs = {m: build_cfg(spec["configs"][m], spec["opts"], device) for m in MODELS}
    models = {m: build_model(cfgs[m], weights[m]) for m in MODELS}
    images = make_inputs(setting, cfgs["dsla"], train=False)
    detections = {m: [] for m in MODELS}
    infer = time_interleaved(
        {m: infer_step_fn(cfgs[m], models[m], images, detections[m]) for m in MODELS},
        iters["warmup"], iters["infer_iters"])
    batches = make_inputs(setting, cfgs["dsla"], train=True)
    train = time_interleaved(
        {m: train_step_fn(cfgs[m], models[m], batches) for m in MODELS},
        iters["warmup"], iters["train_iters"])
    result = {"train": _timing_summary(train), "infer": _timing_summary(infer)}
    for m in MODELS:
        result["infer"][m]["detections_per_image"] = sum(detections[m]) / len(detections[m])
    return result


def _timing_summary(times: Dict[str, List[float]]) -> Dict:
    out = {m: {"median_s": median(t), "times_s": [round(x, 5) for x in t]}
           for m, t in times.items()}
    out["ratio"] = out["dsla"]["median_s"] / out["fcos"]["median_s"]
    return out


def _proc_status_mb(key: str) -> float:
    """A memory line of /proc/self/status (Linux) in MB: VmRSS (now) or VmHWM (peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak_rss() -> bool:
    """
    Reset VmHWM to the current RSS (Linux >= 4.0), so that it measures the loop alone. Not
    ``ru_maxrss``: that survives fork + exec, so a child reports its parent's peak.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_worker(job: Dict) -> Dict:
    """
    Run in a fresh subprocess: build one model, run ``warmup + 2`` iterations of one mode, and
    report its peak memory (so that the other model's allocations cannot count).
    """
    set_threads(job["threads"])
    spec, device = SETTINGS[job["setting"]], job["device"]
    cfg = build_cfg(spec["configs"][job["model"]], spec["opts"], device)
    model = build_model(cfg, job["weights"])
    train = job["mode"] == "train"
    inputs = make_inputs(job["setting"], cfg, train=train)
    step = train_step_fn(cfg, model, inputs) if train else infer_step_fn(cfg, model, inputs, [])
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    before, reset = _proc_status_mb("VmRSS"), _reset_peak_rss()
    time_interleaved({"model": step}, job["warmup"], 2)
    peak = _proc_status_mb("VmHWM")
    result = {"rss_before_loop_mb": before, "peak_rss_mb": peak,
              "peak_is_loop_only": reset, "loop_rss_increase_mb": peak - before}
    if device.startswith("cuda"):
        result["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def measure_memory(setting: str, device: str, weights: Dict, warmup: int,
                   threads: Optional[int]) -> Dict:
    """Peak memory of each model and mode, each in its own subprocess (see memory_worker)."""
    out = {}
    for mode, model in itertools.product(("train", "infer"), MODELS):
        job = {"setting": setting, "model": model, "mode": mode, "device": device,
               "weights": weights[model], "warmup": warmup, "threads": threads}
        log(f"  peak memory: {setting} {model} {mode}")
        proc = subprocess.run(python_command("speed.py", "--memory-worker", json.dumps(job)),
                              cwd=REPO, env=thread_env(threads), capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"memory worker failed:\n{proc.stderr[-3000:]}")
        # The worker prints its result as the last stdout line (detectron2 may log before).
        out.setdefault(mode, {})[model] = json.loads(proc.stdout.strip().splitlines()[-1])
    key = "cuda_max_allocated_mb" if device.startswith("cuda") else "peak_rss_mb"
    for mode in out:
        out[mode]["ratio"] = out[mode]["dsla"][key] / out[mode]["fcos"][key]
        out[mode]["measure"] = key
        if key == "peak_rss_mb":
            # The loop's own share, without the ~0.7 GB of libraries and weights both carry.
            out[mode]["increase_ratio"] = (out[mode]["dsla"]["loop_rss_increase_mb"]
                                           / out[mode]["fcos"]["loop_rss_increase_mb"])
    return out


def check_targets(settings: Dict) -> Dict:
    """The issue's speed targets per setting: train ratio <= 1.05, inference ratio <= 1.0."""
    return {name: {"train_le_1.05": r["train"]["ratio"] <= TRAIN_TARGET,
                   "infer_le_1.0": r["infer"]["ratio"] <= INFER_TARGET}
            for name, r in settings.items()}


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def _memory_cells(result: Dict, mode: str) -> List[str]:
    """DSLA and FCOS peak memory and their ratio; on CPU also the loop's increase, '(+...)'."""
    mem = result.get("memory", {}).get(mode)
    if not mem:
        return ["n/a"] * 3
    key = mem["measure"]
    if key != "peak_rss_mb":
        return [f"{mem['dsla'][key]:.0f}", f"{mem['fcos'][key]:.0f}", f"{mem['ratio']:.2f}"]
    cells = [f"{mem[m][key]:.0f} (+{mem[m]['loop_rss_increase_mb']:.0f})" for m in MODELS]
    return [*cells, f"{mem['ratio']:.2f} ({mem['increase_ratio']:.2f})"]


def render_markdown(result: Dict) -> str:
    """speed.md: one table row per setting and mode, then the targets."""
    header = ["setting", "mode", "DSLA ms", "FCOS ms", "DSLA / FCOS",
              "DSLA peak MB", "FCOS peak MB", "peak DSLA / FCOS"]
    rows = []
    for name, r in result["settings"].items():
        for mode, what in (("train", f"train step, batch {r['train_batch']}"),
                           ("infer", "inference, 1 image")):
            t = r[mode]
            rows.append([SETTINGS[name]["title"], what, _ms(t["dsla"]["median_s"]),
                         _ms(t["fcos"]["median_s"]), f"{t['ratio']:.3f}",
                         *_memory_cells(r, mode)])
    m = result["machine"]
    on_cuda = m["device"].startswith("cuda")
    memory = ("torch.cuda.max_memory_allocated" if on_cuda
              else "peak RSS of a fresh process per model and mode during the loop, in "
              "parentheses its increase over the RSS before the loop")
    text = (f"Median over the timed iterations; DSLA and FCOS interleaved in one process. "
            f"Device: {m['device']} ({m.get('gpu', m['cpu'])}), threads: {m['torch_threads']}, "
            f"load average at start {m['load_average_1_5_15'][0]}. Peak memory: {memory}.\n\n")
    text += markdown_table(header, rows)
    for name, r in result["settings"].items():
        dets = {m: r["infer"][m]["detections_per_image"] for m in MODELS}
        weights = "random init" if r["weights"]["dsla"] is None else "trained (comparison runs)"
        text += (f"\n{name}: weights {weights}; detections per image after NMS: "
                 f"DSLA {dets['dsla']:.1f}, FCOS {dets['fcos']:.1f}.\n")
    text += "\nTargets:\n\n"
    for name, t in result["targets"].items():
        text += target_line(f"{name}: DSLA training step ≤ {TRAIN_TARGET}× FCOS",
                            t["train_le_1.05"])
        text += target_line(f"{name}: DSLA inference ≤ {INFER_TARGET}× FCOS", t["infer_le_1.0"])
    return text


def parse_args(argv=None):
    """Command-line options; per-setting defaults apply where an option is not given."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS),
                        default=["shapes", "coco"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's, i.e. all cores)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed iterations per model")
    parser.add_argument("--train-iters", type=int, default=None, help="timed training steps")
    parser.add_argument("--infer-iters", type=int, default=None, help="timed inference calls")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    parser.add_argument("--shapes-weights-dir", default=os.path.join(RESULTS_DIR, "runs"),
                        help="where comparison.py's shapes/<model>/seed0_x1/model_final.pth are "
                        "looked up")
    parser.add_argument("--output-dir", default=RESULTS_DIR)
    parser.add_argument("--memory-worker", metavar="JSON", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run_setting(name: str, args) -> Dict:
    """Timing (and memory unless --no-memory) of one setting."""
    spec = SETTINGS[name]
    iters = {k: getattr(args, k) if getattr(args, k) is not None else spec[k]
             for k in ("warmup", "train_iters", "infer_iters")}
    weights = setting_weights(name, args.shapes_weights_dir)
    log(f"{name}: timing ({iters})")
    result = {"train_batch": spec["train_batch"], **iters,
              "weights": {m: w and display_path(w) for m, w in weights.items()},
              **time_setting(name, args.device, weights, iters)}
    log(f"{name}: train ratio {result['train']['ratio']:.3f}, "
        f"infer ratio {result['infer']['ratio']:.3f}")
    if not args.no_memory:
        result["memory"] = measure_memory(name, args.device, weights, iters["warmup"],
                                          args.threads)
    return result


def main(argv=None):
    args = parse_args(argv)
    set_threads(args.threads)
    import dsla  # noqa: F401  (registers DSLA, FCOS and the shapes datasets)

    if args.memory_worker:
        print(json.dumps(memory_worker(json.loads(args.memory_worker))))
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: --device cuda but CUDA is not available")
    machine = machine_info(args.device)
    settings = {name: run_setting(name, args) for name in args.settings}
    result = {"machine": machine, "settings": settings, "targets": check_targets(settings)}
    write_results("speed", result, render_markdown(result), args.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
