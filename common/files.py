"""Crash-safe file writes: a reader sees the old content or the new, never a torn file."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["atomic_write", "fsync_dir"]


def atomic_write(path: Path, data: bytes | Sequence[bytes | memoryview]) -> None:
    """Write ``data`` (bytes, or buffers written one after the other without joining them) to a
    temp file beside ``path``, fsync it, rename it over ``path``, and fsync the directory so that
    the rename itself survives a power cut."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as handle:
        for buffer in [data] if isinstance(data, bytes) else data:
            handle.write(buffer)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # some filesystems refuse fsync on directories
            os.fsync(fd)
    finally:
        os.close(fd)
