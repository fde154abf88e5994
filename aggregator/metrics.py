"""The aggregator's Prometheus metrics, in a registry of its own, and the endpoint that serves them.

Counters and gauges are read at scrape time from the last :class:`AggregatorStatus` the service
published, so ``/metrics`` and ``aggregator/status`` can never disagree, and counters continue
across restarts (they are checkpointed). Histograms (staleness, fold time, bytes of folded
updates) are observed as versions are made, so they cover this process's lifetime, as Prometheus
expects of histograms. Connected nodes come from the nodes' retained statuses (their Last Will
marks them offline).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client import start_http_server as _start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from common.messages import AggregatorState, AggregatorStatus, NodeState, NodeStatus, VersionRecord

__all__ = ["AggregatorMetrics", "serve_metrics"]

log = logging.getLogger(__name__)

STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)
FOLD_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)
UPDATE_BYTES_BUCKETS = tuple(float(1024 * 4**i) for i in range(11))  # 1 KiB .. 1 GiB


class AggregatorMetrics:
    """Everything ``/metrics`` shows for one aggregator; thread-safe (scrapes run elsewhere)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._lock = threading.Lock()
        self._status: AggregatorStatus | None = None
        self._node_states: dict[str, NodeState] = {}
        self.staleness = Histogram(
            "healthnet_update_staleness",
            "Staleness (versions) of each folded update.",
            buckets=STALENESS_BUCKETS,
            registry=self.registry,
        )
        self.fold_seconds = Histogram(
            "healthnet_fold_seconds",
            "Time to fold one buffer into a new version.",
            buckets=FOLD_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.update_bytes = Histogram(
            "healthnet_folded_update_bytes",
            "Size on the wire of each folded update.",
            buckets=UPDATE_BYTES_BUCKETS,
            registry=self.registry,
        )
        self.versions_published = Counter(
            "healthnet_versions_published",
            "Versions this aggregator process has folded and published.",
            registry=self.registry,
        )
        self.secagg_refused = Counter(
            "healthnet_secagg_refused",
            "Secure aggregation messages (receipts, answers) refused, by kind and reason.",
            ["kind", "reason"],
            registry=self.registry,
        )
        self.registry.register(_StatusCollector(self))
        ProcessCollector(registry=self.registry)

    def observe_status(self, status: AggregatorStatus) -> None:
        with self._lock:
            self._status = status

    def observe_version(self, record: VersionRecord) -> None:
        self.versions_published.inc()
        self.fold_seconds.observe(record.fold_seconds)
        for contribution in record.contributions:
            self.staleness.observe(contribution.staleness)
            self.update_bytes.observe(contribution.bytes)

    def observe_node_status(self, node: str, status: NodeStatus) -> None:
        with self._lock:
            self._node_states[node] = status.state

    def current(self) -> tuple[AggregatorStatus | None, dict[str, NodeState]]:
        with self._lock:
            return self._status, dict(self._node_states)


class _StatusCollector(Collector):
    """Metric families computed from the last published status at each scrape."""

    def __init__(self, metrics: AggregatorMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        status, node_states = self._metrics.current()
        connected = GaugeMetricFamily(
            "healthnet_nodes_connected", "Nodes whose retained status is not offline."
        )
        connected.add_metric([], sum(s is not NodeState.OFFLINE for s in node_states.values()))
        node_up = GaugeMetricFamily(
            "healthnet_node_connected", "1 while the node's status is not offline.", labels=["node"]
        )
        for node, state in sorted(node_states.items()):
            node_up.add_metric([node], float(state is not NodeState.OFFLINE))
        yield connected
        yield node_up
        if status is None:
            return
        yield from _status_families(status)


def _status_families(status: AggregatorStatus) -> Iterator[Metric]:
    info = GaugeMetricFamily("healthnet_run_info", "The run being served.", labels=["run_id"])
    info.add_metric([status.run_id], 1)
    yield info
    state = GaugeMetricFamily("healthnet_run_state", "1 for the run's state.", labels=["state"])
    for candidate in AggregatorState:
        state.add_metric([candidate.value], float(candidate is status.state))
    yield state
    yield GaugeMetricFamily("healthnet_model_version", "Current global version.", status.version)
    yield GaugeMetricFamily(
        "healthnet_buffer_fill", "Updates waiting to be folded.", status.buffer_fill
    )
    yield GaugeMetricFamily(
        "healthnet_buffer_size", "Updates per version (K).", status.knobs.buffer_size
    )
    yield GaugeMetricFamily(
        "healthnet_budgets_spent",
        "1 when every hospital that could train has spent its privacy budget.",
        float(status.budgets_spent),
    )
    c = status.counters
    yield CounterMetricFamily("healthnet_updates_received", "Update messages received.", c.received)
    yield CounterMetricFamily(
        "healthnet_updates_duplicate", "Redelivered updates acknowledged again.", c.duplicates
    )
    yield CounterMetricFamily(
        "healthnet_received_bytes", "Bytes of update messages received.", c.bytes_received
    )
    yield CounterMetricFamily(
        "healthnet_probe_failures",
        "Folds refused because the version's outputs on the probe batch were not finite.",
        c.probe_failures,
    )
    yield CounterMetricFamily("healthnet_rollbacks", "Versions made by a rollback.", c.rollbacks)
    accepted = CounterMetricFamily(
        "healthnet_node_updates_accepted", "Updates accepted, by node.", labels=["node"]
    )
    folded = CounterMetricFamily(
        "healthnet_node_updates_folded", "Updates folded into a version, by node.", labels=["node"]
    )
    discarded = CounterMetricFamily(
        "healthnet_node_updates_discarded",
        "Accepted updates dropped with a batch that could not become a version, by node.",
        labels=["node"],
    )
    rejected = CounterMetricFamily(
        "healthnet_node_updates_rejected",
        "Updates rejected, by node and reason.",
        labels=["node", "reason"],
    )
    node_bytes = CounterMetricFamily(
        "healthnet_node_received_bytes", "Bytes of update messages, by node.", labels=["node"]
    )
    accuracy = GaugeMetricFamily(
        "healthnet_node_eval_accuracy",
        "The node's test accuracy on its latest evaluated version.",
        labels=["node"],
    )
    eval_version = GaugeMetricFamily(
        "healthnet_node_eval_version", "The version of that evaluation.", labels=["node"]
    )
    personal = GaugeMetricFamily(
        "healthnet_node_personal_accuracy",
        "The node's personal model on its test split, with that evaluation (personalisation).",
        labels=["node"],
    )
    last_seen = GaugeMetricFamily(
        "healthnet_node_last_update_timestamp_seconds",
        "When the node's last update arrived (aggregator clock).",
        labels=["node"],
    )
    epsilon = GaugeMetricFamily(
        "healthnet_node_epsilon",
        "The privacy loss (epsilon) the node last reported from its ledger, under DP.",
        labels=["node"],
    )
    budget = GaugeMetricFamily(
        "healthnet_node_epsilon_budget",
        "The epsilon budget the node trains under, under DP.",
        labels=["node"],
    )
    for entry in status.nodes:
        accepted.add_metric([entry.node], entry.accepted)
        folded.add_metric([entry.node], entry.folded)
        discarded.add_metric([entry.node], entry.discarded)
        node_bytes.add_metric([entry.node], entry.bytes_received)
        for reason, count in sorted(entry.rejections.items()):
            rejected.add_metric([entry.node, reason], count)
        if entry.eval_accuracy is not None and entry.eval_version is not None:
            accuracy.add_metric([entry.node], entry.eval_accuracy)
            eval_version.add_metric([entry.node], entry.eval_version)
            if entry.eval_personal_accuracy is not None:
                personal.add_metric([entry.node], entry.eval_personal_accuracy)
        if entry.last_seen is not None:
            last_seen.add_metric([entry.node], entry.last_seen)
        if entry.epsilon is not None and entry.epsilon_budget is not None:
            epsilon.add_metric([entry.node], entry.epsilon)
            budget.add_metric([entry.node], entry.epsilon_budget)
    yield from (accepted, folded, discarded, rejected, node_bytes)
    yield from (accuracy, eval_version, personal, last_seen, epsilon, budget)


@contextlib.contextmanager
def serve_metrics(metrics: AggregatorMetrics, host: str, port: int) -> Iterator[str]:
    """Serve ``/metrics`` on ``host:port`` (0: any free port) until the block ends; its URL."""
    server, thread = _start_http_server(port, addr=host, registry=metrics.registry)
    bound_host, bound_port = server.server_address[:2]
    name = bound_host.decode() if isinstance(bound_host, bytes) else bound_host
    url = f"http://{f'[{name}]' if ':' in name else name}:{bound_port}/metrics"
    log.info("metrics at %s", url)
    try:
        yield url
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5.0)
