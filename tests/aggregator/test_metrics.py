"""Specification of the Prometheus view: families parsed back with Prometheus's own text parser."""

from __future__ import annotations

import urllib.request

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from aggregator.metrics import AggregatorMetrics, serve_metrics
from common.messages import NodeState, NodeStatus, NodeTally
from tests.samples import record, status

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    """(sample name, sorted labels) -> value, for every sample of a scrape."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(metrics: AggregatorMetrics) -> Samples:
    return samples(generate_latest(metrics.registry).decode())


def test_counters_and_gauges_come_from_the_published_status() -> None:
    """Version, buffer, run state and every per-node counter equal the status they come from."""
    metrics = AggregatorMetrics()
    ledger = (
        NodeTally(
            node="a",
            accepted=4,
            rejected=2,
            folded=3,
            rejections={"stale": 1, "non_finite": 1},
            bytes_received=600,
            last_seen=99.0,
            eval_version=5,
            eval_accuracy=0.8,
        ),
    )
    metrics.observe_status(status(6, nodes=ledger, buffer_fill=1))
    got = scrape(metrics)
    assert got[("healthnet_model_version", ())] == 6
    assert got[("healthnet_buffer_fill", ())] == 1
    assert got[("healthnet_buffer_size", ())] == 3
    assert got[("healthnet_run_state", (("state", "running"),))] == 1
    assert got[("healthnet_run_state", (("state", "paused"),))] == 0
    assert got[("healthnet_run_info", (("run_id", "run-1"),))] == 1
    assert got[("healthnet_updates_received_total", ())] == 7
    assert got[("healthnet_received_bytes_total", ())] == 700
    node = (("node", "a"),)
    assert got[("healthnet_node_updates_accepted_total", node)] == 4
    assert got[("healthnet_node_updates_folded_total", node)] == 3
    assert got[("healthnet_node_received_bytes_total", node)] == 600
    assert got[("healthnet_node_updates_rejected_total", (("node", "a"), ("reason", "stale")))] == 1
    assert got[("healthnet_node_eval_accuracy", node)] == 0.8
    assert got[("healthnet_node_last_update_timestamp_seconds", node)] == 99.0


def test_histograms_observe_every_folded_update() -> None:
    """Each version adds its updates' staleness and bytes and its fold time to the histograms."""
    metrics = AggregatorMetrics()
    metrics.observe_version(record(1, 0, 3))
    metrics.observe_version(record(2, 5))
    got = scrape(metrics)
    assert got[("healthnet_versions_published_total", ())] == 2
    assert got[("healthnet_update_staleness_count", ())] == 3
    assert got[("healthnet_update_staleness_sum", ())] == 8
    assert got[("healthnet_update_staleness_bucket", (("le", "0.0"),))] == 1
    assert got[("healthnet_update_staleness_bucket", (("le", "4.0"),))] == 2
    assert got[("healthnet_fold_seconds_count", ())] == 2
    assert got[("healthnet_folded_update_bytes_sum", ())] == 100 + 101 + 100


def test_connected_nodes_follow_their_retained_status() -> None:
    """A node counts as connected until its status (or its Last Will) says offline."""
    metrics = AggregatorMetrics()
    metrics.observe_node_status("a", NodeStatus(state=NodeState.TRAINING))
    metrics.observe_node_status("b", NodeStatus(state=NodeState.IDLE))
    metrics.observe_node_status("b", NodeStatus(state=NodeState.OFFLINE))
    got = scrape(metrics)
    assert got[("healthnet_nodes_connected", ())] == 1
    assert got[("healthnet_node_connected", (("node", "b"),))] == 0


def test_before_any_status_only_the_process_view_is_served() -> None:
    """With no status yet there is no version family, and the scrape still parses."""
    got = scrape(AggregatorMetrics())
    assert ("healthnet_model_version", ()) not in got
    assert got[("healthnet_nodes_connected", ())] == 0


def test_two_aggregators_in_one_process_keep_separate_registries() -> None:
    """No global registry: one aggregator's numbers never appear in another's scrape."""
    first, second = AggregatorMetrics(), AggregatorMetrics()
    first.observe_status(status(9))
    assert ("healthnet_model_version", ()) not in scrape(second)


def test_the_endpoint_serves_the_registry_on_loopback() -> None:
    """serve_metrics binds 127.0.0.1 on a free port and answers with the text format."""
    metrics = AggregatorMetrics()
    metrics.observe_status(status(3))
    with serve_metrics(metrics, "127.0.0.1", 0) as url:
        assert url.startswith("http://127.0.0.1:")
        assert url.endswith("/metrics")
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - our own loopback URL
            text = response.read().decode()
    assert samples(text)[("healthnet_model_version", ())] == 3


def test_epsilon_and_budget_are_gauges_of_the_nodes_that_report_them() -> None:
    """Each node's epsilon and budget come from the status's tallies; a node without DP has none."""
    metrics = AggregatorMetrics()
    ledger = (
        NodeTally(node="a", epsilon=1.75, epsilon_budget=3.0),
        NodeTally(node="b"),
    )
    metrics.observe_status(status(2, nodes=ledger))
    got = scrape(metrics)
    assert got[("healthnet_node_epsilon", (("node", "a"),))] == 1.75
    assert got[("healthnet_node_epsilon_budget", (("node", "a"),))] == 3.0
    assert ("healthnet_node_epsilon", (("node", "b"),)) not in got


def test_spent_budgets_are_a_gauge() -> None:
    """1 once every hospital that could train has spent its budget, else 0."""
    metrics = AggregatorMetrics()
    metrics.observe_status(status(2))
    assert scrape(metrics)[("healthnet_budgets_spent", ())] == 0
    metrics.observe_status(status(3).model_copy(update={"budgets_spent": True}))
    assert scrape(metrics)[("healthnet_budgets_spent", ())] == 1


def test_the_personal_accuracy_is_a_gauge_beside_the_global_one() -> None:
    """A node that reports a personal model gets a personal accuracy gauge; one without, none."""
    metrics = AggregatorMetrics()
    tallies = (
        NodeTally(node="a", eval_version=4, eval_accuracy=0.75, eval_personal_accuracy=0.85),
        NodeTally(node="b", eval_version=4, eval_accuracy=0.7),
    )
    metrics.observe_status(status(4, nodes=tallies))
    got = scrape(metrics)
    assert got[("healthnet_node_eval_accuracy", (("node", "a"),))] == 0.75
    assert got[("healthnet_node_personal_accuracy", (("node", "a"),))] == 0.85
    assert ("healthnet_node_personal_accuracy", (("node", "b"),)) not in got
