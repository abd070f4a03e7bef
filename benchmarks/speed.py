"""Training-step time, inference time and peak memory of DSLA against detectron2's FCOS.

Settings: ``shapes``, the built-in CPU configs (256 px images, training batch 8; the comparison's
seed-0 weights when they exist, so that inference post-processes a trained detector's boxes), and
``coco``, the COCO R-50 configs at 800×1333, random init, on synthetic images with 10 random boxes
(training batch 2). Both models of a setting start from the same seeded initialisation.

Time: both models live in one process and their iterations alternate, so load from other jobs
hits both alike; the median after the warm-up is reported. A training step is forward, backward
and ``dsla.engine.Trainer``'s optimizer step; inference is one image per call in eval mode.
Peak memory is not measured here: the table's memory columns are speed.json's ``memory`` entries
(speed.py at commit 4af8d40: a fresh process per model and mode, its peak RSS).

    python benchmarks/speed.py [--settings shapes coco] [--device cuda]
"""
import argparse
import itertools
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    CONFIGS, RESULTS_DIR, display_path, log, machine_info, machine_line, markdown_table,
    set_threads, write_results,
)

MODELS = ("dsla", "fcos")
SETTINGS = {
    "shapes": {"configs": {m: f"Shapes/{m}_R_18_FPN_cpu.yaml" for m in MODELS}, "opts": [],
               "train_batch": 8, "warmup": 3, "train_iters": 20, "infer_iters": 30},
    "coco": {"configs": {m: f"COCO-Detection/{m}_R_50_FPN_1x.yaml" for m in MODELS},
             "opts": ["MODEL.WEIGHTS", ""], "train_batch": 2, "warmup": 1, "train_iters": 3,
             "infer_iters": 5},
}
POOL = 4  # distinct batches cycled through, so no iteration repeats the previous input


