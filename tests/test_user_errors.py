"""A user's mistake ends in one line naming the file / key / numbers; a bug keeps its traceback.

One test (or more) per case of the "bad input" survey: weights of another class count, --eval-only
advice, broken and empty datasets, --resume with missing or truncated checkpoints, unreadable
images in ``dsla-predict``, class names, a second run into a finished OUTPUT_DIR, errors too broad,
the device / backbone-weights warnings, strict JSON and the constructor's checks.
"""
import json
import logging
from argparse import Namespace
import math
import os
import subprocess
import sys

import pytest
import torch

from detectron2.modeling import build_model

from conftest import CPU_CONFIG, REPO, tiny_cfg
from dsla.checkpoint import ClassNames, DSLACheckpointer
from dsla.cli import class_names, load_config, write_json
from dsla.data import STYLES, generate_shapes_dataset, register_coco_dataset
from dsla.errors import UserError
from dsla.tools import analyze_consistency, export_model, predict, visualize_assignment
from test_workflow import SMALL, _write_coco, run


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def dsla_warnings():
    handler = _Records()
    logging.getLogger("dsla").addHandler(handler)
    yield handler.messages
    logging.getLogger("dsla").removeHandler(handler)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """``--register-coco`` arguments of an 8-image train and 4-image val split, 128 px."""
    root = str(tmp_path_factory.mktemp("shapes"))
    train = generate_shapes_dataset(root, "train", num_images=8, seed=0, image_size=128)
    val = generate_shapes_dataset(root, "val", num_images=4, seed=1, image_size=128)
    return {"register": ["--register-coco", "ue_train", *train, "--register-coco", "ue_val", *val],
            "val_images": val[1]}


@pytest.fixture(scope="module")
def three_class_weights(tmp_path_factory):
    """A checkpoint of the tiny model with 3 classes (the config has 4)."""
    folder = tmp_path_factory.mktemp("w3")
    model = build_model(tiny_cfg("MODEL.DSLA.NUM_CLASSES", "3"))
    DSLACheckpointer(model, str(folder)).save("three")
    return str(folder / "three.pth")


def _args(shapes, out, *opts):
    return ["--config-file", CPU_CONFIG, *shapes["register"], "DATASETS.TRAIN", "('ue_train',)",
            "DATASETS.TEST", "('ue_val',)", *SMALL, "OUTPUT_DIR", str(out), *opts]


def _last_line(proc):
    """The one line a user sees; no traceback above it."""
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


def _tool_error(tool, argv):
    with pytest.raises(SystemExit) as e:
        tool.main(argv)
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


# 1. Weights of another class count: no randomly initialised classifier.


def test_eval_only_refuses_weights_of_another_class_count(shapes, three_class_weights, tmp_path):
    last = _last_line(run(["--eval-only", *_args(shapes, tmp_path),
                           "MODEL.WEIGHTS", three_class_weights]))
    assert three_class_weights in last and "head.cls_score" in last, last
    assert "3 classes" in last and "NUM_CLASSES is 4" in last, last


@pytest.mark.parametrize("tool", [predict, analyze_consistency, export_model],
                         ids=lambda t: t.__name__)
def test_tools_refuse_weights_of_another_class_count(tool, shapes, three_class_weights, tmp_path):
    image = os.path.join(shapes["val_images"], "000000.jpg")
    extra = {predict: ["--input", image], export_model: ["--sample-image", image],
             analyze_consistency: ["--dataset", "shapes_val"]}[tool]
    message = _tool_error(tool, ["--config-file", CPU_CONFIG, *extra, "--output",
                                 str(tmp_path / "o"), "MODEL.WEIGHTS", three_class_weights])
    assert "3 classes" in message and "NUM_CLASSES is 4" in message, message
    assert not (tmp_path / "o").exists()


def test_fine_tuning_reinitialises_with_one_warning(three_class_weights, dsla_warnings):
    model = build_model(tiny_cfg())
    DSLACheckpointer(model, strict=False).load(three_class_weights)
    warnings = [m for m in dsla_warnings if "re-initialised" in m]
    assert len(warnings) == 1 and "head.cls_score.weight" in warnings[0], warnings


# 2, 3 and 4: the datasets each command uses (the checks of dsla.engine.setup, in-process).


