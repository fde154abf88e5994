"""Specification of the MQTT adapter against real brokers on 127.0.0.1 (Mosquitto and amqtt)."""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common.backoff import Backoff
from common.broker_url import BrokerEndpoint
from common.errors import BrokerUnavailable, SubscriptionRefused
from common.mqtt import ConnectionEvent, Message, MqttClient, Will
from common.topics import Topic, TopicTree
from tests.brokers import BrokerConfig, EmbeddedBroker, find_mosquitto, free_port

pytestmark = [pytest.mark.broker, pytest.mark.timeout(90)]

WAIT = 15.0  # seconds; every wait in this module is bounded by it
FAST_RECONNECT = Backoff(initial=0.05, cap=0.3)
needs_mosquitto = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")


@pytest.fixture
def tree() -> TopicTree:
    """A federation of this test's own, so retained messages of other tests never show up."""
    return TopicTree(f"t{uuid.uuid4().hex[:12]}")


@contextlib.contextmanager
def connected(url: str, name: str, **options: Any) -> Iterator[MqttClient]:
    """A started MqttClient with a unique client id, closed on exit."""
    client = MqttClient(BrokerEndpoint.parse(url), f"{name}-{uuid.uuid4().hex[:8]}", **options)
    client.start(timeout=WAIT)
    try:
        yield client
    finally:
        client.close()


def next_item(client: MqttClient, deadline: float) -> Message | ConnectionEvent:
    remaining = deadline - time.monotonic()
    assert remaining > 0, f"{client.client_id}: nothing arrived in time"
    try:
        return client.inbox.get(timeout=remaining)
    except queue.Empty as exc:
        raise AssertionError(f"{client.client_id}: nothing arrived within {WAIT}s") from exc


def messages(client: MqttClient, count: int, topic: str | None = None) -> list[Message]:
    """The next ``count`` messages (on ``topic`` if given), skipping connection events."""
    deadline = time.monotonic() + WAIT
    received: list[Message] = []
    while len(received) < count:
        item = next_item(client, deadline)
        if isinstance(item, Message) and (topic is None or item.topic == topic):
            received.append(item)
    return received


def connection_event(client: MqttClient) -> ConnectionEvent:
    """The next connection event; messages before it fail the test (none are expected)."""
    item = next_item(client, time.monotonic() + WAIT)
    assert isinstance(item, ConnectionEvent), f"expected a connection event, got {item}"
    return item


def drain_connection_events(client: MqttClient) -> None:
    while not client.inbox.empty():
        assert isinstance(client.inbox.get_nowait(), ConnectionEvent)


def wait_subscribed(client: MqttClient, tree: TopicTree) -> list[Message]:
    """Return once every subscription made so far is active, with the messages seen meanwhile.

    A broker handles one connection's packets in order, so once the client receives its own
    publish on a probe topic subscribed last, the earlier SUBSCRIBEs have been processed.
    """
    probe = tree.ack(f"probe-{uuid.uuid4().hex[:8]}")
    client.subscribe(probe)
    client.publish(probe, b"probe")
    deadline = time.monotonic() + WAIT
    seen: list[Message] = []
    while True:
        item = next_item(client, deadline)
        if isinstance(item, Message):
            if item.topic == str(probe):
                client.unsubscribe(probe)
                return seen
            seen.append(item)


def test_a_message_travels_between_two_clients(broker_url: str, tree: TopicTree) -> None:
    """A publish on a route arrives at a subscriber as a Message with its topic and QoS 1."""
    topic = tree.update("hosp-a")
    with connected(broker_url, "sub") as sub, connected(broker_url, "pub") as pub:
        assert connection_event(sub) == ConnectionEvent(connected=True, session_present=False)
        sub.subscribe(tree.all_updates())
        wait_subscribed(sub, tree)
        pub.publish(topic, b"\x00delta\xff")
        [message] = messages(sub, 1)
    assert message == Message(str(topic), b"\x00delta\xff", retain=False, qos=1)


