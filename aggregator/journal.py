"""The order in which the aggregator writes its durable records, and recovery from a crash between
any two of them.

Theory of operation. Four records live in the state directory (:class:`~aggregator.store.StateStore`
and :class:`~aggregator.update_log.UpdateLog`): checkpoints, the write-ahead log (WAL) of accepted
updates, ``versions.jsonl`` and the update log. The service calls this module at three moments,
and acknowledges a message only after the call returns:

1. **An update arrives** (:meth:`Journal.record_update`). Accepted and new: its raw message goes
   to the WAL (fsync). Rejected: the update-log line is synced, since the rejection is the answer
   the node gets and nothing else remembers it. Accepted or duplicate: the update-log line is
   written but not synced; the WAL (and later ``versions.jsonl``) is the durable proof. Then the
   service acks the update to the node and to the broker. A crash before the ack leaves the
   update unacked, so the broker (manual ack on a persistent session) and the node's outbox
   deliver it again; a crash after the WAL write finds it in the WAL on restart, and the
   redelivery is a duplicate.
2. **A fold** (:meth:`Journal.commit_fold`), in this order:
   0. the version's model blob, as broadcast, archived in ``models/`` (atomic; a crash before (a)
      leaves a blob of a version that never existed, overwritten when that number is made);
   a. the version record, sealed into the hash chain (:mod:`common.provenance`: its parent's
      digest is that of the last record in the log), appended to ``versions.jsonl`` and synced:
      **the commit point**;
   b. a ``folded`` update-log line per update (not synced: derived from (a) if lost);
   c. every ``checkpoint_every`` versions, and whenever the run state changes, an (atomic)
      checkpoint, after which the WAL entries of every update not in the buffer are deleted;
   then the service publishes the manifest and the versions message.
   Crash before (a): the version never existed and nobody saw it; its updates are still in the WAL
   and fold again. Crash after (a): recovery (below) makes the version again from the WAL. A WAL
   entry is deleted only once a checkpoint covers its update, so every update a version record
   names is in the last checkpoint or in the WAL.
3. **A control command** (:meth:`Journal.checkpoint`): a checkpoint, so knob and state changes are
   durable and every version after a checkpoint was folded under the knobs it holds.

A **discarded batch** (:meth:`Journal.commit_discard`): ``discarded`` update-log lines (synced),
then a checkpoint that no longer lists the updates as buffered. Crash before the checkpoint: the
updates come back from the WAL, fold again into the same batch and are discarded again; the update
log has their line twice, never a ``folded`` one.

A **rollback** (:meth:`Journal.commit_rollback`) is a version made from a retained checkpoint's
weights (:meth:`Journal.rollback_source`): the version record (``reason: rollback``,
``rollback_of``) is its commit point, and a checkpoint follows at once. Crash between the two:
recovery finds the record after the newest checkpoint and makes the rollback again from the same
retained checkpoint, which no checkpoint write has rotated away since (the next write is the one
that failed to happen), so the version has the same number and the same weights, once.

Recovery (:meth:`Journal.resume`): load the newest checkpoint (version c); put back the updates it
lists as buffered, and every WAL entry accepted after it, in the order they were accepted; then for
each record in ``versions.jsonl`` after c, fold exactly the updates it names, in its order
(:meth:`AggregatorCore.refold`), or redo the rollback it logs. Deterministic maths on the same
inputs gives the same weights, so the versions nodes already trained on are the versions the
aggregator continues from. Then the update log gets any ``folded`` lines it lacks, and a checkpoint
is written. No update is folded into two versions (each refold takes its updates out of the buffer,
and WAL entries that the checkpoint already folded are recognised by its ``seen`` set), and no
acked update is lost (it is in the WAL or the checkpoint).

Under **secure aggregation** (docs/secure-aggregation.md) two more records join them:
``unmask.jsonl`` (:class:`~aggregator.secure_unmask.UnmaskLedger`: each fold plan, written before
any holder is asked, the answers that unmask it, written before its version, and its close) and
``receipts.jsonl`` (:class:`~aggregator.secure_unmask.ReceiptLog`: the holders' receipts, written
before the broker's PUBACK). A secure version is checkpointed as soon as it is logged, so that a
version to make again on recovery is always one whose plan is still open, with its answers on
disk: recovery folds it again from them (asking no one) and closes the plan. Recovery then puts
back the receipts and takes back the plan still open (its updates are buffered), to be asked
again with the same fold id and weights; a plan whose version was made, or whose batch was
discarded, is closed or abandoned, never asked again.

``checkpoint_every`` trades recovery time (up to that many refolds) and WAL disk (that many
versions' updates) against the cost of writing the model at every version; the durability
benchmark measures both ends.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from aggregator.aggregation import Params, ServerOptimizerState
from aggregator.core import AggregatorCore, Discard, Fold, Probe, Verdict
from aggregator.secure_unmask import FoldPlan, ReceiptLog, UnmaskLedger
from aggregator.store import Checkpoint, StateStore
from aggregator.update_log import UpdateEvent, UpdateLog, UpdateLogEntry
from common.codec import sha256_hex
from common.errors import ControlError, DecodeError, HealthNetError
from common.inbound import Fault, decode_body
from common.messages import AggregatorState, ModelSpec, RejectReason, Update, VersionRecord
from common.provenance import record_digest, seal
from common.secure_aggregation.events import UnmaskAnswer

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
        checkpoint_every: int = 1,
        archive_models: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be at least 1, not {checkpoint_every}")
        self.store = StateStore(
            directory, keep_checkpoints=keep_checkpoints, archive_models=archive_models
        )
        self.update_log = UpdateLog(directory)
        self.checkpoint_every = checkpoint_every
        self._model = model
        self._clock = clock
        self._record: VersionRecord | None = None
        # The digest of the newest record in versions.jsonl: the next version's parent.
        self._head: str | None = None
        self._checkpointed: tuple[int, AggregatorState] | None = None
        # Secure aggregation's records: open only when the run has the policy.
        self._directory = directory
        self._unmask: UnmaskLedger | None = None
        self._receipts: ReceiptLog | None = None

    def close(self) -> None:
        self.update_log.close()
        if self._unmask is not None:
            self._unmask.__exit__(None, None, None)
            self._unmask = None
        if self._receipts is not None:
            self._receipts.__exit__(None, None, None)
            self._receipts = None

    @property
    def unmask(self) -> UnmaskLedger:
        """The fold plans' ledger of a run under secure aggregation."""
        if self._unmask is None:
            raise HealthNetError("the run has no secure aggregation policy")
        return self._unmask

    @property
    def receipts(self) -> ReceiptLog:
        """The holders' receipts of a run under secure aggregation."""
        if self._receipts is None:
            raise HealthNetError("the run has no secure aggregation policy")
        return self._receipts

    # -- recovery

    def resume(
        self,
        fresh: Callable[[], AggregatorCore],
        *,
        max_bytes: int,
        probe: Probe | None = None,
    ) -> tuple[AggregatorCore, Checkpoint | None, int]:
        """The core as the last process left it (or ``fresh()``, checkpointed at once), judging
        new versions with ``probe``.

        Returns the core, the checkpoint it started from and how many versions were made again.
        """
        self.store.open()
        self.update_log.open()
        try:
            return self._resume(fresh, max_bytes=max_bytes, probe=probe)
        except BaseException:
            self.close()
            raise

    def _resume(
        self, fresh: Callable[[], AggregatorCore], *, max_bytes: int, probe: Probe | None
    ) -> tuple[AggregatorCore, Checkpoint | None, int]:
        for last in self.store.versions_backwards():
            self._head = record_digest(last)
            break
        checkpoint = self.store.load_latest()
        if checkpoint is None:
            core = fresh()
            self._open_secure(core)
            self.checkpoint(core)
            return core, None, 0
        self._record = checkpoint.record
        self._checkpointed = (checkpoint.version, checkpoint.state)
        core = _core_from(checkpoint, probe)
        self._open_secure(core)
        self._replay(core, checkpoint.buffered, max_bytes=max_bytes)
        refolded = self._refold(core, self._records_after(checkpoint.version))
        self._complete_update_log()
        if refolded or core.buffer:
            self.checkpoint(core)  # the next recovery starts here, and the WAL is trimmed
        if self._unmask is not None:
            self._resume_secure(core)
        return core, checkpoint, refolded

    def _open_secure(self, core: AggregatorCore) -> None:
        if core.secure_policy is None:
            return
        self._unmask = UnmaskLedger(self._directory).__enter__()
        self._receipts = ReceiptLog(self._directory).__enter__()

    def _resume_secure(self, core: AggregatorCore) -> None:
        """Put the receipts back, take back the open plan, and close or abandon the others."""
        policy, ledger = core.secure_policy, self.unmask
        if policy is None:
            return
        for holder, update_ids in self.receipts.read():
            core.record_receipts(holder, policy.digest(), update_ids)
        for plan in ledger.open_plans():
            if core.adopt_plan(plan):
                log.info("run %s: fold %s is still open", core.run_id, plan.fold_id)
                continue
            version = self._version_of(plan)
            if version is not None:
                ledger.close(plan.fold_id, version)
            else:
                log.warning(
                    "run %s: fold %s was not made and its updates are gone; abandoning it",
                    core.run_id,
                    plan.fold_id,
                )
                ledger.abandon(plan.fold_id)

    def _version_of(self, plan: FoldPlan) -> int | None:
        """The version a plan made, from versions.jsonl (None: it made none)."""
        for record in self.store.versions_backwards():
            if record.secure_fold_id == plan.fold_id:
                return record.version
        return None

    def _secure_of(self, record: VersionRecord) -> tuple[FoldPlan, tuple[UnmaskAnswer, ...]] | None:
        """The plan and recorded answers a secure version is made again from."""
        if record.secure_fold_id is None or self._unmask is None:
            return None
        for plan in self._unmask.open_plans():
            if plan.fold_id == record.secure_fold_id:
                return plan, self._unmask.answers(plan.fold_id)
        return None

    def _replay(self, core: AggregatorCore, buffered: tuple[str, ...], *, max_bytes: int) -> None:
        """Rebuild the buffer from the WAL, in the order the updates were accepted.

        An update the checkpoint lists as buffered goes back as it was; one the checkpoint has
        seen otherwise was folded (or discarded) and its entry is dropped; one accepted after the
        checkpoint goes back and is counted (it was validated when it arrived; the versions made
        since may have named it, so it is not validated again against a version it predates).
        """
        done: set[str] = set()
        pending = set(buffered)
        for entry in self.store.wal_entries():
            seen = core.seen.get(entry.update_id)
            if seen is not None and entry.update_id not in pending:
                done.add(entry.update_id)
                continue
            payload = entry.payload
            decoded = decode_body(Update, payload, max_bytes=max_bytes)
            if isinstance(decoded, Fault):
                # Written whole before the ack (fsync), so only damage gets here.
                log.error(
                    "WAL entry %s is not an update (%s: %s); dropping it",
                    entry.path.name,
                    decoded.reason.value,
                    decoded.detail,
                )
                done.add(entry.update_id)
                continue
            update = decoded.body
            try:
                core.restore_buffered(
                    entry.node, update, len(payload), self._clock(), count=seen is None
                )
            except ValueError:
                log.exception("WAL entry %s cannot be restored; dropping it", entry.path.name)
                done.add(entry.update_id)
                continue
            pending.discard(update.update_id)
            if seen is None:
                restored = self._entry(
                    UpdateEvent.ACCEPTED, entry.node, update, core, size=len(payload)
                )
                self.update_log.append(
                    [restored.model_copy(update={"detail": "restored from the WAL"})]
                )
        for update_id in sorted(pending):
            log.error("buffered update %s has no WAL entry; it cannot be restored", update_id)
        if done:
            self.store.drop_wal(done)

    def _records_after(self, version: int) -> list[VersionRecord]:
        records = []
        for record in self.store.versions_backwards():
            if record.version <= version:
                break
            records.append(record)
        return records[::-1]

    def _refold(self, core: AggregatorCore, records: list[VersionRecord]) -> int:
        """Make the versions logged after the checkpoint again; returns how many."""
        for record in records:
            try:
                if record.reason == "rollback":
                    params, optimizer = self.rollback_source(core, record.rollback_of or 0)
                    core.redo_rollback(record, params, optimizer)
                else:
                    core.refold(record, self._clock(), secure=self._secure_of(record))
            except ControlError as exc:
                # Only possible if files were damaged or deleted: going on would publish a second,
                # different version under a number that nodes already trained on.
                raise HealthNetError(
                    f"run {core.run_id}: v{record.version} is in versions.jsonl but cannot be made "
                    f"again from the checkpoint and the write-ahead log in "
                    f"{self.store.directory} ({exc}); the state directory is damaged"
                ) from exc
            # The logged record, not the refold's (its times differ): versions.jsonl is the chain.
            self._record = record
        if records:
            log.info(
                "run %s: made v%d-v%d again from the WAL",
                core.run_id,
                records[0].version,
                core.version,
            )
        return len(records)

    def _complete_update_log(self) -> None:
        """Append the ``folded`` lines of logged versions that a crash kept out of the log."""
        last = self.update_log.last_folded_version() or 0
        missing = self._records_after(last)
        if missing:
            self.update_log.write(line for record in missing for line in self._folded(record))

    # -- the three moments

    def record_update(
        self,
        core: AggregatorCore,
        node: str,
        update: Update,
        verdict: Verdict,
        payload: bytes,
    ) -> None:
        """Make a verdict durable before it is acked (see the module docstring, step 1)."""
        if verdict.accepted and not verdict.duplicate:
            self.store.append_wal(node, update.update_id, payload)
        event = (
            UpdateEvent.DUPLICATE
            if verdict.duplicate
            else UpdateEvent.ACCEPTED
            if verdict.accepted
            else UpdateEvent.REJECTED
        )
        entry = self._entry(event, node, update, core, verdict=verdict, size=len(payload))
        self.update_log.append([entry])
        if event is UpdateEvent.REJECTED:
            self.update_log.sync()

    def record_unreadable(
        self, core: AggregatorCore, node: str, reason: RejectReason, detail: str, size: int
    ) -> None:
        """A message on a node's update topic that never became an update (no id to ack)."""
        self.update_log.append(
            [
                UpdateLogEntry(
                    event=UpdateEvent.REJECTED,
                    at=self._clock(),
                    node=node,
                    version=core.version,
                    reason=reason.value,
                    detail=detail,
                    bytes=size,
                )
            ]
        )

    def commit_fold(self, core: AggregatorCore, fold: Fold, model_blob: bytes) -> VersionRecord:
        """Model archive, versions log (the commit point), update log, and a checkpoint when one is
        due. ``model_blob`` is the version's blob as broadcast; returns the record as logged,
        sealed into the hash chain (:mod:`common.provenance`)."""
        record = self._log_version(fold, model_blob)
        self.update_log.append(self._folded(record))
        state_changed = self._checkpointed is None or self._checkpointed[1] is not core.state
        # A secure version is made again only from its open plan's answers: checkpoint it now,
        # before its plan is closed (see the module docstring).
        secure = record.secure_fold_id is not None
        if secure or state_changed or fold.version % self.checkpoint_every == 0:
            self.checkpoint(core)
        return record

    def commit_discard(self, core: AggregatorCore, discard: Discard) -> None:
        """The update log (synced: the nodes are told next), then a checkpoint that forgets them."""
        now = self._clock()
        self.update_log.write(
            UpdateLogEntry(
                event=UpdateEvent.DISCARDED,
                at=now,
                node=node,
                update_id=update_id,
                version=core.version,
                reason=RejectReason.DISCARDED.value,
                detail=discard.detail,
            )
            for update_id, node in zip(discard.update_ids, discard.nodes, strict=True)
        )
        self.checkpoint(core)

    def rollback_source(
        self, core: AggregatorCore, version: int
    ) -> tuple[Params, ServerOptimizerState]:
        """The weights and server optimizer state of ``version``, an earlier version of the run.

        From its checkpoint when one is kept (``keep_checkpoints`` of them, one every
        ``checkpoint_every`` versions); else, for a version since the newest checkpoint, made
        again from that checkpoint and the WAL, as recovery would. Any other version is gone: a
        ControlError names the versions there are.
        """
        if not 0 <= version < core.version:
            raise ControlError(f"v{version} is not an earlier version (current: v{core.version})")
        checkpoint = self._kept_checkpoint(version)
        if checkpoint is not None and checkpoint.run_id == core.run_id:
            return checkpoint.params, checkpoint.optimizer_state()
        latest = self.store.load_latest()
        if latest is not None and latest.run_id == core.run_id and latest.version <= version:
            return self._remake(latest, version)
        kept = [v for v in self.store.checkpoint_versions() if v < core.version]
        listed = [f"v{v}" for v in kept if latest is None or v < latest.version]
        if latest is not None and latest.version < core.version - 1:
            listed.append(f"v{latest.version}-v{core.version - 1}")
        elif latest is not None and latest.version < core.version:
            listed.append(f"v{latest.version}")
        raise ControlError(
            f"v{version} is neither kept nor since the newest checkpoint; versions that can be "
            f"rolled back to: {', '.join(listed) or 'none'} (keep_checkpoints and "
            "checkpoint_every decide which are kept)"
        )

    def _kept_checkpoint(self, version: int) -> Checkpoint | None:
        """The checkpoint of ``version``, or None when none is kept (or it does not decode)."""
        try:
            return self.store.load_checkpoint(version)
        except FileNotFoundError:
            return None
        except DecodeError as exc:
            log.warning("checkpoint of v%d is unreadable: %s", version, exc)
            return None

    def _remake(self, checkpoint: Checkpoint, version: int) -> tuple[Params, ServerOptimizerState]:
        """``version``'s weights, folded again from ``checkpoint`` and the WAL in a scratch core:
        the updates each logged version names, in its order, as :meth:`resume` does."""
        # The same core recovery builds (norm history included), so that each update is judged
        # as it was on arrival; no probe: these versions were published once already.
        scratch = _core_from(checkpoint, probe=None)
        buffered = set(checkpoint.buffered)
        for entry in self.store.wal_entries():
            if entry.update_id in checkpoint.seen and entry.update_id not in buffered:
                continue  # folded (or discarded) before the checkpoint
            payload = entry.payload
            # Our own record, accepted under the service's size limit: any size it has is fine.
            decoded = decode_body(Update, payload, max_bytes=len(payload))
            if isinstance(decoded, Fault):
                log.warning(
                    "WAL entry %s left out of a rollback: %s", entry.path.name, decoded.detail
                )
                continue
            try:
                new = entry.update_id not in checkpoint.seen
                scratch.restore_buffered(entry.node, decoded.body, 0, 0.0, count=new)
            except ValueError as exc:
                log.warning("WAL entry %s left out of a rollback: %s", entry.path.name, exc)
        for record in self._records_after(checkpoint.version):
            if record.version > version:
                break
            scratch.refold(record, record.created_at)
        if scratch.version != version:
            raise ControlError(f"v{version} cannot be made again from the write-ahead log")
        return scratch.params, scratch.optimizer_state

    def commit_rollback(self, core: AggregatorCore, fold: Fold, model_blob: bytes) -> VersionRecord:
        """The version record (the commit point), then a checkpoint at once: recovery can redo a
        rollback only while its source checkpoint is kept, and the next write may rotate it."""
        record = self._log_version(fold, model_blob)
        self.checkpoint(core)
        return record

    def _log_version(self, fold: Fold, model_blob: bytes) -> VersionRecord:
        """Seal the version's record into the chain, archive its model, then log the record."""
        record = seal(fold.record, parent=self._head, model_sha256=sha256_hex(model_blob))
        # Before the commit point, so that every logged version has its model on disk.
        self.store.archive_model(fold.version, model_blob)
        self._record = record
        self.store.append_version(record)
        self._head = record_digest(record)
        return record

    def checkpoint(self, core: AggregatorCore) -> None:
        """Write a checkpoint of the core, then drop the WAL entries it covers."""
        self.update_log.sync()  # what the checkpoint counts, the update log has on disk too
        opt = core.optimizer_state
        record = self._record if self._record and self._record.version == core.version else None
        buffered = tuple(u.update_id for u in core.buffer)
        self.store.save(
            Checkpoint(
                run_id=core.run_id,
                version=core.version,
                state=core.state,
                model=self._model,
                knobs=core.knobs,
                params=core.params,
                seen=core.seen,
                seen_by=core.seen_by,
                counters=core.counters(),
                nodes=core.node_tallies(),
                created_at=self._clock(),
                optimizer_step=opt.step,
                optimizer_m=opt.m,
                optimizer_v=opt.v,
                buffered=buffered,
                record=record,
                norms=core.norm_history,
                initial_norm=core.initial_norm,
                buffered_scales={u.update_id: u.scale for u in core.buffer if u.scale != 1.0},
                broadcast_dtype=core.broadcast_dtype,
                broadcast_view=core.broadcast_view,
            )
        )
        self._checkpointed = (core.version, core.state)
        keep = set(buffered)
        self.store.drop_wal({e.update_id for e in self.store.wal_entries()} - keep)

    # -- update-log lines

    def _entry(
        self,
        event: UpdateEvent,
        node: str,
        update: Update,
        core: AggregatorCore,
        *,
        verdict: Verdict | None = None,
        size: int = 0,
    ) -> UpdateLogEntry:
        reason = verdict.reason if verdict is not None else None
        return UpdateLogEntry(
            event=event,
            at=self._clock(),
            node=node,
            update_id=update.update_id,
            base_version=update.base_version,
            version=core.version,
            reason=reason.value if reason else None,
            detail=verdict.detail if verdict is not None else "",
            bytes=size,
        )

    def _folded(self, record: VersionRecord) -> list[UpdateLogEntry]:
        now = self._clock()
        return [
            UpdateLogEntry(
                event=UpdateEvent.FOLDED,
                at=now,
                node=c.node,
                update_id=c.update_id,
                base_version=c.base_version,
                version=record.version,
                bytes=c.bytes,
            )
            for c in record.contributions
        ]


def _core_from(checkpoint: Checkpoint, probe: Probe | None) -> AggregatorCore:
    """The core a checkpoint describes, before the write-ahead log is replayed into it."""
    return AggregatorCore(
        run_id=checkpoint.run_id,
        params=checkpoint.params,
        knobs=checkpoint.knobs,
        version=checkpoint.version,
        state=checkpoint.state,
        optimizer_state=checkpoint.optimizer_state(),
        seen=checkpoint.seen,
        seen_by=checkpoint.seen_by,
        counters=checkpoint.counters,
        nodes=checkpoint.nodes,
        norms=checkpoint.norms,
        initial_norm=checkpoint.initial_norm,
        buffered_scales=checkpoint.buffered_scales,
        probe=probe,
        broadcast_view=checkpoint.broadcast_view,
        broadcast_dtype=checkpoint.broadcast_dtype,
    )
