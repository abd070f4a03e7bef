"""ONNX export (``dsla.deploy``, ``dsla-export --format onnx``) and the onnxruntime example
``deploy/onnx_predict.py``: onnxruntime's detections equal eager PyTorch's.

Random weights give near-equal scores, so the classifier is re-drawn with a spread (bias -1,
weights std 0.05) and the score threshold lowered to 0.2: the tests compare ~50-100 detections
per image through every step (top-k per level, threshold, NMS, top-N), not an empty output.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from conftest import CPU_CONFIG, REPO, tiny_cfg
from dsla import deploy
from dsla.errors import UserError
from dsla.tools import export_model

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

R50_CONFIG = os.path.join(REPO, "configs", "COCO-Detection", "dsla_R_50_FPN_1x_mmdet.yaml")
EXAMPLE = os.path.join(REPO, "deploy", "onnx_predict.py")
BOX_TOL, SCORE_TOL = 0.01, 1e-4
# TOPK 100: level P3 of a 128 px image has 256 points, P5 16, so both branches of the per-level
# top-k (k < Pi and k = Pi) are in the graph's checks.
SPREAD_OPTS = ["MODEL.DSLA.SCORE_THRESH_TEST", "0.2", "MODEL.DSLA.TOPK_CANDIDATES_TEST", "100"]


def spread_model(cfg, seed=0):
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():
        model.head.cls_score.bias.fill_(-1.0)
        model.head.cls_score.weight.normal_(0, 0.05)
    return model


def export_to(model, cfg, path, size=(128, 160)):
    image = torch.rand(3, *size, generator=torch.Generator().manual_seed(1)) * 255
    deploy.export_onnx(model, image, str(path),
                       deploy.metadata_props(cfg, None, model.backbone.size_divisibility))
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def same_detections(eager, exported) -> bool:
    """
    Same count, and each eager detection has an exported one of its own with the same class, its
    box within BOX_TOL px and its score within SCORE_TOL (Instances). Matched one to one rather
    than rank by rank: two detections of equal score may come out of the two sorts either way.
    """
    if len(eager) != len(exported):
        return False
    boxes = (eager.pred_boxes.tensor[:, None] - exported.pred_boxes.tensor[None]).abs().amax(-1)
    scores = (eager.scores[:, None] - exported.scores[None]).abs()
    classes = eager.pred_classes[:, None] == exported.pred_classes[None]
    close = (boxes <= BOX_TOL) & (scores <= SCORE_TOL) & classes  # [eager, exported]
    free = torch.ones(len(exported), dtype=torch.bool)
    for row in close:  # greedy in score order: a tie is two rows matching the same two columns
        match = (row & free).nonzero()
        if len(match) == 0:
            return False
        free[match[0, 0]] = False
    return True


def onnx_instances(session, image):
    """onnxruntime's detections on ``image [3, H, W]`` as Instances in input pixels."""
    boxes, scores, classes = deploy.run_onnx(session, image)
    return Instances(tuple(image.shape[1:]), pred_boxes=Boxes(boxes), scores=scores,
                     pred_classes=classes)


def assert_same_detections(model, session, image, minimum=10):
    """onnxruntime's detections on ``image [3, H, W]`` equal eager's; returns their number."""
    with torch.no_grad():
        eager = model([{"image": image}])[0]["instances"]
    assert len(eager) >= minimum, "too few detections for a meaningful comparison"
    exported = onnx_instances(session, image)
    assert same_detections(eager, exported), (len(eager), len(exported))
    return len(eager)


@pytest.fixture(scope="module")
def r18(tmp_path_factory):
    cfg = tiny_cfg(*SPREAD_OPTS)
    model = spread_model(cfg)
    path = tmp_path_factory.mktemp("onnx") / "r18.onnx"
    return cfg, model, export_to(model, cfg, path), path


@pytest.mark.parametrize("size", [(128, 160), (96, 200), (300, 180)])
def test_r18_onnxruntime_equals_eager_at_other_sizes(r18, size):
    _, model, session, _ = r18
    image = torch.rand(3, *size, generator=torch.Generator().manual_seed(sum(size))) * 255
    assert_same_detections(model, session, image)


def test_per_level_top_k_follows_the_input_size(tmp_path):
    """With 10 candidates per level, levels with fewer points than 10 at the traced size (P6, P7
    of 128x160) have more at 300x180, and levels with more (P5) have fewer at 64x64: the graph
    must keep min(10, Pi) at every size, not the traced count."""
    cfg = tiny_cfg("MODEL.DSLA.SCORE_THRESH_TEST", "0.2", "MODEL.DSLA.TOPK_CANDIDATES_TEST", "10")
    model = spread_model(cfg)
    session = export_to(model, cfg, tmp_path / "top10.onnx")
    for size in [(300, 180), (64, 64)]:
        image = torch.rand(3, *size, generator=torch.Generator().manual_seed(7)) * 255
        assert_same_detections(model, session, image, minimum=5)


