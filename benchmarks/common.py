"""Helpers shared by the benchmark scripts: paths, machine description, statistics and output.

Every benchmark writes ``benchmarks/results/<name>.json`` (numbers + the machine they were taken
on) and ``<name>.md`` (a short table); :func:`write_results` writes both atomically, so an
interrupted benchmark never leaves a half-written result behind (``*.tmp`` is git-ignored).
"""
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Dict, Iterable, List, Optional, Sequence

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
RESULTS_DIR = os.path.join(BENCH_DIR, "results")
TRAIN_NET = os.path.join(REPO, "projects", "DSLA", "train_net.py")
SHAPES_CONFIGS = {
    "dsla": os.path.join(REPO, "configs", "Shapes", "dsla_R_18_FPN_cpu.yaml"),
    "fcos": os.path.join(REPO, "configs", "Shapes", "fcos_R_18_FPN_cpu.yaml"),
}
COCO_CONFIGS = {
    "dsla": os.path.join(REPO, "configs", "COCO-Detection", "dsla_R_50_FPN_1x.yaml"),
    "fcos": os.path.join(REPO, "configs", "COCO-Detection", "fcos_R_50_FPN_1x.yaml"),
}


def log(message: str) -> None:
    """Progress line on stdout, flushed so that it shows up in piped / nohup logs at once."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (``platform.processor()`` is often empty)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: str = "cpu") -> Dict:
    """
    Where the numbers were taken: CPU, cores, load, library versions, threads, GPU if used.
    The load average is recorded because other jobs on a shared machine inflate timings.
    """
    import torch

    import detectron2

    info = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "detectron2": detectron2.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "device": device,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def summarize(values: Iterable[float]) -> Dict:
    """
    mean / std / min / max / n of the finite values (COCO reports NaN for, e.g., APs when a split
    has no small object; those are left out rather than poisoning the mean).
    """
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not finite:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {
        "mean": statistics.fmean(finite),
        "std": statistics.stdev(finite) if len(finite) > 1 else 0.0,
        "min": min(finite),
        "max": max(finite),
        "n": len(finite),
    }


def format_spread(stats: Dict, digits: int = 1) -> str:
    """``mean (min–max)`` of a :func:`summarize` dict, or ``mean`` for a single value."""
    if stats["mean"] is None:
        return "n/a"
    if stats["n"] == 1:
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ({stats['min']:.{digits}f}–{stats['max']:.{digits}f})"


def median(values: Sequence[float]) -> float:
    """Median of timings: robust to the occasional iteration slowed down by another job."""
    return statistics.median(values)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    """A GitHub Markdown table; cells are converted with ``str``."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _atomic_write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_results(name: str, data: Dict, markdown: str, results_dir: str = RESULTS_DIR) -> None:
    """Write ``<results_dir>/<name>.json`` and ``<name>.md`` and say where they are."""
    os.makedirs(results_dir, exist_ok=True)
    json_path = os.path.join(results_dir, f"{name}.json")
    md_path = os.path.join(results_dir, f"{name}.md")
    # allow_nan: COCO metrics can be NaN; Python's json reads the NaN token back.
    _atomic_write(json_path, json.dumps(data, indent=2, allow_nan=True) + "\n")
    _atomic_write(md_path, markdown)
    log(f"wrote {display_path(json_path)} and {display_path(md_path)}")


def display_path(path: str) -> str:
    """``path`` relative to the repository when inside it, else absolute."""
    path = os.path.abspath(path)
    return os.path.relpath(path, REPO) if path.startswith(REPO + os.sep) else path


def thread_env(threads: Optional[int]) -> Dict[str, str]:
    """The environment of a benchmark subprocess, with its intra-op thread count pinned."""
    env = dict(os.environ)
    if threads:
        for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[key] = str(threads)
    return env


def set_threads(threads: Optional[int]) -> None:
    """Pin this process's torch intra-op threads (``None``: leave torch's default)."""
    import torch

    if threads:
        torch.set_num_threads(threads)


def target_line(description: str, met: Optional[bool]) -> str:
    """One Markdown bullet saying whether an issue target was met (``None``: not measured)."""
    verdict = {True: "**met**", False: "**not met**", None: "not measured"}[met]
    return f"- {description}: {verdict}\n"


def python_command(script: str, *args: str) -> List[str]:
    """``[python, benchmarks/<script>, args...]`` with this interpreter."""
    return [sys.executable, os.path.join(BENCH_DIR, script), *args]
