"""Where a training step of a config spends its time (why ``make demo`` takes what it takes).

Builds the trainer of ``--config-file`` exactly as ``train_net.py`` does (model, optimizer, data
loader, bfloat16 autocast on a CPU), runs ``--warmup`` steps, then times ``--steps`` steps split
into data loading, forward + losses, backward and optimizer step, and profiles a few more with
``torch.profiler`` to list the operators that cost most. Nothing is written to disk except the
trainer's log folder (a temporary directory).

    python benchmarks/step_profile.py                                  # the demo recipe
    python benchmarks/step_profile.py --threads 1 DATALOADER.NUM_WORKERS 0
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, cpu_model, log, set_threads  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", default=os.path.join(
        REPO, "configs", "Shapes", "dsla_R_18_FPN_cpu.yaml"))
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads")
    parser.add_argument("--warmup", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--profiled", type=int, default=5, help="steps under torch.profiler")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return parser.parse_args(argv)


def timed_step(trainer, data_iter):
    """One training step as detectron2's SimpleTrainer runs it, timed in four parts (s)."""
    t0 = time.perf_counter()
    data = next(data_iter)
    t1 = time.perf_counter()
    losses = trainer.model(data)
    loss = sum(losses.values())
    t2 = time.perf_counter()
    trainer.optimizer.zero_grad()
    loss.backward()
    t3 = time.perf_counter()
    trainer.optimizer.step()
    return t1 - t0, t2 - t1, t3 - t2, time.perf_counter() - t3


def main(argv=None):
    args = parse_args(argv)
    set_threads(args.threads)
    import torch
    from torch.profiler import ProfilerActivity, profile

    from detectron2.utils.events import EventStorage

    from dsla.engine import Trainer, argument_parser, setup

    with tempfile.TemporaryDirectory() as out:
        cfg = setup(argument_parser().parse_args(
            ["--config-file", args.config_file, *args.opts, "OUTPUT_DIR", out]))
        step = Trainer(cfg)._trainer  # detectron2's SimpleTrainer: model, optimizer, loader
        data_iter = iter(step.data_loader)
        with EventStorage(0):
            for _ in range(args.warmup):
                timed_step(step, data_iter)
            parts = np.median([timed_step(step, data_iter) for _ in range(args.steps)], axis=0)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.profiled):
                    timed_step(step, data_iter)
    log(f"{os.path.relpath(args.config_file, REPO)} {' '.join(args.opts)} on {cpu_model()}, "
        f"{torch.get_num_threads()} threads, {cfg.DATALOADER.NUM_WORKERS} loader workers")
    names = ("data", "forward + losses", "backward", "optimizer")
    print("median of %d steps: " % args.steps + ", ".join(
        f"{n} {t:.3f} s" for n, t in zip(names, parts)) + f"; total {parts.sum():.3f} s/it")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
    return 0


if __name__ == "__main__":
    sys.exit(main())
