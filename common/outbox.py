"""An on-disk outbox: an encoded update stays here until its receiver acks it.

A node keeps its updates here until the aggregator acks them; a regional aggregator keeps the
combined updates it sends upstream until the core aggregator acks them.

Each entry is one file ``{sequence}-{update id}.update``, written atomically (temp file, fsync,
rename), so a crash at any moment leaves either the whole message or nothing. The sequence number
keeps entries in the order they were written whatever the filesystem's timestamp resolution.
Resending is always the same bytes with the same update id, which the aggregator folds at most once.
"""

from __future__ import annotations

import re
from pathlib import Path

from common.files import atomic_write

__all__ = ["Outbox"]

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_ENTRY = re.compile(r"^(\d{12})-([A-Za-z0-9][A-Za-z0-9_.-]{0,63})\.update$")


class Outbox:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._sequence = 0

    def open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob("*.tmp"):
            stale.unlink()
        self._sequence = max((seq for seq, _, _ in self._entries()), default=0)

    def put(self, update_id: str, payload: bytes) -> None:
        """Keep an update (replacing an entry of the same id in place, keeping its position)."""
        _check(update_id)
        path = self._find(update_id)
        if path is None:
            self._sequence += 1
            path = self.directory / f"{self._sequence:012d}-{update_id}.update"
        atomic_write(path, payload)

    def remove(self, update_id: str) -> bool:
        """Forget an acked update; False if it was not here."""
        _check(update_id)
        path = self._find(update_id)
        if path is None:
            return False
        path.unlink(missing_ok=True)
        return True

    def ids(self) -> list[str]:
        """Ids of the unacked updates, oldest first (no payload is read)."""
        return [uid for _, uid, _ in sorted(self._entries())]

    def read(self, update_id: str) -> bytes | None:
        """The payload kept for ``update_id``, or None if it has been acked meanwhile."""
        path = self._find(update_id)
        return None if path is None else path.read_bytes()

    def pending(self) -> list[tuple[str, bytes]]:
        """Unacked updates with their payloads, oldest first."""
        return [(uid, path.read_bytes()) for _, uid, path in sorted(self._entries())]

    def __len__(self) -> int:
        return sum(1 for _ in self._entries())

    def _find(self, update_id: str) -> Path | None:
        for _, uid, path in self._entries():
            if uid == update_id:
                return path
        return None

    def _entries(self) -> list[tuple[int, str, Path]]:
        found = []
        for path in self.directory.iterdir():
            match = _ENTRY.match(path.name)
            if match is not None:
                found.append((int(match.group(1)), match.group(2), path))
        return found


def _check(update_id: str) -> None:
    if not _ID.fullmatch(update_id):
        raise ValueError(f"invalid update id {update_id!r}")
