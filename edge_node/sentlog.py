"""The node's sent log: an append-only record of every update it made and the ack each one got.

``sent.jsonl`` in the node's state directory holds one JSON line per event: ``queued`` when an
update enters the outbox (update id, run, base version, size) and ``acked`` when the aggregator's
verdict arrives (accepted, or the rejection reason). It serves two purposes:

* **Progress that survives a crash.** The newest ``queued`` line names the version the node last
  trained on, so a restarted node does not train again on a version it already sent an update for
  (a node never sends two updates from one base version, which synchronous FedAvg relies on).
* **Reconciliation.** Tools compare the ids a node sent with the aggregator's update log
  (``devtools.chaos`` does, after breaking things on purpose).

Write order in the node: outbox entry (atomic), then the ``queued`` line (fsync), then the publish.
A crash between the first two leaves an outbox entry that the log does not name; :meth:`SentLog.
adopt` adds its line on the next start. On an ack the ``acked`` line is written before the outbox
entry is removed, so a crash between them only causes one more resend, answered as a duplicate.

Hook for compressed updates (error feedback): the residual that a compressed update leaves behind
must survive a crash *consistently with the outbox*. Keep two residual slots on disk, each tagged
with the id of the update that produced it, and write the new slot (atomically) before the outbox
entry. On start, use the slot whose update id is in this log (its update exists and will be
delivered); ignore a slot whose update never reached the outbox, since its mass is still in the
previous slot.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from common.jsonlog import JsonLog, read_json_lines, read_json_lines_backwards

__all__ = ["SENT_LOG_FILE", "SentEntry", "SentEvent", "SentLog", "read_sent_log"]

SENT_LOG_FILE = "sent.jsonl"


class SentEvent(StrEnum):
    QUEUED = "queued"
    ACKED = "acked"


class SentEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    event: SentEvent
    at: float
    update_id: str
    run_id: str | None = None
    base_version: int | None = None
    bytes: int = 0
    accepted: bool | None = None
    reason: str | None = None
    current_version: int | None = None


class SentLog(JsonLog[SentEntry]):
    """The writer of ``sent.jsonl``."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory / SENT_LOG_FILE, SentEntry)

    def last_trained(self) -> tuple[str, int] | None:
        """(run id, base version) of the newest update the node queued, if any."""
        self.sync()
        for entry in read_json_lines_backwards(self.path, SentEntry):
            if entry.event is SentEvent.QUEUED and entry.run_id is not None:
                return entry.run_id, entry.base_version or 0
        return None

    def adopt(self, queued: Iterable[SentEntry]) -> int:
        """Add ``queued`` lines for outbox entries that the log does not name (a crash came
        between the outbox write and the log line); returns how many were added."""
        self.sync()
        known = {e.update_id for e in read_json_lines(self.path, SentEntry)}
        missing = [e for e in queued if e.update_id not in known]
        self.write(missing)
        return len(missing)


def read_sent_log(path: Path | str) -> Iterator[SentEntry]:
    """Every complete entry of a sent log (or of ``sent.jsonl`` in a node's state directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / SENT_LOG_FILE
    return read_json_lines(path, SentEntry)
