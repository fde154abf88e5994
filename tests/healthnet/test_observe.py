"""Specification of the observer's picture, driven by plain message objects (no broker)."""

from __future__ import annotations

import pytest

from common.messages import (
    AggregatorState,
    Body,
    Counters,
    Evaluation,
    NodeState,
    NodeStatus,
    NodeTally,
    PrivacySpend,
    VersionRecord,
)
from common.topics import TopicTree
from healthnet.observe import Observer, RateWindow
from tests.samples import RUN, privacy_spend, record, status

FED = "fed"
TREE = TopicTree(FED)


def evaluation(version: int, accuracy: float, run_id: str = RUN) -> Evaluation:
    return Evaluation(
        run_id=run_id, version=version, loss=0.4, accuracy=accuracy, correct=1, num_examples=2
    )


def feed(observer: Observer, node: str, *bodies: Body, now: float = 0.0) -> None:
    for body in bodies:
        match body:
            case Evaluation():
                topic = TREE.node_eval(node)
            case NodeStatus():
                topic = TREE.node_status(node)
            case VersionRecord():
                topic = TREE.versions()
            case _:
                topic = TREE.aggregator_status()
        observer.observe(topic, body, now)


def test_an_empty_observer_shows_the_federation_and_nothing_else() -> None:
    """Before any message the snapshot names the federation and holds no run, nodes or points."""
    snap = Observer(FED).snapshot(now=5.0)
    assert (snap.federation, snap.run_id, snap.version, snap.nodes) == (FED, None, None, ())
    assert snap.accuracy.versions == ()
    assert snap.staleness_counts == ()


def test_status_sets_version_buffer_knobs_and_counters() -> None:
    """The aggregator's status gives the headline: state, version, buffer fill of K, counters."""
    observer = Observer(FED)
    observer.on_status(status(4, buffer_fill=2), now=10.0)
    snap = observer.snapshot(now=10.5)
    assert (snap.run_id, snap.state, snap.version) == (RUN, "running", 4)
    assert (snap.buffer_fill, snap.buffer_size) == (2, 3)
    assert snap.knobs["buffer_size"] == 3
    assert snap.counters.accepted == 6
    assert snap.status_age_seconds == pytest.approx(0.5)
    assert snap.budgets_spent is False


def test_the_snapshot_says_when_every_privacy_budget_is_spent() -> None:
    observer = Observer(FED)
    observer.on_status(status(4).model_copy(update={"budgets_spent": True}), now=10.0)
    assert observer.snapshot(now=10.5).budgets_spent is True


def test_node_table_joins_tallies_and_node_status() -> None:
    """A row per node: its own state and version, lag, and counts and bytes from its tally."""
    observer = Observer(FED)
    ledger = (
        NodeTally(
            node="a",
            accepted=5,
            rejected=2,
            folded=4,
            rejections={"stale": 2},
            bytes_received=900,
            last_seen=95.0,
            last_staleness=1,
        ),
    )
    observer.on_status(status(10, updated_at=100.0, nodes=ledger), now=1000.0)
    feed(observer, "a", NodeStatus(state=NodeState.TRAINING, version=7, software="x"))
    feed(observer, "b", NodeStatus(state=NodeState.OFFLINE, version=3))
    a, b = observer.snapshot(now=1002.0).nodes
    assert (a.node, a.state, a.version, a.lag) == ("a", "training", 7, 3)
    assert (a.accepted, a.rejected, a.folded, a.bytes_sent) == (5, 2, 4, 900)
    assert a.rejections == {"stale": 2}
    assert a.last_staleness == 1
    # 5 s old when the aggregator said so, and that status arrived 2 s ago: clocks never mixed.
    assert a.last_seen_seconds == pytest.approx(7.0)
    assert (b.node, b.state, b.lag, b.accepted, b.last_seen_seconds) == ("b", "offline", 7, 0, None)


def test_accuracy_series_are_aligned_by_version_with_gaps() -> None:
    """Each node's accuracies line up on the union of versions; a skipped version is None."""
    observer = Observer(FED)
    feed(observer, "a", evaluation(0, 0.5), evaluation(2, 0.7))
    feed(observer, "b", evaluation(1, 0.6))
    series = observer.snapshot(now=0).accuracy
    assert series.versions == (0, 1, 2)
    assert series.nodes == {"a": (0.5, None, 0.7), "b": (None, 0.6, None)}


def test_mean_uses_each_hospitals_latest_accuracy_once_all_have_reported() -> None:
    """The mean starts when every node has an evaluation and carries each one's latest forward."""
    observer = Observer(FED)
    feed(observer, "a", evaluation(0, 0.5), evaluation(2, 0.9))
    feed(observer, "b", evaluation(1, 0.7))
    snap = observer.snapshot(now=0)
    assert snap.accuracy.mean == (None, pytest.approx(0.6), pytest.approx(0.8))
    assert snap.latest_mean_accuracy == pytest.approx(0.8)
    assert {n.node: (n.accuracy, n.eval_version) for n in snap.nodes} == {
        "a": (0.9, 2),
        "b": (0.7, 1),
    }


