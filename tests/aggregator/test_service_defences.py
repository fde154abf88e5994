"""The aggregator's validation rules and poisoning defences, one by one, through the service.

Every hostile update is acknowledged with its reason and counted for its node; the model never
sees it, and the next valid updates still fold. (The rules covered by test_service.py, such as
non-finite values, shapes, staleness and size, are not repeated here.)
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from common.codec import encode, encode_record, envelope
from common.compression import compress
from common.messages import (
    AggregationRule,
    Compression,
    ControlCommand,
    ControlReply,
    ControlRequest,
    NormPolicy,
    Quantization,
    RejectReason,
)
from common.topics import TopicTree
from tests.aggregator.test_service import SHAPES, WAIT, Aggregator, Peer, assert_rejected
from tests.brokers import EmbeddedBroker

pytestmark = [pytest.mark.broker, pytest.mark.timeout(60)]


@pytest.fixture
def other(mosquitto: EmbeddedBroker, tree: TopicTree, running: Aggregator) -> Iterator[Peer]:
    """A second hospital, n2, on the same federation."""
    peer = Peer(mosquitto.url, tree, "n2")
    peer.aggregator = running
    with peer.client:
        peer.model(0)
        yield peer


def control_node(peer: Peer, command: ControlCommand, target: str) -> ControlReply:
    """Send a quarantine or readmit request for ``target`` and return its reply."""
    request = ControlRequest(request_id=uuid.uuid4().hex, command=command, node=target)
    env = envelope(request, sender="operator", sent_at=time.time())
    peer.client.publish(peer.tree.control_requests(), encode(env), wait=WAIT)
    return peer.reply(request.request_id)


def tallied_rejections(node: Peer, name: str, reason: RejectReason) -> None:
    node.status(
        lambda s: any(e.node == name and e.rejections.get(reason.value) == 1 for e in s.nodes),
        f"{reason.value} counted for {name}",
    )


# msgpack of [2, "update", "x", "y", 0.0, {}]: a well-formed envelope of schema version 2.
SCHEMA_2 = b"\x96\x02\xa6update\xa1x\xa1y\xcb" + bytes(8) + b"\x80"


def test_unknown_schema_version_and_non_envelopes_are_malformed(
    running: Aggregator, node: Peer
) -> None:
    """An envelope of a schema version we do not speak, and a body outside any envelope, are
    dropped and counted as malformed."""
    node.publish_raw(SCHEMA_2)
    node.publish_raw(encode_record(ControlRequest(request_id="r", command=ControlCommand.STOP)))
    node.status(lambda s: s.counters.rejections.get("malformed") == 2, "two malformed")
    node.fold_next(0)


def test_a_delta_compressed_less_than_the_run_asks_is_rejected(
    start: Callable[..., Aggregator], node: Peer
) -> None:
    """The run asks for int8: float16 values are rejected as compression_policy, int8 folds."""
    policy = Compression(quantization=Quantization.INT8)
    node.aggregator = start(knobs={"buffer_size": 1, "compression": policy})
    node.model(0)
    delta = {n: np.full(s, 0.01, np.float32) for n, s in SHAPES.items()}
    loose = compress(delta, Compression(quantization=Quantization.FP16)).tensors
    update = node.update(0, tensors=loose)
    node.publish(update)
    assert_rejected(node, update, RejectReason.COMPRESSION_POLICY)
    assert "float16" in node.ack(update.update_id).detail
    node.send(node.update(0, tensors=compress(delta, policy).tensors))
    node.model(1)


def test_update_of_another_run_is_rejected(running: Aggregator, node: Peer) -> None:
    """An update naming another run id is rejected as wrong_run."""
    update = node.update(0).model_copy(update={"run_id": "another-run"})
    node.publish(update)
    assert_rejected(node, update, RejectReason.WRONG_RUN)
    node.fold_next(0)


def test_another_nodes_update_id_is_a_replay(running: Aggregator, node: Peer, other: Peer) -> None:
    """n2 sending an update with the id n1's accepted update has is rejected as replay."""
    first = node.update(0)
    node.send(first)
    other.publish(first)
    ack = other.ack(first.update_id)
    assert (ack.accepted, ack.reason) == (False, RejectReason.REPLAY)
    tallied_rejections(node, "n2", RejectReason.REPLAY)
    node.send(node.update(0))
    record = node.record(1)
    assert [c.node for c in record.contributions] == ["n1", "n1"]


def test_a_rejected_update_resent_is_a_replay(running: Aggregator, node: Peer) -> None:
    """Resending a rejected update id gets a replay rejection, not a second judgement."""
    update = node.update(7)
    node.publish(update)
    assert_rejected(node, update, RejectReason.FUTURE_VERSION)
    node.publish(update)
    second = node.ack(update.update_id, count=2)
    assert (second.accepted, second.reason) == (False, RejectReason.REPLAY)


def test_norm_bound_rejects_a_large_update(start: Callable[..., Aggregator], node: Peer) -> None:
    """With max_update_norm and the reject policy, a larger update is rejected as norm_bound."""
    node.aggregator = start(knobs={"buffer_size": 2, "max_update_norm": 0.5})
    node.model(0)
    update = node.update(0, value=10.0)
    node.publish(update)
    assert_rejected(node, update, RejectReason.NORM_BOUND)
    node.fold_next(0)


