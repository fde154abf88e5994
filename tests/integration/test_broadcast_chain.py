"""The broadcast chain across an aggregator crash: SIGKILL mid-chain, restart, the chain goes on
from the same view, and a node that followed it before the crash follows it after, never forked."""

from __future__ import annotations

import signal
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from common.messages import AggregatorState, AggregatorStatus
from common.topics import Route, TopicTree
from healthnet.broker import EmbeddedBroker
from healthnet.demo import aggregator_settings
from healthnet.federations import HEART_DISEASE
from healthnet.processes import ProcessGroup
from tests.aggregator.test_service import Peer
from tests.aggregator.test_service_broadcast import CHAIN, Follower, assert_holds

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(240)]

WAIT = 90.0  # the aggregator imports torch first, on a machine that may be busy
SHAPES = {"1.weight": (2, 13), "1.bias": (2,)}  # the heart-disease logreg


def step(node: Peer, version: int, rng: np.random.Generator) -> None:
    """One update from ``version``; buffer_size 1 folds it into the next version."""
    delta = {n: rng.normal(0, 0.05, s).astype(np.float32) for n, s in SHAPES.items()}
    node.send(node.update(version, delta=delta))
    node.record(version + 1, timeout=WAIT)


def test_the_chain_survives_an_aggregator_sigkill_without_forking(
    mosquitto: EmbeddedBroker, tmp_path: Path
) -> None:
    """kill -9 after v3 (its last checkpoint is v0, so v1-v3 are folded again from the WAL): the
    restarted aggregator's delta to v4 names the view the node holds, the node takes v4 to v6
    from deltas alone, and every version's logged sha256 is the one the node held."""
    tree = TopicTree(f"chain-{uuid.uuid4().hex[:12]}")
    state_dir = tmp_path / "aggregator"
    settings = aggregator_settings(
        broker_url=mosquitto.url,
        federation_id=tree.federation,
        state_dir=state_dir,
        federation=HEART_DISEASE,
        buffer_size=1,
        max_staleness=100,
        checkpoint_every=10,
    )
    settings = settings.model_copy(
        update={"knobs": settings.knobs.model_copy(update={"broadcast_compression": CHAIN})}
    )
    rng = np.random.default_rng(0)
    node = Peer(mosquitto.url, tree, "n1")
    follower = Follower(mosquitto.url, tree, "steady")
    with ProcessGroup(tmp_path / "logs") as group, node.client, follower:
        first = group.start_service("aggregator", settings)
        try:
            node.wait_for(lambda: node.models.get(0), "model v0", timeout=WAIT)
        except AssertionError:
            raise AssertionError(first.tail()) from None
        follower.wait_version(0)
        for version in range(3):
            step(node, version, rng)
        follower.wait_version(3)
        first.signal(signal.SIGKILL)
        assert first.wait(30) is not None
        killed_at = time.time()
        second = group.start_service("aggregator-again", settings)

        def back() -> AggregatorStatus | None:
            statuses = node.of(Route.AGGREGATOR_STATUS, AggregatorStatus)
            return next(
                (
                    s
                    for s in reversed(statuses)
                    if s.state is AggregatorState.RUNNING and s.updated_at > killed_at
                ),
                None,
            )

        try:
            resumed = node.wait_for(back, "a running status after the restart", timeout=WAIT)
        except AssertionError:
            raise AssertionError(second.tail()) from None
        assert resumed.version == 3
        for version in range(3, 6):
            step(node, version, rng)
        follower.wait_version(6)
    assert_holds(follower, state_dir, 6)
    chain = follower.chain
    assert (chain.snapshots, chain.applied, chain.refused) == (1, 6, 0)
    assert [m.version for m in follower.held] == list(range(7))
    logs = list(state_dir.glob("versions.jsonl"))
    assert logs
    from aggregator.store import StateStore

    records = list(StateStore(state_dir).versions_backwards())[::-1]
    assert [r.version for r in records] == list(range(1, 7))  # one record per version: no fork
    for manifest in follower.held[1:]:
        assert records[manifest.version - 1].model_sha256 == manifest.sha256
