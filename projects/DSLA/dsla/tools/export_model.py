"""
Export a DSLA model to TorchScript (default) or ONNX, and check it against the eager model.

``--format torchscript`` traces the whole model (preprocessing, backbone, head, decoding, NMS)
through detectron2's ``TracingAdapter`` (as detectron2's ``tools/deploy/export_model.py
--export-method tracing`` does) into ``DIR/model.ts``; the file still needs PyTorch and
detectron2 to run. Its interface:

    input:   image, float32 Tensor[3, H, W], channels in INPUT.FORMAT order (BGR by default),
             0-255, already resized as at test time (shorter side INPUT.MIN_SIZE_TEST)
    outputs: (pred_boxes [D, 4] xyxy in input pixels, pred_classes [D], scores [D], image_size [2])

``--format onnx`` writes ``DIR/model.onnx``, one ONNX graph of the same computation with dynamic
H and W that onnxruntime runs alone (needs ``pip install .[deploy]``): input ``image`` as above,
outputs ``boxes [D, 4]``, ``scores [D]``, ``classes [D]``; class names, channel order and the
test-time resize are in the file's metadata (docs/DEPLOY.md). Models with deformable
convolutions (DCN) stop with one line naming the operator.

Either way the tool runs the written file and the eager model on the sample image and fails
unless boxes and scores agree within 1e-4 and the classes are equal; ``DIR/export.json``
records the differences.

    dsla-export \\
        --config-file configs/Shapes/dsla_R_18_FPN_demo.yaml --output out/export \\
        --sample-image datasets/shapes/easy_val/images/000000.jpg --format onnx \\
        MODEL.WEIGHTS output/demo/model_final.pth
"""
import os
import sys
import warnings
from typing import Dict

import torch

import detectron2.data.transforms as T
from detectron2.data import DatasetCatalog
from detectron2.data.detection_utils import read_image
from detectron2.export import TracingAdapter
from detectron2.data import MetadataCatalog
from detectron2.structures import Boxes, Instances

import dsla  # noqa: F401  (registers the meta-architectures and the built-in datasets)
from dsla import deploy
from dsla.cli import (
    class_names,
    exit_on_user_error,
    load_config,
    load_model,
    register_datasets,
    tool_parser,
    write_json,
)
from dsla.errors import UserError
from dsla.outputs import add_overwrite_argument, check_output_path

TOLERANCE = 1e-4
# Order of the traced outputs: TracingAdapter flattens Instances fields in sorted-name order, then
# appends image_size.
OUTPUT_NAMES = ["pred_boxes", "pred_classes", "scores", "image_size"]
FORMATS = ("torchscript", "onnx")
MODEL_FILES = {"torchscript": "model.ts", "onnx": "model.onnx"}


def parse_args(argv=None):
    parser = tool_parser(__doc__, weights="MODEL.WEIGHTS is required",
                         output_help="folder for model.ts / model.onnx and export.json")
    parser.add_argument("--format", choices=FORMATS, default="torchscript",
                        help="torchscript (default; runs with PyTorch + detectron2) or onnx "
                        "(runs with onnxruntime alone; needs pip install .[deploy])")
    parser.add_argument("--sample-image", default=None, metavar="PATH",
                        help="image of your data to trace with and to check on (default: the "
                        "first image of the config's DATASETS.TEST[0], if it is on disk)")
    add_overwrite_argument(parser)
    return parser.parse_args(argv)


def sample_image_path(cfg, path=None) -> str:
    """
    ``path`` if it exists, else the first image of ``DATASETS.TEST[0]`` when that dataset's
    annotation file is on disk: a built-in split that was never generated is not generated here
    (the model should be traced on the user's own data, not on data made up for the occasion).
    """
    if path is not None:
        if not os.path.isfile(path):
            raise UserError(f"--sample-image not found: {path}")
        return path
    dataset = cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else None
    if dataset not in DatasetCatalog.list():
        raise UserError(f"no --sample-image given and DATASETS.TEST[0] ({dataset}) is not a "
                         "registered dataset: pass --sample-image with an image of your data")
    json_file = MetadataCatalog.get(dataset).get("json_file", None)
    if json_file is not None and not os.path.isfile(json_file):
        raise UserError(f"no --sample-image given and DATASETS.TEST[0] ({dataset}) is not on "
                        f"disk ({json_file}): pass --sample-image with an image of your data")
    dicts = DatasetCatalog.get(dataset)
    if not dicts:
        raise UserError(f"no --sample-image given and dataset '{dataset}' has no images")
    return dicts[0]["file_name"]