def test_a_late_subscriber_sees_the_retained_status(broker_url: str, tree: TopicTree) -> None:
    """A retained route's last message reaches a client that subscribes afterwards."""
    topic = tree.node_status("hosp-a")
    with connected(broker_url, "pub") as pub:
        pub.publish(topic, b"first", wait=WAIT)
        pub.publish(topic, b"idle", wait=WAIT)
        with connected(broker_url, "late") as late:
            late.subscribe(tree.all_node_status())
            [message] = messages(late, 1)
        pub.clear_retained(topic)
    assert (message.topic, message.payload, message.retain) == (str(topic), b"idle", True)


def test_a_cleared_retained_message_is_not_replayed(broker_url: str, tree: TopicTree) -> None:
    """After clear_retained, a new subscriber gets nothing for that topic."""
    topic, other = tree.node_status("gone"), tree.node_status("here")
    with connected(broker_url, "pub") as pub:
        pub.publish(topic, b"idle", wait=WAIT)
        pub.clear_retained(topic)
        pub.publish(other, b"idle", wait=WAIT)
        with connected(broker_url, "late") as late:
            # The broker sends retained messages right after the SUBACK, before it handles the
            # probe that wait_subscribed subscribes to and publishes afterwards.
            late.subscribe(tree.all_node_status())
            seen = [m.topic for m in wait_subscribed(late, tree)]
        pub.clear_retained(other)
    assert str(topic) not in seen
    assert str(other) in seen


def test_subscribing_before_start_takes_effect_on_connect(broker_url: str, tree: TopicTree) -> None:
    """subscribe() before start() is remembered and made when the client connects."""
    topic = tree.node_eval("hosp-b")
    sub = MqttClient(BrokerEndpoint.parse(broker_url), f"early-{uuid.uuid4().hex[:8]}")
    sub.subscribe(tree.all_node_evals())
    sub.start(timeout=WAIT)
    try:
        wait_subscribed(sub, tree)
        with connected(broker_url, "pub") as pub:
            pub.publish(topic, b"eval")
            [message] = messages(sub, 1)
    finally:
        sub.close()
    assert (message.topic, message.payload) == (str(topic), b"eval")


def test_publish_with_wait_returns_once_the_broker_acked(broker_url: str, tree: TopicTree) -> None:
    """publish(wait=...) returns only after the PUBACK: nothing is left to flush."""
    with connected(broker_url, "sub") as sub, connected(broker_url, "pub") as pub:
        sub.subscribe(tree.versions())
        wait_subscribed(sub, tree)
        pub.publish(tree.versions(), b"v1", wait=5)
        assert pub.flush(timeout=0.0) is True
        [message] = messages(sub, 1)
    assert message.payload == b"v1"


def test_connecting_to_a_closed_port_raises_broker_unavailable_in_time() -> None:
    """With nothing listening, start() raises BrokerUnavailable once connect_timeout has passed."""
    port = free_port()
    client = MqttClient(
        BrokerEndpoint("127.0.0.1", port, username="u", password="hidden-pw"),  # noqa: S106 - fake
        "nobody",
        connect_timeout=1.0,
        backoff=FAST_RECONNECT,
    )
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable, match=rf"127\.0\.0\.1:{port}") as info:
        client.start()
    assert time.monotonic() - started < 5.0
    assert "hidden-pw" not in str(info.value)
    assert not client.connected


@pytest.fixture
def own_mosquitto() -> Iterator[EmbeddedBroker]:
    """A Mosquitto of this test alone, which it may stop and restart."""
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed")
    with EmbeddedBroker(BrokerConfig(implementation="mosquitto")) as broker:
        yield broker


@needs_mosquitto
def test_the_client_reconnects_and_resubscribes_after_a_broker_restart(
    own_mosquitto: EmbeddedBroker, tree: TopicTree
) -> None:
    """A broker restart shows as disconnected then connected, and subscriptions come back."""
    url = own_mosquitto.url
    with connected(url, "sub", backoff=FAST_RECONNECT) as sub:
        sub.subscribe(tree.all_updates())
        assert connection_event(sub).connected
        own_mosquitto.restart()
        lost, back = connection_event(sub), connection_event(sub)
        assert (lost.connected, back.connected) == (False, True)
        assert sub.connected
        wait_subscribed(sub, tree)
        with connected(url, "pub") as pub:
            pub.publish(tree.update("hosp-a"), b"after restart")
            [message] = messages(sub, 1)
    assert message.payload == b"after restart"


