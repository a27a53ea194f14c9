"""Atomic files: write to a temporary file beside the target, fsync, then os.replace.

The file gets the permissions of a plainly created one (0666 minus the umask).

A reader therefore sees either the previous complete file or the new one, never a torn write.
In a multi-process run rank 0 alone writes and the other ranks wait for the file (every rank
calls the writer at the same point). Loading uses ``torch.load(weights_only=True)``; an
unreadable file raises :class:`CheckpointError`.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Union

import torch

from . import distributed

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint file exists but cannot be read as one (corrupt, truncated, wrong format)."""


def umask_mode(mode: int = 0o666) -> int:
    """``mode`` with the process umask applied: what open() would give a new file (mkstemp gives 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def replace_atomic(path: PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp)`` on a temporary path beside ``path``, fsync it, then rename it into place (this
    process only): a crash leaves the old file or the whole new one, never a part (the report's text and plots
    were renamed unsynced)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, umask_mode())
    os.close(fd)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write(path: PathLike, write: Callable[[str], None]) -> Path:
    """:func:`replace_atomic` on rank 0 while the other ranks wait: a collective, which every rank calls with
    the same path (a path per rank would leave only rank 0's file: named as an error instead)."""
    distributed.check_same(str(Path(path).resolve()), "save paths", "bise's save functions are collective: call "
                           "them on every rank with the same path (rank 0 writes it)")
    if distributed.current().is_main:
        replace_atomic(path, write)
    distributed.barrier()
    return Path(path)


def save_atomic(obj: Any, path: PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (:func:`replace_atomic`)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: given a path, torch.save names the archive after it (bytes
            torch.save(obj, f)      # differing with the random temporary name)

    return atomic_write(path, write)


def _reason(err: Exception) -> str:
    """One line of why torch.load failed (its messages run to several paragraphs)."""
    text = str(err).strip()
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:  # e.g. torch.save(model) instead of torch.save(model.state_dict())
        return f"it holds a pickled {found.group(1)} object; only tensors and plain containers are read"
    return f"{type(err).__name__}: {text.splitlines()[0].split('. ')[0] if text else ''}"


def load_checkpoint(path: PathLike, *, required: tuple = ()) -> dict:
    """Read a checkpoint dict written by :func:`save_atomic`; ``required`` keys must be present."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle / zip errors differ by how the file is damaged
        raise CheckpointError(f"checkpoint {path} is corrupt or not a checkpoint ({_reason(err)})") from err
    return require_keys(obj, required, f"checkpoint {path}")


def require_keys(obj: Any, required: tuple, what: str) -> dict:
    """``obj`` if it is a dict holding the ``required`` keys, else a :class:`CheckpointError` naming ``what``
    (a file, or an argument holding what was read from one)."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{what} holds a {type(obj).__name__}, not a dict")
    missing = [k for k in required if k not in obj]
    if missing:
        raise CheckpointError(f"{what} lacks {missing}; it was not written by this version of bise")
    return obj


__all__ = ["CheckpointError", "atomic_write", "load_checkpoint", "replace_atomic", "require_keys", "save_atomic",
           "umask_mode"]
