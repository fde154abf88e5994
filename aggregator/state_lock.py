"""One process per state directory: an exclusive, non-blocking lock on a file inside it."""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path

from common.errors import HealthNetError

__all__ = ["locked_state_dir"]


@contextlib.contextmanager
def locked_state_dir(directory: Path, owner: str) -> Iterator[None]:
    """Hold ``directory`` (created if need be) for this process, or raise at once if another
    ``owner`` holds it: two writers of one write-ahead log would each fold the other's updates."""
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / f"{owner}.lock").open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise HealthNetError(f"another {owner} holds {directory}; one per state dir") from None
        yield