def test_norm_bound_clips_a_large_update(start: Callable[..., Aggregator], node: Peer) -> None:
    """With the clip policy, a large update is accepted, scaled to the bound, and counted."""
    node.aggregator = start(
        knobs={"buffer_size": 2, "max_update_norm": 0.5, "norm_policy": NormPolicy.CLIP}
    )
    _, v0 = node.model(0)
    big = node.update(0, value=10.0)
    node.publish(big)
    ack = node.ack(big.update_id)
    assert ack.accepted
    assert "clipped" in ack.detail
    node.send(node.update(0, value=0.0))
    _, v1 = node.model(1)
    change = np.sqrt(sum(float(np.sum((v1[n] - v0[n]) ** 2)) for n in SHAPES))
    assert change == pytest.approx(0.25, rel=1e-4)  # the mean of the clipped 0.5 and 0
    node.status(lambda s: s.counters.clipped == 1, "one clipped update")


def test_too_many_samples_are_rejected(start: Callable[..., Aggregator], node: Peer) -> None:
    """An update claiming more samples than max_num_samples is rejected as sample_count."""
    node.aggregator = start(knobs={"buffer_size": 2, "max_num_samples": 100})
    node.model(0)
    update = node.update(0).model_copy(update={"num_samples": 10**9})
    node.publish(update)
    assert_rejected(node, update, RejectReason.SAMPLE_COUNT)
    node.fold_next(0)


def test_a_flood_from_one_base_version_is_rate_limited(
    start: Callable[..., Aggregator], node: Peer
) -> None:
    """With one_update_per_version, a node's second update from the same base is rejected."""
    node.aggregator = start(knobs={"buffer_size": 2, "one_update_per_version": True})
    node.model(0)
    node.send(node.update(0))
    flood = node.update(0)
    node.publish(flood)
    assert_rejected(node, flood, RejectReason.RATE_LIMITED)
    node.status(lambda s: s.buffer_fill == 1, "only the first update buffered")


def test_quarantine_rejects_a_node_until_readmitted_and_survives_restart(
    start: Callable[..., Aggregator], running: Aggregator, node: Peer
) -> None:
    """An operator quarantines n1: its buffered update is dropped and new ones are rejected as
    quarantined, also after a restart; readmit lets it back in."""
    buffered = node.update(0)
    node.send(buffered)
    reply = control_node(node, ControlCommand.QUARANTINE, "n1")
    assert reply.ok, reply.message
    assert "1 buffered" in reply.message
    assert reply.status is not None
    assert reply.status.buffer_fill == 0
    refused = node.update(0)
    node.publish(refused)
    assert_rejected(node, refused, RejectReason.QUARANTINED)

    running.stop()
    node.aggregator = start()
    since = node.aggregator.started_at
    status = node.status(lambda s: s.updated_at >= since, "the restarted aggregator")
    assert [e.quarantined for e in status.nodes if e.node == "n1"] == [True]
    after_restart = node.update(0)
    node.publish(after_restart)
    ack = node.ack(after_restart.update_id)
    assert ack.reason is RejectReason.QUARANTINED

    again = control_node(node, ControlCommand.QUARANTINE, "n1")
    assert (again.ok, again.message) == (False, "node 'n1' is already quarantined")
    assert control_node(node, ControlCommand.READMIT, "n1").ok
    node.fold_next(0)


def test_median_aggregation_keeps_a_poisoned_update_out_of_the_model(
    running: Aggregator, node: Peer, other: Peer
) -> None:
    """Set live to the median of a buffer of three, a 1000x update does not move the model."""
    reply = node.control(
        ControlCommand.SET, aggregation=AggregationRule.MEDIAN.value, buffer_size=3
    )
    assert reply.ok, reply.message
    _, v0 = node.model(0)
    node.send(node.update(0, value=0.01))
    node.send(node.update(0, value=0.01))
    other.send(other.update(0, value=1000.0))
    _, v1 = node.model(1)
    for name in SHAPES:
        np.testing.assert_allclose(v1[name], v0[name] + 0.01, rtol=1e-5)


def test_the_default_trimmed_mean_trims_a_poisoned_update_and_refuses_a_buffer_of_two(
    running: Aggregator, node: Peer, other: Peer
) -> None:
    """`set aggregation=trimmed_mean` alone (buffer_size 2: nothing to trim) is refused; with
    buffer_size 4 and the default trim_fraction, a 1000x update among four does not move the
    model."""
    refused = node.control(ControlCommand.SET, aggregation=AggregationRule.TRIMMED_MEAN.value)
    assert not refused.ok
    assert "trims nothing" in refused.message
    reply = node.control(
        ControlCommand.SET, aggregation=AggregationRule.TRIMMED_MEAN.value, buffer_size=4
    )
    assert reply.ok, reply.message
    assert reply.status is not None
    assert reply.status.knobs.trim_fraction == 0.1
    _, v0 = node.model(0)
    for _ in range(3):
        node.send(node.update(0, value=0.01))
    other.send(other.update(0, value=1000.0))
    _, v1 = node.model(1)
    for name in SHAPES:
        np.testing.assert_allclose(v1[name], v0[name] + 0.01, rtol=1e-5)
