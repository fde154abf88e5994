"""Light hospitals: their outbox and version bookkeeping, and a swarm against a real aggregator."""

from __future__ import annotations

import queue
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from benchmarks._simhospitals import DecodeCache, LightHospital, Swarm, Tally
from common.blobs import split_blob
from common.broker_url import BrokerEndpoint
from common.codec import decode, encode, encode_tensors, envelope, sha256_hex
from common.messages import (
    Ack,
    AggregatorStatus,
    Manifest,
    ModelSpec,
    RejectReason,
    TrainingConfig,
    Update,
)
from common.mqtt import ConnectionEvent, Message, MqttClient
from common.settings import ConnectionSettings
from common.topics import TopicTree
from healthnet.broker import EmbeddedBroker
from healthnet.demo import aggregator_settings
from healthnet.federations import HEART_DISEASE
from healthnet.processes import ProcessGroup

TOPICS = TopicTree("sim")
PARAMS = {"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)}


def version_messages(version: int, *, created: float) -> list[tuple[str, bytes]]:
    """``version`` of PARAMS as the broker delivers it: its chunk, then its manifest."""
    blob = encode_tensors(PARAMS)
    (chunk,) = split_blob(blob, 1 << 20)
    manifest = Manifest(run_id="run", version=version, sha256=sha256_hex(blob),
                        blob_bytes=len(blob), chunk_size=1 << 20, chunk_count=1,
                        model=ModelSpec(name="logreg", kwargs={}), training=TrainingConfig(),
                        created_at=created)  # fmt: skip
    payload = encode(envelope(manifest, sender="aggregator", sent_at=created))
    return [(str(TOPICS.chunk(version, 0)), chunk), (str(TOPICS.manifest()), payload)]


def publish_version(hospital: LightHospital, version: int, *, created: float, now: float) -> None:
    for topic, payload in version_messages(version, created=created):
        hospital.on_message(topic, payload, now)


def ack(hospital: LightHospital, update_id: str, *, accepted: bool = True) -> None:
    verdict = Ack(update_id=update_id, accepted=accepted, current_version=1,
                  reason=None if accepted else RejectReason.STALE)  # fmt: skip
    payload = encode(envelope(verdict, sender="aggregator", sent_at=0.0))
    hospital.on_message(str(TOPICS.ack(hospital.name)), payload, 0.0)


def holding(version: int = 1) -> LightHospital:
    hospital = LightHospital("h1", TOPICS, seed=1)
    publish_version(hospital, version, created=100.0, now=100.25)
    return hospital


def test_a_hospital_holds_a_version_once_its_chunks_and_manifest_arrived() -> None:
    """The held version, its tensor shapes, and the seconds from its creation until held."""
    hospital = holding(3)
    assert hospital.held is not None
    manifest, shapes = hospital.held
    assert manifest.version == 3
    assert shapes == {"w": (3, 2), "b": (2,)}
    assert hospital.held_after == {3: 0.25}


def test_an_update_is_a_real_envelope_against_the_held_version_and_stays_until_acked() -> None:
    """The update decodes as an Update on base v1 with the model's shapes; the outbox keeps it."""
    hospital = holding()
    hospital.start_sending(0.0, think=0.0)
    assert hospital.due_update(0.0, think=1.0) is None  # think 0: not sending
    hospital.send_now(0.0)
    due = hospital.due_update(0.0, think=1.0)
    assert due is not None
    update_id, payload = due
    body = decode(payload).body
    assert isinstance(body, Update)
    assert (body.update_id, body.base_version, body.run_id) == (update_id, 1, "run")
    assert [t.name for t in body.delta] == ["w", "b"]
    assert hospital.outbox == {update_id: payload}
    ack(hospital, update_id)
    assert hospital.outbox == {}
    assert (hospital.tally.sent, hospital.tally.accepted) == (1, 1)


def test_a_hospital_sends_at_most_one_update_per_version() -> None:
    """Due again after its think time, it waits for a new version before it sends again."""
    hospital = holding()
    hospital.send_now(0.0)
    assert hospital.due_update(0.0, think=1.0) is not None
    assert hospital.due_update(10.0, think=1.0) is None
    publish_version(hospital, 2, created=10.0, now=10.0)
    due = hospital.due_update(10.0, think=1.0)
    assert due is not None
    body = decode(due[1]).body
    assert isinstance(body, Update)
    assert body.base_version == 2


def test_a_reconnect_resends_every_unacked_update_oldest_first_with_the_same_bytes() -> None:
    """What the outbox holds goes out again on a reconnect; an acked update does not."""
    hospital = holding()
    hospital.send_now(0.0)
    first = hospital.due_update(0.0, think=1.0)
    publish_version(hospital, 2, created=1.0, now=1.0)
    second = hospital.due_update(5.0, think=1.0)
    assert first is not None
    assert second is not None
    hospital.on_connection(ConnectionEvent(connected=False))
    assert hospital.on_connection(ConnectionEvent(connected=True)) == [first[1], second[1]]
    ack(hospital, first[0])
    assert hospital.on_connection(ConnectionEvent(connected=True)) == [second[1]]
    assert (hospital.tally.resent, hospital.tally.disconnects) == (3, 1)


def test_a_rejection_is_final_and_a_second_ack_is_counted_as_a_duplicate() -> None:
    """A rejected update leaves the outbox; the ack of a resend's copy is a duplicate."""
    hospital = holding()
    hospital.send_now(0.0)
    due = hospital.due_update(0.0, think=1.0)
    assert due is not None
    ack(hospital, due[0], accepted=False)
    ack(hospital, due[0], accepted=False)
    snapshot = hospital.snapshot(connected=True)
    assert (snapshot.rejected, snapshot.duplicate_acks, snapshot.pending) == (1, 1, 0)


def test_a_malformed_message_is_refused_and_counted() -> None:
    """Bytes that are no envelope on the ack topic are counted, never raised."""
    hospital = holding()
    hospital.on_message(str(TOPICS.ack("h1")), b"\x00not msgpack", 0.0)
    assert hospital.tally.refused == 1


def test_hospitals_sharing_a_decode_cache_hold_what_each_would_alone() -> None:
    """The cache decodes a version once for all; acks, which differ per hospital, pass through."""
    cache = DecodeCache(TOPICS)
    first = LightHospital("h1", TOPICS, seed=1, cache=cache)
    second = LightHospital("h2", TOPICS, seed=2, cache=cache)
    messages = version_messages(4, created=10.0)
    for hospital in (first, second):
        for topic, payload in messages:
            hospital.on_message(topic, payload, 11.0)
    assert first.held is not None
    assert second.held is not None
    assert first.held[0] is second.held[0]  # one decoded manifest
    assert first.held[1] == second.held[1] == {"w": (3, 2), "b": (2,)}
    second.send_now(0.0)
    due = second.due_update(0.0, think=1.0)
    assert due is not None
    ack(second, due[0])
    assert second.tally.accepted == 1
    assert first.tally.duplicate_acks == 0


def test_tallies_add_field_by_field() -> None:
    """The sum of two tallies adds every counter."""
    total = Tally(hospitals=1, sent=2, pending=1) + Tally(hospitals=1, sent=3, accepted=4)
    assert (total.hospitals, total.sent, total.pending, total.accepted) == (2, 5, 1, 4)


def latest_status(watch: MqttClient) -> AggregatorStatus | None:
    status = None
    while True:
        try:
            item = watch.inbox.get_nowait()
        except queue.Empty:
            return status
        if isinstance(item, Message) and item.payload:
            body = decode(item.payload).body
            if isinstance(body, AggregatorStatus):
                status = body


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_swarm_on_one_loop_is_acked_for_every_update_by_a_real_aggregator(
    mosquitto: EmbeddedBroker, tmp_path: Path
) -> None:
    """40 light hospitals on one thread: all hold the model, send, and every update is acked."""
    federation = f"sim-{uuid.uuid4().hex[:10]}"
    topics = TopicTree(federation)
    connection = ConnectionSettings(broker_url=mosquitto.url, federation=federation)
    names = [f"h{i:03d}" for i in range(40)]
    with (
        ProcessGroup(tmp_path / "logs") as group,
        MqttClient(BrokerEndpoint.parse(mosquitto.url), f"{federation}-watch") as watch,
    ):
        watch.subscribe(topics.aggregator_status())
        aggregator = group.start_service(
            "aggregator",
            aggregator_settings(broker_url=mosquitto.url, federation_id=federation,
                                state_dir=tmp_path / "aggregator", federation=HEART_DISEASE,
                                buffer_size=5, max_staleness=1000),
        )  # fmt: skip
        swarm = Swarm(federation, dict.fromkeys(names, connection))
        with swarm.loop:
            deadline = time.monotonic() + 120
            while swarm.tally().holding < len(names):
                assert time.monotonic() < deadline, f"not all hold the model: {swarm.tally()}"
                assert aggregator.poll() is None, aggregator.tail()
                swarm.run_for(0.2)
            swarm.set_think(1.0)
            swarm.run_for(4.0)
            swarm.set_think(0.0)
            swarm.run_for(60.0, until_settled=True)
            tally = swarm.tally()
            time.sleep(1.5)  # the next status heartbeat
            status = latest_status(watch)
    assert tally.connected == len(names)
    assert tally.sent >= len(names)
    assert tally.pending == 0, f"updates never acked: {tally}"
    assert tally.accepted + tally.rejected == tally.sent
    assert tally.errors == tally.refused == 0
    assert status is not None
    assert status.counters.accepted == tally.accepted
    assert status.version >= tally.accepted // 5