@needs_mosquitto
def test_a_publish_made_while_the_broker_is_down_is_sent_on_reconnect(
    own_mosquitto: EmbeddedBroker, tree: TopicTree
) -> None:
    """A QoS 1 publish while offline is queued, delivered after reconnect, and close() is clean."""
    url = own_mosquitto.url
    topic = tree.node_status("hosp-a")
    pub = MqttClient(
        BrokerEndpoint.parse(url), f"pub-{uuid.uuid4().hex[:8]}", backoff=FAST_RECONNECT
    )
    pub.start(timeout=WAIT)
    drain_connection_events(pub)
    own_mosquitto.kill()
    assert not connection_event(pub).connected
    pub.publish(topic, b"queued while offline")
    own_mosquitto.start()
    assert connection_event(pub).connected
    with connected(url, "late") as late:
        late.subscribe(topic)
        [message] = messages(late, 1)
    assert message.payload == b"queued while offline"
    pub.close()
    assert not pub.connected


CHILD_WITH_WILL = textwrap.dedent(
    """
    import os, sys
    from common.broker_url import BrokerEndpoint
    from common.mqtt import MqttClient, Will
    from common.topics import TopicTree

    url, federation, client_id = sys.argv[1:]
    topic = TopicTree(federation).node_status("dying")
    client = MqttClient(BrokerEndpoint.parse(url), client_id, will=Will(topic, b"offline"))
    client.start(timeout=10)
    client.publish(topic, b"idle", wait=10)
    os._exit(1)  # no DISCONNECT: the broker must publish the Last Will
    """
)


def test_the_last_will_is_published_when_the_process_dies(broker_url: str, tree: TopicTree) -> None:
    """A client whose process dies without DISCONNECT gets its Last Will published (retained)."""
    topic = tree.node_status("dying")
    with connected(broker_url, "watcher") as watcher:
        watcher.subscribe(topic)
        wait_subscribed(watcher, tree)
        child = subprocess.run(
            [sys.executable, "-c", CHILD_WITH_WILL, broker_url, tree.federation, "dying-child"],
            capture_output=True,
            timeout=WAIT,
            check=False,
            cwd=Path(__file__).resolve().parents[2],
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        )
        assert child.returncode == 1, child.stderr.decode()
        status, will = messages(watcher, 2)
        watcher.clear_retained(topic)
    assert (status.payload, will.payload) == (b"idle", b"offline")


def test_a_clean_close_does_not_publish_the_last_will(broker_url: str, tree: TopicTree) -> None:
    """close() disconnects cleanly, so the Last Will stays unpublished."""
    topic = tree.node_status("leaving")
    with connected(broker_url, "watcher") as watcher:
        watcher.subscribe(topic)
        wait_subscribed(watcher, tree)
        with connected(broker_url, "leaving", will=Will(topic, b"offline")) as leaving:
            leaving.publish(topic, b"idle", wait=WAIT)
        time.sleep(0.3)  # time for the broker to (wrongly) publish the will
        seen = wait_subscribed(watcher, tree)
        watcher.clear_retained(topic)
    assert [m.payload for m in seen] == [b"idle"]


def test_close_flushes_every_qos1_publish(broker_url: str, tree: TopicTree) -> None:
    """Publishing 200 messages and closing at once still delivers all 200."""
    with connected(broker_url, "sub") as sub:
        sub.subscribe(tree.all_updates())
        wait_subscribed(sub, tree)
        pub = MqttClient(BrokerEndpoint.parse(broker_url), f"burst-{uuid.uuid4().hex[:8]}")
        pub.start(timeout=WAIT)
        for index in range(200):
            pub.publish(tree.update("hosp-a"), index.to_bytes(2, "big"))
        pub.close()
        received = messages(sub, 200)
    assert sorted(int.from_bytes(m.payload, "big") for m in received) == list(range(200))