def model_input(cfg, image_path: str) -> torch.Tensor:
    """
    The image as the model's ``"image"`` input, resized as at test time (like DefaultPredictor).

    Returns:
        float32 Tensor[3, H, W] on ``cfg.MODEL.DEVICE``, channels in ``cfg.INPUT.FORMAT``.
    """
    try:
        image = read_image(image_path, format=cfg.INPUT.FORMAT)
    except OSError as e:  # PIL: not an image
        raise UserError(f"cannot read {image_path}: {e}") from e
    resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    image = resize.get_transform(image).apply_image(image)
    tensor = torch.as_tensor(image.astype("float32").transpose(2, 0, 1))
    return tensor.to(cfg.MODEL.DEVICE)


def trace_model(model: torch.nn.Module, image: torch.Tensor):
    """
    Trace ``model`` (eval mode) on one image.

    Args:
        model: a detectron2 model whose inference output is ``[{"instances": Instances}]``.
        image: float Tensor[3, H, W], the model's ``"image"`` input.

    Returns:
        (traced ScriptModule taking ``image`` and returning the flat outputs, the TracingAdapter
        whose ``outputs_schema`` turns them back into ``[{"instances": Instances}]``).
    """
    # Only "image": without "height"/"width" the outputs stay in input coordinates, and the
    # traced graph needs no Python ints besides the tensor (as detectron2's export tool does).
    adapter = TracingAdapter(model, [{"image": image}])
    with warnings.catch_warnings():
        # TracerWarnings name asserts and shape reads in detectron2's Boxes/NMS that are constant
        # for a given model; export.json's check is what tells whether the trace is right.
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(adapter, (image,))
    return traced, adapter


def compare_instances(eager: Instances, exported: Instances) -> Dict:
    """
    Args:
        eager, exported: predictions (``pred_boxes``, ``scores``, ``pred_classes``) on one image.

    Returns:
        dict: ``num_detections`` of each, ``max_abs_diff_boxes`` / ``max_abs_diff_scores``
        (None when the counts differ) and ``classes_equal``.
    """
    same_count = len(eager) == len(exported)
    report = {"num_detections_eager": len(eager), "num_detections_exported": len(exported),
              "max_abs_diff_boxes": None, "max_abs_diff_scores": None,
              "classes_equal": False}
    if same_count:
        exported = exported[counterparts(eager, exported)]
        report["max_abs_diff_boxes"] = _max_abs_diff(eager.pred_boxes.tensor,
                                                     exported.pred_boxes.tensor)
        report["max_abs_diff_scores"] = _max_abs_diff(eager.scores, exported.scores)
        report["classes_equal"] = bool(torch.equal(eager.pred_classes.cpu(),
                                                   exported.pred_classes.cpu()))
    return report


def counterparts(eager: Instances, exported: Instances) -> torch.Tensor:
    """
    Which exported detection each eager one is compared with: in eager's order, the unused one of
    the same class whose box is nearest (largest corner difference). Rank by rank would fail an
    export whose two detections of equal score leave its sort in the other order.

    Args:
        eager, exported: D detections each (``pred_boxes``, ``pred_classes``).

    Returns:
        ``[D]`` long, a permutation of the exported detections (an eager detection without an
        unused one of its class takes the first unused one, and the class check fails).
    """
    cost = (eager.pred_boxes.tensor[:, None] - exported.pred_boxes.tensor[None]).abs().amax(-1)
    cost[eager.pred_classes[:, None].cpu() != exported.pred_classes[None].cpu()] = float("inf")
    free = torch.ones(len(exported), dtype=torch.bool)
    order = []
    for row in cost.cpu():
        row = row.masked_fill(~free, float("inf"))
        j = int(row.argmin()) if torch.isfinite(row).any() else int(free.nonzero()[0, 0])
        free[j] = False
        order.append(j)
    return torch.tensor(order, dtype=torch.long)


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def check_report(report: Dict) -> None:
    """Raise ``RuntimeError`` naming the mismatch unless the export matches within TOLERANCE."""
    if report["num_detections_eager"] != report["num_detections_exported"]:
        raise RuntimeError(f"exported model gives {report['num_detections_exported']} detections, "
                           f"eager {report['num_detections_eager']}")
    worst = max(report["max_abs_diff_boxes"], report["max_abs_diff_scores"])
    if worst > TOLERANCE or not report["classes_equal"]:
        raise RuntimeError(f"exported model differs from eager: max abs diff {worst:.3g} "
                           f"(tolerance {TOLERANCE}), classes equal: {report['classes_equal']}")