def _dataset_check(cfg_opts, eval_only):
    from dsla.engine import _check_datasets

    cfg = load_config(CPU_CONFIG, cfg_opts)
    with pytest.raises(UserError) as e:
        _check_datasets(cfg, Namespace(eval_only=eval_only))
    return str(e.value)


def _register(tmp_path, name, **coco):
    json_file = _write_coco(tmp_path, bad_boxes=False, **coco)
    register_coco_dataset(name, json_file, str(tmp_path))
    return json_file


def test_eval_only_advice_names_test_set_and_checkpoint(three_class_weights, tmp_path):
    _register(tmp_path, "ue_two", num_categories=2)
    message = _dataset_check(["DATASETS.TEST", "('ue_two',)", "MODEL.DSLA.NUM_CLASSES", "6",
                              "MODEL.WEIGHTS", three_class_weights], eval_only=True)
    assert "MODEL.DSLA.NUM_CLASSES = 6" in message and "'ue_two' has 2 classes" in message
    assert f"{three_class_weights} has 3 classes" in message, message
    assert "shapes_train" not in message  # the training set is not --eval-only's business


def test_broken_json_is_not_reported_as_num_classes(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [')
    register_coco_dataset("ue_bad", str(bad), str(tmp_path))
    message = _dataset_check(["DATASETS.TEST", "('ue_bad',)"], eval_only=True)
    assert str(bad) in message and "not a valid COCO json" in message, message
    assert "NUM_CLASSES" not in message, message


@pytest.mark.parametrize("annotations", ["missing", "empty"])
def test_empty_training_data_names_the_dataset(tmp_path, annotations):
    json_file = _write_coco(tmp_path, num_categories=4, bad_boxes=False)
    data = json.loads(open(json_file).read())
    if annotations == "missing":
        del data["annotations"]
    else:
        data["annotations"] = []
    open(json_file, "w").write(json.dumps(data))
    name = f"ue_none_{annotations}"
    register_coco_dataset(name, json_file, str(tmp_path))
    message = _dataset_check(["DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", "()",
                              "DATALOADER.FILTER_EMPTY_ANNOTATIONS", "True"], eval_only=False)
    assert f"Dataset '{name}'" in message and json_file in message, message
    assert "no usable box" in message, message


# 5 and 8. --resume with missing / truncated checkpoints; a finished run is not overwritten.


@pytest.fixture(scope="module")
def finished_run(shapes, tmp_path_factory):
    """A 2-iteration training with a checkpoint every iteration, no evaluation."""
    out = tmp_path_factory.mktemp("run")
    proc = run(_args(shapes, out, "SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_PERIOD", "1",
                     "DATASETS.TEST", "()"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_training_checkpoints_record_class_names(finished_run):
    saved = torch.load(finished_run / "model_final.pth", map_location="cpu", weights_only=True)
    assert saved["class_names"]["thing_classes"] == list(STYLES["standard"].classes)


def test_second_fresh_run_is_refused(shapes, finished_run):
    before = (finished_run / "model_final.pth").stat().st_mtime_ns
    last = _last_line(run(_args(shapes, finished_run, "SOLVER.MAX_ITER", "2",
                                "DATASETS.TEST", "()")))
    assert str(finished_run) in last and "--resume" in last and "--overwrite" in last, last
    assert (finished_run / "model_final.pth").stat().st_mtime_ns == before


def test_eval_only_resume_contradicting_weights_is_refused(finished_run, three_class_weights):
    from dsla.engine import _eval_weights

    opts = ["OUTPUT_DIR", str(finished_run), "MODEL.WEIGHTS", three_class_weights]
    cfg = load_config(CPU_CONFIG, opts)
    checkpointer = DSLACheckpointer(build_model(cfg), str(finished_run))
    with pytest.raises(UserError) as e:
        _eval_weights(cfg, Namespace(resume=True, opts=opts), checkpointer)
    assert three_class_weights in str(e.value) and "model_final.pth" in str(e.value)
    # Without MODEL.WEIGHTS on the command line, --resume evaluates the run's last checkpoint.
    last = _eval_weights(cfg, Namespace(resume=True, opts=opts[:2]), checkpointer)
    assert last == str(finished_run / "model_final.pth")


def test_resume_falls_back_then_stops_on_truncated(shapes, finished_run, tmp_path):
    run_dir = tmp_path / "copy"
    run_dir.mkdir()
    for name in ("model_0000000.pth", "model_0000001.pth", "last_checkpoint"):
        (run_dir / name).write_bytes((finished_run / name).read_bytes())
    (run_dir / "last_checkpoint").write_text("model_final.pth")  # deleted since
    args = ["--resume", *_args(shapes, run_dir, "SOLVER.MAX_ITER", "2", "DATASETS.TEST", "()")]
    proc = run(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stderr + proc.stdout
    assert "model_final.pth (named in last_checkpoint) is missing" in log, log[-3000:]
    assert f"resuming from {run_dir / 'model_0000001.pth'}" in log, log[-3000:]

    for name in ("model_0000000.pth", "model_0000001.pth", "model_final.pth"):
        # Truncated, e.g. by a full disk.
        (run_dir / name).write_bytes((finished_run / name).read_bytes()[:1000])
    last = _last_line(run(args))
    assert str(run_dir / "model_final.pth") in last and "unreadable" in last, last


def test_truncated_weights_name_the_file(shapes, finished_run, tmp_path):
    truncated = tmp_path / "cut.pth"
    truncated.write_bytes((finished_run / "model_final.pth").read_bytes()[:5000])
    image = os.path.join(shapes["val_images"], "000000.jpg")
    message = _tool_error(export_model, ["--config-file", CPU_CONFIG, "--output",
                                         str(tmp_path / "o"), "MODEL.WEIGHTS", str(truncated)])
    assert f"cannot read checkpoint {truncated}" in message, message
    message = _tool_error(predict, ["--config-file", CPU_CONFIG, "--input", image, "--output",
                                    str(tmp_path / "o"), "MODEL.WEIGHTS", str(truncated)])
    assert f"cannot read checkpoint {truncated}" in message, message


# 6 and 7. dsla-predict: unreadable inputs are skipped; class names come with the model.


@pytest.fixture(scope="module")
def named_weights(tmp_path_factory):
    """A 4-class checkpoint that records the class names a, b, c, d (as training does)."""
    folder = tmp_path_factory.mktemp("named")
    model = build_model(tiny_cfg())
    DSLACheckpointer(model, str(folder), class_names=ClassNames(list("abcd"))).save("named")
    return str(folder / "named.pth")


def test_predict_skips_unreadable_images(shapes, named_weights, tmp_path, capsys):
    good = os.path.join(shapes["val_images"], "000001.jpg")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(open(good, "rb").read()[:600])  # a truncated JPEG
    out = tmp_path / "out"
    status = predict.main(["--config-file", CPU_CONFIG, "--input", good, str(broken),
                           "--output", str(out), "MODEL.WEIGHTS", named_weights])
    assert status == 1
    assert os.listdir(out) == ["000001.png"]
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert "Wrote 1 PNG" in summary and "skipped 1" in summary and str(broken) in summary


def test_class_names_come_from_the_checkpoint(named_weights):
    cfg = load_config(CPU_CONFIG, ["MODEL.WEIGHTS", named_weights])
    model = build_model(cfg)
    names = DSLACheckpointer(model).load(named_weights)["class_names"]["thing_classes"]
    assert class_names(cfg, names) == list("abcd")
    # No names in the checkpoint: the test set's, only when they are NUM_CLASSES many.
    assert class_names(cfg, None) == list(STYLES["standard"].classes)
    assert class_names(load_config(CPU_CONFIG, ["MODEL.DSLA.NUM_CLASSES", "2"]), None) is None


def test_tools_take_register_coco(tmp_path):
    json_file = _write_coco(tmp_path, num_categories=4, bad_boxes=False)
    out = tmp_path / "assignment.png"
    assert visualize_assignment.main(["--config-file", CPU_CONFIG, "--register-coco", "mine_va",
                                      json_file, str(tmp_path), "--dataset", "mine_va",
                                      "--output", str(out)]) == 0
    assert out.stat().st_size > 0


# 9. Only user errors are one-liners: a bug deep in training keeps its traceback.


def test_bug_in_training_keeps_its_traceback(shapes, tmp_path):
    code = (
        "import sys; import dsla.meta_arch as m\n"
        "def broken(self, *a, **k):\n"
        "    raise ValueError('deliberate bug: BCE shape mismatch')\n"
        "m.DSLA.losses = broken\n"
        "from dsla.engine import cli; cli(sys.argv[1:])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, *_args(shapes, tmp_path, "SOLVER.MAX_ITER", "1",
                                            "DATASETS.TEST", "()")],
        capture_output=True, text=True, timeout=300, cwd=REPO,
        env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "ValueError: deliberate bug" in proc.stderr
    assert not proc.stderr.strip().splitlines()[-1].startswith("error:")


# 10. Device fallback and frozen random backbones are said; JSON is strict; DSLA checks itself.


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the CPU fallback")
def test_cuda_without_cuda_warns(dsla_warnings):
    cfg = load_config(CPU_CONFIG, ["MODEL.DEVICE", "cuda"])
    assert cfg.MODEL.DEVICE == "cpu"
    assert any("MODEL.DEVICE" in m and "CUDA is not available" in m for m in dsla_warnings)


def test_frozen_backbone_without_weights_warns(dsla_warnings, tmp_path):
    from dsla.engine import _warn_frozen_random_backbone

    x101 = os.path.join(REPO, "configs", "COCO-Detection", "dsla_X_101_64x4d_FPN_dcn_ms_2x.yaml")
    cfg = load_config(x101, ["OUTPUT_DIR", str(tmp_path)])
    _warn_frozen_random_backbone(cfg, Namespace(eval_only=False, resume=False))
    assert any("MODEL.WEIGHTS is empty" in m and "FREEZE_AT" in m for m in dsla_warnings)
    dsla_warnings.clear()
    _warn_frozen_random_backbone(load_config(CPU_CONFIG, ["OUTPUT_DIR", str(tmp_path)]),
                                 Namespace(eval_only=False, resume=False))
    assert not dsla_warnings  # the CPU configs train from scratch on purpose


def test_eval_results_are_strict_json(tmp_path, monkeypatch):
    from detectron2.engine import DefaultTrainer

    from dsla.engine import Trainer

    monkeypatch.setattr(DefaultTrainer, "test", classmethod(
        lambda cls, cfg, model, evaluators=None: {"bbox": {"AP": 12.5, "APl": math.nan}}))
    Trainer.test(load_config(CPU_CONFIG, ["OUTPUT_DIR", str(tmp_path)]), model=None)
    text = (tmp_path / "eval_results.json").read_text()
    results = json.loads(text, parse_constant=lambda c: pytest.fail(f"invalid JSON: {c}"))
    assert results == {"bbox": {"AP": 12.5, "APl": None}}
    write_json(str(tmp_path / "x.json"), [math.inf])
    assert json.loads((tmp_path / "x.json").read_text()) == [None]


def test_dsla_constructor_checks_its_arguments():
    cfg = tiny_cfg()
    kwargs = type(build_model(cfg)).from_config(cfg)
    kwargs["iou_coupling"] = "yes"
    from dsla.meta_arch import DSLA

    with pytest.raises(UserError, match="DSLA argument iou_coupling = 'yes'"):
        DSLA(**kwargs)


def test_resume_from_another_models_checkpoint_is_refused(shapes, finished_run, tmp_path):
    """An OUTPUT_DIR holding a run of another class count (e.g. an old `make demo` output) is
    not resumed with a re-initialised head: one line naming the file and both class counts, and
    the file is left as it was."""
    run_dir = tmp_path / "other"
    run_dir.mkdir()
    saved = torch.load(finished_run / "model_final.pth", map_location="cpu", weights_only=True)
    for key in [k for k in saved["model"] if "cls_score" in k]:
        saved["model"][key] = saved["model"][key][:3].clone()  # a 3-class model's head
    torch.save(saved, run_dir / "model_final.pth")
    (run_dir / "last_checkpoint").write_text("model_final.pth")
    before = (run_dir / "model_final.pth").read_bytes()
    last = _last_line(run(["--resume", *_args(shapes, run_dir, "SOLVER.MAX_ITER", "4",
                                              "DATASETS.TEST", "()")]))
    assert str(run_dir / "model_final.pth") in last and "--resume" in last, last
    assert "The checkpoint has 3 classes, the config's NUM_CLASSES is 4" in last, last
    assert (run_dir / "model_final.pth").read_bytes() == before
