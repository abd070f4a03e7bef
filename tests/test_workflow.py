"""The user workflow through ``projects/DSLA/train_net.py``, run as a user would (subprocesses):
train + COCO eval, --eval-only, --resume after SIGKILL, 2 CPU processes (gloo), --register-coco
and the errors a user sees."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conftest import REPO

TRAIN_NET = os.path.join(REPO, "projects", "DSLA", "train_net.py")
CONFIG = os.path.join(REPO, "configs", "Shapes", "dsla_R_18_FPN_cpu.yaml")
SMALL = ["INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "128",
         "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "128",
         "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "2", "SOLVER.STEPS", "(1000,)",
         "DATALOADER.NUM_WORKERS", "0", "SOLVER.CHECKPOINT_PERIOD", "1000"]


def run(args, timeout=300, env_extra=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run([sys.executable, TRAIN_NET, *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def train_args(register, out, *opts):
    return ["--config-file", CONFIG, *register, "DATASETS.TRAIN", "('tiny_train',)",
            "DATASETS.TEST", "('tiny_val',)", *SMALL, "OUTPUT_DIR", str(out), *opts]


@pytest.fixture(scope="module")
def trained(tiny_shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    proc = run(train_args(tiny_shapes, out, "SOLVER.MAX_ITER", "8"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_train_and_eval_writes_coco_metrics(trained):
    out, proc = trained
    results = json.loads((out / "eval_results.json").read_text())
    assert set(results["bbox"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert (out / "model_final.pth").is_file()
    lines = [json.loads(x) for x in (out / "metrics.json").read_text().splitlines()]
    assert any("loss_dsla_cls" in x for x in lines)
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out))  # TensorBoard
    log = (out / "log.txt").read_text()
    assert "eta:" in log


def test_eval_only_reproduces_final_ap(trained, tiny_shapes, tmp_path):
    out, _ = trained
    proc = run(["--eval-only", *train_args(tiny_shapes, tmp_path),
                "MODEL.WEIGHTS", str(out / "model_final.pth")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = json.loads((out / "eval_results.json").read_text())["bbox"]
    again = json.loads((tmp_path / "eval" / "eval_results.json").read_text())["bbox"]
    assert again == pytest.approx(final, nan_ok=True)


@pytest.mark.parametrize("weights, message", [
    ("", "--eval-only needs trained weights"),
    ("/nonexistent/model.pth", "MODEL.WEIGHTS file not found: /nonexistent/model.pth"),
])
def test_eval_only_without_weights_fails_clearly(tiny_shapes, tmp_path, weights, message):
    proc = run(["--eval-only", *train_args(tiny_shapes, tmp_path), "MODEL.WEIGHTS", weights])
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert message in proc.stderr.strip().splitlines()[-1]


def test_resume_after_sigkill(tiny_shapes, tmp_path):
    args = train_args(tiny_shapes, tmp_path, "SOLVER.MAX_ITER", "60",
                      "SOLVER.CHECKPOINT_PERIOD", "4")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, TRAIN_NET, *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = tmp_path / "last_checkpoint"
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert marker.exists(), "no checkpoint was written before the kill"
    saved = marker.read_text().strip()
    assert saved != "model_final.pth", "training finished before it could be killed"
    saved_iter = int(re.match(r"model_(\d+)\.pth", saved).group(1))

    resumed = run(["--resume", *args])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stderr + resumed.stdout
    assert f"Starting training from iteration {saved_iter + 1}" in log
    assert (tmp_path / "model_final.pth").is_file()


def test_two_cpu_processes_agree(tiny_shapes, tmp_path):
    proc = run(["--num-gpus", "2", *train_args(tiny_shapes, tmp_path, "SOLVER.MAX_ITER", "4",
                                                 "TEST.EVAL_PERIOD", "0")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (tmp_path / "log.txt").read_text()
    match = re.search(r"Parameter checksums of the 2 ranks: \[(.*)\] \((\w+)\)", log)
    assert match and match.group(2) == "equal", log[-2000:]
    assert "world size: 2" in log or "Rank of current process: 0. World size: 2" in log


def test_user_error_in_a_launched_rank_is_one_line(tiny_shapes, tmp_path):
    (tmp_path / "model_final.pth").write_bytes(b"a finished run")  # fresh training refuses
    proc = run(["--num-gpus", "2", *train_args(tiny_shapes, tmp_path)])
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: OUTPUT_DIR {tmp_path} already holds a training run"), last
    assert (tmp_path / "model_final.pth").read_bytes() == b"a finished run"


def _write_coco(tmp_path, num_categories=3, bad_boxes=True, missing_image=False):
    """A hand-made COCO json: 4 images with coloured rectangles, optionally a degenerate box."""
    images, annotations = [], []
    rng = np.random.default_rng(0)
    for i in range(4):
        image = np.full((96, 128, 3), 30, dtype=np.uint8)
        x, y = 10 + 20 * i, 20
        image[y : y + 40, x : x + 30] = rng.integers(100, 255, 3)
        name = f"img{i}.png"
        if not (missing_image and i == 3):
            Image.fromarray(image).save(tmp_path / name)
        images.append({"id": i + 1, "file_name": name, "height": 96, "width": 128})
        annotations.append({"id": 2 * i + 1, "image_id": i + 1, "category_id": 1 + i % num_categories,
                            "bbox": [x, y, 30, 40], "area": 1200, "iscrowd": 0})
        if bad_boxes:  # zero width: dropped with a warning
            annotations.append({"id": 2 * i + 2, "image_id": i + 1, "category_id": 1,
                                "bbox": [5, 5, 0, 10], "area": 0, "iscrowd": 0})
    categories = [{"id": c + 1, "name": f"thing{c}"} for c in range(num_categories)]
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": categories}))
    return str(path)


def _custom_args(json_file, tmp_path, *opts):
    return ["--config-file", CONFIG, "--register-coco", "mine", json_file, str(tmp_path),
            "DATASETS.TRAIN", "('mine',)", "DATASETS.TEST", "('mine',)", *SMALL,
            "OUTPUT_DIR", str(tmp_path / "out"), *opts]


def test_register_coco_trains_on_user_json(tmp_path):
    json_file = _write_coco(tmp_path)
    proc = run(_custom_args(json_file, tmp_path, "MODEL.DSLA.NUM_CLASSES", "3",
                            "SOLVER.MAX_ITER", "4"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dropped 4 boxes" in proc.stderr + proc.stdout
    results = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert "AP" in results["bbox"]


def test_num_classes_mismatch_names_both_numbers(tmp_path):
    proc = run(_custom_args(_write_coco(tmp_path), tmp_path, "SOLVER.MAX_ITER", "1"))
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "MODEL.DSLA.NUM_CLASSES = 4" in last and "3 classes" in last, last
    assert "Traceback" not in proc.stderr


def test_missing_json_and_image_name_the_path(tmp_path):
    missing = str(tmp_path / "nope.json")
    proc = run(_custom_args(missing, tmp_path, "MODEL.DSLA.NUM_CLASSES", "3"))
    assert proc.returncode != 0 and missing in proc.stderr.strip().splitlines()[-1]

    json_file = _write_coco(tmp_path, bad_boxes=False, missing_image=True)
    proc = run(_custom_args(json_file, tmp_path, "MODEL.DSLA.NUM_CLASSES", "3",
                            "SOLVER.MAX_ITER", "1"))
    assert proc.returncode != 0
    assert str(tmp_path / "img3.png") in proc.stderr
