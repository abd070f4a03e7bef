"""Command-line plumbing shared by ``dsla-train``, the tools and ``make demo``: one config loader,
one argument parser, checks of weights, strict JSON, and turning :class:`UserError` (only) into a
one-line message."""
import argparse
import contextlib
import json
import logging
import math
import os
import sys
from typing import Optional, Sequence, Tuple

import torch
import yaml
from torch.multiprocessing import ProcessRaisedException

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model

from .checkpoint import load_weights
from .config import add_dsla_config, head_config_node
from .data import register_coco_dataset
from .errors import UserError

__all__ = [
    "add_register_coco_argument",
    "check_weights",
    "class_names",
    "exit_on_user_error",
    "json_safe",
    "load_config",
    "load_model",
    "register_datasets",
    "tool_parser",
    "write_json",
]

logger = logging.getLogger("dsla")


def load_config(config_file: str, opts: Sequence[str], require_weights: bool = False,
                freeze: bool = True):
    """
    The project's one way to build a config: detectron2 defaults, the DSLA keys, ``config_file``
    (if given), then ``KEY VALUE`` opts. A config asking for CUDA on a machine without it runs on
    the CPU, with a warning naming ``MODEL.DEVICE``.

    Args:
        config_file: yaml path, or "" for the defaults.
        opts: flat list of overrides.
        require_weights: check that ``MODEL.WEIGHTS`` is set and (if local) exists.
        freeze: return a frozen config (tests pass False to change it afterwards).

    Raises:
        UserError: naming the file, key or value.
    """
    if config_file and not os.path.isfile(config_file):
        raise UserError(f"config file not found: {config_file}")
    if len(opts) % 2:
        raise UserError(f"config overrides must be KEY VALUE pairs, got {list(opts)}")
    cfg = get_cfg()
    add_dsla_config(cfg)
    try:
        if config_file:
            cfg.merge_from_file(config_file)
        cfg.merge_from_list(list(opts))
    except (AssertionError, KeyError, ValueError, yaml.YAMLError) as e:
        # yacs reports unknown keys with a bare assert; keep its message ("Non-existent key: X").
        raise UserError(f"invalid config ({config_file or 'defaults'} + overrides): {e}") from None
    if not torch.cuda.is_available() and cfg.MODEL.DEVICE.startswith("cuda"):
        logger.warning(f"MODEL.DEVICE is {cfg.MODEL.DEVICE!r} but CUDA is not available: running "
                       "on the CPU (set MODEL.DEVICE cpu to silence this).")
        cfg.MODEL.DEVICE = "cpu"
    if freeze:
        cfg.freeze()
    if require_weights:
        check_weights(cfg.MODEL.WEIGHTS, "this command")
    return cfg


def check_weights(weights: str, purpose: str) -> None:
    """
    Refuse to run a model on silently random weights.

    Args:
        weights: ``MODEL.WEIGHTS``.
        purpose: what needs them, for the message (e.g. "--eval-only").

    Raises:
        UserError: no weights given, or a local path that does not exist.
    """
    if not weights:
        raise UserError(f"{purpose} needs trained weights: pass MODEL.WEIGHTS /path/to/model.pth")
    if "://" not in weights and not os.path.isfile(weights):
        raise UserError(f"MODEL.WEIGHTS file not found: {weights}")


def add_register_coco_argument(parser: argparse.ArgumentParser) -> None:
    """``--register-coco NAME JSON_FILE IMAGE_ROOT`` (repeatable), for training and the tools."""
    parser.add_argument(
        "--register-coco", nargs=3, action="append", default=[],
        metavar=("NAME", "JSON_FILE", "IMAGE_ROOT"),
        help="register a COCO-format dataset under NAME (repeatable); use it in "
        "DATASETS.TRAIN / DATASETS.TEST or the tool's --dataset",
    )


def register_datasets(args) -> None:
    """Register the datasets of ``args.register_coco``."""
    for name, json_file, image_root in args.register_coco:
        register_coco_dataset(name, json_file, image_root)