@needs_mosquitto
@pytest.mark.parametrize(
    "protocol", [pytest.param("3.1.1", id="mqtt311"), pytest.param("5", id="mqtt5")]
)
def test_a_persistent_session_receives_what_was_published_while_it_was_away(
    mosquitto: EmbeddedBroker, tree: TopicTree, protocol: str
) -> None:
    """With a persistent session, QoS 1 messages sent while the client was away arrive on return."""
    url = f"{mosquitto.url}?protocol={protocol}"
    client_id = f"persistent-{uuid.uuid4().hex[:8]}"
    topic = tree.update("n1")

    first = MqttClient(BrokerEndpoint.parse(url), client_id, persistent_session=True)
    first.subscribe(topic)
    first.start(timeout=WAIT)
    first.close()
    with connected(mosquitto.url, "sender") as sender:
        for i in range(3):
            sender.publish(topic, f"while away {i}".encode(), wait=WAIT)

    second = MqttClient(BrokerEndpoint.parse(url), client_id, persistent_session=True)
    second.subscribe(topic)
    second.start(timeout=WAIT)
    try:
        event = connection_event(second)
        assert event.session_present
        payloads = [m.payload for m in messages(second, 3, str(topic))]
    finally:
        second.close()
    assert payloads == [b"while away 0", b"while away 1", b"while away 2"]


def manual_session(url: str, client_id: str, topic: Topic) -> MqttClient:
    """A started persistent-session client that acknowledges messages only when told to."""
    client = MqttClient(
        BrokerEndpoint.parse(url),
        client_id,
        persistent_session=True,
        manual_ack=True,
        backoff=FAST_RECONNECT,
    )
    client.subscribe(topic)
    client.start(timeout=WAIT)
    return client


@needs_mosquitto
@pytest.mark.parametrize(
    "protocol", [pytest.param("3.1.1", id="mqtt311"), pytest.param("5", id="mqtt5")]
)
def test_an_unacked_message_is_redelivered_and_an_acked_one_is_not(
    mosquitto: EmbeddedBroker, tree: TopicTree, protocol: str
) -> None:
    """With manual ack, a message received but never acked comes back on the next connection."""
    url = f"{mosquitto.url}?protocol={protocol}"
    client_id = f"manual-{uuid.uuid4().hex[:8]}"
    topic = str(tree.update("n1"))

    first = manual_session(url, client_id, tree.update("n1"))
    with connected(mosquitto.url, "sender") as sender:
        sender.publish(tree.update("n1"), b"m1", wait=WAIT)
    assert [m.payload for m in messages(first, 1, topic)] == [b"m1"]
    first.close()  # without an ack: the broker keeps m1 in flight for this session

    second = manual_session(url, client_id, tree.update("n1"))
    [again] = messages(second, 1, topic)
    assert again.payload == b"m1"
    assert second.ack(again)
    second.close()

    third = manual_session(url, client_id, tree.update("n1"))
    try:
        with connected(mosquitto.url, "sender") as sender:
            sender.publish(tree.update("n1"), b"m2", wait=WAIT)
        [after] = messages(third, 1, topic)
        assert third.ack(after)
    finally:
        third.close()
    assert after.payload == b"m2", "an acked message was delivered again"


@needs_mosquitto
def test_an_ack_for_an_earlier_connection_is_not_sent(tree: TopicTree, tmp_path: Path) -> None:
    """After a reconnect, the old copy of a message is not acked; its redelivered copy is."""
    config = BrokerConfig(implementation="mosquitto", persistence=True, workdir=tmp_path / "b")
    with EmbeddedBroker(config) as broker:
        topic = str(tree.update("n1"))
        client = manual_session(broker.url, f"manual-{uuid.uuid4().hex[:8]}", tree.update("n1"))
        try:
            with connected(broker.url, "sender") as sender:
                sender.publish(tree.update("n1"), b"m1", wait=WAIT)
            [old] = messages(client, 1, topic)
            broker.restart()  # the session (and m1, unacked) survives in the broker's store
            [again] = messages(client, 1, topic)
            assert again.payload == b"m1"
            assert again.connection > old.connection
            assert not client.ack(old)
            assert client.ack(again)
        finally:
            client.close()


