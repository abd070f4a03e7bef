"""The LazyConfig entry (``python -m dsla.lazy_engine``, installed as ``dsla-lazy-train``) run as a
user would: the built-in CPU LazyConfig trains a few iterations and evaluates, and ``--eval-only``
on its checkpoint gives the AP of the yacs entry's ``--eval-only`` on the same checkpoint."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

LAZY_CONFIG = os.path.join(REPO, "configs", "lazy", "Shapes", "dsla_R_18_FPN_cpu.py")
YACS_CONFIG = os.path.join(REPO, "configs", "Shapes", "dsla_R_18_FPN_cpu.yaml")
TRAIN_NET = os.path.join(REPO, "projects", "DSLA", "train_net.py")
# The CPU recipe shrunk to seconds: 128 px images, batch 2, no loader workers.
TINY = ["dataloader.train.dataset.names=tiny_train", "dataloader.test.dataset.names=tiny_val",
        "dataloader.train.mapper.augmentations.0.short_edge_length=[128]",
        "dataloader.train.mapper.augmentations.0.max_size=128",
        "dataloader.test.mapper.augmentations.0.short_edge_length=128",
        "dataloader.test.mapper.augmentations.0.max_size=128",
        "dataloader.train.total_batch_size=2", "dataloader.train.num_workers=0",
        "dataloader.test.num_workers=0"]


def run(command, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *command, *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=REPO)


def lazy(*args):
    return run(["-m", "dsla.lazy_engine", "--config-file", LAZY_CONFIG], *args)


def bbox(out):
    return json.loads((out / "eval_results.json").read_text())["bbox"]


@pytest.fixture(scope="module")
def trained(tiny_shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("lazy_train")
    proc = lazy(*tiny_shapes, *TINY, "train.max_iter=6", f"train.output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_cpu_lazy_config_trains_and_evaluates(trained):
    assert set(bbox(trained)) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert (trained / "model_final.pth").is_file()
    lines = [json.loads(x) for x in (trained / "metrics.json").read_text().splitlines()]
    assert any("loss_dsla_cls" in x for x in lines)
    assert "Starting training from iteration 0" in (trained / "log.txt").read_text()


def test_eval_only_gives_the_yacs_entrys_ap(trained, tiny_shapes, tmp_path):
    weights = str(trained / "model_final.pth")
    proc = lazy("--eval-only", *tiny_shapes, *TINY, f"train.init_checkpoint={weights}",
                f"train.output_dir={tmp_path / 'lazy'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run([TRAIN_NET, "--config-file", YACS_CONFIG, "--eval-only"], *tiny_shapes,
               "DATASETS.TRAIN", "('tiny_train',)", "DATASETS.TEST", "('tiny_val',)",
               "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "128",
               "DATALOADER.NUM_WORKERS", "0", "MODEL.WEIGHTS", weights,
               "OUTPUT_DIR", str(tmp_path / "yacs"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # --eval-only writes into OUTPUT_DIR/eval.
    final, lazy_ap, yacs_ap = (bbox(trained), bbox(tmp_path / "lazy" / "eval"),
                               bbox(tmp_path / "yacs" / "eval"))
    assert lazy_ap == pytest.approx(final, nan_ok=True)
    assert lazy_ap == pytest.approx(yacs_ap, nan_ok=True)


@pytest.mark.parametrize("flags, overrides, message", [
    (["--eval-only"], [], "--eval-only needs trained weights: pass train.init_checkpoint="),
    ([], ["model.num_classes=3"], "model.num_classes = 3"),
])
def test_user_errors_end_in_one_line(tiny_shapes, tmp_path, flags, overrides, message):
    proc = lazy(*flags, *tiny_shapes, *TINY, f"train.output_dir={tmp_path}", *overrides)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert message in proc.stderr.strip().splitlines()[-1]
