"""Many MQTT connections on one thread (ClientLoop, LoopClient) against a real Mosquitto."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from common.backoff import Backoff
from common.broker_url import BrokerEndpoint
from common.mqtt import ClientLoop, ConnectionEvent, LoopClient, Message, MqttClient
from common.topics import TopicTree
from healthnet.broker import BrokerConfig, EmbeddedBroker

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]


@dataclass
class Recorder:
    """A LoopHandler that keeps what it is told, per client."""

    events: list[tuple[str, ConnectionEvent]] = field(default_factory=list)
    messages: list[tuple[str, Message]] = field(default_factory=list)

    def on_connection(self, client: LoopClient, event: ConnectionEvent) -> None:
        self.events.append((client.client_id, event))

    def on_message(self, client: LoopClient, message: Message) -> None:
        self.messages.append((client.client_id, message))

    def connected(self, client_id: str) -> int:
        return sum(1 for c, e in self.events if c == client_id and e.connected)


def run_until(loop: ClientLoop, done: Callable[[], bool], seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < deadline, "the loop did not get there in time"
        loop.run_once(0.05)


def test_many_connections_on_one_thread_each_get_the_retained_message_and_their_own(
    mosquitto: EmbeddedBroker,
) -> None:
    """30 clients on one loop: each gets the retained manifest, and only its own ack topic."""
    topics = TopicTree(f"loop-{uuid.uuid4().hex[:8]}")
    endpoint = BrokerEndpoint.parse(mosquitto.url)
    recorder = Recorder()
    names = [f"{topics.federation}-n{i:02d}" for i in range(30)]  # unique client ids
    with MqttClient(endpoint, f"{topics.federation}-pub") as publisher:
        publisher.publish(topics.manifest(), b"the model", wait=10)
        with ClientLoop() as loop:
            for name in names:
                subscriptions = (topics.manifest(), topics.ack(name))
                loop.add(LoopClient(endpoint, name, recorder, subscriptions=subscriptions))
            run_until(loop, lambda: len(recorder.messages) == len(names))
            for name in names:
                publisher.publish(topics.ack(name), name.encode())
            run_until(loop, lambda: len(recorder.messages) == 2 * len(names))
            published = loop.clients[0].publish(topics.ack(names[1]), b"from a loop client")
            run_until(loop, lambda: len(recorder.messages) == 2 * len(names) + 1)
    retained = [(c, m.payload) for c, m in recorder.messages if m.retain]
    assert sorted(retained) == [(n, b"the model") for n in names]
    assert published
    for name in names:
        got = [m.payload for c, m in recorder.messages if c == name and not m.retain]
        expected = [name.encode()] + ([b"from a loop client"] if name == names[1] else [])
        assert got == expected
        assert recorder.connected(name) == 1


@pytest.mark.slow
def test_a_loop_client_reconnects_after_a_broker_restart_and_subscribes_again() -> None:
    """Broker down: the handler hears of the loss; back up: a new connect, the same filters."""
    topics = TopicTree(f"loop-{uuid.uuid4().hex[:8]}")
    recorder = Recorder()
    with EmbeddedBroker(BrokerConfig(implementation="mosquitto")) as broker:
        endpoint = BrokerEndpoint.parse(broker.url)
        client = LoopClient(endpoint, "restarted", recorder, subscriptions=(topics.manifest(),),
                            backoff=Backoff(initial=0.05, cap=0.3))  # fmt: skip
        with ClientLoop() as loop:
            loop.add(client)
            run_until(loop, lambda: client.connected)
            broker.stop()
            run_until(loop, lambda: not client.connected)
            assert not client.publish(topics.manifest(), b"offline")
            broker.start()
            run_until(loop, lambda: recorder.connected("restarted") == 2)
            # Retained: it reaches the renewed subscription whichever comes first.
            with MqttClient(endpoint, "publisher") as publisher:
                publisher.publish(topics.manifest(), b"after the restart", wait=10)
            run_until(loop, lambda: len(recorder.messages) == 1)
    assert [e.connected for _, e in recorder.events] == [True, False, True]
    assert recorder.messages[0][1].payload == b"after the restart"
