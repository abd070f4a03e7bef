"""
Convert the authors' DSLA checkpoint (mmdetection 2.x) into a detectron2 checkpoint, offline.

    dsla-convert-mmdet INPUT.pth OUTPUT.pth \\
        [--config-file configs/COCO-Detection/dsla_R_50_FPN_1x_mmdet.yaml] [KEY VALUE ...]
    python projects/DSLA/train_net.py --eval-only \\
        --config-file configs/COCO-Detection/dsla_R_50_FPN_1x_mmdet.yaml MODEL.WEIGHTS OUTPUT.pth

MODEL.WEIGHTS also accepts INPUT.pth itself, converted in memory by the same code; this tool
writes the converted file once (e.g. to read a file that needs --allow-pickle). The model of
--config-file (built on the CPU) fixes the expected keys and shapes: conversion stops with the
list of unused checkpoint keys, missing model keys and shape mismatches unless the checkpoint
fits it exactly. Use the same config (and overrides) for evaluation. An existing OUTPUT is
replaced only with --overwrite.
"""
import os
import sys

import torch

from dsla.checkpoint import mmdet_to_detectron2
from dsla.cli import exit_on_user_error, load_config, tool_parser
from dsla.convert import (
    ConversionError,
    config_hints,
    extract_state_dict,
    model_shapes_from_config,
    read_checkpoint_file,
)
from dsla.outputs import add_overwrite_argument, check_output_path
from dsla.tools import REPO

DEFAULT_CONFIG = os.path.join(REPO, "configs", "COCO-Detection", "dsla_R_50_FPN_1x_mmdet.yaml")


def parse_args(argv=None):
    parser = tool_parser(__doc__, weights="e.g. MODEL.DSLA.NUM_CLASSES 20",
                         config_default=DEFAULT_CONFIG,
                         positionals=[("INPUT", "mmdetection checkpoint (.pth)"),
                                      ("OUTPUT", "detectron2 checkpoint to write (.pth)")])
    parser.add_argument("--allow-pickle", action="store_true",
                        help="read INPUT with full unpickling (trusted files only)")
    add_overwrite_argument(parser)
    # Intermixed: KEY VALUE overrides may follow the options, as in the usage above.
    return parser.parse_intermixed_args(argv)


def main(argv=None):
    """Convert INPUT to OUTPUT; returns the process exit status (1 when the weights do not fit)."""
    args = parse_args(argv)
    # Missing file, unreadable checkpoint, bad config, existing OUTPUT: one line.
    with exit_on_user_error():
        check_output_path(args.output, overwrite=args.overwrite, kind="file", option="OUTPUT")
        checkpoint = read_checkpoint_file(args.input, allow_pickle=args.allow_pickle)
        mmdet_state = extract_state_dict(checkpoint)
        cfg = load_config(args.config_file, list(args.opts) + ["MODEL.DEVICE", "cpu"])
        expected = model_shapes_from_config(cfg)
    try:
        converted = mmdet_to_detectron2(checkpoint, expected)
    except ConversionError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 1
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    torch.save(converted, args.output)
    # Strict conversion used every key, so the difference is the dropped BN counters.
    tensors = len(converted["model"])
    print(f"Converted {tensors} tensors ({len(mmdet_state) - tensors} BN num_batches_tracked "
          f"entries dropped) from {args.input} to {args.output}.")
    hints = config_hints(checkpoint)
    if hints:
        # Style and normalisation leave no trace in the weights: compare them with the config.
        print("The checkpoint's training config says (check that --config-file agrees: "
              "style caffe = STRIDE_IN_1X1 True, img_norm_cfg = PIXEL_MEAN/STD and INPUT.FORMAT):")
        print("".join(f"    {line}\n" for line in hints), end="")
    print(f"Evaluate with: dsla-train --eval-only --config-file "
          f"{args.config_file} MODEL.WEIGHTS {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
