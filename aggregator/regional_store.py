"""A regional aggregator's durable state: its hospitals' updates until combined, and the combined
updates until the core acks them.

Theory of operation. Three things on disk, in one state directory:

* ``wal/``: the write-ahead log of accepted hospital updates (the core's
  :class:`~aggregator.store.StateStore` log, one atomic file per update). A hospital's update is
  acknowledged only once it is here, as the core acknowledges only after its own WAL write.
* ``combined.jsonl``: one fsynced line per combined update (its id and its constituents' ids), and
  one per core ack. **The ``combined`` line is the commit point**: from then on its constituents
  belong to that combined update and are never combined again.
* ``outbox/``: the combined updates' messages (:class:`~common.outbox.Outbox`), kept until the
  core's ack and resent with the same id after every reconnect.

:meth:`RegionalStore.commit` writes the ``combined`` line, then the outbox entry, then drops the
constituents from the WAL. A crash between any two leaves a state that :meth:`RegionalStore.open`
finishes, so the three steps act as one:

* before the line: the constituents are still in the WAL and not combined; they are buffered
  again and combined anew (possibly with others; the hospitals were acked, none is lost);
* after the line, before the outbox entry: the constituents are still in the WAL; recovery hands
  them back as :attr:`Recovery.rebuild`, and the caller combines exactly those again, in the same
  order, which gives the same message with the same id (:mod:`aggregator.combine`);
* after the outbox entry, before the WAL is dropped: recovery drops those WAL entries;
* after the core's ack line, before the outbox entry is removed: recovery removes it.

Whatever is in the outbox after recovery is resent; if the core folded it before the crash, it
answers with a duplicate ack (its replay protection knows the id), never folds it twice.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Self, assert_never

from pydantic import BaseModel, ConfigDict

from aggregator.store import StateStore, WalEntry
from common.jsonlog import JsonLog, read_json_lines
from common.outbox import Outbox

__all__ = ["COMBINED_LOG_FILE", "CombinedEvent", "CombinedLogEntry", "Recovery", "RegionalStore"]

log = logging.getLogger(__name__)

COMBINED_LOG_FILE = "combined.jsonl"


class CombinedEvent(StrEnum):
    COMBINED = "combined"  # the commit point: these constituents are this update's
    ACKED = "acked"  # the core acknowledged the combined update (accepted or refused)


class CombinedLogEntry(BaseModel):
    """One line of ``combined.jsonl``; ``constituents`` only on ``combined`` lines."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    event: CombinedEvent
    update_id: str
    constituents: tuple[str, ...] = ()
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Recovery:
    """What a restarted regional aggregator does before it takes new updates.

    ``pending``: accepted updates not yet combined, in the order they were accepted: buffer them
    again. ``rebuild``: combined updates whose message never reached the outbox, each with its
    constituents in the order combined: combine them again and :meth:`RegionalStore.commit` the
    result. ``outbox``: combined updates awaiting the core's ack, oldest first: resend them.
    """

    pending: tuple[WalEntry, ...]
    rebuild: tuple[tuple[str, tuple[WalEntry, ...]], ...]
    outbox: tuple[tuple[str, bytes], ...]


