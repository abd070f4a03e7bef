"""Command-line plumbing shared by ``dsla-train``, ``dsla-lazy-train``, the tools and ``make demo``:
one config loader, the argument parsers, checks of weights, strict JSON, launching one process per
device, and turning :class:`UserError` (only) into a one-line message, also from a launched rank."""
import argparse
import contextlib
import json
import logging
import math
import os
import sys
import tempfile
from typing import Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import yaml
from torch.multiprocessing import ProcessRaisedException

from detectron2.config import CfgNode, get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import default_argument_parser, launch
from detectron2.modeling import build_model
from detectron2.utils import comm

from .checkpoint import load_weights
from .config import add_dsla_config, head_config_node
from .data import register_coco_dataset
from .errors import UserError

__all__ = [
    "add_register_coco_argument",
    "argument_parser",
    "check_config_file",
    "check_options_first",
    "check_weights",
    "class_names",
    "exit_on_user_error",
    "json_safe",
    "leave_process_group",
    "load_config",
    "load_model",
    "log_rank_agreement",
    "register_datasets",
    "run_then_leave_group",
    "tool_parser",
    "training_cli",
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
    check_options_first(opts)
    if len(opts) % 2:
        raise UserError(f"config overrides must be KEY VALUE pairs, got {list(opts)}")
    cfg = get_cfg()
    add_dsla_config(cfg)
    if config_file:
        check_config_file(config_file, cfg)
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


def check_options_first(overrides: Sequence[str]) -> None:
    """argparse keeps every word after the first override as an override, options included; no
    override (``KEY VALUE`` or ``key=value``) starts with ``--``."""
    overrides = list(overrides)
    late = [i for i, o in enumerate(overrides) if isinstance(o, str) and o.startswith("--")]
    if late:
        i = late[0]
        after = " ".join(map(str, overrides[max(i - 2, 0):i]))
        raise UserError(f"{overrides[i]} comes after the config overrides (after '{after}'): "
                        "options go before the overrides, e.g. --eval-only --config-file F "
                        "KEY VALUE ...")


def check_config_file(path: str, defaults, named_by: Optional[str] = None) -> None:
    """
    The yaml config ``path`` and its ``_BASE_`` files exist (detectron2 resolves a relative
    ``_BASE_`` against the folder of the file naming it), and no value is a YAML boolean where
    the key takes another type: unquoted on/off/yes/no read as booleans.

    Raises:
        UserError: naming the file (and the file whose ``_BASE_`` it is) or the key.
    """
    if not os.path.isfile(path):
        raise UserError(f"config file not found: {path}" +
                        (f" (the _BASE_ of {named_by})" if named_by else ""))
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError:
        return  # detectron2's loader reports it (or reads the tags safe_load refuses)
    if not isinstance(data, dict):
        return
    base = data.pop("_BASE_", None)
    if isinstance(base, str) and "://" not in base:
        base = os.path.expanduser(base)
        check_config_file(os.path.join(os.path.dirname(path), base), defaults, named_by=path)
    _check_yaml_booleans(data, defaults, path)


def _check_yaml_booleans(data: dict, node, path: str, prefix: str = "") -> None:
    for name, value in data.items():
        default = node.get(name) if isinstance(node, CfgNode) else None
        key = prefix + str(name)
        if isinstance(value, dict):
            _check_yaml_booleans(value, default, path, key + ".")
        elif isinstance(value, bool) and default is not None and not isinstance(default, bool):
            raise UserError(
                f"invalid config {path}: type mismatch for {key}: {value} is a YAML boolean "
                f"but {key} takes a {type(default).__name__} (default {default!r}); YAML reads "
                f"unquoted on/off/yes/no as booleans: quote the value, e.g. {name}: "
                f"\"{'on' if value else 'off'}\"")


def check_weights(weights: str, purpose: str, key: str = "MODEL.WEIGHTS", assign: str = " "
                  ) -> None:
    """
    Refuse to run a model on silently random weights.

    Args:
        weights: the value of ``key`` (``MODEL.WEIGHTS``, ``train.init_checkpoint``).
        purpose: what needs them, for the message (e.g. "--eval-only").
        key, assign: how the user sets them ("MODEL.WEIGHTS" " ", "train.init_checkpoint" "=").

    Raises:
        UserError: no weights given, or a local path that does not exist.
    """
    if not weights:
        raise UserError(f"{purpose} needs trained weights: pass {key}{assign}/path/to/model.pth")
    if "://" not in weights and not os.path.isfile(weights):
        raise UserError(f"{key} file not found: {weights}")


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


def argument_parser() -> argparse.ArgumentParser:
    """The training entries' parser (``dsla-train``, ``train_net.py``, ``dsla-lazy-train``):
    detectron2's default parser plus ``--register-coco NAME JSON_FILE IMAGE_ROOT`` and
    ``--overwrite``."""
    parser = default_argument_parser()
    add_register_coco_argument(parser)
    parser.add_argument("--overwrite", action="store_true",
                        help="train from scratch into an OUTPUT_DIR that holds a previous run's "
                        "checkpoints (they are replaced as training writes new ones)")
    return parser


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


def one_line(error: Exception) -> str:
    """The error's message with every run of whitespace (newlines too) made one space."""
    return " ".join(str(error).split())


# The folder where a launched rank writes the message of the UserError that ended it, for the
# parent; set by :func:`training_cli` (spawned ranks inherit the environment).
RANK_ERRORS_ENV = "DSLA_RANK_ERRORS"


def _rank_error_file(folder: str, local_rank: int) -> str:
    return os.path.join(folder, f"rank{local_rank}.txt")


@contextlib.contextmanager
def exit_on_user_error(rank_errors: Optional[str] = None):
    """
    Turn :class:`UserError` into ``sys.exit("error: <message>")`` on one line (exit code 1),
    also when it ended the launched rank whose failure ``launch`` reports (that rank left its
    message in ``rank_errors``, see :func:`run_then_leave_group`); every other exception is a
    bug and keeps its traceback. Set ``DSLA_TRACEBACK=1`` to get the traceback of a user error.
    """
    try:
        yield
    except UserError as e:
        if os.environ.get("DSLA_TRACEBACK"):
            raise
        sys.exit("error: " + one_line(e))
    except ProcessRaisedException as e:
        path = _rank_error_file(rank_errors, e.error_index) if rank_errors else None
        if path is None or not os.path.isfile(path) or os.environ.get("DSLA_TRACEBACK"):
            raise
        with open(path) as f:
            sys.exit("error: " + f.read())


def leave_process_group() -> None:
    """Wait for every rank, then destroy the process groups (no-op without an initialised one).

    Left to interpreter shutdown, gloo's worker threads can outlive Python and abort a rank
    ("terminate called without an active exception", pytorch/pytorch#190489); detectron2's
    ``launch`` does not destroy them. Called only after this rank succeeded. If another rank
    failed, the barrier fails too (gloo: "Connection closed by peer" within seconds) or, with
    NCCL across machines, waits up to the process group's timeout (``launch``: 30 minutes):
    the price of never destroying a group that a peer still uses. On one machine ``launch``
    ends the waiting ranks as soon as one fails, and reports the first failure it sees."""
    if dist.is_available() and dist.is_initialized():
        comm.synchronize()
        dist.destroy_process_group()


def run_then_leave_group(main_func, args):
    """``main_func(args)``, then :func:`leave_process_group`: what ``launch`` runs per rank. A
    :class:`UserError` in a launched rank also leaves its one-line message where the parent's
    :func:`exit_on_user_error` reads it (the parent gets only the rank's traceback text)."""
    try:
        results = main_func(args)
    except UserError as e:
        folder = os.environ.get(RANK_ERRORS_ENV)
        if folder and comm.get_world_size() > 1:
            with open(_rank_error_file(folder, comm.get_local_rank()), "w") as f:
                f.write(one_line(e))
        raise
    leave_process_group()
    return results


def training_cli(main_func, argv=None):
    """
    The command line of ``dsla-train`` and ``dsla-lazy-train``: parse :func:`argument_parser`,
    then ``launch`` one process per device running ``main_func(args)``. A :class:`UserError`, in
    this process or in a launched rank, ends with one line; any other exception keeps its
    traceback.
    """
    args = argument_parser().parse_args(argv)
    print("Command Line Args:", args)
    with tempfile.TemporaryDirectory(prefix="dsla-ranks-") as folder:
        os.environ[RANK_ERRORS_ENV] = folder
        try:
            with exit_on_user_error(rank_errors=folder):
                return launch(run_then_leave_group, args.num_gpus, num_machines=args.num_machines,
                              machine_rank=args.machine_rank, dist_url=args.dist_url,
                              args=(main_func, args))
        finally:
            del os.environ[RANK_ERRORS_ENV]


def log_rank_agreement(model) -> None:
    """After distributed training every rank must hold the same weights; say so in the log."""
    if comm.get_world_size() == 1:
        return
    checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
    sums = comm.all_gather(checksum)
    if comm.is_main_process():
        same = all(s == sums[0] for s in sums)
        log = logger.info if same else logger.error
        log(f"Parameter checksums of the {len(sums)} ranks: {sums} ({'equal' if same else 'DIFFER'})")


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
