"""The "see what DSLA does" tools: ``dsla.tools.predict``, ``visualize_assignment``,
``analyze_consistency``, ``export_model`` and their library ``dsla.analysis``.

The tools run in-process (``main(argv)``) on a 6-image shapes dataset with a randomly initialised
tiny model; ``SCORE_THRESH_TEST 0`` keeps its (untrained, low-score) predictions non-empty.
"""
import json
import math
import os
import uuid

import pytest
import torch
from PIL import Image
from scipy import stats

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from detectron2.structures import BoxMode

from conftest import CPU_CONFIG, tiny_cfg
from dsla.analysis import (
    correlations,
    correlations_by_rule,
    ground_truth_of,
    match_detections,
    pearson,
    spearman,
)
from dsla.data import generate_shapes_dataset, register_coco_dataset
from dsla.tools import analyze_consistency, export_model, predict, visualize_assignment

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


TOOLS = [predict, visualize_assignment, analyze_consistency, export_model]


# ----------------------------------------------------------------------------------------------
# dsla.analysis: hand-checked matching and correlations.
# ----------------------------------------------------------------------------------------------


def test_match_detections_hand_computed():
    gt_boxes = torch.tensor([[0.0, 0, 10, 10], [20.0, 20, 30, 30]])
    gt_classes = torch.tensor([0, 1])
    pred_boxes = torch.tensor([
        [0.0, 0, 10, 20],    # class 0 over gt 0: IoU 100 / 200 = 0.5
        [0.0, 0, 10, 10],    # class 1: exactly on gt 0, which is class 0 -> no same-class overlap
        [25.0, 20, 35, 30],  # class 1 over gt 1: inter 50, union 150 -> 1/3
        [0.0, 0, 10, 10],    # class 2: no ground truth of that class
    ])
    pred_classes = torch.tensor([0, 1, 1, 2])
    ious, matched = match_detections(pred_boxes, pred_classes, gt_boxes, gt_classes)
    assert ious.tolist() == pytest.approx([0.5, 0.0, 1 / 3, 0.0])
    assert matched.tolist() == [0, -1, 1, -1]


def test_match_detections_takes_highest_same_class_iou():
    gt_boxes = torch.tensor([[0.0, 0, 10, 10], [0.0, 0, 10, 20]])
    ious, matched = match_detections(torch.tensor([[0.0, 0, 10, 18]]), torch.tensor([3]),
                                     gt_boxes, torch.tensor([3, 3]))
    # IoU 100/180 with box 0, 180/200 with box 1.
    assert ious.tolist() == pytest.approx([0.9])
    assert matched.tolist() == [1]


