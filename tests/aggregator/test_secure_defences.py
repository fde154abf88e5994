"""The aggregator as `healthnet deploy init` configures it, on the Mosquitto those files configure:
it defends itself against a legitimate hospital out of the box, and its per-node view and
Prometheus metrics work through the generated ACL."""

from __future__ import annotations

import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from aggregator.settings import AggregatorSettings
from common.codec import encode, envelope
from common.messages import NodeState, NodeStatus, RejectReason
from common.topics import TopicTree
from tests.aggregator.test_metrics import Samples, samples
from tests.aggregator.test_service import MODEL, SHAPES, WAIT, Aggregator, Peer, assert_rejected
from tests.secure import AuthMode, SecureBroker, secure_broker

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]

FLOAT32_HUGE = 3e38  # near float32's largest value: one such update makes the model unusable


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[SecureBroker]:
    federation = f"def{uuid.uuid4().hex[:8]}"
    with secure_broker(tmp_path, auth=AuthMode.PASSWORD, federation=federation) as b:
        yield b


@pytest.fixture
def aggregator(broker: SecureBroker, tmp_path: Path) -> Iterator[Aggregator]:
    """The aggregator with its generated env file; only the model and local paths are ours."""
    settings = AggregatorSettings(
        _env_file=broker.deployment.env_files["aggregator"],  # type: ignore[call-arg]
        state_dir=tmp_path / "aggregator",
        run_id=f"run-{broker.federation}",
        model=MODEL,
        status_interval=0.2,
        connect_timeout=WAIT,
        metrics_port=0,
    )
    running = Aggregator(settings)
    yield running
    running.stop()


def hospital(broker: SecureBroker, aggregator: Aggregator, name: str) -> Peer:
    """A hospital of the deployment, connected with its own generated credentials."""
    peer = Peer("", TopicTree(broker.federation), name, client=broker.client(name))
    peer.aggregator = aggregator
    return peer


def test_a_legitimate_hospital_cannot_poison_a_generated_deployment(
    broker: SecureBroker, aggregator: Aggregator
) -> None:
    """cleveland, with its real certificate, sends an update of 3e38-sized values claiming 10^6
    samples, then the same values claiming 10: the first is refused as sample_count, the second
    as norm_bound (before any other update is known), and the next version is exactly the
    honest hospitals' mean."""
    knobs = aggregator.settings.knobs
    assert (knobs.max_num_samples, knobs.norm_multiplier) == (100_000, 10.0)
    attacker = hospital(broker, aggregator, "cleveland")
    honest = hospital(broker, aggregator, "hungarian")
    with attacker.client, honest.client:
        _, v0 = attacker.model(0)
        huge = {name: np.full(shape, FLOAT32_HUGE, np.float32) for name, shape in SHAPES.items()}
        inflated = attacker.update(0, delta=huge).model_copy(update={"num_samples": 10**6})
        attacker.publish(inflated)
        assert_rejected(attacker, inflated, RejectReason.SAMPLE_COUNT)
        blown_up = attacker.update(0, delta=huge)
        attacker.publish(blown_up)
        assert_rejected(attacker, blown_up, RejectReason.NORM_BOUND)
        assert "warm-up" in attacker.ack(blown_up.update_id).detail

        honest.send(honest.update(0, value=0.01))
        attacker.send(attacker.update(0, value=0.03))
        _, v1 = honest.model(1)
        for name in SHAPES:
            np.testing.assert_allclose(v1[name], v0[name] + 0.02, rtol=1e-5)
        status = honest.status(lambda s: s.version == 1, "v1 in the status")
        (entry,) = [e for e in status.nodes if e.node == "cleveland"]
        assert entry.rejections == {"sample_count": 1, "norm_bound": 1}


def scrape_until(aggregator: Aggregator, check: Callable[[Samples], bool], what: str) -> Samples:
    """Scrape /metrics until ``check`` holds, at most WAIT seconds."""
    deadline = time.monotonic() + WAIT
    got: Samples = {}
    while time.monotonic() < deadline:
        aggregator.check_alive()
        url = aggregator.service.metrics_url
        if url is not None:
            with urllib.request.urlopen(url, timeout=WAIT) as response:  # noqa: S310 - loopback
                got = samples(response.read().decode())
            if check(got):
                return got
        time.sleep(0.1)
    raise AssertionError(f"/metrics never showed {what}; last scrape: {got}")


def node_up(node: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return ("healthnet_node_connected", (("node", node),))


def test_the_per_node_connection_view_and_metrics_work_through_the_generated_acl(
    broker: SecureBroker, aggregator: Aggregator
) -> None:
    """Hospitals' retained statuses reach the aggregator on the secure broker: /metrics shows
    each hospital connected, then cleveland offline, and counts its rejected update."""
    peers = [hospital(broker, aggregator, name) for name in ("cleveland", "hungarian")]
    for peer in peers:
        peer.client.start()
    try:
        for peer in peers:
            peer.model(0)
            body = envelope(NodeStatus(state=NodeState.IDLE), sender=peer.name, sent_at=0.0)
            peer.client.publish(peer.tree.node_status(peer.name), encode(body), wait=WAIT)
        scrape_until(
            aggregator,
            lambda s: s.get(("healthnet_nodes_connected", ())) == 2,
            "two connected hospitals",
        )
        cleveland = peers[0]
        offline = envelope(NodeStatus(state=NodeState.OFFLINE), sender="cleveland", sent_at=0.0)
        cleveland.client.publish(cleveland.tree.node_status("cleveland"), encode(offline))
        late = cleveland.update(7)
        cleveland.publish(late)
        assert_rejected(cleveland, late, RejectReason.FUTURE_VERSION)
        got = scrape_until(
            aggregator,
            lambda s: s.get(node_up("cleveland")) == 0 and s.get(node_up("hungarian")) == 1,
            "cleveland offline, hungarian connected",
        )
        rejected = (
            "healthnet_node_updates_rejected_total",
            (("node", "cleveland"), ("reason", "future_version")),
        )
        assert got[rejected] == 1
        assert got[("healthnet_nodes_connected", ())] == 1
    finally:
        for peer in peers:
            peer.client.clear_retained(peer.tree.node_status(peer.name))
            peer.client.close()
