"""The observer's picture of a live federation, folded from the messages the aggregator and the
nodes already publish: one pure model behind the web dashboard and ``healthnet watch``.

Theory of operation. :class:`Observer` takes typed bodies as they arrive (the retained
``aggregator/status``, each ``versions`` record, every node's retained status and its evaluations)
with the local time of arrival, and :meth:`Observer.snapshot` turns what it holds into a
:class:`Snapshot`, a frozen, JSON-ready value. Nothing here reads a clock or the network.

These choices shape the numbers:

- *Rate* uses local arrival times of the status, never the aggregator's clock, so a dashboard on
  another machine with a skewed clock still reports true versions per minute.
- *Status age* is the time since the status arrived here, when it arrived live. A retained status
  (what a new subscriber is handed) may be hours old: its age is measured from its ``updated_at``
  (the aggregator's clock, never later than our arrival), so a dead aggregator's last word shows
  its age instead of looking fresh.
- *Offline*: the aggregator's Last Will is the status of its connection's start marked OFFLINE.
  Arriving after a status of the same run, it changes only the state: the numbers stay the last
  ones the aggregator published.
- *Last seen* is the age of the node's last update as the aggregator stated it in its status
  (``updated_at - last_seen``, both its clock) plus the status's age.
- *Epsilon* (under differential privacy) is the node's privacy loss against its budget: from the
  node's own retained status when it carries its ledger, else as the aggregator's tally last
  heard it (the node's latest accepted update or status).
- *Accuracy* comes from the nodes' evaluations, and from the node tallies in the status (each node's
  latest evaluation) so a dashboard that may not read the eval topics still draws a point per
  status. Nodes evaluate whichever version is newest when they are free, so they skip versions;
  the mean at version ``v`` is the mean of every hospital's latest accuracy at or before ``v``,
  drawn from the first version by which every hospital has reported once.
- *Personal accuracy* (under personalisation) is the hospital's personal model on the same test
  split, from the same evaluations; a node's row shows it beside the global model's, for the
  same version, and the snapshot the mean over the hospitals that report one.

A status with a new run id starts the picture afresh: records and evaluations of other runs are
dropped.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import TypeVar

from pydantic import BaseModel, ConfigDict

from common.messages import (
    AggregatorState,
    AggregatorStatus,
    Body,
    Counters,
    Evaluation,
    NodeStatus,
    NodeTally,
    VersionRecord,
)
from common.topics import Route, Topic
from common.wire_size import describe_wire_size

__all__ = [
    "AccuracySeries",
    "NodeRow",
    "Observer",
    "RateWindow",
    "Snapshot",
    "VersionRow",
]

RATE_WINDOW_SECONDS = 60.0

V = TypeVar("V")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class NodeRow(_Frozen):
    """One hospital as the operator sees it."""

    node: str
    state: str  # the node's own status (idle, training, paused, offline) or "unknown"
    version: int | None  # the global version the node holds
    lag: int | None  # global version minus the node's
    last_seen_seconds: float | None  # since its last update reached the aggregator
    accepted: int
    rejected: int
    folded: int
    rejections: dict[str, int]
    bytes_sent: int
    last_staleness: int | None
    accuracy: float | None
    eval_version: int | None
    # Under personalisation: the node's personal model at ``eval_version``.
    personal_accuracy: float | None = None
    software: str = ""
    device: str = ""
    # Under DP: the privacy loss the node reported, and its budget (see the module's notes).
    epsilon: float | None = None
    epsilon_budget: float | None = None


class AccuracySeries(_Frozen):
    """Test accuracy by global version: one aligned list per node (None where it skipped one)."""

    versions: tuple[int, ...] = ()
    nodes: dict[str, tuple[float | None, ...]] = {}
    mean: tuple[float | None, ...] = ()


class VersionRow(_Frozen):
    """A summary of one published version."""

    version: int
    created_at: float
    updates: int
    nodes: tuple[str, ...]
    mean_staleness: float
    max_staleness: int
    bytes: int
    fold_seconds: float
    train_loss: float
    reason: str
    # Folded by secure aggregation: the aggregator saw only the weighted sum of the updates.
    secure: bool = False


class Snapshot(_Frozen):
    """Everything the dashboard and ``watch`` show at one moment."""

    federation: str
    generated_at: float
    connected: bool = False
    run_id: str | None = None
    state: str | None = None
    version: int | None = None
    versions_per_minute: float | None = None
    buffer_fill: int = 0
    buffer_size: int | None = None
    # Under DP: every hospital that could still train has spent its privacy budget.
    budgets_spent: bool = False
    knobs: dict[str, object] = {}
    counters: Counters = Counters()
    # The mean accepted update on the wire beside dense float32, in words (common.wire_size).
    update_size: str | None = None
    status_age_seconds: float | None = None
    nodes: tuple[NodeRow, ...] = ()
    accuracy: AccuracySeries = AccuracySeries()
    latest_mean_accuracy: float | None = None
    # Under personalisation: the mean of the hospitals' latest personal accuracies.
    latest_mean_personal_accuracy: float | None = None
    # Folded updates by staleness: index s holds how many had staleness s.
    staleness_counts: tuple[int, ...] = ()
    recent_versions: tuple[VersionRow, ...] = ()
    versions_seen: int = 0


@dataclass(slots=True)
class RateWindow:
    """Versions per minute over the last ``window`` seconds of (local time, version) samples."""

    window: float = RATE_WINDOW_SECONDS
    samples: deque[tuple[float, int]] = field(default_factory=deque)

    def add(self, now: float, version: int) -> None:
        if self.samples and version < self.samples[-1][1]:
            self.samples.clear()  # a rollback or a new run: the old slope means nothing now
        self.samples.append((now, version))
        # Keep one sample older than the window, so the slope spans the whole window.
        while len(self.samples) > 2 and self.samples[1][0] <= now - self.window:
            self.samples.popleft()

    def per_minute(self, now: float) -> float | None:
        if len(self.samples) < 2:
            return None
        (t0, v0), (t1, v1) = self.samples[0], self.samples[-1]
        # A run that stopped publishing decays towards 0 instead of showing its old pace forever.
        span = max(now, t1) - t0
        if span <= 0:
            return None
        return 60.0 * (v1 - v0) / span


@dataclass(slots=True)
class _StatusSeen:
    status: AggregatorStatus
    received_at: float  # local time; for a retained status, when it was published (see above)


class Observer:
    """Folds a federation's messages into a :class:`Snapshot`; one per dashboard or watch."""

    def __init__(
        self, federation: str, *, max_versions: int = 2000, recent_versions: int = 20
    ) -> None:
        self.federation = federation
        self.max_versions = max_versions
        self.recent = recent_versions
        self.connected = False
        self._status: _StatusSeen | None = None
        self._node_status: dict[str, NodeStatus] = {}
        self._records: dict[int, VersionRecord] = {}
        self._evals: dict[str, dict[int, float]] = {}
        self._personal: dict[str, dict[int, float]] = {}
        self._rate = RateWindow()

    @property
    def run_id(self) -> str | None:
        return None if self._status is None else self._status.status.run_id

    def observe(self, topic: Topic, body: Body, now: float, *, retained: bool = False) -> bool:
        """Take one message (``retained``: handed over on subscribing); True when it changed."""
        match body:
            case AggregatorStatus() if topic.route is Route.AGGREGATOR_STATUS:
                self.on_status(body, now, retained=retained)
            case VersionRecord() if topic.route is Route.VERSIONS:
                return self.on_version(body)
            case NodeStatus() if topic.route is Route.NODE_STATUS and topic.node:
                self.on_node_status(topic.node, body)
            case Evaluation() if topic.route is Route.NODE_EVAL and topic.node:
                return self.on_evaluation(topic.node, body)
            case _:
                return False
        return True

    def on_status(self, status: AggregatorStatus, now: float, *, retained: bool = False) -> None:
        if self.run_id is not None and status.run_id != self.run_id:
            self._new_run(status.run_id)
        held = self._status
        if (
            status.state is AggregatorState.OFFLINE
            and held is not None
            and held.status.run_id == status.run_id
        ):
            # A Last Will carries the numbers of its connection's start: keep the newer ones.
            status = held.status.model_copy(update={"state": AggregatorState.OFFLINE})
        as_of = min(now, status.updated_at) if retained else now
        self._status = _StatusSeen(status, as_of)
        self._rate.add(now, status.version)
        for entry in status.nodes:
            if entry.eval_version is not None and entry.eval_accuracy is not None:
                self._add_eval(
                    entry.node,
                    entry.eval_version,
                    entry.eval_accuracy,
                    entry.eval_personal_accuracy,
                )

    def on_version(self, record: VersionRecord) -> bool:
        if self.run_id is not None and record.run_id != self.run_id:
            return False
        self._records[record.version] = record
        _trim(self._records, self.max_versions)
        return True

    def on_node_status(self, node: str, status: NodeStatus) -> None:
        self._node_status[node] = status

    def on_evaluation(self, node: str, evaluation: Evaluation) -> bool:
        if self.run_id is not None and evaluation.run_id != self.run_id:
            return False
        if evaluation.failure:
            return True  # no accuracy to plot: the node could not evaluate this version
        self._add_eval(node, evaluation.version, evaluation.accuracy, evaluation.personal_accuracy)
        return True

    def _add_eval(
        self, node: str, version: int, accuracy: float, personal: float | None = None
    ) -> None:
        series = self._evals.setdefault(node, {})
        series[version] = accuracy
        _trim(series, self.max_versions)
        if personal is not None:
            mine = self._personal.setdefault(node, {})
            mine[version] = personal
            _trim(mine, self.max_versions)

    def _new_run(self, run_id: str) -> None:
        self._records = {v: r for v, r in self._records.items() if r.run_id == run_id}
        self._evals = {}
        self._personal = {}
        self._rate = RateWindow()

    # -- the picture

    def snapshot(self, now: float) -> Snapshot:
        seen = self._status
        accuracy = self._accuracy()
        latest_mean = next((m for m in reversed(accuracy.mean) if m is not None), None)
        nodes = self._nodes(now)
        personal = [row.personal_accuracy for row in nodes if row.personal_accuracy is not None]
        base = Snapshot(
            federation=self.federation,
            generated_at=now,
            connected=self.connected,
            nodes=nodes,
            accuracy=accuracy,
            latest_mean_accuracy=latest_mean,
            latest_mean_personal_accuracy=math.fsum(personal) / len(personal) if personal else None,
            staleness_counts=self._staleness_counts(),
            recent_versions=tuple(
                _version_row(self._records[v]) for v in sorted(self._records)[-self.recent :]
            ),
            versions_seen=len(self._records),
        )
        if seen is None:
            return base
        status = seen.status
        return base.model_copy(
            update={
                "run_id": status.run_id,
                "state": status.state.value,
                "version": status.version,
                "versions_per_minute": self._rate.per_minute(now),
                "buffer_fill": status.buffer_fill,
                "buffer_size": status.knobs.buffer_size,
                "budgets_spent": status.budgets_spent,
                "knobs": status.knobs.model_dump(mode="json"),
                "counters": status.counters,
                "update_size": _update_size(status.counters),
                "status_age_seconds": max(0.0, now - seen.received_at),
            }
        )

    def _nodes(self, now: float) -> tuple[NodeRow, ...]:
        seen = self._status
        tallies = {e.node: e for e in seen.status.nodes} if seen else {}
        global_version = seen.status.version if seen else None
        rows = []
        for node in sorted(set(tallies) | set(self._node_status) | set(self._evals)):
            entry, own = tallies.get(node), self._node_status.get(node)
            version = own.version if own else None
            last_seen = None
            if seen is not None and entry is not None and entry.last_seen is not None:
                age_then = max(0.0, seen.status.updated_at - entry.last_seen)
                last_seen = age_then + max(0.0, now - seen.received_at)
            evals = self._evals.get(node, {})
            eval_version = max(evals) if evals else None
            rows.append(
                NodeRow(
                    node=node,
                    state=own.state.value if own else "unknown",
                    version=version,
                    lag=None
                    if version is None or global_version is None
                    else global_version - version,
                    last_seen_seconds=last_seen,
                    accepted=entry.accepted if entry else 0,
                    rejected=entry.rejected if entry else 0,
                    folded=entry.folded if entry else 0,
                    rejections=dict(entry.rejections) if entry else {},
                    bytes_sent=entry.bytes_received if entry else 0,
                    last_staleness=entry.last_staleness if entry else None,
                    accuracy=None if eval_version is None else evals[eval_version],
                    eval_version=eval_version,
                    personal_accuracy=None
                    if eval_version is None
                    else self._personal.get(node, {}).get(eval_version),
                    software=own.software if own else "",
                    device=own.device if own else "",
                    **_privacy(entry, own),
                )
            )
        return tuple(rows)

    def _accuracy(self) -> AccuracySeries:
        nodes = sorted(self._evals)
        versions = sorted({v for series in self._evals.values() for v in series})
        columns: dict[str, tuple[float | None, ...]] = {
            node: tuple(self._evals[node].get(v) for v in versions) for node in nodes
        }
        latest: dict[str, float] = {}
        mean: list[float | None] = []
        for index in range(len(versions)):
            for node in nodes:
                value = columns[node][index]
                if value is not None:
                    latest[node] = value
            mean.append(
                math.fsum(latest.values()) / len(nodes) if len(latest) == len(nodes) else None
            )
        return AccuracySeries(versions=tuple(versions), nodes=columns, mean=tuple(mean))

    def _staleness_counts(self) -> tuple[int, ...]:
        counts = Counter(c.staleness for r in self._records.values() for c in r.contributions)
        return tuple(counts[s] for s in range(max(counts) + 1)) if counts else ()


