"""The update log: an append-only record of what happened to every update the aggregator saw.

One JSON line per event, in ``ledger.jsonl`` of the state directory (the file keeps the name it
had when this record was called the ledger, so older state directories read as they are):

* ``accepted``: validated and buffered (its raw message is in the write-ahead log);
* ``duplicate``: an accepted id came again (a resend or a broker redelivery): acked, not buffered;
* ``rejected``: refused with a reason (``update_id`` is null when the message never decoded);
* ``folded``: went into ``version``;
* ``discarded``: accepted, then dropped with its batch, which could not become a version (a
  non-finite sum, or a version whose outputs failed the probe); the node is told in a second ack.
  Neither folded nor rejected: work the run lost on purpose, counted on its own.

The aggregator syncs the log before it acknowledges anything (to the node and to the broker), so
an acked verdict is on disk. After a crash between a checkpoint and the ``folded`` lines of its
version, recovery appends the missing lines from the checkpoint, so a reader may see a ``folded``
line twice for the same (update, version), never for two versions unless an update really was
folded twice: :func:`update_fates` counts distinct versions. An update accepted just before a
crash may lack its ``accepted`` line; a ``folded`` line implies it.

Read it with :func:`read_update_log` and :func:`update_fates`, or with ``jq``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import assert_never

from pydantic import BaseModel, ConfigDict

from common.jsonlog import JsonLog, read_json_lines, read_json_lines_backwards

__all__ = [
    "UPDATE_LOG_FILE",
    "UpdateEvent",
    "UpdateFate",
    "UpdateLog",
    "UpdateLogEntry",
    "read_update_log",
    "update_fates",
]

UPDATE_LOG_FILE = "ledger.jsonl"


class UpdateEvent(StrEnum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"
    FOLDED = "folded"
    DISCARDED = "discarded"


class UpdateLogEntry(BaseModel):
    """One event. ``version`` is the global version when it happened; for ``folded``, the version
    the update went into."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    event: UpdateEvent
    at: float
    node: str
    update_id: str | None = None
    base_version: int | None = None
    version: int
    reason: str | None = None
    detail: str = ""
    bytes: int = 0


class UpdateLog(JsonLog[UpdateLogEntry]):
    """The writer of ``ledger.jsonl``."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory / UPDATE_LOG_FILE, UpdateLogEntry)

    def last_folded_version(self) -> int | None:
        """The version of the newest ``folded`` line (folds are written in version order)."""
        self.sync()
        for entry in read_json_lines_backwards(self.path, UpdateLogEntry):
            if entry.event is UpdateEvent.FOLDED:
                return entry.version
        return None


def read_update_log(path: Path | str) -> Iterator[UpdateLogEntry]:
    """Every complete entry of an update log file (or of ``ledger.jsonl`` in a state directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / UPDATE_LOG_FILE
    return read_json_lines(path, UpdateLogEntry)


@dataclass(slots=True)
class UpdateFate:
    """Everything the update log says about one update id."""

    update_id: str
    node: str
    accepted: bool = False
    duplicates: int = 0
    rejections: list[str] = field(default_factory=list)
    folded_into: list[int] = field(default_factory=list)  # distinct versions, in log order
    discarded: bool = False

    @property
    def folded(self) -> bool:
        return bool(self.folded_into)

    @property
    def double_folded(self) -> bool:
        return len(self.folded_into) > 1

    @property
    def rejected(self) -> bool:
        """Refused and never folded: the node was told, nothing is owed to it."""
        return bool(self.rejections) and not self.folded and not self.discarded


def update_fates(entries: Iterable[UpdateLogEntry]) -> dict[str, UpdateFate]:
    """The fate of every update id in the log (entries without an id are left out)."""
    fates: dict[str, UpdateFate] = {}
    for entry in entries:
        if entry.update_id is None:
            continue
        fate = fates.get(entry.update_id)
        if fate is None:
            fate = fates[entry.update_id] = UpdateFate(entry.update_id, entry.node)
        match entry.event:
            case UpdateEvent.ACCEPTED:
                fate.accepted = True
            case UpdateEvent.DUPLICATE:
                fate.duplicates += 1
            case UpdateEvent.REJECTED:
                fate.rejections.append(entry.reason or entry.event.value)
            case UpdateEvent.DISCARDED:
                fate.accepted = True
                fate.discarded = True
            case UpdateEvent.FOLDED:
                fate.accepted = True
                if entry.version not in fate.folded_into:
                    fate.folded_into.append(entry.version)
            case _:
                assert_never(entry.event)
    return fates
