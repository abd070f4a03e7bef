"""What the tools may write: an output path is checked before any model is loaded, and an
existing file or folder is never replaced without ``--overwrite``."""
import argparse
import os

from .errors import UserError

__all__ = ["add_overwrite_argument", "check_output_path"]


def add_overwrite_argument(parser: argparse.ArgumentParser) -> None:
    """``--overwrite``: allow a tool to replace what its output path already holds."""
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output (default: refuse)")


def check_output_path(path: str, *, overwrite: bool, kind: str = "file",
                      option: str = "--output") -> str:
    """
    Check, before any expensive work, that ``path`` can be written.

    Args:
        path: the file or folder the tool will write.
        overwrite: the user passed ``--overwrite``.
        kind: "file" (one file at ``path``) or "folder" (files written inside ``path``).
        option: how the user named the path, for the message.

    Returns:
        ``path`` made absolute.

    Raises:
        UserError: ``path`` exists (without ``overwrite``), is of the other kind, or its folder
            cannot be created or written.
    """
    if kind not in ("file", "folder"):
        raise ValueError(f"kind must be 'file' or 'folder', got {kind!r}")
    path = os.path.abspath(path)
    if kind == "folder" and os.path.isfile(path):
        raise UserError(f"{option} {path} is a file; give a folder (it is created if missing)")
    if kind == "file" and os.path.isdir(path):
        raise UserError(f"{option} {path} is a folder; give a file name")
    exists = os.path.isfile(path) if kind == "file" else bool(
        os.path.isdir(path) and os.listdir(path))
    if exists and not overwrite:
        what = "exists" if kind == "file" else "is not empty"
        raise UserError(f"{option} {path} {what}: pass --overwrite to replace it, or choose "
                        "another path")
    folder = path if kind == "folder" else os.path.dirname(path)
    _check_writable_folder(folder, option)
    return path


def _check_writable_folder(folder: str, option: str) -> None:
    """The nearest existing parent of ``folder`` must be a writable folder."""
    probe = folder
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UserError(f"{option}: cannot create {folder}: {probe} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{option}: cannot write into {probe} (permission denied)")