def _privacy(entry: NodeTally | None, own: NodeStatus | None) -> dict[str, float | None]:
    """A node's epsilon and budget: its own status's ledger, else the aggregator's tally."""
    if own is not None and own.privacy is not None:
        return {"epsilon": own.privacy.epsilon, "epsilon_budget": own.privacy.epsilon_budget}
    if entry is not None:
        return {"epsilon": entry.epsilon, "epsilon_budget": entry.epsilon_budget}
    return {}


def _update_size(counters: Counters) -> str | None:
    if not counters.accepted or not counters.bytes_accepted:
        return None
    return describe_wire_size(
        counters.bytes_accepted / counters.accepted, counters.raw_bytes_accepted / counters.accepted
    )


def _version_row(record: VersionRecord) -> VersionRow:
    stalenesses = [c.staleness for c in record.contributions] or [0]
    return VersionRow(
        version=record.version,
        created_at=record.created_at,
        updates=len(record.contributions),
        nodes=tuple(c.node for c in record.contributions),
        mean_staleness=math.fsum(stalenesses) / len(stalenesses),
        max_staleness=max(stalenesses),
        bytes=sum(c.bytes for c in record.contributions),
        fold_seconds=record.fold_seconds,
        train_loss=record.train_loss,
        reason=record.reason,
        secure=record.secure_fold_id is not None,
    )


def _trim(by_version: dict[int, V], keep: int) -> None:
    """Drop the oldest versions beyond ``keep`` (a long run must not grow without bound)."""
    excess = len(by_version) - keep
    if excess > 0:
        for version in sorted(by_version)[:excess]:
            del by_version[version]
