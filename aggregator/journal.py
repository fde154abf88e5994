"""The order in which the aggregator writes its durable records, and recovery from a crash between
any two of them.

Theory of operation. Four records live in the state directory (:class:`~aggregator.store.StateStore`
and :class:`~aggregator.ledger.Ledger`): the checkpoint of the current version, the write-ahead log
(WAL) of accepted updates not yet folded, ``versions.jsonl`` and the update ledger. The service
calls this module at three moments, and acks only after it returns:

1. **An update arrives** (:meth:`Journal.record_update`). Accepted and new: its raw message goes
   to the WAL (fsync). Whatever the verdict: a ledger line (fsync). Then the service acks it to the
   node and to the broker. A crash before the ack leaves the update unacked, so the broker (manual
   ack on a persistent session) and the node's outbox both deliver it again; a crash after the WAL
   write finds it in the WAL on restart and buffers it again, and the redelivery is a duplicate.
2. **A fold** (:meth:`Journal.commit_fold`), in this order:
   a. the checkpoint of the new version, carrying its version record (atomic: the commit point);
   b. the record appended to ``versions.jsonl``;
   c. a ``folded`` ledger line per update;
   d. the folded updates' WAL entries deleted;
   then the service publishes the manifest and the versions message.
   Crash before (a): the old checkpoint and the whole WAL are there; the buffer is rebuilt and the
   same updates fold again into the same version number (nothing was announced). Crash after (a)
   and before (b) or (c): :meth:`Journal.open` appends the checkpoint's record and ``folded``
   lines that are missing. Crash before (d): the WAL entries of folded updates are in the
   checkpoint's ``seen`` and not in its ``buffered`` list, so replay drops them instead of
   buffering them. Crash before the publish: the restarted service publishes its checkpoint's
   version. No update is folded into two versions, and none that was acked is lost.
3. **A control command** (:meth:`Journal.checkpoint`): a checkpoint at the same version, so knob
   and state changes survive and replay always runs under the knobs the updates were accepted with.

A checkpoint is written for every version. It is cheap (raw arrays, see ``store``): the durability
benchmark measures it against the rest of the aggregator's work per version.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from aggregator.core import AggregatorCore, Discard, Fold, Verdict
from aggregator.ledger import Ledger, LedgerEntry, LedgerEvent
from aggregator.store import Checkpoint, StateStore
from common.codec import decode
from common.errors import ProtocolError
from common.messages import ModelSpec, RejectReason, Update, VersionRecord

__all__ = ["Journal"]

log = logging.getLogger(__name__)


class Journal:
    """The aggregator's durable records in one state directory (one process at a time)."""

    def __init__(
        self,
        directory: Path,
        *,
        model: ModelSpec,
        keep_checkpoints: int = 3,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = StateStore(directory, keep_checkpoints=keep_checkpoints)
        self.ledger = Ledger(directory)
        self._model = model
        self._clock = clock
        self._record: VersionRecord | None = None

    def open(self) -> Checkpoint | None:
        """Open the files and finish what a crash interrupted; the latest checkpoint, if any."""
        self.store.open()
        self.ledger.open()
        checkpoint = self.store.load_latest()
        if checkpoint is not None:
            self._record = checkpoint.record
            self._complete_logs(checkpoint)
        return checkpoint

    def close(self) -> None:
        self.ledger.close()

    # -- recovery

    def resume(
        self, fresh: Callable[[], AggregatorCore], *, max_bytes: int
    ) -> tuple[AggregatorCore, Checkpoint | None, int]:
        """The core as the last run left it (or ``fresh()``, checkpointed at once), with its
        buffer rebuilt; also the checkpoint it came from and how many updates were restored."""
        checkpoint = self.open()
        if checkpoint is None:
            core = fresh()
            self.checkpoint(core)
        else:
            core = AggregatorCore(
                run_id=checkpoint.run_id,
                params=checkpoint.params,
                knobs=checkpoint.knobs,
                version=checkpoint.version,
                state=checkpoint.state,
                optimizer_state=checkpoint.optimizer_state(),
                seen=checkpoint.seen,
                counters=checkpoint.counters,
                nodes=checkpoint.nodes,
            )
        buffered = checkpoint.buffered if checkpoint is not None else ()
        return core, checkpoint, self.replay(core, buffered, max_bytes=max_bytes)

    def _complete_logs(self, checkpoint: Checkpoint) -> None:
        """Append the checkpoint's version record and ``folded`` lines if a crash cut them off."""
        record = checkpoint.record
        if record is None or record.version != checkpoint.version:
            return
        logged = self.store.last_logged_version()
        if logged < record.version:
            if logged != record.version - 1:
                log.error(
                    "run %s: versions.jsonl ends at v%d but the checkpoint is v%d",
                    checkpoint.run_id,
                    logged,
                    record.version,
                )
            log.warning(
                "run %s: v%d was checkpointed but not logged; logging it now",
                checkpoint.run_id,
                record.version,
            )
            self.store.append_version(record)
        folded = self.ledger.last_folded_version()
        if folded is None or folded < record.version:
            log.warning(
                "run %s: completing the ledger's folded lines of v%d",
                checkpoint.run_id,
                record.version,
            )
            self.ledger.write(self._folded(record))

    def replay(self, core: AggregatorCore, buffered: tuple[str, ...], *, max_bytes: int) -> int:
        """Rebuild the buffer from the WAL; returns how many updates it holds again.

        An update the checkpoint lists as buffered goes back as it was; one the checkpoint has
        seen otherwise was folded (or discarded) and its entry is dropped; one accepted after the
        checkpoint goes through validation again (and is counted, as the checkpoint did not).
        """
        done: set[str] = set()
        restored = 0
        pending = set(buffered)
        for entry in self.store.wal_entries():
            payload = entry.payload
            try:
                env = decode(payload, max_bytes=max_bytes)
            except ProtocolError:
                log.exception("WAL entry %s does not decode; dropping it", entry.path.name)
                done.add(entry.update_id)
                continue
            update = env.body
            if not isinstance(update, Update):
                done.add(entry.update_id)
                continue
            now = self._clock()
            if update.update_id in pending:
                core.restore_buffered(entry.node, update, len(payload), now)
                pending.discard(update.update_id)
                restored += 1
            elif update.update_id in core.seen:
                done.add(entry.update_id)
            else:
                verdict = core.receive(entry.node, env.sender, update, len(payload), now)
                if verdict.accepted:
                    restored += 1
                else:
                    # Accepted once under the same version and knobs, so this should not happen;
                    # if it does, say so in the ledger rather than drop it without a trace.
                    log.error(
                        "node %s: logged update %s rejected on replay at v%d: %s",
                        entry.node,
                        update.update_id[:8],
                        core.version,
                        verdict.detail,
                    )
                    self.ledger.write(
                        [self._entry(LedgerEvent.REJECTED, entry.node, update, verdict, core)]
                    )
                    done.add(entry.update_id)
        for update_id in sorted(pending):
            log.error("buffered update %s has no WAL entry; it cannot be restored", update_id)
        if done:
            self.store.drop_wal(done)
        return restored

    # -- the three moments

    def record_update(
        self,
        core: AggregatorCore,
        node: str,
        update: Update,
        verdict: Verdict,
        payload: bytes,
    ) -> None:
        """Make a verdict durable before it is acked: WAL (accepted, new), then the ledger."""
        if verdict.accepted and not verdict.duplicate:
            self.store.append_wal(node, update.update_id, payload)
        event = (
            LedgerEvent.DUPLICATE
            if verdict.duplicate
            else LedgerEvent.ACCEPTED
            if verdict.accepted
            else LedgerEvent.REJECTED
        )
        self.ledger.write([self._entry(event, node, update, verdict, core, size=len(payload))])

    def record_unreadable(
        self, core: AggregatorCore, node: str, reason: RejectReason, detail: str, size: int
    ) -> None:
        """A message on a node's update topic that never became an update (no id to ack)."""
        self.ledger.write(
            [
                LedgerEntry(
                    event=LedgerEvent.REJECTED,
                    at=self._clock(),
                    node=node,
                    version=core.version,
                    reason=reason.value,
                    detail=detail,
                    bytes=size,
                )
            ]
        )

    def commit_fold(self, core: AggregatorCore, fold: Fold) -> None:
        """Checkpoint, versions log, ledger, WAL: the order the module docstring argues for."""
        self._record = fold.record
        self.checkpoint(core)
        self.store.append_version(fold.record)
        self.ledger.write(self._folded(fold.record))
        self.store.drop_wal(set(fold.folded_ids))

    def commit_discard(self, core: AggregatorCore, discard: Discard) -> None:
        """Checkpoint (the ids are now rejected in ``seen``), ledger, WAL."""
        self.checkpoint(core)
        ids = set(discard.update_ids)
        nodes = {e.update_id: e.node for e in self.store.wal_entries() if e.update_id in ids}
        now = self._clock()
        self.ledger.write(
            LedgerEntry(
                event=LedgerEvent.DISCARDED,
                at=now,
                node=nodes.get(update_id, ""),
                update_id=update_id,
                version=core.version,
                reason=RejectReason.NON_FINITE.value,
                detail=discard.detail,
            )
            for update_id in discard.update_ids
        )
        self.store.drop_wal(set(discard.update_ids))

    def checkpoint(self, core: AggregatorCore) -> None:
        opt = core.optimizer_state
        record = self._record if self._record and self._record.version == core.version else None
        self.store.save(
            Checkpoint(
                run_id=core.run_id,
                version=core.version,
                state=core.state,
                model=self._model,
                knobs=core.knobs,
                params=core.params,
                seen=core.seen,
                counters=core.counters(),
                nodes=core.ledger(),
                created_at=self._clock(),
                optimizer_step=opt.step,
                optimizer_m=opt.m,
                optimizer_v=opt.v,
                buffered=tuple(u.update_id for u in core.buffer),
                record=record,
            )
        )

    # -- ledger lines

    def _entry(
        self,
        event: LedgerEvent,
        node: str,
        update: Update,
        verdict: Verdict,
        core: AggregatorCore,
        *,
        size: int = 0,
    ) -> LedgerEntry:
        return LedgerEntry(
            event=event,
            at=self._clock(),
            node=node,
            update_id=update.update_id,
            base_version=update.base_version,
            version=core.version,
            reason=verdict.reason.value if verdict.reason else None,
            detail=verdict.detail,
            bytes=size,
        )

    def _folded(self, record: VersionRecord) -> list[LedgerEntry]:
        now = self._clock()
        return [
            LedgerEntry(
                event=LedgerEvent.FOLDED,
                at=now,
                node=c.node,
                update_id=c.update_id,
                base_version=c.base_version,
                version=record.version,
                bytes=c.bytes,
            )
            for c in record.contributions
        ]