def export(cfg, model, image_path: str, output_dir: str, fmt: str = "torchscript",
           names=None) -> Dict:
    """
    Export ``model`` (eval mode, weights loaded) as ``fmt`` into ``output_dir``, run the written
    file and the eager model on the image, and return the report written to export.json.

    Args:
        names: class names recorded in an ONNX file's metadata (None: class indices).
    """
    image = model_input(cfg, image_path)
    if fmt == "onnx":  # exported and checked on the CPU, onnxruntime's default provider
        model, image = model.to("cpu"), image.to("cpu")
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, MODEL_FILES[fmt])
    with torch.no_grad():
        eager = model([{"image": image}])[0]["instances"]
    if fmt == "onnx":
        exported, interface = _export_onnx(cfg, model, image, path, names)
    else:
        exported, interface = _export_torchscript(cfg, model, image, path)
    report = {"model": path, "format": fmt, "sample_image": image_path,
              "input_shape": list(image.shape), "input_format": cfg.INPUT.FORMAT, **interface,
              "torch_version": torch.__version__, "device": str(image.device),
              "tolerance": TOLERANCE, **compare_instances(eager, exported)}
    write_json(os.path.join(output_dir, "export.json"), report)
    return report


def _export_torchscript(cfg, model, image, path):
    """Trace and save to ``path``; returns (the reloaded file's Instances on ``image``, the
    interface for the report)."""
    traced, adapter = trace_model(model, image)
    traced.save(path)
    # Check the file that was written, not the in-memory trace.
    reloaded = torch.jit.load(path, map_location=cfg.MODEL.DEVICE)
    with torch.no_grad():
        exported = adapter.outputs_schema(reloaded(image))[0]["instances"]
    return exported, {"outputs": OUTPUT_NAMES}


def _export_onnx(cfg, model, image, path, names):
    """Export to ``path``; returns (onnxruntime's Instances on ``image``, the interface for the
    report)."""
    _, onnxruntime = deploy.require_onnx()
    metadata = deploy.metadata_props(cfg, names, model.backbone.size_divisibility)
    deploy.export_onnx(model, image, path, metadata)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    boxes, scores, classes = deploy.run_onnx(session, image)
    exported = Instances(tuple(image.shape[1:]), pred_boxes=Boxes(boxes), scores=scores,
                         pred_classes=classes)
    interface = {"outputs": deploy.OUTPUT_NAMES, "opset": deploy.OPSET,
                 "onnxruntime_version": onnxruntime.__version__, "metadata": metadata}
    return exported, interface


def main(argv=None) -> int:
    args = parse_args(argv)
    with exit_on_user_error():
        cfg = load_config(args.config_file, args.opts, require_weights=True)
        check_output_path(args.output, overwrite=args.overwrite, kind="folder")
        if args.format == "onnx":
            deploy.require_onnx()
        register_datasets(args)
        model, checkpoint_names = load_model(cfg)
        image_path = sample_image_path(cfg, args.sample_image)
        names = class_names(cfg, checkpoint_names) if args.format == "onnx" else None
        report = export(cfg, model, image_path, args.output, args.format, names)
    try:
        check_report(report)
    except RuntimeError as e:
        sys.exit(f"error: {e} (see {os.path.join(args.output, 'export.json')})")
    print(f"Wrote {report['model']}: {report['num_detections_eager']} detections on "
          f"{report['sample_image']}, max abs diff boxes {report['max_abs_diff_boxes']:.3g}, "
          f"scores {report['max_abs_diff_scores']:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