class RegionalStore:
    """Files under one regional aggregator's state directory; one process owns it at a time."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        # The core's write-ahead log, as is; its checkpoint and model folders stay empty here.
        self._wal = StateStore(directory, keep_checkpoints=1, archive_models=False)
        self._outbox = Outbox(directory / "outbox")
        self._log = JsonLog(directory / COMBINED_LOG_FILE, CombinedLogEntry)
        self._combined: dict[str, tuple[str, ...]] = {}  # combined id -> its constituents
        self._acked: set[str] = set()
        self._owner: dict[str, str] = {}  # constituent id -> the combined update it went into
        self._accepted: set[str] = set()  # ids in the WAL

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> Recovery:
        """Open the state directory, finish a commit or an ack that a crash cut short, and say
        what to buffer, combine and resend again."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._wal.open()
        self._outbox.open()
        self._log.open()
        self._read_log()
        in_outbox = set(self._outbox.ids())
        for uid in in_outbox & self._acked:
            self._outbox.remove(uid)  # acked, then killed before the entry was removed
        wal = self._wal.wal_entries()
        by_id = {e.update_id: e for e in wal}
        rebuild: list[tuple[str, tuple[WalEntry, ...]]] = []
        finished: set[str] = set()
        for uid, constituents in self._combined.items():
            if uid in self._acked or uid in in_outbox:
                finished.update(c for c in constituents if c in by_id)
                continue
            missing = [c for c in constituents if c not in by_id]
            if missing:
                # The WAL entries go only after the outbox entry is written: a broken invariant.
                raise RuntimeError(
                    f"combined update {uid} is in neither the outbox nor acked, and its "
                    f"constituents {missing} are gone from the write-ahead log"
                )
            rebuild.append((uid, tuple(by_id[c] for c in constituents)))
        if finished:
            self._wal.drop_wal(finished)  # the outbox held them: killed before the WAL drop
        self._accepted = {e.update_id for e in wal} - finished
        pending = tuple(e for e in wal if e.update_id not in self._owner)
        if pending or rebuild:
            log.info(
                "recovered %d uncombined updates, %d combined updates to rebuild",
                len(pending),
                len(rebuild),
            )
        return Recovery(pending, tuple(rebuild), tuple(self._outbox.pending()))

    def _read_log(self) -> None:
        self._combined.clear()
        self._acked.clear()
        self._owner.clear()
        for entry in read_json_lines(self._log.path, CombinedLogEntry):
            match entry.event:
                case CombinedEvent.COMBINED:
                    self._combined[entry.update_id] = entry.constituents
                    for constituent in entry.constituents:
                        self._owner[constituent] = entry.update_id
                case CombinedEvent.ACKED:
                    self._acked.add(entry.update_id)
                case _:
                    assert_never(entry.event)

    def close(self) -> None:
        self._log.close()

    # -- hospitals' updates

    def known(self, update_id: str) -> bool:
        """Whether an update of this id was accepted before (buffered or already combined)."""
        return update_id in self._accepted or update_id in self._owner

    def accept(self, node: str, update_id: str, payload: bytes) -> None:
        """Durably keep an accepted hospital update; only then may it be acknowledged."""
        if self.known(update_id):
            raise ValueError(f"update {update_id} was accepted before")
        self._wal.append_wal(node, update_id, payload)
        self._accepted.add(update_id)

    # -- combined updates

    def commit(self, update_id: str, constituents: Sequence[str], payload: bytes) -> None:
        """Make ``payload`` (the combined update ``update_id``) the fate of ``constituents``.

        Also the way to finish a :attr:`Recovery.rebuild` entry: its line is already written.
        """
        previous = self._combined.get(update_id)
        if previous is None:
            taken = [c for c in constituents if c in self._owner]
            if taken:
                raise ValueError(f"updates {taken} were combined before")
            unknown = [c for c in constituents if c not in self._accepted]
            if unknown:
                raise ValueError(f"updates {unknown} were never accepted")
            self._log.write(
                [
                    CombinedLogEntry(
                        event=CombinedEvent.COMBINED,
                        update_id=update_id,
                        constituents=tuple(constituents),
                    )
                ]
            )
            self._combined[update_id] = tuple(constituents)
            for constituent in constituents:
                self._owner[constituent] = update_id
        elif previous != tuple(constituents):
            raise ValueError(f"combined update {update_id} already has other constituents")
        self._outbox.put(update_id, payload)
        self._wal.drop_wal(set(constituents))
        self._accepted.difference_update(constituents)

    def acked(self, update_id: str, detail: str = "") -> bool:
        """The core answered ``update_id``: forget its message. False if it was not waiting."""
        if update_id not in self._combined or update_id in self._acked:
            return False
        self._log.write(
            [CombinedLogEntry(event=CombinedEvent.ACKED, update_id=update_id, detail=detail)]
        )
        self._acked.add(update_id)
        self._outbox.remove(update_id)
        return True

    def unacked(self) -> list[tuple[str, bytes]]:
        """Combined updates awaiting the core's ack, oldest first: what to resend."""
        return self._outbox.pending()

    def unacked_message(self, update_id: str) -> bytes | None:
        """The message of one combined update awaiting the core's ack (None: acked meanwhile)."""
        return self._outbox.read(update_id)

    def constituents(self, update_id: str) -> tuple[str, ...]:
        """The hospital updates that ``update_id`` combined (empty if it is not a combined id)."""
        return self._combined.get(update_id, ())

    def combined_ids(self) -> Iterable[str]:
        """Every combined update, in the order committed."""
        return iter(self._combined)
