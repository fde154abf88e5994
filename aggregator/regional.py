"""A regional aggregator's decisions: validate, log, combine and hand upstream; no MQTT.

Theory of operation. :class:`RegionalCombiner` joins three parts that exist on their own: an
:class:`~aggregator.core.AggregatorCore` that validates the region's hospitals' updates exactly as
the core does (it follows the core's versions with :meth:`~AggregatorCore.follow` and never folds;
its knobs are the core's, with the region's buffer size and timeout), the durable
:class:`~aggregator.regional_store.RegionalStore`, and the combine rule of
:mod:`aggregator.combine`. A shell that owns the connections calls it:

* :meth:`~RegionalCombiner.receive` for each hospital update: when it returns an accepted verdict
  the update is in the write-ahead log, and the shell may ack the hospital (and the broker);
* :meth:`~RegionalCombiner.combine_due` after each update and on the buffer's timer: a combined
  update to publish to the core, already in the outbox;
* :meth:`~RegionalCombiner.core_acked` for each ack the core sends the region;
* :meth:`~RegionalCombiner.open` once at start: finishes what a crash cut short and returns the
  outbox to resend.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from aggregator.aggregation import StalenessPolicy
from aggregator.combine import Combination, combine
from aggregator.core import AggregatorCore, BufferedUpdate, Verdict
from aggregator.regional_store import RegionalStore
from aggregator.store import WalEntry
from common.codec import encode, envelope
from common.inbound import Decoded, Fault, decode_body
from common.messages import Ack, TrainMetrics, Update

__all__ = ["RegionalCombiner", "Upstream"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Upstream:
    """A combined update's message, to publish on the region's update topic at the core."""

    update_id: str
    payload: bytes


class RegionalCombiner:
    """One region's combiner; ``node_id`` is its identity at the core (its update topic)."""

    def __init__(
        self,
        *,
        region: str,
        node_id: str,
        validator: AggregatorCore,
        store: RegionalStore,
        max_bytes: int,
    ) -> None:
        self.region = region
        self.node_id = node_id
        self.validator = validator
        self.store = store
        self.max_bytes = max_bytes
        self._metrics: dict[str, TrainMetrics] = {}

    def open(self, now: float) -> list[Upstream]:
        """Recover: commit the combinations a crash left without a message, buffer again what
        was accepted and not combined, and return the combined updates to (re)send."""
        recovery = self.store.open()
        for uid, entries in recovery.rebuild:
            for entry in entries:
                self._restore(entry, now)
            combination = self._combine(self.validator.take(len(entries)))
            if combination.update.update_id != uid:
                raise RuntimeError(f"combined update {uid} came back as another combination")
            self.store.commit(uid, combination.constituents, self._encode(combination, now))
        for entry in recovery.pending:
            self._restore(entry, now)
        return [Upstream(uid, payload) for uid, payload in self.store.unacked()]

    def close(self) -> None:
        self.store.close()

    def receive(
        self, node: str, sender: str, update: Update, payload: bytes, now: float
    ) -> Verdict:
        """Judge a hospital's update; an accepted one is durably logged before this returns."""
        if self.store.known(update.update_id):
            return Verdict(accepted=True, duplicate=True, detail="already accepted")
        verdict = self.validator.receive(node, sender, update, len(payload), now)
        if verdict.accepted and not verdict.duplicate:
            self.store.accept(node, update.update_id, payload)
            self._metrics[update.update_id] = update.metrics
        return verdict

    def combine_due(self, now: float) -> Upstream | None:
        """Combine the oldest buffered updates if the buffer is full or timed out, commit the
        result and return it to publish; None when nothing is due."""
        if self.validator.fold_due(now) is None:
            return None
        size = min(self.validator.knobs.buffer_size, len(self.validator.buffer))
        combination = self._combine(self.validator.take(size))
        payload = self._encode(combination, now)
        self.store.commit(combination.update.update_id, combination.constituents, payload)
        log.info(
            "region %s combined %d updates from base v%d into %s",
            self.region,
            len(combination.constituents),
            combination.update.base_version,
            combination.update.update_id,
        )
        return Upstream(combination.update.update_id, payload)

    def core_acked(self, ack: Ack) -> bool:
        """The core's verdict on a combined update: it leaves the outbox. False if unknown."""
        if ack.accepted:
            detail = "accepted"
        else:
            reason = ack.reason.value if ack.reason is not None else "refused"
            detail = f"{reason}: {ack.detail}"
            log.warning(
                "the core refused %s (%d hospital updates): %s",
                ack.update_id,
                len(self.store.constituents(ack.update_id)),
                detail,
            )
        return self.store.acked(ack.update_id, detail)

    def _restore(self, entry: WalEntry, now: float) -> None:
        payload = entry.payload
        match decode_body(Update, payload, max_bytes=self.max_bytes):
            case Fault(detail=detail):
                # Written whole and fsynced before its ack: only damage to the disk gets here.
                raise RuntimeError(f"WAL entry {entry.path.name} is not an update: {detail}")
            case Decoded(body=update):
                pass
        self.validator.restore_buffered(entry.node, update, len(payload), now, count=True)
        self._metrics[update.update_id] = update.metrics

    def _combine(self, batch: tuple[BufferedUpdate, ...]) -> Combination:
        knobs = self.validator.knobs
        return combine(
            batch,
            [self._metrics.pop(u.update_id) for u in batch],
            region=self.region,
            run_id=self.validator.run_id,
            shapes={name: p.shape for name, p in self.validator.params.items()},
            policy=StalenessPolicy(knobs.staleness, knobs.staleness_a, knobs.staleness_b),
            sample_exponent=knobs.sample_exponent,
            compression=knobs.compression,
        )

    def _encode(self, combination: Combination, now: float) -> bytes:
        return encode(envelope(combination.update, sender=self.node_id, sent_at=now))