def tool_parser(doc: str, weights: Optional[str] = None, output_help: Optional[str] = None,
                config_default: Optional[str] = None,
                positionals: Sequence[Tuple[str, str]] = (),
                register_coco: bool = True) -> argparse.ArgumentParser:
    """
    The tools' argument parser: description and examples from the tool's docstring,
    ``--config-file``, ``--register-coco``, ``--output`` (when ``output_help`` is given) and the
    trailing ``KEY VALUE`` config overrides. Each tool adds its own arguments.

    Args:
        doc: the tool's module docstring (first paragraph: description; the rest: epilog).
        weights: how the tool uses MODEL.WEIGHTS, for the help of the overrides.
        output_help: help of ``--output`` (required), or None for tools without it.
        config_default: the config used without ``--config-file`` (None: it is required).
        positionals: (name, help) of positional arguments, before the overrides.
        register_coco: offer ``--register-coco`` (not for ``dsla-demo``, which uses the built-in
            dataset).
    """
    head, _, tail = doc.strip().partition("\n\n")
    parser = argparse.ArgumentParser(description=head, epilog=tail,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=config_default is None, default=config_default,
                        metavar="FILE", help="yaml config" + (
                            f" (default: {config_default})" if config_default else ""))
    if register_coco:
        add_register_coco_argument(parser)
    if output_help:
        parser.add_argument("--output", required=True, metavar="PATH", help=output_help)
    for name, help_text in positionals:
        parser.add_argument(name.lower(), metavar=name, help=help_text)
    # After positionals, "*" lets options follow them (INPUT OUTPUT --config-file F); otherwise
    # REMAINDER keeps every word after the options as an override, as train_net.py does.
    parser.add_argument("opts", nargs="*" if positionals else argparse.REMAINDER,
                        metavar="KEY VALUE",
                        help="config overrides" + (f"; {weights}" if weights else ""))
    return parser


def json_safe(obj):
    """NaN/inf -> None, recursively (COCO APs are NaN for absent size ranges), so that the file
    written from it is strict JSON."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: str, obj) -> None:
    """Write ``obj`` as strict JSON (NaN/inf as null), indented."""
    with open(path, "w") as f:
        json.dump(json_safe(obj), f, indent=2, allow_nan=False)


# Marks a UserError raised in a launched rank, whose parent only gets the rank's traceback text.
RANK_USER_ERROR = "[user error in a launched rank] "


def one_line(error: Exception) -> str:
    """The error's message with every run of whitespace (newlines too) made one space."""
    return " ".join(str(error).split())


def mark_rank_user_error(error: UserError) -> UserError:
    """The error a launched rank raises for ``error``: its one-line message, marked so that the
    parent's :func:`exit_on_user_error` can print it as one line too."""
    return UserError(RANK_USER_ERROR + one_line(error))


def _rank_user_error(error: ProcessRaisedException) -> Optional[str]:
    """The message of a marked UserError that ended a launched rank, or None."""
    lines = error.msg.strip().splitlines()  # the rank's traceback text
    last = lines[-1] if lines else ""
    head = f"{UserError.__module__}.{UserError.__qualname__}: {RANK_USER_ERROR}"
    return last[len(head):] if last.startswith(head) else None


@contextlib.contextmanager
def exit_on_user_error():
    """
    Turn :class:`UserError` into ``sys.exit("error: <message>")`` on one line (exit code 1),
    also when it ended a rank of a multi-process ``launch`` on this machine (and that rank's
    failure is the one ``launch`` reports); every other exception is a bug and
    keeps its traceback. Set ``DSLA_TRACEBACK=1`` to get the traceback of a user error too.
    """
    try:
        yield
    except (UserError, ProcessRaisedException) as e:
        message = one_line(e) if isinstance(e, UserError) else _rank_user_error(e)
        if message is None or os.environ.get("DSLA_TRACEBACK"):
            raise
        sys.exit("error: " + message)


def load_model(cfg):
    """
    The model of ``cfg`` in eval mode with ``MODEL.WEIGHTS`` loaded strictly (shapes and keys
    must fit: no randomly initialised head).

    Returns:
        (model, class names recorded in the checkpoint or None)
    """
    check_weights(cfg.MODEL.WEIGHTS, "this command")
    model = build_model(cfg)
    names = load_weights(model, cfg.MODEL.WEIGHTS, strict=True)
    return model.eval(), names


def class_names(cfg, checkpoint_names: Optional[Sequence[str]], dataset: Optional[str] = None):
    """
    The names of the model's classes: those its checkpoint recorded, else those of ``dataset``
    (default ``DATASETS.TEST[0]``) if it has exactly NUM_CLASSES of them; else None (class
    indices are drawn), with a warning.
    """
    num_classes = _model_num_classes(cfg)
    if checkpoint_names and len(checkpoint_names) == num_classes:
        return list(checkpoint_names)
    dataset = dataset or (cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else None)
    # MetadataCatalog.get() of an unknown name would silently create an empty entry.
    if dataset in DatasetCatalog.list():
        names = MetadataCatalog.get(dataset).get("thing_classes", None)
        if names and len(names) == num_classes:
            return list(names)
    logger.warning(f"No class names for the model's {num_classes} classes (neither MODEL.WEIGHTS "
                   f"nor dataset {dataset!r} lists {num_classes}): drawing class indices.")
    return None


def _model_num_classes(cfg) -> int:
    _, node = head_config_node(cfg)
    return (node or cfg.MODEL.DSLA).NUM_CLASSES