def test_match_detections_empty_inputs():
    ious, matched = match_detections(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long),
                                     torch.tensor([[0.0, 0, 1, 1]]), torch.tensor([0]))
    assert ious.shape == matched.shape == (0,)
    ious, matched = match_detections(torch.tensor([[0.0, 0, 1, 1]]), torch.tensor([0]),
                                     torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    assert ious.tolist() == [0.0] and matched.tolist() == [-1]


def test_pearson_hand_computed():
    # x - mean = (-1, 0, 1), y - mean = (-3, 1, 2): r = 5 / sqrt(2 * 14).
    assert pearson([1, 2, 3], [1, 5, 6]) == pytest.approx(5 / math.sqrt(28))
    assert pearson([1, 2, 3], [6, 4, 2]) == pytest.approx(-1.0)


def test_spearman_is_pearson_of_ranks_hand_computed():
    # Ranks (3, 2, 1) vs (3, 1, 2): d = (0, 1, -1), rho = 1 - 6 * 2 / (3 * (9 - 1)) = 0.5.
    assert spearman([0.9, 0.5, 0.1], [0.8, 0.6, 0.7]) == pytest.approx(0.5)
    # Monotone but not linear: Spearman 1, Pearson < 1.
    assert spearman([1, 2, 3, 4], [1, 10, 100, 1000]) == pytest.approx(1.0)
    # Ties take their average rank: ranks (2.5, 2.5, 1, 5, 4) and (2, 4.5, 1, 4.5, 3), both with
    # mean 3: sum of products of deviations 6.75, sums of squares 9.5 -> rho = 6.75 / 9.5.
    x, y = [0.3, 0.3, 0.1, 0.7, 0.5], [0.2, 0.9, 0.0, 0.9, 0.4]
    assert spearman(x, y) == pytest.approx(6.75 / 9.5)


def test_correlations_undefined_is_none():
    assert correlations([0.5], [0.3])["spearman"] is None  # one detection
    constant = correlations([0.2, 0.4, 0.6], [0.0, 0.0, 0.0])  # all IoU 0 (random weights)
    assert constant["spearman"] is None and constant["pearson"] is None
    assert constant["num_detections"] == 3 and constant["mean_iou"] == 0.0
    assert correlations([], [])["mean_iou"] is None


def test_correlations_by_rule_reports_all_and_iou_positive():
    report = correlations_by_rule([0.9, 0.1, 0.8, 0.2], [0.9, 0.0, 0.5, 0.0])
    assert report["num_detections"] == 4 and report["iou_positive"]["num_detections"] == 2
    assert report["iou_positive"]["spearman"] == pytest.approx(1.0)
    assert report["spearman"] == pytest.approx(stats.spearmanr([0.9, 0.1, 0.8, 0.2],
                                                               [0.9, 0.0, 0.5, 0.0]).statistic)
    assert "rule" in report


def test_ground_truth_of_converts_and_drops_crowd():
    record = {"annotations": [
        {"bbox": [1, 2, 3, 4], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 2},
        {"bbox": [0, 0, 5, 5], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0, "iscrowd": 1},
    ]}
    boxes, classes = ground_truth_of(record)
    assert boxes.tolist() == [[1.0, 2.0, 4.0, 6.0]] and classes.tolist() == [2]
    boxes, classes = ground_truth_of({"annotations": []})
    assert boxes.shape == (0, 4) and classes.shape == (0,)


# ----------------------------------------------------------------------------------------------
# The tools, end to end.
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """(name, image folder) of a registered 6-image, 128 px shapes dataset."""
    root = tmp_path_factory.mktemp("shapes")
    json_file, image_root = generate_shapes_dataset(str(root), "val", num_images=6, seed=1,
                                                    image_size=128)
    name = f"tools_test_{uuid.uuid4().hex[:8]}"
    register_coco_dataset(name, json_file, image_root)
    yield name, image_root
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A checkpoint of the tiny CPU model with random (initial) weights."""
    torch.manual_seed(0)
    save_dir = tmp_path_factory.mktemp("weights")
    DetectionCheckpointer(build_model(tiny_cfg()), save_dir=str(save_dir)).save("model")
    return str(save_dir / "model.pth")


@pytest.fixture
def opts(dataset, weights):
    """Config overrides: the weights, the test dataset, 128 px, every candidate kept."""
    return ["MODEL.WEIGHTS", weights, "MODEL.DSLA.SCORE_THRESH_TEST", "0.0",
            "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "128",
            "DATASETS.TEST", f"('{dataset[0]}',)", "DATALOADER.NUM_WORKERS", "0"]


def _assert_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC, path
    with Image.open(path) as im:
        im.load()
        assert im.width > 0 and im.height > 0


def test_predict_writes_one_png_per_image(dataset, opts, tmp_path):
    pattern = os.path.join(dataset[1], "00000[0-2].jpg")
    out = tmp_path / "demo"
    assert predict.main(["--config-file", CPU_CONFIG, "--input", pattern, "--output", str(out),
                      "--confidence-threshold", "0", *opts]) == 0
    assert sorted(os.listdir(out)) == ["000000.png", "000001.png", "000002.png"]
    for name in os.listdir(out):
        _assert_png(out / name)
    assert Image.open(out / "000000.png").size == (128, 128)  # drawn at the input's size


def test_visualize_assignment_writes_png(dataset, tmp_path):
    out = tmp_path / "assignment.png"
    args = ["--config-file", CPU_CONFIG, "--dataset", dataset[0], "--output", str(out)]
    assert visualize_assignment.main(args + ["--index", "1"]) == 0
    _assert_png(out)
    image_id = DatasetCatalog.get(dataset[0])[2]["image_id"]
    assert visualize_assignment.main(args + ["--image-id", str(image_id),
                                             "MODEL.DSLA.CORE_ZONE", "False"]) == 0
    _assert_png(out)


def test_visualize_assignment_level_grids_hand_checked():
    """One 40 px box at (16, 16)-(56, 56) with the CPU config's ranges, relaxation 0.2."""
    cfg = tiny_cfg()
    boxes, classes = torch.tensor([[16.0, 16.0, 56.0, 56.0]]), torch.tensor([0])
    levels = visualize_assignment.level_grids(cfg, (64, 64), boxes, classes)
    assert [lv["dsla"].shape for lv in levels] == [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]
    p4 = levels[1]  # stride 16, range [16, 32], relaxed [12, 38]
    assert p4["relaxed"] == (12, 38)
    # Point (32, 32): m = 24 in range; within half a stride of the centre (36, 36), so the core
    # zone gives ctr = 1 -> q = 1. FCOS: inside the centre region -> positive.
    assert p4["dsla"][2, 2] == pytest.approx(1.0) and p4["fcos"][2, 2] == 1.0
    # Point (48, 48): l = t = 32, r = b = 8 -> m = 32 (in range), ctr = 8/32 = 0.25. FCOS:
    # centre region 36 +- 1.5 * 16 clipped to the box is [16, 56]^2, so positive too.
    assert p4["dsla"][3, 3] == pytest.approx(0.25) and p4["fcos"][3, 3] == 1.0
    p5 = levels[2]  # stride 32, range [32, 64], relaxed [25, 76]
    # Point (32, 32): m = 24 < 25 -> q = 0 on P5 (outside even the relaxed range).
    assert p5["dsla"][1, 1] == 0.0 and p5["fcos"][1, 1] == 0.0


def test_analyze_consistency_writes_json_and_png(dataset, opts, tmp_path):
    out = tmp_path / "consistency"
    assert analyze_consistency.main(["--config-file", CPU_CONFIG, "--dataset", dataset[0],
                                     "--output", str(out), *opts]) == 0
    with open(out / "consistency.json") as f:
        report = json.load(f)  # strict JSON: NaN APs are written as null
    for key in ("rule", "num_detections", "spearman", "pearson", "iou_positive", "coco_bbox"):
        assert key in report, key
    # Random weights: 100 detections per image (the cap) with a score threshold of 0.
    assert report["num_detections"] == 6 * 100
    assert "AP" in report["coco_bbox"] and "AP50" in report["coco_bbox"]
    _assert_png(out / "score_vs_iou.png")


def _detections(boxes, scores, classes):
    from detectron2.structures import Boxes, Instances

    return Instances((100, 100), pred_boxes=Boxes(torch.tensor(boxes, dtype=torch.float)),
                     scores=torch.tensor(scores), pred_classes=torch.tensor(classes))


def test_export_check_pairs_detections_of_equal_score_with_their_own():
    """The exported model may sort two detections of equal score the other way round; the check
    compares each with its counterpart, and still fails a wrong class or box."""
    eager = _detections([[0, 0, 10, 10], [5, 5, 20, 20], [1, 1, 3, 3]], [0.9, 0.8, 0.8], [1, 2, 3])
    swapped = _detections([[0, 0, 10, 10], [1, 1, 3, 3], [5, 5, 20, 20]], [0.9, 0.8, 0.8], [1, 3, 2])
    report = export_model.compare_instances(eager, swapped)
    assert report["classes_equal"] and report["max_abs_diff_boxes"] == 0.0
    export_model.check_report(report)
    wrong_class = _detections([[0, 0, 10, 10], [1, 1, 3, 3], [5, 5, 20, 20]], [0.9, 0.8, 0.8],
                              [1, 3, 1])
    with pytest.raises(RuntimeError, match="classes equal: False"):
        export_model.check_report(export_model.compare_instances(eager, wrong_class))
    moved = _detections([[0, 0, 10, 10], [5, 5, 20, 20.5], [1, 1, 3, 3]], [0.9, 0.8, 0.8], [1, 2, 3])
    with pytest.raises(RuntimeError, match="max abs diff 0.5"):
        export_model.check_report(export_model.compare_instances(eager, moved))


def test_export_matches_eager(dataset, opts, weights, tmp_path):
    out = tmp_path / "export"
    image = os.path.join(dataset[1], "000003.jpg")
    assert export_model.main(["--config-file", CPU_CONFIG, "--output", str(out),
                              "--sample-image", image, *opts]) == 0
    with open(out / "export.json") as f:
        report = json.load(f)
    assert report["num_detections_eager"] == report["num_detections_exported"] > 0
    assert report["max_abs_diff_boxes"] <= 1e-4 and report["max_abs_diff_scores"] <= 1e-4
    assert report["classes_equal"]

    # Independently of the tool: reload model.ts and compare with a fresh eager model.
    cfg = tiny_cfg(*opts)
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(weights)
    x = export_model.model_input(cfg, image)
    traced = torch.jit.load(str(out / "model.ts"))
    with torch.no_grad():
        eager = model([{"image": x}])[0]["instances"]
        boxes, classes, scores, image_size = traced(x)
    assert torch.allclose(boxes, eager.pred_boxes.tensor, atol=1e-4, rtol=0)
    assert torch.allclose(scores, eager.scores, atol=1e-4, rtol=0)
    assert torch.equal(classes, eager.pred_classes)
    assert image_size.tolist() == list(x.shape[1:])


# ----------------------------------------------------------------------------------------------
# Command-line behaviour: --help, and one-line errors for bad arguments.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tool", TOOLS, ids=lambda t: t.__name__)
def test_help(tool, capsys):
    with pytest.raises(SystemExit) as e:
        tool.main(["--help"])
    assert e.value.code == 0
    assert "--config-file" in capsys.readouterr().out


def _bad_cases(dataset, weights, tmp_path):
    image = os.path.join(dataset[1], "000000.jpg")
    cfg = ["--config-file", CPU_CONFIG]
    out = ["--output", str(tmp_path / "out")]
    w = ["MODEL.WEIGHTS", weights]
    return [
        (predict, ["--config-file", "nope.yaml", "--input", image, *out, *w], "config file not found"),
        (predict, [*cfg, "--input", image, *out], "MODEL.WEIGHTS"),
        (predict, [*cfg, "--input", "/no/such/image.jpg", *out, *w], "/no/such/image.jpg"),
        (predict, [*cfg, "--input", str(tmp_path / "*.jpg"), *out, *w], "matches no file"),
        (predict, [*cfg, "--input", image, *out, "MODEL.WEIGHTS", "/no/model.pth"], "/no/model.pth"),
        (predict, [*cfg, "--input", image, *out, *w, "MODEL.NO_SUCH_KEY", "1"], "MODEL.NO_SUCH_KEY"),
        (visualize_assignment, [*cfg, "--dataset", "no_such_set", "--output", "x.png"],
         "no_such_set"),
        (visualize_assignment, [*cfg, "--dataset", dataset[0], "--index", "99",
                                "--output", "x.png"], "out of range"),
        (visualize_assignment, [*cfg, "--dataset", dataset[0], "--image-id", "12345",
                                "--output", "x.png"], "12345"),
        (analyze_consistency, [*cfg, "--dataset", dataset[0], *out], "MODEL.WEIGHTS"),
        (analyze_consistency, [*cfg, "--dataset", "no_such_set", *out, *w], "no_such_set"),
        (export_model, [*cfg, *out, "--sample-image", "/no/img.png", *w], "/no/img.png"),
        (export_model, [*cfg, *out, "--sample-image", image], "MODEL.WEIGHTS"),
    ]


def test_bad_arguments_give_one_line_errors(dataset, weights, tmp_path):
    for tool, argv, expected in _bad_cases(dataset, weights, tmp_path):
        with pytest.raises(SystemExit) as e:
            tool.main(argv)
        message = str(e.value.code)
        assert message.startswith("error: ") and "\n" not in message, (argv, message)
        assert expected in message, (argv, message)
    assert not (tmp_path / "out").exists()  # nothing written before the arguments are checked


def test_predict_draws_what_the_demo_picture_draws():
    """dsla-predict's default threshold is make demo's picture threshold, so the same model
    draws the same detections in both."""
    from dsla.tools import demo

    args = predict.parse_args(["--config-file", CPU_CONFIG, "--input", "x.jpg", "--output", "o",
                               "MODEL.WEIGHTS", "w.pth"])
    assert args.confidence_threshold == demo.parse_args([]).score_threshold == 0.4
