"""
Draw a DSLA (or FCOS-baseline) model's detections on your images.

One PNG per input image, named after it (``photo.jpg`` -> ``DIR/photo.png``), drawn with
detectron2's Visualizer. Class names come from the checkpoint (training records them), else from
``DATASETS.TEST[0]`` when it has NUM_CLASSES classes, else class indices are drawn. An input
that cannot be read is skipped with a warning naming it; the others are written, and the exit
status is 1 if any input was skipped.

    dsla-predict --config-file configs/Shapes/dsla_R_18_FPN_demo.yaml \\
        --input "datasets/shapes/easy_val/images/00000*.jpg" --output out/predict \\
        MODEL.WEIGHTS output/demo/model_final.pth
"""
import glob
import logging
import os
import sys
from typing import List, Optional, Sequence, Tuple

from PIL import Image

from detectron2.data import MetadataCatalog

import dsla  # noqa: F401  (registers the meta-architectures and the built-in datasets)
from dsla.cli import (
    class_names,
    exit_on_user_error,
    load_config,
    load_model,
    register_datasets,
    tool_parser,
)
from dsla.errors import UserError
from dsla.visualization import predict_images

logger = logging.getLogger("dsla")
_GLOB_CHARS = set("*?[")


def parse_args(argv=None):
    parser = tool_parser(__doc__, weights="MODEL.WEIGHTS is required",
                         output_help="folder for the PNGs")
    parser.add_argument("--input", required=True, nargs="+", metavar="IMAGE_OR_GLOB",
                        help="image files or quoted glob patterns")
    # 0.4: the threshold of make demo's picture and precision/recall, so that the same model
    # draws the same detections in both (DSLA's IoU-coupled scores run lower than class
    # confidences; docs/BENCHMARKS.md, "Calibration").
    parser.add_argument("--confidence-threshold", type=float, default=0.4,
                        help="detections below this score are not drawn (default 0.4, as make demo)")
    return parser.parse_args(argv)


def expand_inputs(patterns: Sequence[str]) -> List[str]:
    """
    Args:
        patterns: file paths or glob patterns.

    Returns:
        the files, globs expanded and sorted, in argument order.

    Raises:
        UserError: a path does not exist, a pattern matches no file, or two inputs would write
            the same output file.
    """
    paths = []
    for pattern in patterns:
        if _GLOB_CHARS & set(pattern):
            matches = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
            if not matches:
                raise UserError(f"--input pattern matches no file: {pattern}")
            paths.extend(matches)
        elif os.path.isfile(pattern):
            paths.append(pattern)
        else:
            raise UserError(f"--input file not found: {pattern}")
    names = [output_name(p) for p in paths]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UserError(f"several inputs would be written to the same file: {duplicates[0]}")
    return paths


def output_name(image_path: str) -> str:
    """``a/b/photo.jpg`` -> ``photo.png``."""
    return os.path.splitext(os.path.basename(image_path))[0] + ".png"


def readable_images(paths: Sequence[str]) -> Tuple[List[str], List[str]]:
    """
    Split ``paths`` into images that decode completely and the others (each named in a
    warning): one broken file must not cost the outputs of the good ones.
    """
    good, bad = [], []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.load()  # decodes all of it: a truncated JPEG fails here, not mid-run
            good.append(path)
        except OSError as e:  # PIL: not an image, truncated, unreadable
            logger.warning(f"skipping {path}: cannot read it as an image ({e})")
            bad.append(path)
    return good, bad


def _metadata_name(names) -> Optional[str]:
    """A MetadataCatalog entry holding ``names`` (how predict_images takes class names)."""
    if not names:
        return None
    key = "dsla_predict_classes:" + "|".join(names)
    MetadataCatalog.get(key).set(thing_classes=list(names))
    return key


def run(args) -> Tuple[List[str], List[str]]:
    """Predict and draw; returns the written PNG paths and the skipped inputs."""
    cfg = load_config(args.config_file, args.opts, require_weights=True)
    register_datasets(args)
    paths = expand_inputs(args.input)
    _, checkpoint_names = load_model(cfg)  # strict: weights that do not fit stop here
    good, bad = readable_images(paths)
    if not good:
        raise UserError(f"none of the {len(paths)} inputs could be read as an image "
                        f"(first: {bad[0]})")
    names = _metadata_name(class_names(cfg, checkpoint_names))
    drawings = predict_images(cfg, good, dataset_name=names,
                              score_threshold=args.confidence_threshold)
    os.makedirs(args.output, exist_ok=True)
    written = []
    for path, drawing in zip(good, drawings):
        out = os.path.join(args.output, output_name(path))
        Image.fromarray(drawing).save(out)
        written.append(out)
    return written, bad


def main(argv=None) -> int:
    args = parse_args(argv)
    with exit_on_user_error():
        written, skipped = run(args)
    print(f"Wrote {len(written)} PNG(s) to {args.output}; skipped {len(skipped)} unreadable "
          f"input(s)" + (f": {', '.join(skipped)}" if skipped else ""))
    return 1 if skipped else 0


if __name__ == "__main__":
    sys.exit(main())
