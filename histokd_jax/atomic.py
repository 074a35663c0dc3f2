"""Atomic file writes: a file that a later step reads is either complete or absent.

A kill (SIGKILL, a lost node, a full disk) in the middle of a plain write leaves a
truncated file that the next run takes for a finished one (``result.json`` marks a
stage done; a truncated ``meta.json`` crashed the resume). Everything that a later
step reads is written to a temporary sibling in the same folder, flushed, and
renamed into place: a rename within one filesystem is atomic.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pathlib
import stat
import tempfile
from collections.abc import Iterator
from typing import IO, Any

import numpy as np


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp makes its file private (0600); a finished file gets the permissions a plain open() would give it
_FILE_MODE = 0o666 & ~_read_umask()


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """``open(path, mode)`` that appears at ``path`` only when the block ends without an exception."""
    if not mode.startswith("w"):
        raise ValueError(f"atomic_open writes whole files: mode must start with 'w', got {mode!r}")
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.partial"):  # left by a writer that was killed
        stale.unlink(missing_ok=True)
    permissions = stat.S_IMODE(path.stat().st_mode) if path.exists() else _FILE_MODE  # a rewrite keeps them
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)  # reopened by name: writers that want a named file (tifffile) accept the handle
    try:
        with open(tmp, mode, **kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, permissions)
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def write_json(path: str | os.PathLike, value: Any, *, indent: int | None = 2) -> None:
    write_text(path, json.dumps(value, indent=indent))


def save_npz(path: str | os.PathLike, **arrays: Any) -> None:
    """``np.savez`` to exactly ``path`` (numpy would add ``.npz`` to a temporary name)."""
    with atomic_open(path, "wb") as handle:
        np.savez(handle, **arrays)


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_open(path, "wb") as handle:
        np.save(handle, array)
