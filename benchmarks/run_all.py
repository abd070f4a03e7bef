"""Run every benchmark (``make benchmark``), then copy their tables into docs/BENCHMARKS.md.

Order: the DSLA-vs-FCOS comparison first (about a day on a 2-core CPU; cached per run, so the same
command completes an interrupted one), then its investigation (the finished runs' NMS clusters,
per-level recall and positives), so that the speed benchmark can time the trained shapes
detectors; then speed, then assignment. Each runs in
its own subprocess, so one failing does not stop the others; the exit code says if any failed.

    python benchmarks/run_all.py                        # everything, full settings
    python benchmarks/run_all.py --only speed assignment
    python benchmarks/run_all.py --quick                # smoke test, into output/benchmarks-quick

Timing benchmarks should run on an otherwise idle machine; ``machine.load_average_1_5_15`` in
each JSON records how idle it was.
"""
import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    REPO, RESULTS_DIR, display_path, log, python_command, thread_env,
)

BENCHMARKS = ("comparison", "investigate", "speed", "assignment")
# Tiny settings that exercise every code path in a few minutes (numbers are meaningless).
QUICK_ARGS = {
    "comparison": ["--quick"],
    "investigate": ["--factor", "0.01"],
    "speed": ["--settings", "shapes", "--warmup", "1", "--train-iters", "2",
              "--infer-iters", "2"],
    "assignment": ["--boxes", "10", "100", "--repeats", "2"],
}
QUICK_DIR = os.path.join(REPO, "output", "benchmarks-quick")


def benchmark_command(name: str, args) -> list:
    """The command line of one benchmark under run_all's options."""
    extra = ["--output-dir", args.output_dir]
    if args.threads:
        extra += ["--threads", str(args.threads)]
    if name == "speed":
        # Time the detectors that the comparison trained (when they exist).
        extra += ["--shapes-weights-dir", os.path.join(args.output_dir, "runs")]
    return python_command(f"{name}.py", *(QUICK_ARGS[name] if args.quick else []), *extra)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS))
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for every benchmark (default: each one's default)")
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny settings into {os.path.relpath(QUICK_DIR, REPO)}")
    parser.add_argument("--output-dir", default=None,
                        help=f"default: {os.path.relpath(RESULTS_DIR, REPO)} "
                        f"({os.path.relpath(QUICK_DIR, REPO)} with --quick)")
    args = parser.parse_args(argv)
    args.output_dir = args.output_dir or (QUICK_DIR if args.quick else RESULTS_DIR)
    failed = []
    for name in [b for b in BENCHMARKS if b in args.only]:
        cmd = benchmark_command(name, args)
        log(f"==== {name}: {' '.join(display_path(c) for c in cmd)}")
        if subprocess.run(cmd, cwd=REPO, env=thread_env(args.threads)).returncode != 0:
            failed.append(name)
            log(f"==== {name} FAILED")
    if os.path.abspath(args.output_dir) == RESULTS_DIR:
        from update_docs import README, update_docs

        update_docs()
        update_docs(doc=README)
    if failed:
        log(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