def build(setting: str, model: str, device: str, weights: Optional[str]):
    """``(cfg, model)``, seeded so that DSLA and FCOS start from the same backbone weights."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from dsla.cli import load_config

    spec = SETTINGS[setting]
    cfg = load_config(os.path.join(CONFIGS, spec["configs"][model]),
                      [*spec["opts"], "MODEL.DEVICE", device])
    torch.manual_seed(0)
    net = build_model(cfg)
    if weights:
        DetectionCheckpointer(net).load(weights)
    return cfg, net


def synthetic_dicts(count: int, num_boxes: int = 10, size=(800, 1333)) -> List[Dict]:
    """Random 800×1333 images with random boxes (sides log-uniform in 16-512 px) of the 80
    COCO classes: the assignment sees a COCO-like load."""
    from detectron2.structures import Boxes, Instances

    g, (h, w), out = torch.Generator().manual_seed(0), size, []
    for _ in range(count):
        wh = torch.exp(torch.rand(num_boxes, 2, generator=g) * torch.log(torch.tensor(32.0))) * 16
        wh = torch.minimum(wh, torch.tensor([w - 1.0, h - 1.0]))
        x0y0 = torch.rand(num_boxes, 2, generator=g) * (torch.tensor([w, h]) - wh)
        inst = Instances((h, w), gt_boxes=Boxes(torch.cat([x0y0, x0y0 + wh], dim=1)),
                         gt_classes=torch.randint(0, 80, (num_boxes,), generator=g))
        out.append({"image": torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g),
                    "height": h, "width": w, "instances": inst})
    return out


def make_inputs(setting: str, cfg, train: bool) -> List[List[Dict]]:
    """POOL training batches, or POOL single-image inference inputs."""
    from detectron2.data import DatasetCatalog, DatasetMapper

    batch = SETTINGS[setting]["train_batch"] if train else 1
    if setting == "shapes":
        name = cfg.DATASETS.TRAIN[0] if train else cfg.DATASETS.TEST[0]
        mapper = DatasetMapper(cfg, is_train=train)
        dicts = [mapper(d) for d in DatasetCatalog.get(name)[:POOL * batch]]
    else:
        dicts = synthetic_dicts(POOL * batch)
    for d in dicts if not train else []:
        d.pop("instances", None)
    return [dicts[i * batch:(i + 1) * batch] for i in range(POOL)]


def step_fn(cfg, model, inputs: List, train: bool, detections: List[int]) -> Callable[[], None]:
    """One training step (forward, backward, the Trainer's optimizer) or one inference."""
    from dsla.engine import Trainer

    cycle = itertools.cycle(inputs)
    optimizer = Trainer.build_optimizer(cfg, model) if train else None

    def step():
        model.train(train)
        if train:
            loss = sum(model(next(cycle)).values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        else:
            with torch.no_grad():
                detections.append(len(model(next(cycle))[0]["instances"]))
        if cfg.MODEL.DEVICE.startswith("cuda"):
            torch.cuda.synchronize()  # kernels run asynchronously: time the work

    return step


def time_interleaved(steps: Dict[str, Callable], warmup: int, iters: int) -> Dict[str, List]:
    """Call the steps in turn ``warmup + iters`` times each; the last ``iters`` wall times."""
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


def time_setting(setting: str, device: str, weights: Dict, iters: Dict) -> Dict:
    """Inference first (on the untouched weights), then training steps, both models alternating."""
    built = {m: build(setting, m, device, weights[m]) for m in MODELS}
    out = {}
    for mode in ("infer", "train"):
        inputs = make_inputs(setting, built["dsla"][0], mode == "train")
        dets = {m: [] for m in MODELS}
        steps = {m: step_fn(*built[m], inputs, mode == "train", dets[m]) for m in MODELS}
        times = time_interleaved(steps, iters["warmup"], iters[f"{mode}_iters"])
        out[mode] = {m: {"median_s": statistics.median(t),
                         "times_s": [round(x, 5) for x in t]} for m, t in times.items()}
        out[mode]["ratio"] = out[mode]["dsla"]["median_s"] / out[mode]["fcos"]["median_s"]
        for m in MODELS if mode == "infer" else ():
            out[mode][m]["detections_per_image"] = sum(dets[m]) / len(dets[m])
    return out


def _memory_cells(mem: Optional[Dict]) -> List[str]:  # where speed.json has them
    return [*(f"{mem[m]['peak_rss_mb']:.0f} (+{mem[m]['loop_rss_increase_mb']:.0f})"
              for m in MODELS), f"{mem['ratio']:.2f} ({mem['increase_ratio']:.2f})"] if mem \
        else ["n/a"] * 3


def render_markdown(result: Dict) -> str:
    """speed.md: one row per setting and mode, from speed.json alone."""
    rows = []
    for name, r in result["settings"].items():
        weights = "random init" if r["weights"]["dsla"] is None else "trained weights"
        for mode, what in (("train", f"train step, batch {r['train_batch']}"),
                           ("infer", "inference, 1 image")):
            t = r[mode]
            rows.append([f"{name} ({weights})", what, f"{t['dsla']['median_s'] * 1000:.1f}",
                         f"{t['fcos']['median_s'] * 1000:.1f}", f"{t['ratio']:.3f}",
                         *_memory_cells(r.get("memory", {}).get(mode))])
    dets = "; ".join(f"{name}: DSLA {r['infer']['dsla']['detections_per_image']:.1f}, FCOS "
                     f"{r['infer']['fcos']['detections_per_image']:.1f}"
                     for name, r in result["settings"].items())
    return (f"Measured {machine_line(result['machine'])}. Median of the timed iterations; peak "
            "memory of a fresh process per model and mode (CPU: peak RSS, in parentheses its "
            "increase during the loop; n/a: not measured).\n\n" + markdown_table(
                ["setting", "mode", "DSLA ms", "FCOS ms", "DSLA / FCOS", "DSLA peak MB",
                 "FCOS peak MB", "peak DSLA / FCOS"], rows)
            + f"\nDetections per image after NMS: {dets}.\n")


def run_setting(name: str, args) -> Dict:
    """Timing of one setting, with the comparison's trained weights where they exist."""
    spec = SETTINGS[name]
    iters = {k: spec[k] if getattr(args, k) is None else getattr(args, k)
             for k in ("warmup", "train_iters", "infer_iters")}
    paths = {m: os.path.join(args.weights_dir, "shapes", m, "seed0_x1", "model_final.pth")
             for m in MODELS}
    trained = name == "shapes" and all(os.path.isfile(p) for p in paths.values())
    weights = {m: paths[m] if trained else None for m in MODELS}
    log(f"{name}: timing {iters}")
    return {"train_batch": spec["train_batch"], **iters,
            "weights": {m: w and display_path(w) for m, w in weights.items()},
            **time_setting(name, args.device, weights, iters)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS),
                        default=["shapes", "coco"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--warmup", type=int, default=None, help="untimed iterations per model")
    parser.add_argument("--train-iters", type=int, default=None, help="timed training steps")
    parser.add_argument("--infer-iters", type=int, default=None, help="timed inference calls")
    parser.add_argument("--weights-dir", default=os.path.join(RESULTS_DIR, "runs"),
                        help="comparison.py's runs (shapes/<model>/seed0_x1/model_final.pth)")
    parser.add_argument("--output-dir", default=RESULTS_DIR)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    import dsla  # noqa: F401  (registers the models and the shapes datasets)

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: --device cuda but CUDA is not available")
    result = {"machine": machine_info(args.device),
              "settings": {name: run_setting(name, args) for name in args.settings}}
    write_results("speed", result, render_markdown(result), args.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
