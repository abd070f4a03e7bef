"""Command-line plumbing shared by ``train_net.py``, ``make demo`` and the tools: building a
config from a yaml file and ``KEY VALUE`` overrides, checking weights, and turning user errors
into one-line messages."""
import contextlib
import os
import sys
from typing import Sequence

import torch
import yaml

from detectron2.config import get_cfg

from .config import add_dsla_config

__all__ = ["USER_ERRORS", "check_weights", "exit_on_user_error", "load_config"]

# Errors that mean "the user passed something wrong" (missing file, bad key or value), turned into
# one-line messages. Anything else is a bug and keeps its traceback.
USER_ERRORS = (FileNotFoundError, KeyError, ValueError)


def load_config(config_file: str, opts: Sequence[str], require_weights: bool = False):
    """
    A frozen config: detectron2 defaults, the DSLA keys, ``config_file`` (if given), then
    ``KEY VALUE`` opts. A config asking for CUDA on a machine without it runs on the CPU.

    Args:
        config_file: yaml path, or "" for the defaults.
        opts: flat list of overrides.
        require_weights: check that ``MODEL.WEIGHTS`` is set and (if local) exists.

    Raises:
        FileNotFoundError / ValueError: with a message naming the problem.
    """
    if config_file and not os.path.isfile(config_file):
        raise FileNotFoundError(f"config file not found: {config_file}")
    if len(opts) % 2:
        raise ValueError(f"config overrides must be KEY VALUE pairs, got {list(opts)}")
    cfg = get_cfg()
    add_dsla_config(cfg)
    try:
        if config_file:
            cfg.merge_from_file(config_file)
        cfg.merge_from_list(list(opts))
    except (AssertionError, yaml.YAMLError) as e:
        # yacs reports unknown keys with a bare assert; keep its message ("Non-existent key: X").
        raise ValueError(f"invalid config ({config_file or 'defaults'} + overrides): {e}") from None
    if not torch.cuda.is_available() and cfg.MODEL.DEVICE.startswith("cuda"):
        cfg.MODEL.DEVICE = "cpu"  # a GPU config still runs here, slowly
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
        ValueError: no weights given. FileNotFoundError: a local path that does not exist.
    """
    if not weights:
        raise ValueError(f"{purpose} needs trained weights: pass MODEL.WEIGHTS /path/to/model.pth")
    if "://" not in weights and not os.path.isfile(weights):
        raise FileNotFoundError(f"MODEL.WEIGHTS file not found: {weights}")


@contextlib.contextmanager
def exit_on_user_error():
    """
    Turn :data:`USER_ERRORS` into ``sys.exit("error: <message>")`` on one line (exit code 1).
    Set ``DSLA_TRACEBACK=1`` to get the traceback instead.
    """
    try:
        yield
    except USER_ERRORS as e:
        if os.environ.get("DSLA_TRACEBACK"):
            raise
        # KeyError's str() is the repr of its argument; unwrap it.
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        sys.exit("error: " + " ".join(str(message).split()))
