"""A federation without a broker: node sessions and the aggregator core, talking in encoded bytes.

In the manner of h11's tests, the pure cores are wired to each other in memory. What travels is
what MQTT would carry: topic names from the topic tree and encoded envelopes, the model as the
manifest and chunks the core broadcasts, updates as the node's own upload code seals them. The
loop below does what the two services do with each message, minus the broker, the disks and the
clocks: time is a number the test moves on. Training is real (logistic regression on three
heart-disease hospitals), and one update is lost on the way, so the node's resend is exercised.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from numpy.typing import NDArray

from aggregator.core import AggregatorCore, Discard, Fold
from common.blobs import ModelDownload
from common.codec import decode, decode_tensors, encode, envelope
from common.messages import (
    Ack,
    AggregatorState,
    AggregatorStatus,
    Body,
    ControlCommand,
    Evaluation,
    Knobs,
    Manifest,
    ModelSpec,
    Update,
)
from common.models import build_model, model_params
from common.topics import Route, Topic, TopicTree
from edge_node.datasets import load_dataset
from edge_node.session import Job, JobKind, NodeSession
from edge_node.training import evaluate, train
from edge_node.upload import compress_delta, seal_upload

TREE = TopicTree("sansio")
MODEL = ModelSpec(name="logreg", kwargs={"in_features": 13, "num_classes": 2})
HOSPITALS = ("cleveland", "hungarian", "va")
VERSIONS = 4
ACK_TIMEOUT = 30.0
# How far time moves on each turn of the loop: an update lost on one turn is due again on the
# next, ahead of the update the node trains then (the aggregator takes one per base version).
TICK = ACK_TIMEOUT
CHUNK_SIZE = 64  # small, so that every version travels in several chunks
CPU = torch.device("cpu")

Params = Mapping[str, NDArray[np.float32]]


@dataclass(frozen=True, slots=True)
class Packet:
    """One MQTT message: a topic name and its payload."""

    topic: str
    payload: bytes


def packet(topic: Topic, body: Body, *, sender: str, now: float) -> Packet:
    return Packet(str(topic), encode(envelope(body, sender=sender, sent_at=now)))


def body_of(payload: bytes, kind: type[Body]) -> Body:
    body = decode(payload).body
    assert isinstance(body, kind), f"{type(body).__name__} where {kind.__name__} was due"
    return body


@dataclass(frozen=True, slots=True)
class Version:
    """A fold as the aggregator end saw it: the weights it started from, and what it made."""

    before: dict[str, NDArray[np.float32]]
    fold: Fold


class AggregatorEnd:
    """What the aggregator service does with each message, on the core, in bytes."""

    def __init__(self, knobs: Knobs) -> None:
        params = model_params(build_model(MODEL, seed=0))
        self.core = AggregatorCore(run_id="run-sansio", params=params, knobs=knobs)
        self.core.command(ControlCommand.START)
        self.versions: list[Version] = []

    def announce(self, now: float) -> list[Packet]:
        """The current version's chunks, then its manifest, then the run's status."""
        broadcast = self.core.broadcast(model=MODEL, chunk_size=CHUNK_SIZE, now=now)
        version = self.core.version
        chunks = [
            Packet(str(TREE.chunk(version, i)), chunk) for i, chunk in enumerate(broadcast.chunks)
        ]
        return [
            *chunks,
            packet(TREE.manifest(), broadcast.manifest, sender="aggregator", now=now),
            packet(TREE.aggregator_status(), self.core.status(now), sender="aggregator", now=now),
        ]

    def receive(self, message: Packet, now: float) -> list[Packet]:
        topic = TREE.parse(message.topic)
        match topic.route:
            case Route.UPDATE:
                return self._on_update(topic.node or "", message.payload, now)
            case Route.NODE_EVAL:
                env = decode(message.payload)
                assert isinstance(env.body, Evaluation)
                self.core.record_evaluation(env.sender, env.body)
                return []
            case _:
                raise AssertionError(f"nothing sends {message.topic} to the aggregator here")

    def _on_update(self, node: str, payload: bytes, now: float) -> list[Packet]:
        env = decode(payload)
        update = env.body
        assert isinstance(update, Update)
        verdict = self.core.receive(node, env.sender, update, len(payload), now)
        ack = Ack(
            update_id=update.update_id,
            accepted=verdict.accepted,
            reason=verdict.reason,
            detail=verdict.detail,
            current_version=self.core.version,
        )
        return [packet(TREE.ack(node), ack, sender="aggregator", now=now), *self._fold(now)]

    def _fold(self, now: float) -> list[Packet]:
        out: list[Packet] = []
        while self.core.fold_due(now) is not None:
            before = dict(self.core.params)
            result = self.core.fold(now)
            assert not isinstance(result, Discard), result.detail
            self.versions.append(Version(before, result))
            out += self.announce(now)
        return out


@dataclass
class NodeEnd:
    """What the node service does with each message, on its session, in bytes."""

    node_id: str
    session: NodeSession = field(init=False)
    download: ModelDownload = field(init=False)
    outbox: dict[str, bytes] = field(default_factory=dict)
    acks: dict[str, Ack] = field(default_factory=dict)
    # What this node computed and sent, to check the aggregator against: update id -> (base
    # version, samples, dense delta); and how many times each went on the wire.
    deltas: dict[str, tuple[int, int, dict[str, NDArray[np.float32]]]] = field(default_factory=dict)
    sends: dict[str, int] = field(default_factory=dict)
    params: dict[str, NDArray[np.float32]] = field(default_factory=dict)
    manifest: Manifest | None = None

    def __post_init__(self) -> None:
        self.session = NodeSession(ack_timeout=ACK_TIMEOUT)
        self.download = ModelDownload(max_blob_bytes=1 << 20)
        self.data = load_dataset(f"heart-disease:{self.node_id}")
        self.model = build_model(MODEL)

    def receive(self, message: Packet) -> None:
        topic = TREE.parse(message.topic)
        match topic.route:
            case Route.CHUNK:
                self.download.on_chunk(topic.version or 0, topic.chunk or 0, message.payload)
            case Route.MANIFEST:
                manifest = body_of(message.payload, Manifest)
                assert isinstance(manifest, Manifest)
                self.download.on_manifest(manifest)
            case Route.AGGREGATOR_STATUS:
                status = body_of(message.payload, AggregatorStatus)
                assert isinstance(status, AggregatorStatus)
                self.session.on_status(status.state, status.run_id)
            case Route.ACK if topic.node == self.node_id:
                ack = body_of(message.payload, Ack)
                assert isinstance(ack, Ack)
                self.acks[ack.update_id] = ack
                if self.session.acked(ack.update_id):
                    del self.outbox[ack.update_id]
            case _:
                pass  # another node's ack: its subscription, not ours
        self._take_model()

    def _take_model(self) -> None:
        ready = self.download.take()
        if ready is not None:
            self.manifest, blob = ready
            self.params = {
                name: np.asarray(array, dtype=np.float32)
                for name, array in decode_tensors(blob).items()
            }
            self.session.on_model(self.manifest, self.params)

    def work(self, now: float) -> list[Packet]:
        """Run every job the session asks for, then send what it says is due."""
        out: list[Packet] = []
        while (job := self.session.next_job()) is not None:
            if job.kind is JobKind.EVALUATE:
                out.append(self._evaluate(job, now))
            else:
                self._train(job, now)
        for update_id in self.session.sends_due(now):
            out.append(Packet(str(TREE.update(self.node_id)), self.outbox[update_id]))
            self.session.sent(update_id, now)
            self.sends[update_id] = self.sends.get(update_id, 0) + 1
        return out

    def _evaluate(self, job: Job, now: float) -> Packet:
        result = evaluate(self.model, job.params, self.data.test_x, self.data.test_y, device=CPU)
        self.session.job_done(job)
        evaluation = Evaluation(
            run_id=job.manifest.run_id,
            version=job.manifest.version,
            loss=result.loss,
            accuracy=result.accuracy,
            correct=result.correct,
            num_examples=result.num_examples,
        )
        return packet(TREE.node_eval(self.node_id), evaluation, sender=self.node_id, now=now)

    def _train(self, job: Job, now: float) -> None:
        config, version = job.manifest.training, job.manifest.version
        x, y = self.data.train_x, self.data.train_y
        result = train(self.model, job.params, x, y, config, seed=version, device=CPU)
        self.session.job_done(job)
        policy = job.manifest.compression
        compressed = compress_delta(job, result, policy, None)
        update_id = f"{self.node_id}-v{version}"
        upload = seal_upload(
            job,
            result,
            compressed,
            policy=policy,
            node_id=self.node_id,
            update_id=update_id,
            encode_seconds=0.0,
            now=now,
        )
        delta = {name: result.params[name] - base for name, base in job.params.items()}
        self.deltas[update_id] = (version, result.num_samples, delta)
        self.outbox[update_id] = upload.payload
        self.session.queue(update_id)


@dataclass
class Federation:
    aggregator: AggregatorEnd
    nodes: list[NodeEnd]
    lost: set[str]  # the topics whose first message the wire loses
    turns: int = 0

    def run(self, *, max_turns: int = 60) -> None:
        """Deliver, work and fold until the run is over, every node has finished and every
        update is answered."""
        now = 0.0
        to_nodes = self.aggregator.announce(now)
        while not self._done():
            self.turns += 1
            assert self.turns <= max_turns, "the federation never finished"
            for node in self.nodes:
                for message in to_nodes:
                    node.receive(message)
            to_aggregator = [m for node in self.nodes for m in node.work(now)]
            to_nodes = [
                reply
                for message in self._through_the_wire(to_aggregator)
                for reply in self.aggregator.receive(message, now)
            ]
            now += TICK

    def _through_the_wire(self, messages: Iterable[Packet]) -> list[Packet]:
        delivered = []
        for message in messages:
            if message.topic in self.lost:
                self.lost.discard(message.topic)
                continue
            delivered.append(message)
        return delivered

    def _done(self) -> bool:
        return self.aggregator.core.state is AggregatorState.STOPPED and all(
            node.session.finished() and not node.session.unacked for node in self.nodes
        )


def expected_version(
    version: Version, nodes: list[NodeEnd], knobs: Knobs
) -> dict[str, NDArray[np.float64]]:
    """The weights the aggregation rule gives: x + lr * sum(c_i * delta_i), with c_i =
    n_i^beta * (1 + s_i)^(-a) / sum(n_j^beta) (a stale update moves the model less), from what
    the nodes themselves computed and sent."""
    sent = {uid: d for node in nodes for uid, d in node.deltas.items()}
    made = version.fold.version
    contributions = version.fold.record.contributions
    batch = [sent[c.update_id] for c in contributions]
    samples = [float(n) ** knobs.sample_exponent for _, n, _ in batch]
    coefficients = [
        a * (1.0 + (made - 1 - base)) ** -knobs.staleness_a / sum(samples)
        for a, (base, _, _) in zip(samples, batch, strict=True)
    ]
    for contribution, coefficient in zip(contributions, coefficients, strict=True):
        assert contribution.weight == pytest.approx(coefficient, rel=1e-9)
    return {
        name: before.astype(np.float64)
        + knobs.server_lr
        * sum(
            c * d[name].astype(np.float64) for c, (_, _, d) in zip(coefficients, batch, strict=True)
        )
        for name, before in version.before.items()
    }


@pytest.mark.parametrize(
    "dtype", [pytest.param("float32", id="float32"), pytest.param("float16", id="float16")]
)
def test_a_federation_runs_to_its_last_version_over_encoded_bytes_without_a_broker(
    dtype: str,
) -> None:
    """Three hospitals train on each version the core broadcasts; every update is acked (a lost
    one after its resend), every version is the aggregation rule applied to what the nodes sent,
    and the run stops at max_versions with each node having evaluated the last version."""
    knobs = Knobs(buffer_size=2, max_versions=VERSIONS, max_staleness=10, broadcast_dtype=dtype)
    aggregator = AggregatorEnd(knobs)
    nodes = [NodeEnd(hospital) for hospital in HOSPITALS]
    lost = str(TREE.update("va"))
    federation = Federation(aggregator, nodes, lost={lost})
    federation.run()

    core = aggregator.core
    assert (core.version, core.state) == (VERSIONS, AggregatorState.STOPPED)
    assert [v.fold.version for v in aggregator.versions] == list(range(1, VERSIONS + 1))
    for version in aggregator.versions:
        expected = expected_version(version, nodes, knobs)
        for name, weights in version.fold.params.items():
            np.testing.assert_allclose(weights, expected[name], rtol=1e-5, atol=1e-6)
            assert not np.array_equal(weights, version.before[name]), "the version moved nothing"
    for node in nodes:
        assert set(node.acks) == set(node.deltas), f"{node.node_id}: an update went unanswered"
        assert (node.outbox, node.session.unacked) == ({}, ())
        assert node.manifest is not None
        assert (node.manifest.version, node.manifest.broadcast_dtype) == (VERSIONS, dtype)
        for name, weights in core.params.items():
            np.testing.assert_array_equal(node.params[name], weights.astype(dtype))
    (first_va,) = [uid for uid in nodes[2].deltas if uid.endswith("-v0")]
    sends = {uid: n for node in nodes for uid, n in node.sends.items()}
    assert sends.pop(first_va) == 2, "the lost update was not sent again"
    assert set(sends.values()) == {1}, "an update that was acked in time was sent again"
    folded = {c.update_id for v in aggregator.versions for c in v.fold.record.contributions}
    accepted = {uid for node in nodes for uid, ack in node.acks.items() if ack.accepted}
    assert first_va in accepted
    assert folded <= accepted
    assert {e.node: e.eval_version for e in core.node_tallies()} == dict.fromkeys(
        HOSPITALS, VERSIONS
    )
