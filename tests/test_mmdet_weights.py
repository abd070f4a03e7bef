"""The authors' mmdetection checkpoints given as they are to ``MODEL.WEIGHTS`` (and
``train.init_checkpoint``): ``DSLACheckpointer`` converts them in memory with the rules of
``dsla-convert-mmdet`` and refuses, in one line, a file that does not fit the config's model.

The checkpoints are synthetic, with the key names and shapes of the authors' three released
models (``mmdet_reference``); their classifier has the class count of the tiny shapes sets, so
that ``--eval-only`` can evaluate them there.
"""
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from detectron2.modeling import build_model

from conftest import REPO
from dsla.checkpoint import (
    DSLACheckpointer,
    checkpoint_num_classes,
    load_weights,
    mmdet_to_detectron2,
)
from dsla.cli import load_config
from dsla.convert import RELEASED_MODELS, describe_checkpoint, model_shapes, released_model
from dsla.data import STYLES
from dsla.errors import UserError
from dsla.tools import convert_mmdet_weights
from mmdet_reference import r50_layout, r101_dcn_layout, random_state_dict, swin_s_layout

SHAPES_CLASSES = STYLES["standard"].classes  # the classes of the tiny shapes splits

TRAIN_NET = os.path.join(REPO, "projects", "DSLA", "train_net.py")
NUM_CLASSES = len(SHAPES_CLASSES)
# name -> (authors' layout, yacs inference config, LazyConfig)
LAYOUTS = {m.name: (layout, os.path.join(REPO, m.config), os.path.join(REPO, m.lazy_config))
           for m, layout in zip(RELEASED_MODELS, (r50_layout, r101_dcn_layout, swin_s_layout))}
R50, R101, SWIN = LAYOUTS
SMALL_TEST = ["INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "128",
              "DATALOADER.NUM_WORKERS", "0"]


def with_classes(layout, num_classes):
    """``layout`` with a classifier for ``num_classes`` classes."""
    layout = dict(layout)
    channels = layout["bbox_head.conv_cls.weight"][1:]
    layout["bbox_head.conv_cls.weight"] = (num_classes, *channels)
    layout["bbox_head.conv_cls.bias"] = (num_classes,)
    return layout


def save_mmdet(path, state, classes=SHAPES_CLASSES, **meta):
    """What mmdetection 2.x's runner writes: meta (with CLASSES), state_dict, optimizer."""
    meta = {"epoch": 12, "mmdet_version": "2.x", "CLASSES": tuple(classes), **meta}
    torch.save({"meta": meta, "state_dict": state,
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.01, "params": [0]}]}}, path)
    return path


def run(args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def last_line(proc):
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


@pytest.fixture
def dsla_log(caplog):
    """Records of the "dsla" logger, which detectron2's setup_logger may have cut off from the
    root logger in an earlier test."""
    logger = logging.getLogger("dsla")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="dsla")
    yield caplog
    logger.removeHandler(caplog.handler)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """name -> (authors' file, the file dsla-convert-mmdet writes from it)."""
    tmp = tmp_path_factory.mktemp("mmdet")
    paths = {}
    for seed, (name, (layout, config, _)) in enumerate(LAYOUTS.items()):
        stem = name.replace(" ", "_")
        src = save_mmdet(str(tmp / f"{stem}.pth"),
                         random_state_dict(with_classes(layout(), NUM_CLASSES), seed=seed))
        dst = str(tmp / f"{stem}_d2.pth")
        assert convert_mmdet_weights.main([src, dst, "--config-file", config,
                                           "MODEL.DSLA.NUM_CLASSES", str(NUM_CLASSES)]) == 0
        paths[name] = (src, dst)
    return paths


@pytest.fixture(scope="module")
def models():
    """name -> the model of its inference config (CPU, shapes' class count), eval mode."""
    return {name: build_model(load_config(config, [
        "MODEL.DEVICE", "cpu", "MODEL.DSLA.NUM_CLASSES", str(NUM_CLASSES)])).eval()
        for name, (_, config, _) in LAYOUTS.items()}


