"""The node's on-disk outbox: an encoded update stays here until the aggregator acks it.

Each entry is one file named by its update id, written atomically (temp file, fsync, rename), so a
crash at any moment leaves either the whole message or nothing. Resending is always the same bytes
with the same update id, which the aggregator folds at most once.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["Outbox"]

_ENTRY = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.-]{0,63})\.update$")


class Outbox:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob("*.tmp"):
            stale.unlink()

    def put(self, update_id: str, payload: bytes) -> None:
        path = self._path(update_id)
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)

    def remove(self, update_id: str) -> bool:
        path = self._path(update_id)
        existed = path.exists()
        path.unlink(missing_ok=True)
        return existed

    def pending(self) -> list[tuple[str, bytes]]:
        """Unacked updates, oldest first."""
        entries = [p for p in self.directory.iterdir() if _ENTRY.match(p.name)]
        entries.sort(key=lambda p: p.stat().st_mtime_ns)
        return [(p.name.removesuffix(".update"), p.read_bytes()) for p in entries]

    def __len__(self) -> int:
        return sum(1 for p in self.directory.iterdir() if _ENTRY.match(p.name))

    def _path(self, update_id: str) -> Path:
        if not _ENTRY.match(f"{update_id}.update"):
            raise ValueError(f"invalid update id {update_id!r}")
        return self.directory / f"{update_id}.update"
