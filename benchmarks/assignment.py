"""Smooth label assignment at COCO scale: the vectorised ``assign_smooth_labels`` against the
loop-and-sort reference that the tests check it against (``tests/reference_assignment.py``),
time and peak memory.

The points of P3-P7 of an 800×1333 image padded to 896×1408 (26,257; the model pads it to
800×1344, 22,400: the larger set keeps stored results comparable), the COCO regress ranges, G
random boxes (sides log-uniform in 4-404 px, clipped to the image), relaxation 0.2, core zone.
Both functions must return identical labels, scores and boxes (``torch.equal``), else it fails.

Time: one warm-up call each, then the median of ``--repeats`` calls, the two alternating.
Peak memory: the most tensor memory a call holds above what was allocated before it (inputs
excluded, outputs included). On CPU from ``torch.profiler`` (``profile_memory=True``): the
running sum of the signed sizes of its allocator events peaks at this value; on CUDA
``torch.cuda.max_memory_allocated`` above the allocation at the call.

    python benchmarks/assignment.py [--boxes 10 100 1000] [--repeats 5] [--device cuda]
"""
import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    REPO, RESULTS_DIR, log, machine_info, machine_line, markdown_table, set_threads,
    write_results,
)
sys.path.insert(0, os.path.join(REPO, "tests"))
from reference_assignment import reference_assign_smooth_labels  # noqa: E402

IMAGE_SIZE = (800, 1333)
SIZE_DIVISIBILITY = 128  # of the point set measured (the model pads to 32)
STRIDES = (8, 16, 32, 64, 128)
REGRESS_RANGES = ((0, 64), (64, 128), (128, 256), (256, 512), (512, 1e8))  # the paper's COCO
NUM_CLASSES = 80


def coco_points(device: str):
    """(points [P, 2], strides [P], regress ranges [P, 2]) of the padded COCO-size input."""
    from dsla.assignment import level_point_info
    from dsla.points import grid_points

    padded = tuple(math.ceil(x / SIZE_DIVISIBILITY) * SIZE_DIVISIBILITY for x in IMAGE_SIZE)
    per_level = [p.to(device) for p in grid_points(padded, STRIDES)]
    return level_point_info(per_level, STRIDES, REGRESS_RANGES)


def random_boxes(num_boxes: int, device: str, seed: int = 0):
    """``num_boxes`` boxes [G, 4] xyxy inside the image and their classes [G]."""
    g = torch.Generator().manual_seed(seed)
    h, w = IMAGE_SIZE
    centre = torch.rand(num_boxes, 2, generator=g) * torch.tensor([w, h])
    size = torch.exp(torch.rand(num_boxes, 2, generator=g) * math.log(400)) + 4
    boxes = torch.cat([centre - size / 2, centre + size / 2], dim=1)
    boxes = torch.minimum(boxes.clamp(min=0), torch.tensor([w, h, w, h]))
    classes = torch.randint(0, NUM_CLASSES, (num_boxes,), generator=g)
    return boxes.to(device), classes.to(device)


def peak_cpu_bytes(fn: Callable) -> int:
    """Peak tensor memory of ``fn()`` on CPU above the level at the call, from the ``[memory]``
    events (one per malloc / free of torch's CPU allocator, signed ``Bytes``) of its trace."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(os.path.join(tmp, "trace.json"))
        with open(os.path.join(tmp, "trace.json")) as f:
            events = json.load(f)["traceEvents"]
    level = peak = 0
    for _, size in sorted((e["ts"], e["args"]["Bytes"]) for e in events
                          if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0):
        level += size
        peak = max(peak, level)
    return peak


def peak_cuda_bytes(fn: Callable) -> int:
    """Peak CUDA tensor memory of ``fn()`` above the allocation at the call."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def bench_one(num_boxes: int, points_info, repeats: int, device: str) -> Dict:
    """Time, peak memory and output equality of both functions for ``num_boxes`` boxes."""
    from dsla.assignment import assign_smooth_labels

    args = (*points_info, *random_boxes(num_boxes, device), NUM_CLASSES)
    fns = {"vectorised": lambda: assign_smooth_labels(*args),
           "reference": lambda: reference_assign_smooth_labels(*args)}
    equal = all(torch.equal(a, b) for a, b in zip(fns["vectorised"](), fns["reference"]()))
    times = {name: [] for name in fns}
    for i in range(repeats + 1):  # the first call of each is the warm-up
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()  # kernels run asynchronously: time the work
            if i > 0:
                times[name].append(time.perf_counter() - start)
    peak = peak_cuda_bytes if device.startswith("cuda") else peak_cpu_bytes
    result = {name: {"median_ms": statistics.median(t) * 1000, "peak_mb": peak(fns[name]) / 2**20,
                     "times_ms": [round(x * 1000, 3) for x in t]} for name, t in times.items()}
    result["speedup"] = result["reference"]["median_ms"] / result["vectorised"]["median_ms"]
    result["memory_ratio"] = result["vectorised"]["peak_mb"] / result["reference"]["peak_mb"]
    result["equal_outputs"] = equal
    return result


def render_markdown(result: Dict) -> str:
    """assignment.md: one row per G, from assignment.json alone."""
    s = result["settings"]
    rows = [[g, f"{r['vectorised']['median_ms']:.1f}", f"{r['reference']['median_ms']:.1f}",
             f"{r['speedup']:.1f}×", f"{r['vectorised']['peak_mb']:.1f}",
             f"{r['reference']['peak_mb']:.1f}", "yes" if r["equal_outputs"] else "**NO**"]
            for g, r in result["results"].items()]
    return (f"Measured {machine_line(result['machine'])}. {s['num_points']} points (800×1333 "
            f"padded to {s['padded_size'][0]}×{s['padded_size'][1]}, P3-P7), relaxation 0.2, "
            f"core zone; median of {s['repeats']} calls; peak = tensor memory held above the "
            "call's start.\n\n" + markdown_table(
                ["G", "vectorised ms", "loop-and-sort ms", "speed-up", "vectorised peak MB",
                 "loop-and-sort peak MB", "equal outputs"], rows))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--boxes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per function")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--output-dir", default=RESULTS_DIR)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    points_info = coco_points(args.device)
    machine = machine_info(args.device)
    results = {}
    for g in args.boxes:
        results[str(g)] = r = bench_one(g, points_info, args.repeats, args.device)
        log(f"G = {g}: speed-up {r['speedup']:.1f}x, peak {r['vectorised']['peak_mb']:.1f} vs "
            f"{r['reference']['peak_mb']:.1f} MB")
    padded = [math.ceil(x / SIZE_DIVISIBILITY) * SIZE_DIVISIBILITY for x in IMAGE_SIZE]
    result = {"machine": machine, "settings": {
        "image_size": list(IMAGE_SIZE), "padded_size": padded,
        "num_points": int(points_info[0].shape[0]), "strides": list(STRIDES),
        "regress_ranges": [list(r) for r in REGRESS_RANGES], "relaxation_factor": 0.2,
        "core_zone": True, "repeats": args.repeats, "device": args.device}, "results": results}
    write_results("assignment", result, render_markdown(result), args.output_dir)
    unequal = [g for g, r in results.items() if not r["equal_outputs"]]
    assert not unequal, f"vectorised and reference assignments differ for G = {unequal}"
    return 0


if __name__ == "__main__":
    sys.exit(main())
