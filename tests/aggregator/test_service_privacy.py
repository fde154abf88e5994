"""Specification of the aggregator service under a privacy policy, on a real Mosquitto: the epsilon
that its status, versions log and /metrics show is what the nodes reported, and what it does once
its hospitals have spent their budgets."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from prometheus_client import generate_latest

from common.codec import encode, envelope
from common.messages import (
    AggregatorState,
    AggregatorStatus,
    ControlCommand,
    Knobs,
    NodeState,
    NodeStatus,
    PrivacyPolicy,
    PrivacySpend,
    RejectReason,
    Update,
)
from tests.aggregator.test_metrics import samples
from tests.aggregator.test_service import WAIT, Aggregator, Peer, assert_rejected, restart
from tests.samples import privacy_spend

pytestmark = [pytest.mark.broker, pytest.mark.timeout(60)]

POLICY = PrivacyPolicy(noise_multiplier=1.1, delta=1e-5, epsilon_budget=4.0)


def spend(epsilon: float, versions: int = 1, budget: float = 4.0) -> PrivacySpend:
    return privacy_spend(
        epsilon=epsilon,
        epsilon_budget=budget,
        noise_multiplier=1.1,
        sample_rate=0.2,
        steps=5 * versions,
        versions=versions,
    )


def private(node: Peer, base_version: int, privacy: PrivacySpend | None) -> Update:
    return node.update(base_version).model_copy(update={"privacy": privacy})


def report(
    node: Peer, privacy: PrivacySpend, state: NodeState = NodeState.IDLE, version: int = 0
) -> None:
    """Publish the node's retained status with its ledger, as the node itself would."""
    status = NodeStatus(state=state, version=version, privacy=privacy)
    body = envelope(status, sender=node.name, sent_at=0.0)
    node.client.publish(node.tree.node_status(node.name), encode(body), wait=WAIT)


def epsilon_of(status: AggregatorStatus, node: str) -> tuple[float | None, float | None]:
    entry = next((e for e in status.nodes if e.node == node), None)
    return (None, None) if entry is None else (entry.epsilon, entry.epsilon_budget)


def scrape(aggregator: Aggregator) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return samples(generate_latest(aggregator.service.metrics.registry).decode())


@pytest.fixture
def dp(start: Callable[..., Aggregator], node: Peer) -> Aggregator:
    aggregator = start(knobs=Knobs(buffer_size=2, privacy=POLICY))
    node.aggregator = aggregator
    node.model(0)
    return aggregator


def test_the_manifest_carries_the_policy_and_a_short_update_is_refused(
    dp: Aggregator, node: Peer
) -> None:
    """Nodes read the policy from the manifest; an update without a spend hears privacy_policy."""
    manifest, _ = node.model(0)
    assert manifest.privacy == POLICY
    bare = private(node, 0, None)
    node.publish(bare)
    assert_rejected(node, bare, RejectReason.PRIVACY_POLICY)
    assert "carries no privacy spend" in node.ack(bare.update_id).detail


def test_status_versions_and_metrics_show_the_epsilon_the_node_reported(
    dp: Aggregator, node: Peer
) -> None:
    """Updates bring the epsilon into the version record and the tally; the node's status, later,
    moves the tally on; /metrics shows the same figures as the status it is read from."""
    node.send(private(node, 0, spend(0.8, versions=1)))
    node.send(private(node, 0, spend(1.5, versions=2)))
    record = node.record(1)
    assert [c.epsilon for c in record.contributions] == [0.8, 1.5]
    status = node.status(lambda s: s.version == 1, "v1")
    assert epsilon_of(status, "n1") == (1.5, 4.0)

    report(node, spend(2.25, versions=3, budget=3.5))
    status = node.status(lambda s: epsilon_of(s, "n1")[0] == 2.25, "the status's epsilon")
    assert epsilon_of(status, "n1") == (2.25, 3.5)
    deadline = time.monotonic() + WAIT
    while scrape(dp).get(("healthnet_node_epsilon", (("node", "n1"),))) != 2.25:
        assert time.monotonic() < deadline, "/metrics never showed the status's epsilon"
        node.pump(0.05)
    got = scrape(dp)
    assert got[("healthnet_node_epsilon_budget", (("node", "n1"),))] == 3.5


def test_the_epsilon_survives_a_restart(
    start: Callable[..., Aggregator], dp: Aggregator, node: Peer
) -> None:
    """The tallies are checkpointed: a new aggregator on the same state dir shows the epsilon."""
    node.send(private(node, 0, spend(1.25)))
    assert node.control(ControlCommand.PAUSE).ok  # a checkpoint with the tally in it
    status = restart(node, start, dp)
    assert epsilon_of(status, "n1") == (1.25, 4.0)


def test_a_laxer_policy_set_live_is_refused_with_its_reason(dp: Aggregator, node: Peer) -> None:
    reply = node.control(ControlCommand.SET, **{"privacy.epsilon_budget": 10.0})
    assert not reply.ok
    assert "never laxer" in reply.message
    assert reply.status is not None
    assert reply.status.knobs.privacy == POLICY
    stricter = node.control(ControlCommand.SET, **{"privacy.epsilon_budget": 2.0})
    assert stricter.ok, stricter.message
    assert stricter.status is not None
    assert stricter.status.knobs.privacy == POLICY.model_copy(update={"epsilon_budget": 2.0})


def test_spent_budgets_fold_the_charged_update_and_the_status_says_so(
    dp: Aggregator, node: Peer
) -> None:
    """K = 2 and the only hospital says BUDGET_SPENT with one update buffered: nothing can fill
    the buffer, so it folds as v1 (the update was charged to the hospital's ledger), and the
    status says every budget is spent, the run still up for the last evaluations."""
    node.send(private(node, 0, spend(3.5)))
    report(node, spend(3.5), NodeState.BUDGET_SPENT)
    record = node.record(1)
    assert record.reason == "budgets_spent"
    assert [c.node for c in record.contributions] == ["n1"]
    status = node.status(lambda s: s.budgets_spent and s.version == 1, "budgets spent at v1")
    assert (status.state, status.buffer_fill) == (AggregatorState.RUNNING, 0)
    assert [(e.node, e.budget_spent) for e in status.nodes] == [("n1", True)]
