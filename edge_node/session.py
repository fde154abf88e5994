"""What a node does next, decided without I/O: which job to start, which update to send when.

Theory of operation. The node follows two retained streams: the model manifest (with its blob) and
the aggregator's status. It evaluates every new global version on its local test split, and trains
at most once per version, only while the run is RUNNING: a node never sends two updates from the
same base, which keeps synchronous FedAvg (K = number of nodes) honest. One job runs at a time off
the MQTT thread; the shell asks :meth:`NodeSession.next_job` whenever something changes. Where the
node stands is a :class:`~edge_node.session_state.Phase`, changed only through its table.

A version that cannot be used (its outputs are not finite) is remembered with the reason
(:meth:`NodeSession.job_failed`) until the next version arrives: the node reports it and waits. An
evaluation that fails that way also rules out training on the version, which would fail the same.

Every update the node has in its outbox is tracked here until its ack
(:class:`~edge_node.session_state.Delivery`): the shell tells the session what it queued and
sent, and when the connection came back; :meth:`NodeSession.sends_due` says what to (re)send now.
Time comes in as an argument; nothing here reads a clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from numpy.typing import NDArray

from common.messages import AggregatorState, Manifest, NodeState
from edge_node.session_state import (
    Delivery,
    DeliveryEvent,
    Gate,
    IllegalTransition,
    Phase,
    WorkEvent,
    advance,
    deliver,
)

__all__ = ["Job", "JobKind", "NodeSession"]


class JobKind(StrEnum):
    EVALUATE = "evaluate"
    TRAIN = "train"


_BUSY = {Phase.EVALUATING: JobKind.EVALUATE, Phase.TRAINING: JobKind.TRAIN}
_START = {JobKind.EVALUATE: WorkEvent.EVALUATE, JobKind.TRAIN: WorkEvent.TRAIN}


@dataclass(frozen=True, slots=True)
class Job:
    kind: JobKind
    manifest: Manifest
    params: Mapping[str, NDArray[np.float32]]


class NodeSession:
    """One node's work and outbox; ``ack_timeout``: seconds before an unacked update is resent."""

    def __init__(self, *, ack_timeout: float) -> None:
        self.aggregator_state: AggregatorState | None = None
        self.run_id: str | None = None
        self._phase = Phase.WAITING_FOR_MODEL
        self._manifest: Manifest | None = None
        self._params: Mapping[str, NDArray[np.float32]] | None = None
        self._trained: tuple[str, int] | None = None
        self._evaluated: tuple[str, int] | None = None
        self._last: JobKind | None = None
        self._failure: tuple[tuple[str, int], str] | None = None
        # A version the node may not train on (privacy), its gate and why.
        self._gate: tuple[tuple[str, int], Gate, str] | None = None
        self._ack_timeout = ack_timeout
        # Update id -> its delivery and when it was last sent (None: not yet), oldest first.
        self._outbox: dict[str, tuple[Delivery, float | None]] = {}

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def manifest(self) -> Manifest | None:
        """The latest version's manifest (None before the first)."""
        return self._manifest

    @property
    def version(self) -> int | None:
        return None if self._manifest is None else self._manifest.version

    @property
    def busy(self) -> JobKind | None:
        return _BUSY.get(self._phase)

    @property
    def failure(self) -> str:
        """Why the current version cannot be used (empty when it can, or is not known yet)."""
        manifest = self._manifest
        if manifest is None:
            return ""
        if self._gate_now() is Gate.REFUSED and self._gate is not None:
            return self._gate[2]
        if self._failure is None:
            return ""
        key, reason = self._failure
        return reason if key == (manifest.run_id, manifest.version) else ""

    @property
    def gate(self) -> Gate:
        """Whether the node may train on the current version (privacy decides; see Gate)."""
        return self._gate_now()

    def on_status(self, state: AggregatorState, run_id: str) -> None:
        self.aggregator_state = state
        self.run_id = run_id
        self._settle()

    def mark_trained(self, run_id: str, version: int) -> None:
        """Remember an update made before a restart, so that version is not trained on again."""
        self._trained = (run_id, version)

    def close_gate(self, run_id: str, version: int, gate: Gate, reason: str) -> None:
        """The node may not train on ``version`` of ``run_id`` (REFUSED or BUDGET_SPENT)."""
        if gate is Gate.OPEN:
            raise IllegalTransition("close_gate needs REFUSED or BUDGET_SPENT")
        self._gate = ((run_id, version), gate, reason)

    def on_model(self, manifest: Manifest, params: Mapping[str, NDArray[np.float32]]) -> None:
        self._phase = advance(self._phase, WorkEvent.MODEL)
        self._manifest = manifest
        self._params = params
        self._settle()

    def next_job(self) -> Job | None:
        """The job to start now, if any; marks the session busy until :meth:`job_done`."""
        if self._phase is not Phase.READY or self._manifest is None or self._params is None:
            return None
        key = (self._manifest.run_id, self._manifest.version)
        may_train = self._trained != key and self._gate_now() is Gate.OPEN and self._may_train()
        may_evaluate = self._evaluated != key
        # Alternate when both are due: versions can arrive faster than a node evaluates, and
        # evaluating first every time would starve training (and training first, evaluation).
        if may_train and (not may_evaluate or self._last is JobKind.EVALUATE):
            return self._start(JobKind.TRAIN)
        if may_evaluate:
            return self._start(JobKind.EVALUATE)
        return None

    def job_done(self, job: Job) -> None:
        """``job`` ended (well or not); raises IllegalTransition if no job was running."""
        self._phase = advance(self._phase, WorkEvent.JOB_DONE)
        key = (job.manifest.run_id, job.manifest.version)
        if job.kind is JobKind.EVALUATE:
            self._evaluated = key
        else:
            self._trained = key
        self._last = job.kind
        self._settle()

    def job_failed(self, job: Job, reason: str) -> None:
        """``job``'s version cannot be used, for ``reason``; do not try it again."""
        self.job_done(job)
        key = (job.manifest.run_id, job.manifest.version)
        self._failure = (key, reason)
        if job.kind is JobKind.EVALUATE:
            self._trained = key

    def node_state(self) -> NodeState:
        if self._phase is Phase.TRAINING:
            return NodeState.TRAINING
        if self._gate_now() is Gate.BUDGET_SPENT:
            return NodeState.BUDGET_SPENT
        if self.aggregator_state in (AggregatorState.PAUSED, AggregatorState.STOPPED):
            return NodeState.PAUSED
        return NodeState.IDLE

    def finished(self) -> bool:
        """The run is over and the node has evaluated the last version it announced."""
        return self._phase is Phase.FINISHED

    # -- the outbox

    @property
    def unacked(self) -> tuple[str, ...]:
        """The updates in the outbox that no ack has answered yet, oldest first."""
        return tuple(self._outbox)

    def delivery(self, update_id: str) -> Delivery | None:
        """Where ``update_id`` stands (None: not in the outbox, or answered)."""
        entry = self._outbox.get(update_id)
        return None if entry is None else entry[0]

    def queue(self, update_id: str) -> None:
        """``update_id`` is in the outbox (just put there, or found there at start)."""
        self._outbox.setdefault(update_id, (Delivery.QUEUED, None))

    def sends_due(self, now: float) -> tuple[str, ...]:
        """The updates to send now: queued ones, and those unacked for ``ack_timeout``."""
        return tuple(
            update_id
            for update_id, (delivery, sent_at) in self._outbox.items()
            if delivery is Delivery.QUEUED
            or (sent_at is not None and now - sent_at >= self._ack_timeout)
        )

    def sent(self, update_id: str, now: float) -> None:
        """``update_id`` was published at ``now``."""
        entry = self._outbox.get(update_id)
        if entry is None:
            raise IllegalTransition(f"update {update_id} is not in the outbox")
        self._outbox[update_id] = (deliver(entry[0], DeliveryEvent.SENT), now)

    def reconnected(self) -> None:
        """The connection is back: the broker may have lost what was sent, so all is due."""
        for update_id, (delivery, sent_at) in list(self._outbox.items()):
            self._outbox[update_id] = (deliver(delivery, DeliveryEvent.RECONNECTED), sent_at)

    def acked(self, update_id: str) -> bool:
        """The aggregator answered ``update_id``; False if it was answered already (or unknown)."""
        entry = self._outbox.pop(update_id, None)
        if entry is None:
            return False
        deliver(entry[0], DeliveryEvent.ACKED)
        return True

    # -- internals

    def _settle(self) -> None:
        """Enter FINISHED when the run is over and nothing is running; leave it when it is not."""
        over = self._run_over()
        if over and self._phase in (Phase.WAITING_FOR_MODEL, Phase.READY):
            self._phase = advance(self._phase, WorkEvent.RUN_OVER)
        elif not over and self._phase is Phase.FINISHED:
            self._phase = advance(self._phase, WorkEvent.RUN_REOPENED)

    def _run_over(self) -> bool:
        """The run is stopped and its last announced version evaluated (or none announced)."""
        if self.aggregator_state is not AggregatorState.STOPPED:
            return False
        manifest = self._manifest
        if manifest is None or manifest.run_id != self.run_id:
            return manifest is None
        return self._evaluated == (manifest.run_id, manifest.version)

    def _gate_now(self) -> Gate:
        manifest = self._manifest
        if self._gate is None or manifest is None:
            return Gate.OPEN
        key, gate, _ = self._gate
        return gate if key == (manifest.run_id, manifest.version) else Gate.OPEN

    def _may_train(self) -> bool:
        manifest = self._manifest
        return (
            self.aggregator_state is AggregatorState.RUNNING
            and manifest is not None
            and manifest.run_id == self.run_id
        )

    def _start(self, kind: JobKind) -> Job:
        manifest, params = self._manifest, self._params
        if manifest is None or params is None:
            raise RuntimeError("no model to work on")  # next_job checked this already
        self._phase = advance(self._phase, _START[kind])
        return Job(kind, manifest, params)