def test_tallied_evaluations_give_points_without_the_eval_topics() -> None:
    """A status alone (an identity that may not read evals) still draws each node's latest point."""
    observer = Observer(FED)
    ledger = (NodeTally(node="a", eval_version=3, eval_accuracy=0.75),)
    observer.on_status(status(3, nodes=ledger), now=0)
    assert observer.snapshot(now=0).accuracy.nodes == {"a": (0.75,)}


def test_staleness_histogram_counts_every_folded_update() -> None:
    """Index s counts the folded updates of staleness s; a record received twice counts once."""
    observer = Observer(FED)
    feed(observer, "", record(1, 0, 0), record(2, 0, 3), record(2, 0, 3))
    assert observer.snapshot(now=0).staleness_counts == (3, 0, 0, 1)


def test_recent_versions_summarise_the_newest_records() -> None:
    """The newest versions, oldest first, with update count, staleness and bytes."""
    observer = Observer(FED, recent_versions=2)
    feed(observer, "", record(1, 0), record(2, 1, 3), record(3, 2))
    rows = observer.snapshot(now=0).recent_versions
    assert [r.version for r in rows] == [2, 3]
    assert (rows[0].updates, rows[0].mean_staleness, rows[0].max_staleness) == (2, 2.0, 3)
    assert rows[0].bytes == 201
    assert rows[0].nodes == ("n0", "n1")
    assert rows[0].secure is False


def test_a_securely_aggregated_version_says_so() -> None:
    """A version record with a secure fold id is marked secure in the recent versions."""
    observer = Observer(FED)
    secure = record(2, 0).model_copy(update={"secure_fold_id": "fold-2"})
    feed(observer, "", record(1, 0), secure)
    rows = observer.snapshot(now=0).recent_versions
    assert [(r.version, r.secure) for r in rows] == [(1, False), (2, True)]


def test_history_is_bounded() -> None:
    """Only the newest max_versions versions are kept, so a long run cannot exhaust memory."""
    observer = Observer(FED, max_versions=3)
    for version in range(10):
        feed(observer, "a", record(version, 0), evaluation(version, 0.5))
    snap = observer.snapshot(now=0)
    assert snap.versions_seen == 3
    assert snap.accuracy.versions == (7, 8, 9)


def test_a_new_run_starts_the_picture_afresh() -> None:
    """A status with another run id drops the old run's records and evaluations."""
    observer = Observer(FED)
    observer.on_status(status(5), now=0)
    feed(observer, "a", record(5, 0), evaluation(5, 0.8))
    observer.on_status(status(0, run_id="run-2"), now=1)
    snap = observer.snapshot(now=1)
    assert (snap.run_id, snap.versions_seen, snap.accuracy.versions) == ("run-2", 0, ())


def test_messages_of_another_run_are_ignored() -> None:
    """Records and evaluations carrying a run id other than the status's change nothing."""
    observer = Observer(FED)
    observer.on_status(status(1), now=0)
    assert not observer.on_version(record(2, 0, run_id="old"))
    assert not observer.on_evaluation("a", evaluation(2, 0.9, run_id="old"))
    assert observer.snapshot(now=0).versions_seen == 0


def test_a_body_on_the_wrong_route_is_ignored() -> None:
    """An evaluation that arrives on the versions topic is not taken for anything."""
    observer = Observer(FED)
    assert not observer.observe(TREE.versions(), evaluation(0, 0.5), 0.0)
    assert observer.snapshot(now=0).accuracy.versions == ()


@pytest.mark.parametrize(
    ("samples", "now", "expected"),
    [
        pytest.param([(0.0, 0), (30.0, 10)], 30.0, 20.0, id="steady"),
        pytest.param([(0.0, 0), (30.0, 10)], 60.0, 10.0, id="decays-when-nothing-new"),
        pytest.param([(0.0, 0)], 10.0, None, id="one-sample"),
        pytest.param([(0.0, 50), (10.0, 2), (20.0, 4)], 20.0, 12.0, id="restart-after-rollback"),
    ],
)
def test_rate_is_versions_per_minute_over_local_arrival_times(
    samples: list[tuple[float, int]], now: float, expected: float | None
) -> None:
    """The rate is the slope of version over local time; it decays once versions stop."""
    window = RateWindow()
    for at, version in samples:
        window.add(at, version)
    assert window.per_minute(now) == (None if expected is None else pytest.approx(expected))


def test_rate_window_forgets_samples_older_than_the_window() -> None:
    """Only the last window (and one sample before it) shapes the rate."""
    window = RateWindow(window=60.0)
    window.add(0.0, 0)
    for t in range(100, 200, 10):
        window.add(float(t), t)  # one version per second from t = 100
    assert window.per_minute(190.0) == pytest.approx(60.0)


