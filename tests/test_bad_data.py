"""Bad data stops with one line before training; images of every mode are read correctly; and
``dsla-predict`` takes folders and never replaces a PNG without ``--overwrite``.

Each dataset is a COCO json written into ``tmp_path`` with small PIL images.
"""
import inspect
import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog

from conftest import CPU_CONFIG
from dsla.data import register_coco_dataset
from dsla.data import datasets as datasets_module
from dsla.errors import UserError
from dsla.tools import analyze_consistency, demo, predict
from dsla.visualization import draw_instances, read_image
from test_user_errors import named_weights  # noqa: F401  (a fixture: a 4-class checkpoint)

W, H = 64, 48
EXIF_ORIENTATION = 0x0112


@pytest.fixture
def load(tmp_path):
    """``load(images, annotations)``: write the json, register it, return its dicts."""
    names = []

    def _load(images, annotations=(), name=None):
        json_file = tmp_path / "anno.json"
        json_file.write_text(json.dumps({
            "images": [{"id": i, "file_name": f, "width": w, "height": h}
                       for i, f, w, h in images],
            "annotations": [{"id": 100 + k, "image_id": a[0], "category_id": 1, "bbox": a[1],
                             "area": 1, "iscrowd": 0} for k, a in enumerate(annotations)],
            "categories": [{"id": 1, "name": "thing"}],
        }))
        name = name or f"bad_data_{len(names)}"
        register_coco_dataset(name, str(json_file), str(tmp_path))
        names.append(name)
        return DatasetCatalog.get(name)

    yield _load
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _image(tmp_path, name, size=(W, H), mode="RGB", **save):
    Image.new(mode, size).save(tmp_path / name, **save)
    return name


def _error(load, *args) -> str:
    with pytest.raises(UserError) as e:
        load(*args)
    return str(e.value)


# ---------------------------------------------------------------------------------------------
# The json: duplicate image ids, boxes that are not numbers.
# ---------------------------------------------------------------------------------------------


def test_duplicate_image_id_names_both_files(tmp_path, load):
    images = [(7, _image(tmp_path, "a.jpg"), W, H), (7, _image(tmp_path, "b.jpg"), W, H)]
    message = _error(load, images, [(7, [1, 1, 10, 10]), (7, [5, 5, 10, 10])])
    assert "anno.json" in message and "image id 7" in message, message
    assert "a.jpg" in message and "b.jpg" in message and "own id" in message, message


@pytest.mark.parametrize("bbox", [["1", "2", "10", "10"], [1, 2, 10], [1, 2, float("nan"), 4]],
                         ids=["strings", "three-values", "nan"])
def test_non_numeric_box_names_the_annotation(tmp_path, load, bbox):
    message = _error(load, [(1, _image(tmp_path, "a.jpg"), W, H)], [(1, [1, 1, 5, 5]), (1, bbox)])
    assert "anno.json" in message and "annotation id 101" in message, message
    assert json.dumps(bbox) in message, message
    if bbox[0] == "1":
        assert "strings" in message, message


# ---------------------------------------------------------------------------------------------
# The image files: empty, not an image, another size than the json says, an unreadable mode.
# ---------------------------------------------------------------------------------------------


def test_empty_and_undecodable_images_are_named(tmp_path, load):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    images = [(1, _image(tmp_path, "ok.jpg"), W, H), (2, "empty.jpg", W, H), (3, "text.jpg", W, H)]
    message = _error(load, images, [(1, [1, 1, 5, 5])])
    assert "image id 2" in message and "empty.jpg" in message and "0 bytes" in message, message
    assert "1 more of its 3 images" in message, message


def test_size_mismatch_names_both_sizes(tmp_path, load):
    message = _error(load, [(1, _image(tmp_path, "a.png", size=(H, W)), W, H)])
    assert "a.png" in message and f"is {H}x{W}" in message and f"says {W}x{H}" in message
    assert "correct the json's width/height" in message, message


