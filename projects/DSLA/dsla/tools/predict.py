"""
Draw a DSLA (or FCOS-baseline) model's detections on your images.

One PNG per input image, named after it (``photo.jpg`` -> ``DIR/photo.png``), drawn with
detectron2's Visualizer; an existing PNG is replaced only with --overwrite. Inputs are image
files, quoted glob patterns or folders (their image files). Class names come from the checkpoint
(training records them), else from ``DATASETS.TEST[0]`` when it has NUM_CLASSES classes, else
class indices are drawn. An input that cannot be read is skipped with a warning naming it; the
others are written, and the exit status is 1 if any input was skipped.

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
from dsla.data import mode_problem
from dsla.errors import UserError
from dsla.outputs import add_overwrite_argument, check_output_path
from dsla.visualization import SCORE_THRESHOLD, predict_images

logger = logging.getLogger("dsla")
_GLOB_CHARS = set("*?[")


def parse_args(argv=None):
    parser = tool_parser(__doc__, weights="MODEL.WEIGHTS is required",
                         output_help="folder for the PNGs")
    parser.add_argument("--input", required=True, nargs="+", metavar="IMAGE_GLOB_OR_DIR",
                        help="image files, quoted glob patterns or folders (their image files)")
    parser.add_argument("--confidence-threshold", type=float, default=SCORE_THRESHOLD,
                        help=f"detections below this score are not drawn (default "
                        f"{SCORE_THRESHOLD}, as make demo)")
    add_overwrite_argument(parser)
    return parser.parse_args(argv)


def expand_inputs(patterns: Sequence[str]) -> List[str]:
    """
    Args:
        patterns: file paths, glob patterns or folders.

    Returns:
        the files, globs expanded and folders listed (their image files), each sorted, in
        argument order.

    Raises:
        UserError: a path does not exist, a pattern matches no file, a folder holds no image
            file, or two inputs would write the same output file.
    """
    paths = []
    for pattern in patterns:
        if _GLOB_CHARS & set(pattern):
            matches = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
            if not matches:
                raise UserError(f"--input pattern matches no file: {pattern}")
            paths.extend(matches)
        elif os.path.isdir(pattern):
            paths.extend(_folder_images(pattern))
        elif os.path.isfile(pattern):
            paths.append(pattern)
        else:
            raise UserError(f"--input file not found: {pattern}")
    names = [output_name(p) for p in paths]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UserError(f"several inputs would be written to the same file: {duplicates[0]}")
    return paths


def _folder_images(folder: str) -> List[str]:
    """The files of ``folder`` (not its subfolders) with an image extension PIL reads, sorted."""
    extensions = Image.registered_extensions()
    files = sorted(os.path.join(folder, name) for name in os.listdir(folder)
                   if os.path.splitext(name)[1].lower() in extensions)
    files = [f for f in files if os.path.isfile(f)]
    if not files:
        raise UserError(f"--input folder {folder} holds no image files (.jpg, .png, ...)")
    return files


def check_outputs(folder: str, paths: Sequence[str], overwrite: bool) -> List[str]:
    """
    The PNG paths of ``paths`` in ``folder``, checked before the model is loaded: ``folder``
    must be a folder that can be written, and no PNG may exist yet unless ``overwrite``.

    Raises:
        UserError: naming the output path and what to do.
    """
    # The folder may hold other files: only the PNGs this run writes must be new.
    check_output_path(folder, overwrite=True, kind="folder")
    return [check_output_path(os.path.join(folder, output_name(p)), overwrite=overwrite)
            for p in paths]


def output_name(image_path: str) -> str:
    """``a/b/photo.jpg`` -> ``photo.png``."""
    return os.path.splitext(os.path.basename(image_path))[0] + ".png"


def readable_images(paths: Sequence[str]) -> Tuple[List[str], List[str]]:
    """
    Split ``paths`` into images that decode completely, in a pixel mode the reader handles,
    and the others (each named in a warning): one broken file must not cost the outputs of the
    good ones.
    """
    good, bad = [], []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.load()  # decodes all of it: a truncated JPEG fails here, not mid-run
                problem = mode_problem(image.mode)
        except OSError as e:  # PIL: not an image, truncated, unreadable
            problem = f"cannot read it as an image ({e})"
        if problem:
            logger.warning(f"skipping {path}: {problem}")
        (bad if problem else good).append(path)
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
    outputs = dict(zip(paths, check_outputs(args.output, paths, args.overwrite)))
    good, bad = readable_images(paths)
    if not good:
        raise UserError(f"none of the {len(paths)} inputs could be read as an image "
                        f"(first: {bad[0]})")
    model, checkpoint_names = load_model(cfg)  # strict: weights that do not fit stop here
    names = _metadata_name(class_names(cfg, checkpoint_names))
    drawings = predict_images(cfg, model, good, dataset_name=names,
                              score_threshold=args.confidence_threshold)
    os.makedirs(args.output, exist_ok=True)
    for path, drawing in zip(good, drawings):
        Image.fromarray(drawing).save(outputs[path])
    return [outputs[p] for p in good], bad


def main(argv=None) -> int:
    args = parse_args(argv)
    with exit_on_user_error():
        written, skipped = run(args)
    print(f"Wrote {len(written)} PNG(s) to {args.output}; skipped {len(skipped)} unreadable "
          f"input(s)" + (f": {', '.join(skipped)}" if skipped else ""))
    return 1 if skipped else 0


if __name__ == "__main__":
    sys.exit(main())