def test_large_publishes_from_another_thread_arrive_intact(
    mosquitto: EmbeddedBroker, tree: TopicTree
) -> None:
    """Publishing multi-megabyte messages from the owner's thread never corrupts the stream.

    Only the network thread may write to the socket: paho writes from the caller's thread when it
    believes no loop thread runs, and two writers interleave the bytes of large packets.
    """
    payloads = [bytes([i]) * (16 * 1024 * 1024 + i) for i in range(6)]
    with connected(mosquitto.url, "sub") as sub:
        sub.subscribe(tree.all_updates())
        wait_subscribed(sub, tree)
        with connected(mosquitto.url, "big") as pub:
            for payload in payloads:
                pub.publish(tree.update("hosp-a"), payload)
            assert pub.flush(WAIT)
        received = messages(sub, len(payloads))
    assert sorted(len(m.payload) for m in received) == sorted(len(p) for p in payloads)
    assert all(m.payload == bytes([m.payload[0]]) * len(m.payload) for m in received)


# -- confirmed subscriptions

# amqtt with its topic ACL plugin: anonymous clients may subscribe in federation "open" only.
# Mosquitto's ACL file cannot serve here: it grants every subscription, then filters delivery.
ACL_BROKER = textwrap.dedent(
    """
    import asyncio, signal, sys
    from amqtt.broker import Broker
    from amqtt.contexts import BrokerConfig, ListenerConfig, ListenerType

    async def serve(port):
        broker = Broker(BrokerConfig(
            listeners={"default": ListenerConfig(type=ListenerType.TCP, bind=f"127.0.0.1:{port}")},
            plugins={
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
                "amqtt.plugins.topic_checking.TopicAccessControlListPlugin": {
                    "acl": {"anonymous": ["healthnet/v1/open/#"]},
                },
            },
        ))
        await broker.start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await broker.shutdown()

    asyncio.run(serve(int(sys.argv[1])))
    """
)


@pytest.fixture(scope="module")
def acl_broker() -> Iterator[str]:
    """A real amqtt that refuses subscriptions outside federation "open" with SUBACK code 0x80."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-c", ACL_BROKER, str(port)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + WAIT
        while True:
            assert process.poll() is None, "the ACL broker exited"
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            assert time.monotonic() < deadline, "the ACL broker did not listen in time"
            time.sleep(0.05)
        yield f"mqtt://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(WAIT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(WAIT)


def test_a_subscription_is_in_place_when_subscribe_returns(
    broker_url: str, tree: TopicTree
) -> None:
    """subscribe() on a connected client returns after the SUBACK: a publish right after arrives."""
    with connected(broker_url, "sub") as sub, connected(broker_url, "pub") as pub:
        sub.subscribe(tree.all_updates())
        pub.publish(tree.update("hosp-a"), b"right after", wait=WAIT)
        [message] = messages(sub, 1)
    assert message.payload == b"right after"


def test_a_refused_subscription_raises_with_the_brokers_code(acl_broker: str) -> None:
    """A SUBACK failure code raises SubscriptionRefused naming the filter and the code; the client
    stays connected and its granted subscription works."""
    allowed, forbidden = TopicTree("open"), TopicTree("closed")
    with connected(acl_broker, "sub") as sub, connected(acl_broker, "pub") as pub:
        sub.subscribe(allowed.all_updates())
        with pytest.raises(SubscriptionRefused) as info:
            sub.subscribe(forbidden.all_updates())
        assert str(info.value).endswith(
            f"subscription to {forbidden.all_updates()}: Unspecified error (0x80)"
        )
        assert sub.connected
        pub.publish(allowed.update("hosp-a"), b"granted", wait=WAIT)
        [message] = messages(sub, 1)
    assert message.payload == b"granted"


def test_start_raises_when_a_subscription_made_before_it_is_refused(acl_broker: str) -> None:
    """start() waits for the SUBACKs of earlier subscribe() calls; a refusal raises, closed."""
    client = MqttClient(BrokerEndpoint.parse(acl_broker), f"early-{uuid.uuid4().hex[:8]}")
    client.subscribe(TopicTree("open").all_updates())
    client.subscribe(TopicTree("closed").all_updates())
    with pytest.raises(SubscriptionRefused, match=r"healthnet/v1/closed/updates/\+"):
        client.start(timeout=WAIT)
    assert not client.connected