def predict(model):
    image = torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(0)) * 255
    with torch.no_grad():
        return model([{"image": image, "height": 96, "width": 128}])[0]["instances"]


# ---------------------------------------------------------------------------------------------
# The three released layouts load as they are, exactly as their converted files
# ---------------------------------------------------------------------------------------------
def test_released_models_are_recognised_and_their_configs_exist():
    for model, layout in zip(RELEASED_MODELS, (r50_layout, r101_dcn_layout, swin_s_layout)):
        state = {k: torch.zeros(s) for k, s in layout().items()}
        assert released_model(state) == model
        assert describe_checkpoint(state) == model.description
        assert os.path.isfile(os.path.join(REPO, model.config))
        assert os.path.isfile(os.path.join(REPO, model.lazy_config))
    swin_b = {k: torch.zeros(s) for k, s in swin_s_layout().items()}
    swin_b["backbone.patch_embed.projection.weight"] = torch.zeros(128, 3, 4, 4)
    assert released_model(swin_b) is None  # same blocks per stage, another width


@pytest.mark.parametrize("name", LAYOUTS)
def test_mmdet_file_loads_as_its_converted_file(name, files, models, dsla_log):
    src, converted = files[name]
    model = models[name]
    assert checkpoint_num_classes(src) == NUM_CLASSES  # for --eval-only's class-count advice
    assert load_weights(model, src) == list(SHAPES_CLASSES)  # meta["CLASSES"]
    state, out = {k: v.clone() for k, v in model.state_dict().items()}, predict(model)
    assert f"{src}: mmdetection checkpoint of the released {name} layout" in dsla_log.text
    assert load_weights(model, converted) == list(SHAPES_CLASSES)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    again = predict(model)
    assert len(out) > 0
    for field in ("pred_classes", "scores"):
        assert torch.equal(out.get(field), again.get(field))
    assert torch.equal(out.pred_boxes.tensor, again.pred_boxes.tensor)


