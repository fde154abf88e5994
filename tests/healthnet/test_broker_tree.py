"""A broker tree from `healthnet deploy init --regions`, run as real Mosquittos on 127.0.0.1: the
bridges log in to the core over mutual TLS, the model comes down and is kept retained in each
region, updates go up and acks come down, and a hospital reaches nothing of another region.

Mosquitto grants every SUBSCRIBE and silently delivers nothing its ACL denies, so a denial is
observed as a probe that never arrives while, in the same test, the permitted path delivers.
"""

from __future__ import annotations

import queue
import time
import uuid
from collections.abc import Iterator

import pytest

from common.mqtt import Message, MqttClient
from common.topics import Topic, TopicTree
from tests.regions import BrokerTree, broker_tree

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]

WAIT = 10.0  # seconds; a probe that has not arrived by then never will
QUIET = 3.0  # seconds to watch for a message that must not arrive


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerTree]:
    root = tmp_path_factory.mktemp("tree")
    with broker_tree(root, federation=f"tree{uuid.uuid4().hex[:8]}") as running:
        yield running


def received(reader: MqttClient, topic: Topic, timeout: float) -> Message | None:
    """The first non-empty message on ``topic`` within ``timeout``, else None."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            item = reader.inbox.get(timeout=left)
        except queue.Empty:
            return None
        if isinstance(item, Message) and item.topic == str(topic) and item.payload:
            return item
    return None


def probe(reader: MqttClient, sender: MqttClient, topic: Topic, timeout: float = WAIT) -> bool:
    """Publish probes on ``topic`` until one reaches ``reader`` (True) or ``timeout`` passes: a
    bridge subscribes on its own schedule, so the first probe may come before the path exists."""
    deadline = time.monotonic() + timeout
    attempt = 0
    while time.monotonic() < deadline:
        attempt += 1
        sender.publish(topic, f"probe {attempt}".encode(), wait=WAIT)
        if received(reader, topic, min(1.0, max(0.0, deadline - time.monotonic()))):
            return True
    return False


def test_each_region_bridges_to_the_core_as_its_own_identity(tree: BrokerTree) -> None:
    """Every broker runs its generated config; each bridge logs in to the core with its client
    certificate (the identity is the certificate's common name)."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline and not all(
        f"u'{region.bridge}'" in tree.brokers["core"].log() for region in tree.spec.regions
    ):
        time.sleep(0.2)
    core = tree.brokers["core"].log()
    for region in tree.spec.regions:
        assert f"as {region.bridge} (" in core, core
        assert f"u'{region.bridge}'" in core, core


def test_an_update_goes_up_to_the_core_and_its_ack_comes_down(tree: BrokerTree) -> None:
    """A hospital on its regional broker reaches the aggregator on the core, and the
    aggregator's ack for it reaches the hospital: both directions of the bridge."""
    topics = TopicTree(tree.federation)
    with tree.client("aggregator") as aggregator, tree.client("hungarian") as hospital:
        aggregator.subscribe(topics.all_updates())
        hospital.subscribe(topics.ack("hungarian"))
        assert probe(aggregator, hospital, topics.update("hungarian"))
        assert probe(hospital, aggregator, topics.ack("hungarian"))


def test_the_model_is_kept_retained_in_each_region(tree: BrokerTree) -> None:
    """A chunk the aggregator publishes retained on the core is retained in each region: a
    hospital subscribing afterwards gets it from its regional broker, even with the core down."""
    topics = TopicTree(tree.federation)
    chunk = topics.chunk(7, 0)
    payload = f"chunk {uuid.uuid4().hex}".encode()
    with tree.client("aggregator") as aggregator:
        aggregator.publish(chunk, payload, wait=WAIT)
    # Each region's bridge forwards it; wait until both regions hold it.
    for hospital in ("cleveland", "va"):
        deadline = time.monotonic() + WAIT
        got: Message | None = None
        while got is None and time.monotonic() < deadline:
            with tree.client(hospital) as reader:
                reader.subscribe(chunk)
                got = received(reader, chunk, 1.0)
        assert got is not None, f"{hospital} never got the retained chunk"
        assert got.retain
        assert got.payload == payload
    core = tree.brokers["core"]
    core.stop()
    try:
        for hospital in ("hungarian", "switzerland"):
            with tree.client(hospital) as reader:
                reader.subscribe(chunk)
                got = received(reader, chunk, WAIT)
            assert got is not None, f"{hospital} got no chunk with the core down"
            assert got.retain
            assert got.payload == payload
    finally:
        core.start()
        with tree.client("aggregator") as aggregator:
            aggregator.clear_retained(chunk)


def test_a_hospital_reads_and_writes_nothing_of_another_region(tree: BrokerTree) -> None:
    """va (region us) dialling region eu's broker with its own certificate reaches neither the
    model nor the aggregator, and on its own broker it never sees another hospital's acks;
    meanwhile the same paths deliver for the hospitals they belong to."""
    topics = TopicTree(tree.federation)
    manifest = topics.manifest()
    with (
        tree.client("aggregator") as aggregator,
        tree.client("va", broker="eu") as intruder,
        tree.client("cleveland") as local,
    ):
        aggregator.subscribe(topics.all_updates())
        intruder.subscribe(manifest)
        local.subscribe(manifest)
        # Allowed: the aggregator's manifest reaches eu's own hospital...
        assert probe(local, aggregator, manifest)
        # ...but not va on eu's broker, whose ACL does not name it.
        assert received(intruder, manifest, QUIET) is None
        # va's update published on eu's broker reaches no aggregator.
        intruder.publish(topics.update("va"), b"from the wrong region", wait=WAIT)
        assert received(aggregator, topics.update("va"), QUIET) is None
        aggregator.clear_retained(manifest)
    with (
        tree.client("aggregator") as aggregator,
        tree.client("va") as va,
        tree.client("switzerland") as switzerland,
    ):
        va.subscribe(topics.route_filter(topics.ack("va").route))  # acks/+
        switzerland.subscribe(topics.ack("switzerland"))
        assert probe(switzerland, aggregator, topics.ack("switzerland"))
        assert received(va, topics.ack("switzerland"), QUIET) is None
        # An eu hospital's ack never even reaches region us.
        aggregator.publish(topics.ack("cleveland"), b"for eu", wait=WAIT)
        assert received(va, topics.ack("cleveland"), QUIET) is None
        # va's own ack, on the same subscription, does arrive: the filter was in place.
        assert probe(va, aggregator, topics.ack("va"))


def test_no_hospital_may_use_the_core_broker(tree: BrokerTree) -> None:
    """A hospital dialling the core directly reaches neither the aggregator nor the model."""
    topics = TopicTree(tree.federation)
    with (
        tree.client("aggregator") as aggregator,
        tree.client("cleveland", broker="core") as hospital,
        tree.client("hungarian") as regional,
    ):
        aggregator.subscribe(topics.all_updates())
        hospital.subscribe(topics.ack("cleveland"))
        hospital.publish(topics.update("cleveland"), b"around the bridge", wait=WAIT)
        assert received(aggregator, topics.update("cleveland"), QUIET) is None
        aggregator.publish(topics.ack("cleveland"), b"not here", wait=WAIT)
        assert received(hospital, topics.ack("cleveland"), QUIET) is None
        # The same update through the region's broker does arrive.
        assert probe(aggregator, regional, topics.update("hungarian"))
