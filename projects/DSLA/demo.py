#!/usr/bin/env python
"""
Draw a DSLA (or FCOS-baseline) model's detections on images.

One PNG per input image, named after it (``photo.jpg`` -> ``DIR/photo.png``), drawn with
detectron2's Visualizer; class names come from the metadata of ``DATASETS.TEST[0]`` when it is
registered (e.g. ``shapes_val``), class indices otherwise.

    python projects/DSLA/demo.py --config-file configs/Shapes/dsla_R_18_FPN_cpu.yaml \\
        --input "datasets/shapes/val/images/00000*.jpg" --output out/demo \\
        MODEL.WEIGHTS output/demo/model_final.pth
"""
import argparse
import glob
import os
import sys
from typing import List, Sequence

from PIL import Image

from detectron2.data import DatasetCatalog

import dsla  # noqa: F401  (registers the meta-architectures and the built-in datasets)
from dsla.cli import exit_on_user_error, load_config
from dsla.visualization import predict_images

_GLOB_CHARS = set("*?[")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0],
                                     epilog=__doc__.strip().split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--input", required=True, nargs="+", metavar="IMAGE_OR_GLOB",
                        help="image files or quoted glob patterns")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for the PNGs")
    parser.add_argument("--confidence-threshold", type=float, default=0.3,
                        help="detections below this score are not drawn (default 0.3)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                        help="config overrides, e.g. MODEL.WEIGHTS model.pth")
    return parser.parse_args(argv)


def expand_inputs(patterns: Sequence[str]) -> List[str]:
    """
    Args:
        patterns: file paths or glob patterns.

    Returns:
        the files, globs expanded and sorted, in argument order.

    Raises:
        FileNotFoundError: a path does not exist or a pattern matches no file.
        ValueError: two inputs would write the same output file.
    """
    paths = []
    for pattern in patterns:
        if _GLOB_CHARS & set(pattern):
            matches = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
            if not matches:
                raise FileNotFoundError(f"--input pattern matches no file: {pattern}")
            paths.extend(matches)
        elif os.path.isfile(pattern):
            paths.append(pattern)
        else:
            raise FileNotFoundError(f"--input file not found: {pattern}")
    names = [output_name(p) for p in paths]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"several inputs would be written to the same file: {duplicates[0]}")
    return paths


def output_name(image_path: str) -> str:
    """``a/b/photo.jpg`` -> ``photo.png``."""
    return os.path.splitext(os.path.basename(image_path))[0] + ".png"


def run(args) -> List[str]:
    """Predict and draw; returns the written PNG paths."""
    cfg = load_config(args.config_file, args.opts, require_weights=True)
    paths = expand_inputs(args.input)
    # Class names only from a registered dataset: MetadataCatalog.get() of an unknown name
    # would silently create an empty entry.
    dataset = cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else None
    dataset = dataset if dataset in DatasetCatalog.list() else None
    try:
        drawings = predict_images(cfg, paths, dataset_name=dataset,
                                  score_threshold=args.confidence_threshold)
    except OSError as e:  # PIL: an input that is not an image
        raise ValueError(f"cannot read an input image: {e}") from e
    os.makedirs(args.output, exist_ok=True)
    written = []
    for path, drawing in zip(paths, drawings):
        out = os.path.join(args.output, output_name(path))
        Image.fromarray(drawing).save(out)
        written.append(out)
    return written


def main(argv=None) -> int:
    args = parse_args(argv)
    with exit_on_user_error():
        written = run(args)
    print(f"Wrote {len(written)} PNG(s) to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