@pytest.mark.parametrize("name", LAYOUTS)
def test_eval_only_with_the_mmdet_config(name, files, tiny_shapes, tmp_path):
    _, config, _ = LAYOUTS[name]
    proc = run([TRAIN_NET, "--config-file", config, "--eval-only", *tiny_shapes,
                "DATASETS.TEST", "('tiny_val',)", "MODEL.DSLA.NUM_CLASSES", str(NUM_CLASSES),
                *SMALL_TEST, "MODEL.WEIGHTS", files[name][0], "OUTPUT_DIR", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"mmdetection checkpoint of the released {name} layout" in proc.stdout
    assert "AP" in (tmp_path / "eval" / "eval_results.json").read_text()  # --eval-only writes into eval/


@pytest.mark.parametrize("name", LAYOUTS)
def test_eval_only_with_the_lazy_config(name, files, tiny_shapes, tmp_path):
    _, _, lazy_config = LAYOUTS[name]
    proc = run(["-m", "dsla.lazy_engine", "--config-file", lazy_config, "--eval-only",
                *tiny_shapes, f"train.init_checkpoint={files[name][0]}",
                # setup checks the class count of the training set's names too
                "dataloader.train.dataset.names=tiny_train",
                "dataloader.test.dataset.names=tiny_val", f"model.num_classes={NUM_CLASSES}",
                "dataloader.test.mapper.augmentations.0.short_edge_length=128",
                "dataloader.test.mapper.augmentations.0.max_size=128",
                "dataloader.test.num_workers=0", f"train.output_dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"mmdetection checkpoint of the released {name} layout" in proc.stdout
    assert "AP" in (tmp_path / "eval" / "eval_results.json").read_text()  # --eval-only writes into eval/


# ---------------------------------------------------------------------------------------------
# A wrong pairing stops with one line: the file, what it is, which config fits
# ---------------------------------------------------------------------------------------------
def _load_error(model, path):
    with pytest.raises(UserError) as e:
        DSLACheckpointer(model).load(path)
    message = str(e.value)
    assert "\n" not in message
    return message


_DCN_HEAD = "head with DCN last tower convs, tower conv biases"


@pytest.mark.parametrize("file, config, looks_like, fits", [
    (R101, R50, f"ResNet-101 with DCN in layer2, layer3, layer4; {_DCN_HEAD}",
     "dsla_R_101_FPN_dcn_ms_2x_mmdet"),
    (SWIN, R101, f"Swin with [2, 2, 18, 2] blocks per stage; {_DCN_HEAD}",
     "dsla_Swin_S_FPN_ms_3x_mmdet"),
], ids=["R-101 file, R-50 config", "Swin-S file, R-101 config"])
def test_released_file_with_another_models_config(file, config, looks_like, fits, files, models):
    src = files[file][0]
    message = _load_error(models[config], src)
    assert message.startswith(
        f"checkpoint {src} is an mmdetection DSLA checkpoint of the released {file} layout "
        f"({looks_like}) and does not fit this config's model (")
    assert message.endswith(f"): use --config-file configs/COCO-Detection/{fits}.yaml "
                            f"(LazyConfig: configs/lazy/COCO-Detection/{fits}.py).")


@pytest.fixture(scope="module")
def fcos_file(tmp_path_factory):
    """An mmdetection FCOS R-50: DSLA's layout plus FCOS's centerness branch."""
    layout = {**r50_layout(), "bbox_head.conv_centerness.weight": (1, 256, 3, 3),
              "bbox_head.conv_centerness.bias": (1,)}
    path = str(tmp_path_factory.mktemp("fcos") / "fcos_r50_caffe_fpn_gn-head_1x_coco.pth")
    return save_mmdet(path, random_state_dict(layout), classes=["person"] * 80)


def test_fcos_file_is_not_dsla(fcos_file, models):
    assert _load_error(models[R50], fcos_file) == (
        f"checkpoint {fcos_file} is an mmdetection checkpoint of another detector, not of DSLA: "
        "it looks like FCOS (bbox_head.conv_centerness is FCOS's centerness branch, which DSLA "
        "does not have); no config of this project loads it (the *_mmdet configs load the authors' "
        "DSLA checkpoints, docs/MODEL_ZOO.md).")


def test_wrong_pairing_ends_the_command_in_one_line(fcos_file, tiny_shapes, tmp_path, models):
    expected = _load_error(models[R50], fcos_file)
    proc = run([TRAIN_NET, "--config-file", LAYOUTS[R50][1], "--eval-only", *tiny_shapes,
                "DATASETS.TEST", "('tiny_val',)", "MODEL.DSLA.NUM_CLASSES", str(NUM_CLASSES),
                *SMALL_TEST, "MODEL.WEIGHTS", fcos_file, "OUTPUT_DIR", str(tmp_path)])
    assert last_line(proc) == f"error: {expected}"


def test_mmdet_file_of_another_class_count_is_refused_for_evaluation(files, models, tmp_path):
    src = save_mmdet(str(tmp_path / "r50_80.pth"), random_state_dict(r50_layout()))
    message = _load_error(models[R50], src)
    assert message == (
        f"checkpoint {src} does not fit the config's model: head.cls_score.weight has shape "
        f"(80, 256, 3, 3) in the checkpoint, ({NUM_CLASSES}, 256, 3, 3) in the model (and 1 more "
        f"keys). The checkpoint has 80 classes, the config's NUM_CLASSES is {NUM_CLASSES}.")


# ---------------------------------------------------------------------------------------------
# Fine-tuning: another class count re-initialises the classifier only
# ---------------------------------------------------------------------------------------------
def test_fine_tuning_reinitialises_only_the_classifier(models, tiny_shapes, tmp_path):
    """The authors' 80-class R-50 file as MODEL.WEIGHTS of a 4-class training; learning rate 0,
    so that the final checkpoint holds the loaded weights."""
    state = random_state_dict(r50_layout(), seed=7)
    src = save_mmdet(str(tmp_path / "dsla_r50_coco.pth"), state, classes=["person"] * 80)
    out = tmp_path / "out"
    proc = run([TRAIN_NET, "--config-file", LAYOUTS[R50][1], *tiny_shapes,
                "DATASETS.TRAIN", "('tiny_train',)", "DATASETS.TEST", "('tiny_val',)",
                "MODEL.DSLA.NUM_CLASSES", str(NUM_CLASSES), "MODEL.WEIGHTS", src,
                "SOLVER.BASE_LR", "0.0", "SOLVER.MAX_ITER", "1", "SOLVER.IMS_PER_BATCH", "2",
                "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "128", *SMALL_TEST,
                "OUTPUT_DIR", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (f"{src}: 2 parameters do not fit the model and are re-initialised (fine-tuning): "
            "head.cls_score.weight, head.cls_score.bias") in proc.stdout
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
    assert final["class_names"]["thing_classes"] == list(SHAPES_CLASSES)  # the training set's
    classifier = ["head.cls_score.weight", "head.cls_score.bias"]
    expected = mmdet_to_detectron2({"state_dict": state}, model_shapes(models[R50]),
                                   may_differ=classifier)["model"]
    for key, value in final["model"].items():
        if key.startswith("head.cls_score."):
            assert value.shape[0] == NUM_CLASSES
        else:
            assert torch.equal(value, expected[key]), key


# ---------------------------------------------------------------------------------------------
# dsla-convert-mmdet: an existing OUTPUT, unreadable and pickled inputs
# ---------------------------------------------------------------------------------------------
def test_converter_refuses_an_existing_output_before_reading(files, tmp_path):
    output = tmp_path / "mine.pth"
    output.write_bytes(b"the user's file")
    not_a_checkpoint = tmp_path / "notes.txt"
    not_a_checkpoint.write_text("not a checkpoint\n")
    for src in (str(not_a_checkpoint), files[R50][0]):
        with pytest.raises(SystemExit) as e:
            convert_mmdet_weights.main([src, str(output), "--config-file", LAYOUTS[R50][1]])
        assert str(e.value) == (f"error: OUTPUT {output} exists: pass --overwrite to replace it, "
                                "or choose another path")
    assert output.read_bytes() == b"the user's file"
    assert convert_mmdet_weights.main([files[R50][0], str(output), "--overwrite", "--config-file",
                                       LAYOUTS[R50][1], "MODEL.DSLA.NUM_CLASSES",
                                       str(NUM_CLASSES)]) == 0
    assert torch.load(output, weights_only=True)["class_names"]["thing_classes"] == list(
        SHAPES_CLASSES)


def test_allow_pickle_on_a_file_that_is_not_a_checkpoint(tmp_path):
    src = tmp_path / "notes.txt"
    src.write_text("not a checkpoint\n")
    with pytest.raises(SystemExit) as e:
        convert_mmdet_weights.main([str(src), str(tmp_path / "out.pth"), "--allow-pickle"])
    assert str(e.value) == (f"error: cannot read checkpoint {src}: truncated or not a checkpoint "
                            "(UnpicklingError: invalid load key, 'n'.)")
    assert not (tmp_path / "out.pth").exists()


def test_pickled_metadata_names_the_object_and_the_way_out(files, models, tmp_path):
    """Old checkpoints may pickle numpy scalars in their meta: weights_only refuses them."""
    state = torch.load(files[R50][0], weights_only=True)["state_dict"]
    src = save_mmdet(str(tmp_path / "np_meta.pth"), state, seed=np.int64(3))
    message = _load_error(models[R50], src)
    assert message.startswith(f"cannot read checkpoint {src} with torch.load(weights_only=True): "
                              "it pickles numpy.")
    assert message.endswith("If it is an mmdetection checkpoint you trust, convert it with "
                            "dsla-convert-mmdet --allow-pickle and use the file it writes.")
    out = tmp_path / "np_meta_d2.pth"
    assert convert_mmdet_weights.main([src, str(out), "--allow-pickle", "--config-file",
                                       LAYOUTS[R50][1], "MODEL.DSLA.NUM_CLASSES",
                                       str(NUM_CLASSES)]) == 0
    assert load_weights(models[R50], str(out)) == list(SHAPES_CLASSES)
