"""What the benchmark scripts share: paths, the machine a number was taken on, and output.

Every benchmark writes ``benchmarks/results/<name>.json`` (the numbers and the machine) and
``<name>.md`` (its table, rendered from the JSON alone, so ``update_docs.py`` can re-render it);
:func:`write_results` writes both atomically (``*.tmp`` is git-ignored).
"""
import json
import os
import platform
import time
from typing import Dict, Iterable, Optional, Sequence

import torch

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
RESULTS_DIR = os.path.join(BENCH_DIR, "results")
CONFIGS = os.path.join(REPO, "configs")


def log(message: str) -> None:
    """Progress line on stdout, flushed so that it shows up at once in piped logs."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (``platform.processor()`` is often empty)."""
    names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
             if line.startswith("model name")] if os.path.isfile("/proc/cpuinfo") else []
    return names[0] if names else platform.processor() or "unknown"


def machine_info(device: str = "cpu") -> Dict:
    """CPU, cores, load (other jobs inflate timings), versions, threads, GPU if used, date."""
    import detectron2

    info = {"cpu": cpu_model(), "logical_cpus": os.cpu_count(),
            "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(), "torch": torch.__version__,
            "detectron2": detectron2.__version__, "torch_threads": torch.get_num_threads(),
            "device": device, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def machine_line(m: Dict) -> str:
    """One line of table metadata: where and with what a table's numbers were taken."""
    return (f"{m['date'][:10]}, {m.get('gpu', m['cpu'])} ({m['device']}, {m['torch_threads']} "
            f"threads, load {m['load_average_1_5_15'][0]}), Python {m['python']}, torch "
            f"{m['torch']}, detectron2 {m['detectron2']}")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    """A GitHub Markdown table; cells are converted with ``str``."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]) + "\n"


def atomic_write(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, so no half-written file is left."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def write_results(name: str, data: Dict, markdown: str, results_dir: str = RESULTS_DIR) -> None:
    """Write ``<results_dir>/<name>.json`` and ``<name>.md``."""
    os.makedirs(results_dir, exist_ok=True)
    # allow_nan: COCO metrics can be NaN; Python's json reads the NaN token back.
    atomic_write(os.path.join(results_dir, f"{name}.json"),
                 json.dumps(data, indent=2, allow_nan=True) + "\n")
    atomic_write(os.path.join(results_dir, f"{name}.md"), markdown)
    log(f"wrote {name}.json and {name}.md in {display_path(results_dir)}")


def display_path(path: str) -> str:
    """``path`` relative to the repository when inside it, else absolute."""
    path = os.path.abspath(path)
    return os.path.relpath(path, REPO) if path.startswith(REPO + os.sep) else path


def thread_env(threads: Optional[int]) -> Dict[str, str]:
    """The environment of a benchmark subprocess, with its intra-op thread count pinned."""
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def set_threads(threads: Optional[int]) -> None:
    """Pin this process's torch intra-op threads (``None``: leave torch's default)."""
    if threads:
        torch.set_num_threads(threads)
