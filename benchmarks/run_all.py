"""Run every benchmark (``make benchmark``), each in its own subprocess, then update_docs.py.

The comparison first (a re-run trains only what is missing), so that speed can time its trained
``shapes`` detectors. Timings want an otherwise idle machine (each JSON records the load).

    python benchmarks/run_all.py [--only speed assignment] [--threads N]
"""
import argparse
import subprocess
import sys

from common import BENCH_DIR, REPO, log, thread_env
from update_docs import main as update_docs

BENCHMARKS = ("comparison", "speed", "assignment")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS))
    parser.add_argument("--threads", type=int, default=None, help="threads of every benchmark")
    args = parser.parse_args(argv)
    extra = ["--threads", str(args.threads)] if args.threads else []
    failed = [name for name in BENCHMARKS if name in args.only and subprocess.run(
        [sys.executable, f"{BENCH_DIR}/{name}.py", *extra], cwd=REPO,
        env=thread_env(args.threads)).returncode]
    update_docs()
    if failed:
        log(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
