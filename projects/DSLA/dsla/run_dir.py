"""The folder of one run (``OUTPUT_DIR``, or ``OUTPUT_DIR/eval`` for ``--eval-only``): its lock,
its log and its config file, shared by the yacs and LazyConfig entries and ``make demo``.

One run per folder: a second run into a folder that a live process holds stops with one line
naming that process. The terminal shows a short log (no colour escapes when it is not a
terminal); the environment, the full config and the model go to the folder's ``log.txt`` only.
"""
import atexit
import fcntl
import logging
import os
import socket
import sys
from typing import Callable

import torch

from detectron2.utils import comm
from detectron2.utils.collect_env import collect_env_info
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger

from .checkpoint import checkpoint_files
from .errors import UserError

__all__ = ["EVAL_FOLDER", "LOCK_FILE", "RunLock", "check_fresh_run", "lock_run_folder",
           "log_details", "open_run", "run_folder", "setup_run_logging", "setup_terminal_logging"]

logger = logging.getLogger("dsla")

LOCK_FILE = ".dsla.lock"
# --eval-only writes its config, log and results here, never over the training run's files.
EVAL_FOLDER = "eval"
# The loggers of a run: detectron2's, fvcore's (checkpoints) and ours, with their short names.
_LOGGERS = (("detectron2", "d2"), ("fvcore", "fvcore"), ("dsla", "dsla"))
# Logs only to the run's log.txt: what is too long for the terminal (environment, config, model).
_DETAILS = "dsla.details"


def run_folder(output_dir: str, eval_only: bool) -> str:
    """The folder a run writes into: OUTPUT_DIR, or its ``eval`` subfolder for ``--eval-only``."""
    return os.path.join(output_dir, EVAL_FOLDER) if eval_only else output_dir


def check_fresh_run(output_dir: str, args) -> None:
    """A new training must not silently replace a previous run's checkpoints (``--resume``
    continues it, ``--overwrite`` starts over)."""
    if args.eval_only or args.resume or args.overwrite:
        return
    previous = checkpoint_files(output_dir)
    if previous:
        raise UserError(
            f"OUTPUT_DIR {output_dir} already holds a training run "
            f"({os.path.basename(previous[-1])}): pass --resume to continue it, set OUTPUT_DIR "
            "to a new folder, or pass --overwrite to start over there.")


class RunLock:
    """``folder/.dsla.lock``, locked (``flock``) by this process and holding "pid host". The
    kernel drops the lock when the process ends, however it ends; the file is removed on
    :meth:`release` or at exit, and one left by a killed process is taken over."""

    _held = {}  # realpath -> RunLock of this process (a second acquire in-process is the same run)

    def __init__(self, folder: str):
        self.path = os.path.join(folder, LOCK_FILE)
        self.fd = None

    def acquire(self) -> None:
        """Raises UserError naming the process that holds the folder."""
        while self.fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(os.read(fd, 200)) or "unknown"
                os.close(fd)
                folder = os.path.dirname(self.path)
                raise UserError(
                    f"OUTPUT_DIR {folder} is in use by another run (pid {holder}, {self.path}): "
                    "wait for it to end, or train into another OUTPUT_DIR.") from None
            # A holder that released (and removed) the file between our open and flock: retry.
            if os.path.exists(self.path) and os.path.samestat(os.fstat(fd), os.stat(self.path)):
                self.fd = fd
            else:
                os.close(fd)
        previous = _holder(os.read(self.fd, 200))
        if previous:
            logger.warning(f"{self.path} was left by process {previous}, which has ended: "
                           "taking the folder over.")
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        atexit.register(self.release)

    def release(self) -> None:
        if self.fd is not None:
            os.remove(self.path)  # before unlocking: a waiting process then retries on a new file
            os.close(self.fd)
            self.fd = None
            RunLock._held.pop(os.path.realpath(os.path.dirname(self.path)), None)


def _holder(content: bytes) -> str:
    """"PID on HOST" from a lock file's "PID HOST"."""
    return content.decode(errors="replace").strip().replace(" ", " on ", 1)


def lock_run_folder(folder: str) -> RunLock:
    """
    Hold ``folder`` for this run (created if missing): rank 0 locks it, and every rank stops
    with rank 0's message if it could not, so that no rank writes into a folder in use.

    Returns:
        the lock (rank 0; a no-op lock elsewhere), released at exit or by ``release()``.
    """
    key = os.path.realpath(folder)
    lock, message = RunLock._held.get(key) or RunLock(folder), None
    if comm.is_main_process() and lock.fd is None:
        os.makedirs(folder, exist_ok=True)
        try:
            lock.acquire()
            RunLock._held[key] = lock
        except UserError as e:
            message = str(e)
    if comm.get_world_size() > 1:
        message = comm.all_gather(message)[0]
    if message:
        raise UserError(message)
    return lock


def open_run(output_dir: str, args, save_config: Callable[[str], None], seed: int,
             cudnn_benchmark: bool) -> str:
    """
    Take the run's folder (:func:`run_folder`) for this run, after the checks that need no
    writing: lock it, refuse a fresh training over a previous run (:func:`check_fresh_run`,
    leaving the folder as it was), then :func:`setup_run_logging` there.

    Returns:
        the run's folder.
    """
    folder = run_folder(output_dir, args.eval_only)
    lock = lock_run_folder(folder)
    try:  # after the lock: a run in progress is named as such
        check_fresh_run(output_dir, args)
    except UserError:
        lock.release()
        raise
    setup_run_logging(folder, args, save_config, seed, cudnn_benchmark)
    return folder


def _color() -> bool:
    return sys.stdout.isatty()


def setup_terminal_logging() -> None:
    """The terminal's log (rank 0 only), before anything is checked or written; no colour
    escapes unless stdout is a terminal."""
    for name, abbrev in _LOGGERS:
        setup_logger(None, comm.get_rank(), color=_color(), name=name, abbrev_name=abbrev)


def setup_run_logging(folder: str, args, save_config: Callable[[str], None], seed: int,
                      cudnn_benchmark: bool) -> None:
    """
    What detectron2's ``default_setup`` does, into ``folder``: the run's ``log.txt`` (every
    logger, appended), the config saved as ``folder/config.yaml`` (rank 0), seeds and cuDNN's
    benchmark mode. ``default_setup`` itself prints the environment and the config, colour
    escapes included, to the terminal, and always writes ``OUTPUT_DIR/config.yaml``.

    Args:
        save_config: writes the run's config to the path it is given.
        seed: the config's seed (< 0: a random one per rank).
    """
    rank = comm.get_rank()
    for name, abbrev in (*_LOGGERS, (_DETAILS, "")):
        setup_logger(folder, rank, name=name, abbrev_name=abbrev, configure_stdout=False)
    log = os.path.join(folder, "log.txt")
    logger.info(f"Rank of current process: {rank}. World size: {comm.get_world_size()}")
    logger.info(f"Command line arguments: {args}")
    log_details("Environment info", collect_env_info())
    if comm.is_main_process():
        path = os.path.join(folder, "config.yaml")
        save_config(path)
        with open(path) as f:
            log_details("Full config", f.read())
        logger.info(f"Full config saved to {path}; it, the environment and the model are in {log}")
    seed_all_rng(None if seed < 0 else seed + rank)
    if not getattr(args, "eval_only", False):
        torch.backends.cudnn.benchmark = cudnn_benchmark


def log_details(title: str, text: str) -> None:
    """``title:`` and ``text`` into the run's log.txt only (too long for the terminal)."""
    logging.getLogger(_DETAILS).info(f"{title}:\n{text}")