def test_a_live_status_ages_from_its_arrival_and_a_retained_one_from_its_updated_at() -> None:
    """A retained status handed over on subscribing shows how old it was when it was published."""
    live, retained = Observer(FED), Observer(FED)
    live.observe(TREE.aggregator_status(), status(4, updated_at=100.0), 1000.0)
    retained.observe(TREE.aggregator_status(), status(4, updated_at=100.0), 1000.0, retained=True)
    assert live.snapshot(now=1010.0).status_age_seconds == pytest.approx(10.0)
    assert retained.snapshot(now=1010.0).status_age_seconds == pytest.approx(910.0)


def test_a_retained_status_from_a_clock_ahead_of_ours_is_no_younger_than_zero() -> None:
    """An aggregator clock ahead of ours makes the status as fresh as its arrival, not negative."""
    observer = Observer(FED)
    observer.observe(TREE.aggregator_status(), status(4, updated_at=2000.0), 1000.0, retained=True)
    assert observer.snapshot(now=1003.0).status_age_seconds == pytest.approx(3.0)


def test_an_offline_will_changes_the_state_and_keeps_the_last_numbers() -> None:
    """The Last Will (made when the aggregator connected, at v2) does not take the picture back."""
    observer = Observer(FED)
    observer.on_status(status(9, updated_at=500.0, buffer_fill=2), now=500.0)
    will = status(2, updated_at=100.0, buffer_fill=0).model_copy(
        update={"state": AggregatorState.OFFLINE}
    )
    observer.on_status(will, now=520.0)
    snap = observer.snapshot(now=530.0)
    assert (snap.state, snap.version, snap.buffer_fill) == ("offline", 9, 2)
    assert snap.status_age_seconds == pytest.approx(10.0)


def test_the_update_size_names_wire_and_dense_bytes_the_right_way_round() -> None:
    """Accepted updates larger on the wire than dense are said to be larger, with both counts."""
    observer = Observer(FED)
    counters = Counters(accepted=3, bytes_accepted=3 * 559, raw_bytes_accepted=3 * 112)
    observer.on_status(status(1).model_copy(update={"counters": counters}), now=1.0)
    assert observer.snapshot(now=1.0).update_size == (
        "559 bytes on the wire, 112 as dense float32 (5.0x larger than dense)"
    )
    assert Observer(FED).snapshot(now=1.0).update_size is None


def _ledger(epsilon: float, budget: float) -> PrivacySpend:
    return privacy_spend(epsilon=epsilon, epsilon_budget=budget, steps=20, versions=2)


def test_each_row_shows_the_epsilon_the_node_reported_against_its_budget() -> None:
    """The node's own status carries its ledger; without one, the aggregator's tally speaks."""
    observer = Observer(FED)
    ledger = (
        NodeTally(node="a", epsilon=0.5, epsilon_budget=3.0),
        NodeTally(node="b", epsilon=1.25, epsilon_budget=2.0),
        NodeTally(node="c"),
    )
    observer.on_status(status(3, nodes=ledger), now=100.0)
    feed(observer, "a", NodeStatus(state=NodeState.BUDGET_SPENT, privacy=_ledger(2.999, 3.0)))
    feed(observer, "b", NodeStatus(state=NodeState.IDLE))
    a, b, c = observer.snapshot(now=101.0).nodes
    assert (a.state, a.epsilon, a.epsilon_budget) == ("budget_spent", 2.999, 3.0)
    assert (b.epsilon, b.epsilon_budget) == (1.25, 2.0)
    assert (c.epsilon, c.epsilon_budget) == (None, None)


def test_each_row_shows_the_personal_accuracy_beside_the_global_one() -> None:
    """Under personalisation a row holds the personal model's accuracy at the row's evaluated
    version, from the node's evaluation or the aggregator's tally; the snapshot their mean."""
    observer = Observer("fed")
    tree = TopicTree("fed")
    tallies = (
        NodeTally(node="b", eval_version=3, eval_accuracy=0.7, eval_personal_accuracy=0.9),
        NodeTally(node="c", eval_version=3, eval_accuracy=0.6),
    )
    observer.on_status(status(3, nodes=tallies), now=1.0)
    personal = evaluation(4, 0.75).model_copy(
        update={"personal_loss": 0.3, "personal_accuracy": 0.8}
    )
    observer.observe(tree.node_eval("a"), personal, 2.0)
    observer.observe(tree.node_eval("c"), evaluation(4, 0.65), 2.0)
    snap = observer.snapshot(now=3.0)
    rows = {row.node: row for row in snap.nodes}
    got = {n: (r.eval_version, r.accuracy, r.personal_accuracy) for n, r in rows.items()}
    assert got == {"a": (4, 0.75, 0.8), "b": (3, 0.7, 0.9), "c": (4, 0.65, None)}
    assert snap.latest_mean_personal_accuracy == pytest.approx(0.85)
    assert Observer("fed").snapshot(now=0.0).latest_mean_personal_accuracy is None
