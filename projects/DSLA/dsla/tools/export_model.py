"""
Export a DSLA model to TorchScript by tracing, and check it against the eager model.

Traces the whole model (preprocessing, backbone, head, decoding, NMS) through detectron2's
``TracingAdapter`` (as detectron2's ``tools/deploy/export_model.py --export-method tracing`` does)
on one sample image, saves ``DIR/model.ts``, reloads it, runs both on the sample image and
fails unless boxes and scores agree within 1e-4 and the classes are equal. ``DIR/export.json``
records the differences and the traced model's interface:

    input:   image, float32 Tensor[3, H, W], channels in INPUT.FORMAT order (BGR by default),
             0-255, already resized as at test time (shorter side INPUT.MIN_SIZE_TEST)
    outputs: (pred_boxes [D, 4] xyxy in input pixels, pred_classes [D], scores [D], image_size [2])

    dsla-export \\
        --config-file configs/Shapes/dsla_R_18_FPN_demo.yaml --output out/export \\
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
from detectron2.structures import Instances

import dsla  # noqa: F401  (registers the meta-architectures and the built-in datasets)
from dsla.cli import (
    exit_on_user_error,
    load_config,
    load_model,
    register_datasets,
    tool_parser,
    write_json,
)
from dsla.errors import UserError

TOLERANCE = 1e-4
# Order of the traced outputs: TracingAdapter flattens Instances fields in sorted-name order, then
# appends image_size.
OUTPUT_NAMES = ["pred_boxes", "pred_classes", "scores", "image_size"]


def parse_args(argv=None):
    parser = tool_parser(__doc__, weights="MODEL.WEIGHTS is required",
                         output_help="folder for model.ts and export.json")
    parser.add_argument("--sample-image", default=None, metavar="PATH",
                        help="image to trace with and to check on (default: the first image of "
                        "the config's DATASETS.TEST[0])")
    return parser.parse_args(argv)


def sample_image_path(cfg, path=None) -> str:
    """``path`` if it exists, else the first image of ``DATASETS.TEST[0]``."""
    if path is not None:
        if not os.path.isfile(path):
            raise UserError(f"--sample-image not found: {path}")
        return path
    dataset = cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else None
    if dataset not in DatasetCatalog.list():
        raise UserError(f"no --sample-image given and DATASETS.TEST[0] ({dataset}) is not a "
                         "registered dataset")
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
        report["max_abs_diff_boxes"] = _max_abs_diff(eager.pred_boxes.tensor,
                                                     exported.pred_boxes.tensor)
        report["max_abs_diff_scores"] = _max_abs_diff(eager.scores, exported.scores)
        report["classes_equal"] = bool(torch.equal(eager.pred_classes.cpu(),
                                                   exported.pred_classes.cpu()))
    return report


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


def export(cfg, model, image_path: str, output_dir: str) -> Dict:
    """Trace ``model`` (eval mode, weights loaded), save, reload and compare; returns the report
    written to export.json."""
    image = model_input(cfg, image_path)
    traced, adapter = trace_model(model, image)
    os.makedirs(output_dir, exist_ok=True)
    ts_path = os.path.join(output_dir, "model.ts")
    traced.save(ts_path)
    # Check the file that was written, not the in-memory trace.
    reloaded = torch.jit.load(ts_path, map_location=cfg.MODEL.DEVICE)
    with torch.no_grad():
        eager = model([{"image": image}])[0]["instances"]
        exported = adapter.outputs_schema(reloaded(image))[0]["instances"]
    report = {"model": ts_path, "sample_image": image_path, "input_shape": list(image.shape),
              "input_format": cfg.INPUT.FORMAT, "outputs": OUTPUT_NAMES,
              "torch_version": torch.__version__, "device": str(image.device),
              "tolerance": TOLERANCE, **compare_instances(eager, exported)}
    write_json(os.path.join(output_dir, "export.json"), report)
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    with exit_on_user_error():
        cfg = load_config(args.config_file, args.opts, require_weights=True)
        register_datasets(args)
        model, _ = load_model(cfg)  # before the sample image, which may generate a dataset
        report = export(cfg, model, sample_image_path(cfg, args.sample_image), args.output)
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
