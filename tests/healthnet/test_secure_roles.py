"""On a real Mosquitto run with `healthnet deploy init`'s files, every role receives on every topic
filter its code subscribes to: the ACL is written from the table the services subscribe through.

Mosquitto 2 grants any SUBSCRIBE and then silently delivers nothing its ACL denies, so each filter
is proven by delivery: the role that writes the route publishes probes until one arrives (a
subscription is made on the network thread, so the first probe may come before it), within a
bounded wait.
"""

from __future__ import annotations

import queue
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from common.mqtt import Message, MqttClient
from common.topics import ROLE_TOPICS, Role, Route, Topic, TopicTree
from healthnet.deploy import SERVICE_IDENTITIES, AuthMode
from tests.secure import SecureBroker, secure_broker

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]

WAIT = 10.0  # seconds; a probe that has not arrived by then never will
HOSPITAL = "cleveland"
PEER = "hungarian"  # the hospital that sends HOSPITAL a share


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    root = tmp_path_factory.mktemp("roles")
    federation = f"roles{uuid.uuid4().hex[:8]}"
    with secure_broker(root, auth=AuthMode.PASSWORD, federation=federation) as b:
        yield b


def identity(role: Role) -> str:
    return HOSPITAL if role is Role.HOSPITAL else SERVICE_IDENTITIES[role]


def writer(route: Route) -> Role:
    (role,) = [r for r, t in ROLE_TOPICS.items() if any(u.route is route for u in t.writes)]
    return role


EXAMPLES: dict[Route, Callable[[TopicTree], Topic]] = {
    Route.MANIFEST: TopicTree.manifest,
    Route.CHUNK: lambda tree: tree.chunk(1, 0),
    Route.DELTA: TopicTree.delta,
    Route.UPDATE: lambda tree: tree.update(HOSPITAL),
    Route.ACK: lambda tree: tree.ack(HOSPITAL),
    Route.NODE_STATUS: lambda tree: tree.node_status(HOSPITAL),
    Route.NODE_EVAL: lambda tree: tree.node_eval(HOSPITAL),
    Route.CONTROL_REQUEST: TopicTree.control_requests,
    Route.CONTROL_REPLY: lambda tree: tree.control_reply("r1"),
    Route.AGGREGATOR_STATUS: TopicTree.aggregator_status,
    Route.VERSIONS: TopicTree.versions,
    Route.SECAGG_KEY: lambda tree: tree.secagg_key(HOSPITAL),
    # A share another hospital sends it (a node keeps its own share and never sends it).
    Route.SECAGG_SHARE: lambda tree: tree.secagg_share(HOSPITAL, PEER),
    Route.SECAGG_RECEIPT: lambda tree: tree.secagg_receipt(HOSPITAL),
    Route.SECAGG_UNMASK: lambda tree: tree.secagg_unmask(HOSPITAL),
    Route.SECAGG_ANSWER: lambda tree: tree.secagg_answer(HOSPITAL),
}


def example(tree: TopicTree, route: Route) -> Topic:
    """A topic of ``route`` that the hospital's identity writes or is addressed by."""
    return EXAMPLES[route](tree)


def test_every_route_has_an_example() -> None:
    """The probes below can reach every route: a new route needs its example topic here."""
    assert EXAMPLES.keys() == set(Route)


def delivered(reader: MqttClient, sender: MqttClient, topic: Topic) -> bool:
    """Publish probes on ``topic`` until one reaches ``reader`` (True) or WAIT passes (False)."""
    deadline = time.monotonic() + WAIT
    attempt = 0
    while time.monotonic() < deadline:
        attempt += 1
        sender.publish(topic, f"probe {attempt}".encode(), wait=WAIT)
        settle = min(time.monotonic() + 0.5, deadline)
        while (left := settle - time.monotonic()) > 0:
            try:
                item = reader.inbox.get(timeout=left)
            except queue.Empty:
                break
            if isinstance(item, Message) and item.topic == str(topic) and item.payload:
                return True
    return False


@pytest.mark.parametrize("role", list(Role), ids=[r.value for r in Role])
def test_every_filter_a_role_subscribes_to_delivers_what_its_writer_publishes(
    broker: SecureBroker, role: Role
) -> None:
    """Subscribed to its role's filters (as its service subscribes), the identity receives each
    route from the identity that writes it: the aggregator its nodes' statuses, the dashboard and
    operator their evaluations, a hospital its own acks (secure aggregation's routes included)."""
    tree = TopicTree(broker.federation)
    reader = broker.client(identity(role))
    for topic_filter in tree.subscriptions(role, identity(role), secure_aggregation=True):
        reader.subscribe(topic_filter)
    refused = []
    with reader:
        for use in ROLE_TOPICS[role].reads:
            topic = example(tree, use.route)
            # A hospital reads key records it writes too: the probe's sender connects under its
            # own client id, or it would take the reader's connection over.
            author = PEER if use.route is Route.SECAGG_SHARE else identity(writer(use.route))
            with broker.client(author, f"{author}.probe") as sender:
                if not delivered(reader, sender, topic):
                    refused.append(str(topic))
                if topic.retain:
                    sender.clear_retained(topic)
    assert refused == [], f"{identity(role)} subscribes to these but never receives them"
