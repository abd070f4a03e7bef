"""Tests for dsla.data: the synthetic shapes generator, user COCO datasets and box sanitising."""
import json
import logging
import os
import threading
import time

import numpy as np
import pytest
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.structures import BoxMode

from dsla.data import (
    SHAPES_SPLITS,
    STYLES,
    check_num_classes,
    generate_shapes_dataset,
    num_classes_of,
    register_coco_dataset,
    register_shapes_datasets,
    sanitize_dataset_dicts,
)
from dsla.data import datasets as datasets_module
from dsla.errors import UserError

# The classes of the default style, "standard".
STANDARD_CLASSES = STYLES["standard"].classes
# FPN regress ranges of the CPU config (strides 8..128).
LEVEL_RANGES = [(0, 16), (16, 32), (32, 64), (64, 128), (128, 1e8)]


def _generate(root, **kwargs):
    args = {"split": "train", "num_images": 12, "seed": 0, "image_size": 128}
    args.update(kwargs)
    return generate_shapes_dataset(str(root), **args)


def _read(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def sample_split(tmp_path_factory):
    """A moderate 256 px split shared by the statistics tests."""
    root = tmp_path_factory.mktemp("shapes")
    return _generate(root, num_images=60, seed=5, image_size=256)


@pytest.fixture
def dataset_names():
    """Names registered by a test, removed afterwards so tests stay independent."""
    names = []
    yield names
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


@pytest.fixture
def sanitize_warnings(caplog):
    """Warnings of dsla.data.datasets, captured even if a setup_logger stopped propagation."""
    logger = datasets_module.logger
    propagate = logger.propagate
    # Capture on the logger itself, and not again through the root logger.
    logger.addHandler(caplog.handler)
    logger.propagate = False
    caplog.set_level(logging.WARNING, logger=logger.name)
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.propagate = propagate


# ---------------------------------------------------------------------------------------------
# Shapes generator
# ---------------------------------------------------------------------------------------------


def test_generation_is_deterministic(tmp_path):
    json_a, images_a = _generate(tmp_path / "a")
    json_b, images_b = _generate(tmp_path / "b")
    json_c, images_c = _generate(tmp_path / "c", seed=1)
    assert _read(json_a) == _read(json_b)
    names = sorted(os.listdir(images_a))
    assert len(names) == 12 and names == sorted(os.listdir(images_b))
    for name in names:
        assert _read(os.path.join(images_a, name)) == _read(os.path.join(images_b, name))
    with open(json_a) as fa, open(json_c) as fc:
        assert json.load(fa)["annotations"] != json.load(fc)["annotations"]
    pixels_a = np.asarray(Image.open(os.path.join(images_a, names[0])))
    pixels_c = np.asarray(Image.open(os.path.join(images_c, names[0])))
    assert not np.array_equal(pixels_a, pixels_c)


def test_generated_json_loads_with_pycocotools_and_detectron2(sample_split):
    from pycocotools.coco import COCO

    json_file, image_root = sample_split
    coco = COCO(json_file)
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(STANDARD_CLASSES)
    assert len(coco.getImgIds()) == 60
    dicts = load_coco_json(json_file, image_root)
    labels = {a["category_id"] for d in dicts for a in d["annotations"]}
    assert labels == set(range(1, len(STANDARD_CLASSES) + 1))
    for d in dicts:
        assert os.path.isfile(d["file_name"])
        assert Image.open(d["file_name"]).size == (d["width"], d["height"]) == (256, 256)
        for a in d["annotations"]:
            x, y, w, h = a["bbox"]
            assert a["bbox_mode"] == BoxMode.XYWH_ABS
            assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= 256 and y + h <= 256


def test_object_sizes_cover_every_fpn_level(sample_split):
    with open(sample_split[0]) as f:
        sides = np.array([max(a["bbox"][2:]) for a in json.load(f)["annotations"]])
    # Standard style: longer sides from 16 px (P3) to 0.8 x 256 px (P7).
    assert sides.min() < 24 and sides.max() > 160
    # A box of longer side s has point measures max(l, t, r, b) in [s/2, s].
    for lo, hi in LEVEL_RANGES:
        assert ((sides / 2 < hi) & (sides > lo)).sum() >= 5, (lo, hi)


def test_easy_style_is_the_demo_data(tmp_path):
    """The demo's data (style "easy"): three classes, 20-192 px boxes
    on every FPN level, 2-6 objects per non-empty image (fewer where there is no room), solid
    fills, no lines over objects."""
    json_file, _ = _generate(tmp_path / "easy", num_images=60, seed=5, image_size=256,
                             style="easy")
    with open(json_file) as f:
        coco = json.load(f)
    assert [c["name"] for c in coco["categories"]] == list(STYLES["easy"].classes)
    assert len(coco["categories"]) == 3
    assert coco["info"]["dsla_shapes"]["style_settings"]["textures"] == ["solid"]
    sides = np.array([max(a["bbox"][2:]) for a in coco["annotations"]])
    assert sides.min() >= 20 - 1 and sides.max() <= 0.75 * 256 + 1  # rasterisation: 1 px
    for lo, hi in LEVEL_RANGES:
        assert ((sides / 2 < hi) & (sides > lo)).sum() >= 3, (lo, hi)
    per_image = np.bincount([a["image_id"] for a in coco["annotations"]])
    non_empty = per_image[per_image > 0]
    # 2-6 drawn; a placement that finds no room is dropped, so a few images have fewer.
    assert non_empty.max() <= 6 and np.mean(non_empty >= 2) > 0.9
    settings = coco["info"]["dsla_shapes"]["style_settings"]
    assert settings["lines_over_objects"] == [0, 0] and settings["distractors"] == [0, 1]


def test_demo_config_trains_on_the_easy_splits():
    from conftest import REPO
    from dsla.cli import load_config

    cfg = load_config(os.path.join(REPO, "configs", "Shapes", "dsla_R_18_FPN_demo.yaml"), [])
    assert cfg.DATASETS.TRAIN == ("shapes_easy_train",)
    assert cfg.DATASETS.TEST == ("shapes_easy_val",)
    assert SHAPES_SPLITS["shapes_easy_train"]["style"] == "easy"
    assert cfg.MODEL.DSLA.NUM_CLASSES == len(STYLES["easy"].classes)
    from dsla.tools import demo

    assert demo.DEFAULT_CONFIG.endswith(os.path.join("Shapes", "dsla_R_18_FPN_demo.yaml"))


def test_forced_empty_fraction(tmp_path):
    json_file, _ = _generate(tmp_path, empty_fraction=0.5)
    with open(json_file) as f:
        coco = json.load(f)
    with_objects = {a["image_id"] for a in coco["annotations"]}
    assert len(coco["images"]) - len(with_objects) == 6


def test_interrupted_and_concurrent_generation(tmp_path):
    # Killed runs leave only tmp directories: never taken for a dataset, removed once old.
    for name, age in [(".train-tmp-killed", 7200), (".train-tmp-recent", 0)]:
        os.makedirs(tmp_path / name / "images")
        past = time.time() - age
        for path in [tmp_path / name / "images", tmp_path / name]:
            os.utime(path, (past, past))
    errors = []

    def generate():
        try:
            _generate(tmp_path, num_images=6, image_size=64)
        except Exception as e:  # surfaced in the main thread below
            errors.append(e)

    threads = [threading.Thread(target=generate) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(os.listdir(tmp_path / "train" / "images")) == 6
    assert sorted(os.listdir(tmp_path)) == [".train-tmp-recent", "train"]
    # Other parameters replace the split rather than silently reusing it.
    _generate(tmp_path, num_images=4, image_size=64)
    assert len(os.listdir(tmp_path / "train" / "images")) == 4


def test_shapes_registration_is_lazy(tmp_path, dataset_names):
    assert {"shapes_train", "shapes_val"} <= set(DatasetCatalog.list())
    assert MetadataCatalog.get("shapes_val").evaluator_type == "coco"
    spec = {"split": "tiny", "num_images": 5, "seed": 3, "image_size": 96}
    register_shapes_datasets(str(tmp_path), {"shapes_test_tiny": spec})
    dataset_names.append("shapes_test_tiny")
    assert os.listdir(tmp_path) == []
    meta = MetadataCatalog.get("shapes_test_tiny")
    assert meta.thing_classes == list(STANDARD_CLASSES)
    assert meta.json_file == str(tmp_path / "tiny" / "annotations.json")
    dicts = DatasetCatalog.get("shapes_test_tiny")
    assert len(dicts) == 5 and os.path.isfile(meta.json_file)
    assert num_classes_of("shapes_test_tiny") == len(STANDARD_CLASSES)


# ---------------------------------------------------------------------------------------------
# Sanitising
# ---------------------------------------------------------------------------------------------


def _anno(bbox, mode=BoxMode.XYWH_ABS):
    return {"bbox": bbox, "bbox_mode": mode, "category_id": 0, "iscrowd": 0}


def test_sanitize_drops_and_clips_with_one_warning(sanitize_warnings):
    dicts = [
        {"file_name": "a.jpg", "image_id": 1, "width": 100, "height": 80, "annotations": [
            _anno([10, 10, 20, 30]),  # fine
            _anno([10, 10, 0, 5]),  # zero width
            _anno([50, 50, 10, -4]),  # negative height
            _anno([90, -10, 20, 30]),  # partly outside: clipped to [90, 0, 10, 20]
            _anno([120, 10, 5, 5]),  # entirely outside
        ]},
        {"file_name": "b.jpg", "image_id": 2, "width": 100, "height": 80, "annotations": [
            _anno([-5, 70, 20, 90], BoxMode.XYXY_ABS),  # clipped to [0, 70, 20, 80]
            _anno([10, 80, 30, 90], BoxMode.XYXY_ABS),  # touches the bottom edge from outside
        ]},
    ]
    original = json.dumps(dicts)
    result = sanitize_dataset_dicts(dicts, "toy")
    assert json.dumps(dicts) == original  # input untouched
    boxes = [a["bbox"] for a in result[0]["annotations"]]
    assert boxes == [[10, 10, 20, 30], [90.0, 0.0, 10.0, 20.0]]
    assert [a["bbox"] for a in result[1]["annotations"]] == [[0.0, 70.0, 20.0, 80.0]]
    assert result[1]["annotations"][0]["bbox_mode"] == BoxMode.XYXY_ABS
    assert len(sanitize_warnings.records) == 1
    message = sanitize_warnings.records[0].getMessage()
    assert "toy: clipped 2 boxes" in message and "dropped 4 boxes" in message


def test_sanitize_clean_dataset_is_silent(sanitize_warnings):
    annotations = [_anno([0, 0, 10, 10])]
    dicts = [{"file_name": "a.jpg", "width": 10, "height": 10, "annotations": annotations}]
    assert sanitize_dataset_dicts(dicts, "clean") == dicts
    assert not sanitize_warnings.records


# ---------------------------------------------------------------------------------------------
# User COCO datasets
# ---------------------------------------------------------------------------------------------


def _write_coco(directory, boxes=((10, 10, 20, 20),)):
    """A one-image COCO dataset with two classes; returns (json_file, image_root)."""
    image_root = directory / "images"
    image_root.mkdir()
    Image.new("RGB", (64, 48)).save(image_root / "img.jpg")
    coco = {
        "images": [{"id": 1, "file_name": "img.jpg", "width": 64, "height": 48}],
        "annotations": [
            {"id": i + 1, "image_id": 1, "category_id": 1, "bbox": list(b), "area": 1, "iscrowd": 0}
            for i, b in enumerate(boxes)
        ],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }
    json_file = directory / "anno.json"
    json_file.write_text(json.dumps(coco))
    return str(json_file), str(image_root)


def test_register_coco_dataset_loads_and_sanitizes(tmp_path, dataset_names, sanitize_warnings):
    json_file, image_root = _write_coco(tmp_path, boxes=[(10, 10, 20, 20), (60, 40, 10, 10)])
    register_coco_dataset("test_user_ok", json_file, image_root)
    dataset_names.append("test_user_ok")
    dicts = DatasetCatalog.get("test_user_ok")
    boxes = [a["bbox"] for a in dicts[0]["annotations"]]
    assert boxes == [[10, 10, 20, 20], [60.0, 40.0, 4.0, 8.0]]
    assert MetadataCatalog.get("test_user_ok").thing_classes == ["cat", "dog"]
    assert len(sanitize_warnings.records) == 1
    assert num_classes_of("test_user_ok") == 2


def test_register_coco_dataset_missing_json(tmp_path):
    missing = str(tmp_path / "nope.json")
    with pytest.raises(UserError, match=missing):
        register_coco_dataset("test_user_missing", missing, str(tmp_path))
    assert "test_user_missing" not in DatasetCatalog


@pytest.mark.parametrize("content", ["{not json", "[1, 2]"])
def test_register_coco_dataset_invalid_json(tmp_path, dataset_names, content):
    json_file = tmp_path / "broken.json"
    json_file.write_text(content)
    register_coco_dataset("test_user_broken", str(json_file), str(tmp_path))
    dataset_names.append("test_user_broken")
    with pytest.raises(UserError, match=str(json_file)):
        DatasetCatalog.get("test_user_broken")


def test_register_coco_dataset_missing_image(tmp_path, dataset_names):
    json_file, image_root = _write_coco(tmp_path)
    os.remove(os.path.join(image_root, "img.jpg"))
    register_coco_dataset("test_user_no_image", json_file, image_root)
    dataset_names.append("test_user_no_image")
    with pytest.raises(UserError, match=os.path.join(image_root, "img.jpg")):
        DatasetCatalog.get("test_user_no_image")


def test_check_num_classes(tmp_path, dataset_names):
    json_file, image_root = _write_coco(tmp_path)
    register_coco_dataset("test_user_classes", json_file, image_root)
    dataset_names.append("test_user_classes")
    check_num_classes(2, "test_user_classes")
    with pytest.raises(UserError) as info:
        check_num_classes(3, ["test_user_classes"])
    message = str(info.value)
    assert "3" in message and "2 classes" in message and "background" in message