def test_r18_top_n_and_threshold_are_in_the_graph(r18):
    """The cap of TEST.DETECTIONS_PER_IMAGE binds (eager gives exactly 100 before empty boxes
    are dropped) and the output obeys the score threshold."""
    _, model, session, _ = r18
    image = torch.rand(3, 256, 256, generator=torch.Generator().manual_seed(5)) * 255
    boxes, scores, _ = deploy.run_onnx(session, image)
    assert 90 <= len(scores) <= 100 and scores.min() > 0.2
    assert torch.all(scores[:-1] >= scores[1:])


def test_metadata_records_what_a_runner_needs(r18):
    cfg, _, _, path = r18
    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert set(meta) == set(deploy.METADATA_KEYS)
    assert meta["format"] == deploy.FORMAT_NAME
    assert json.loads(meta["class_names"]) == ["0", "1", "2", "3"]
    assert meta["input_format"] == "BGR" and meta["size_divisibility"] == "32"
    assert (meta["min_size_test"], meta["max_size_test"]) == ("256", "256")
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [3, "height", "width"]
    assert [o.name for o in proto.graph.output] == ["boxes", "scores", "classes"]
    onnx.checker.check_model(proto, full_check=True)


def test_r50_authors_layout_onnxruntime_equals_eager(tmp_path):
    cfg = tiny_cfg(*SPREAD_OPTS, config_file=R50_CONFIG)
    model = spread_model(cfg)
    session = export_to(model, cfg, tmp_path / "r50.onnx", size=(192, 256))
    image = torch.rand(3, 320, 448, generator=torch.Generator().manual_seed(2)) * 255
    assert_same_detections(model, session, image)


SWIN_CONFIG = os.path.join(REPO, "configs", "COCO-Detection", "dsla_Swin_S_FPN_ms_3x_mmdet.yaml")


def test_swin_stops_with_one_line_naming_the_part(tmp_path):
    """Swin-S without its DCN head still has the size-bound window attention."""
    cfg = tiny_cfg("MODEL.WEIGHTS", "", "MODEL.DSLA.DCN_ON_LAST_CONV", "False",
                   "MODEL.SWIN.DEPTHS", "[2, 2, 2, 2]", config_file=SWIN_CONFIG)
    with pytest.raises(UserError, match="SwinTransformer \\(module backbone.bottom_up\\)"):
        export_to(build_model(cfg).eval(), cfg, tmp_path / "swin.onnx")
    assert not (tmp_path / "swin.onnx").exists()


def test_other_meta_architectures_stop_with_one_line(tmp_path):
    """The plain-FCOS baseline subclasses DSLA but scores with centerness."""
    config = os.path.join(REPO, "configs", "Shapes", "fcos_plain_R_18_FPN_cpu.yaml")
    cfg = tiny_cfg(config_file=config)
    with pytest.raises(UserError, match="not FCOSPlain"):
        export_to(build_model(cfg).eval(), cfg, tmp_path / "fcos.onnx")


def test_dcn_stops_with_one_line_naming_the_operator(tmp_path):
    cfg = tiny_cfg("MODEL.DSLA.DCN_ON_LAST_CONV", "True")
    model = build_model(cfg).eval()
    with pytest.raises(UserError, match="torchvision::deform_conv2d.*head.cls_convs.1"):
        export_to(model, cfg, tmp_path / "dcn.onnx")
    assert not (tmp_path / "dcn.onnx").exists()