def _exif_rotated(tmp_path, name="rotated.jpg"):
    """Stored W x H with EXIF orientation 6 (rotate 90): read as H wide, W tall."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    return _image(tmp_path, name, exif=exif.tobytes())


def test_exif_rotated_image_needs_the_rotated_size(tmp_path, load):
    name = _exif_rotated(tmp_path)
    assert read_image(str(tmp_path / name), "RGB").shape == (W, H, 3)
    assert load([(1, name, H, W)], [(1, [1, 1, 5, 5])])[0]["width"] == H  # good: rotated size
    message = _error(load, [(1, name, W, H)])  # the stored size: what the model would not see
    assert f"is {H}x{W}" in message and "EXIF orientation" in message, message


def test_unreadable_pixel_mode_is_named(tmp_path, load):
    Image.fromarray(np.ones((H, W), np.float32)).save(tmp_path / "float.tif")
    message = _error(load, [(1, "float.tif", W, H)])
    assert "float.tif" in message and "pixel mode F" in message, message


def _sixteen_bit_png(tmp_path):
    values = (np.arange(H * W).reshape(H, W) * 21).astype(np.uint16)  # up to 64491
    Image.fromarray(values).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"
    return "grey16.png", (values.astype(np.int64) + 128) // 257


def test_sixteen_bit_png_is_scaled_for_training_and_prediction(tmp_path, load):
    name, expected = _sixteen_bit_png(tmp_path)
    record = load([(1, name, W, H)], [(1, [1, 1, 5, 5])])[0]
    mapper = DatasetMapper(is_train=True, augmentations=[], image_format="BGR")
    image = mapper(record)["image"].numpy()  # [3, H, W], what training and evaluation see
    for channel in image:
        np.testing.assert_array_equal(channel, expected)
    np.testing.assert_array_equal(read_image(str(tmp_path / name), "RGB")[..., 0], expected)


@pytest.mark.parametrize("mode", ["P", "CMYK", "LA", "RGBA", "L"])
def test_other_modes_read_as_their_rgb(tmp_path, mode):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (H, W, 3), np.uint8))
    image = rgb.convert(mode)
    image.save(tmp_path / "x.png" if mode != "CMYK" else tmp_path / "x.tif")
    path = str(tmp_path / ("x.png" if mode != "CMYK" else "x.tif"))
    np.testing.assert_array_equal(read_image(path, "RGB"), np.asarray(image.convert("RGB")))


# ---------------------------------------------------------------------------------------------
# What works stays: ids 1/7/42, orphan annotations, crowd-only images, big and unicode files.
# ---------------------------------------------------------------------------------------------


def test_good_datasets_still_load(tmp_path, load):
    folder = tmp_path / "données"
    folder.mkdir()
    big = _image(tmp_path, "données/grand.png", size=(6000, 6000), mode="L")
    images = [(1, big, 6000, 6000), (7, _image(tmp_path, "b.jpg"), W, H),
              (42, _exif_rotated(tmp_path, "c.jpg"), H, W)]
    dicts = load(images, [(1, [1, 1, 5, 5]), (7, [1, 1, 5, 5]), (99, [1, 1, 5, 5])])
    assert [d["image_id"] for d in dicts] == [1, 7, 42]
    assert [len(d["annotations"]) for d in dicts] == [1, 1, 0]


def test_dropped_boxes_warning_once_per_process(tmp_path, load, caplog):
    images = [(1, _image(tmp_path, "a.jpg"), W, H)]
    logger = datasets_module.logger
    propagate, logger.propagate = logger.propagate, False  # counted here only, not via the root
    logger.addHandler(caplog.handler)
    try:
        caplog.set_level(logging.WARNING, logger=logger.name)
        dicts = load(images, [(1, [1, 1, 5, 5]), (1, [1, 1, 0, 5])])
        for _ in range(3):  # as a training does: class count, training check, loaders
            assert DatasetCatalog.get("bad_data_0") == dicts
    finally:
        logger.removeHandler(caplog.handler)
        logger.propagate = propagate
    assert len([r for r in caplog.records if "dropped 1 boxes" in r.getMessage()]) == 1


# ---------------------------------------------------------------------------------------------
# dsla-predict and dsla-analyze-consistency: inputs, outputs, the model loaded once.
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def weights(named_weights):
    return named_weights


def _predict(weights, *argv):
    return predict.main(["--config-file", CPU_CONFIG, *argv, "MODEL.WEIGHTS", weights,
                         "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64"])


def _predict_error(weights, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        _predict(weights, *argv)
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a tool loads a model: its output checks must come first."""
    def fail(cfg):
        raise AssertionError("the model was loaded before the output was checked")
    monkeypatch.setattr(predict, "load_model", fail)
    monkeypatch.setattr(analyze_consistency, "load_model", fail)


def test_predict_takes_a_folder_and_loads_the_model_once(tmp_path, weights, monkeypatch):
    import detectron2.engine.defaults
    import dsla.cli

    images = tmp_path / "in"
    images.mkdir()
    for name in ("a.jpg", "b.png"):
        _image(images, name)
    (images / "notes.txt").write_text("not an image")
    builds = []
    for module in (dsla.cli, detectron2.engine.defaults):
        original = module.build_model
        monkeypatch.setattr(module, "build_model",
                            lambda cfg, _build=original: builds.append(1) or _build(cfg))
    assert _predict(weights, "--input", str(images), "--output", str(tmp_path / "out")) == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["a.png", "b.png"]
    assert len(builds) == 1


def test_predict_never_replaces_a_png_without_overwrite(tmp_path, weights, no_model):
    image = str(tmp_path / _image(tmp_path, "a.jpg"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.png").write_bytes(b"the user's file")
    message = _predict_error(weights, "--input", image, "--output", str(out))
    assert str(out / "a.png") in message and "--overwrite" in message, message
    assert (out / "a.png").read_bytes() == b"the user's file"


def test_predict_output_that_is_a_file_or_not_writable(tmp_path, weights, no_model, monkeypatch):
    image = str(tmp_path / _image(tmp_path, "a.jpg"))
    a_file = tmp_path / "out.txt"
    a_file.write_text("x")
    message = _predict_error(weights, "--input", image, "--output", str(a_file))
    assert str(a_file) in message and "is a file" in message, message
    monkeypatch.setattr("dsla.outputs.os.access", lambda path, mode: False)  # as for a non-root
    message = _predict_error(weights, "--input", image, "--output", str(tmp_path / "new"))
    assert "cannot write into" in message and str(tmp_path) in message, message


def test_analyze_consistency_never_replaces_an_output(tmp_path, weights, no_model):
    out = tmp_path / "out"
    out.mkdir()
    (out / "consistency.json").write_text("{}")
    with pytest.raises(SystemExit) as e:
        analyze_consistency.main(["--config-file", CPU_CONFIG, "--dataset", "shapes_val",
                                  "--output", str(out), "MODEL.WEIGHTS", weights])
    assert "--overwrite" in str(e.value.code) and str(out) in str(e.value.code)


def test_one_drawing_threshold():
    args = predict.parse_args(["--config-file", "c", "--input", "x", "--output", "o"])
    default = inspect.signature(draw_instances).parameters["score_threshold"].default
    assert default == args.confidence_threshold == demo.parse_args([]).score_threshold