# ----------------------------------------------------------------------------------------------
# dsla-export --format onnx, and deploy/onnx_predict.py against eager prediction.
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(weights, image, export folder) of ``dsla-export --format onnx`` on a spread model."""
    folder = tmp_path_factory.mktemp("export")
    cfg = tiny_cfg(*SPREAD_OPTS)
    weights = str(folder / "weights.pth")
    torch.save({"model": spread_model(cfg).state_dict()}, weights)
    image = str(folder / "image.png")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (150, 200, 3), dtype=np.uint8)).save(image)
    out = folder / "out"
    assert export_model.main(["--config-file", CPU_CONFIG, "--output", str(out),
                              "--sample-image", image, "--format", "onnx",
                              "MODEL.WEIGHTS", weights, *SPREAD_OPTS]) == 0
    return weights, image, out


def test_export_tool_checks_onnxruntime_against_eager(exported):
    _, image, out = exported
    report = json.loads((out / "export.json").read_text())
    assert report["format"] == "onnx" and report["model"].endswith("model.onnx")
    assert report["num_detections_eager"] == report["num_detections_exported"] > 10
    assert report["max_abs_diff_boxes"] <= 1e-4 and report["max_abs_diff_scores"] <= 1e-4
    assert report["classes_equal"] and report["sample_image"] == image


def _run_example(*argv, python=sys.executable):
    result = subprocess.run([python, EXAMPLE, *map(str, argv)], capture_output=True, text=True)
    return result.returncode, result.stdout, result.stderr.strip()


def test_example_prints_the_detections_of_eager_prediction(exported, tmp_path):
    """The example's resize, rescale and clip reproduce dsla-predict's (DefaultPredictor) on an
    image of another size than the model's test size."""
    from dsla.cli import load_model
    from dsla.visualization import predict

    weights, image, out = exported
    png = tmp_path / "drawn.png"
    code, stdout, stderr = _run_example(out / "model.onnx", image, "--output", png,
                                        "--score-threshold", "0")
    assert code == 0, stderr
    lines = stdout.splitlines()[1:-1]
    cfg = tiny_cfg("MODEL.WEIGHTS", weights, *SPREAD_OPTS)
    cfg.freeze()
    eager = predict(cfg, load_model(cfg)[0], [image])[0]
    meta = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    names = json.loads(meta["class_names"])  # those of DATASETS.TEST[0], as dsla-predict's
    assert len(lines) == len(eager) > 10
    for line, box, score, cls in zip(lines, eager.pred_boxes.tensor.tolist(),
                                     eager.scores.tolist(), eager.pred_classes.tolist()):
        name, printed_score, *printed_box = line.split()
        assert name == names[cls] and float(printed_score) == pytest.approx(score, abs=1e-4)
        # Printed with 2 decimals: BOX_TOL plus the rounding.
        assert np.allclose([float(v) for v in printed_box], box, rtol=0, atol=BOX_TOL + 0.005)
    assert Image.open(png).size == (200, 150)


def test_example_bad_inputs_end_in_one_line(exported, tmp_path):
    _, image, out = exported
    other = tmp_path / "other.onnx"
    node = onnx.helper.make_node("Identity", ["x"], ["y"])
    value = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph([node], "g", [value("x", onnx.TensorProto.FLOAT, [1])],
                                   [value("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(onnx.helper.make_model(graph), str(other))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    cases = [((other, image), "is not a DSLA export"),
             ((image, image), "cannot load"),
             ((out / "model.onnx", broken), "cannot read"),
             ((out / "model.onnx", tmp_path / "missing.jpg"), "cannot read")]
    for argv, expected in cases:
        code, _, stderr = _run_example(*argv)
        assert code == 1 and stderr.startswith("error: ") and "\n" not in stderr, (argv, stderr)
        assert expected in stderr and str(argv[0] if "load" in expected or "DSLA" in expected
                                           else argv[1]) in stderr, stderr


def test_export_without_onnxruntime_says_what_to_install(exported, tmp_path, monkeypatch):
    weights, image, _ = exported
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    with pytest.raises(SystemExit) as e:
        export_model.main(["--config-file", CPU_CONFIG, "--output", str(tmp_path / "o"),
                           "--sample-image", image, "--format", "onnx", "MODEL.WEIGHTS", weights])
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message
    assert "onnxruntime" in message and "pip install .[deploy]" in message
    assert not (tmp_path / "o").exists()


def test_example_without_onnxruntime_says_what_to_install(exported):
    _, image, out = exported
    hide = ("import runpy, sys; sys.modules['onnxruntime'] = None; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", hide, EXAMPLE, str(out / "model.onnx"), image],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip() == "error: this example needs onnxruntime: pip install onnxruntime"


# ----------------------------------------------------------------------------------------------
# dsla-export, either format: never replaces an earlier export, never generates data.
# ----------------------------------------------------------------------------------------------


def test_export_refuses_a_non_empty_output_folder(exported, tmp_path):
    weights, image, _ = exported
    out = tmp_path / "earlier"
    out.mkdir()
    (out / "model.ts").write_text("an earlier export")
    with pytest.raises(SystemExit) as e:
        export_model.main(["--config-file", CPU_CONFIG, "--output", str(out),
                           "--sample-image", image, "MODEL.WEIGHTS", weights])
    assert "--overwrite" in str(e.value.code) and str(out) in str(e.value.code)
    assert (out / "model.ts").read_text() == "an earlier export"


def test_export_without_sample_image_never_generates_data(exported, tmp_path):
    from dsla.data import register_shapes_datasets

    weights, _, _ = exported
    register_shapes_datasets(root=str(tmp_path / "shapes"))  # DATASETS.TEST[0]: not generated
    try:
        with pytest.raises(SystemExit) as e:
            export_model.main(["--config-file", CPU_CONFIG, "--output", str(tmp_path / "o"),
                               "MODEL.WEIGHTS", weights])
    finally:
        register_shapes_datasets()
    message = str(e.value.code)
    assert "--sample-image" in message and "shapes_val" in message and "not on disk" in message
    assert not (tmp_path / "shapes").exists() and not (tmp_path / "o").exists()
