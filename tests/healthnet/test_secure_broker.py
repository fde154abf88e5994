"""A real Mosquitto run with `healthnet deploy init`'s files refuses strangers and enforces the ACL.

Mosquitto drops an unauthorised MQTT 3.1.1 publish without telling the publisher, so each test
proves a refusal by watching from an identity that may read the topic: it publishes the forbidden
messages, then an allowed one, and checks that only the allowed one arrives (a publisher's
messages reach a subscriber in order, so the allowed one arriving means the others were dropped).
Mosquitto routes a QoS 1 publish to its subscribers before it acknowledges it, so messages that
different identities publish one after another, each waiting for its PUBACK, are ordered too. A
subscription is in place once ``subscribe`` returns (it waits for the SUBACK); Mosquitto grants
every subscription and applies the ACL to delivery, so a forbidden read is proved the same way: a
message the watcher may read, published after the forbidden ones, arrives alone.

A refused connection is checked for its reason on both sides: the client's error, and the line the
broker logs (TLS failures reach the client only as a closed connection).
"""

from __future__ import annotations

import queue
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.broker_url import BrokerEndpoint, TlsFiles
from common.errors import BrokerUnavailable
from common.mqtt import ConnectionEvent, Message, MqttClient
from common.topics import Topic, TopicTree
from healthnet.deploy import AuthMode
from tests.secure import SecureBroker, secure_broker

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]

WAIT = 10.0  # seconds; every wait for a message that must come is bounded by it
REFUSED_WITHIN = 2.0  # a refused connection gives up after this long


@pytest.fixture(scope="module")
def mtls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    root = tmp_path_factory.mktemp("mtls")
    with secure_broker(root, auth=AuthMode.MTLS, federation=f"sec{uuid.uuid4().hex[:8]}") as b:
        yield b


@pytest.fixture(scope="module")
def passwords(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    root = tmp_path_factory.mktemp("password")
    with secure_broker(root, auth=AuthMode.PASSWORD, federation=f"pw{uuid.uuid4().hex[:8]}") as b:
        yield b


def tree_of(broker: SecureBroker) -> TopicTree:
    return TopicTree(broker.federation)


def until(client: MqttClient, topic: Topic, payload: bytes) -> list[Message]:
    """Messages up to and including ``payload`` on ``topic``; fails if it does not come."""
    found: list[Message] = []
    deadline = time.monotonic() + WAIT
    while (left := deadline - time.monotonic()) > 0:
        try:
            item = client.inbox.get(timeout=left)
        except queue.Empty:
            break
        if isinstance(item, Message):
            found.append(item)
            if item.topic == str(topic) and item.payload == payload:
                return found
    raise AssertionError(f"{payload!r} on {topic} never arrived; got {found}")


def items_until(
    client: MqttClient, topic: Topic, payload: bytes
) -> list[Message | ConnectionEvent]:
    """Every inbox item (connection events too) up to ``payload`` on ``topic``."""
    found: list[Message | ConnectionEvent] = []
    deadline = time.monotonic() + WAIT
    while (left := deadline - time.monotonic()) > 0:
        try:
            item = client.inbox.get(timeout=left)
        except queue.Empty:
            break
        found.append(item)
        if isinstance(item, Message) and item.topic == str(topic) and item.payload == payload:
            return found
    raise AssertionError(f"{payload!r} on {topic} never arrived; got {found}")


def refused(
    broker: SecureBroker,
    endpoint: BrokerEndpoint,
    tls_files: TlsFiles | None = None,
    *,
    broker_logs: str,
) -> str:
    """Try to connect; the test fails if it connects or if the broker does not log ``broker_logs``
    for the attempt. Returns the client's reason for failing."""
    logged_before = len(broker.log())
    client = MqttClient(endpoint, f"intruder-{uuid.uuid4().hex[:6]}", tls_files=tls_files)
    with pytest.raises(BrokerUnavailable) as info:
        client.start(timeout=REFUSED_WITHIN)
    deadline = time.monotonic() + WAIT
    while broker_logs not in (logged := broker.log()[logged_before:]):
        assert time.monotonic() < deadline, f"the broker never logged {broker_logs!r}: {logged}"
        time.sleep(0.05)  # polls the file Mosquitto appends its log to
    return str(info.value)


# -- who may connect


def test_a_client_built_from_settings_carries_their_keepalive_tls_and_credentials(
    passwords: SecureBroker,
) -> None:
    """MqttClient.from_settings connects over TLS with the settings' CA, as their user, with their
    keep-alive: the broker logs the client's user and keep-alive as it connects."""
    settings = passwords.settings("cleveland").model_copy(update={"keepalive": 17})
    assert settings.broker_url.tls
    assert settings.ca_file is not None
    with MqttClient.from_settings(settings, f"settings-{uuid.uuid4().hex[:6]}") as client:
        assert client.connected
    # The broker names the client by its user (use_username_as_clientid); 17 is this test's own.
    expected = "as cleveland (p2, c1, k17, u'cleveland')"
    deadline = time.monotonic() + WAIT
    while expected not in (logged := passwords.log()):
        assert time.monotonic() < deadline, f"the broker never logged {expected!r}: {logged}"
        time.sleep(0.05)  # polls the file Mosquitto appends its log to


def test_every_generated_identity_connects(mtls: SecureBroker, passwords: SecureBroker) -> None:
    """Each identity's env file (certificate or password) gets it onto its deployment's broker."""
    for broker in (mtls, passwords):
        for identity in broker.deployment.env_files:
            with broker.client(identity) as client:
                assert client.connected, identity


NOT_AUTHORIZED = "broker refused the connection: Not authorized"


def test_anonymous_client_is_refused(passwords: SecureBroker) -> None:
    """A TLS client that trusts the CA but gives no user name is refused as not authorised."""
    settings = passwords.settings("cleveland")
    endpoint = settings.broker_url
    anonymous = BrokerEndpoint(endpoint.host, endpoint.port, tls=True)
    reason = refused(
        passwords, anonymous, settings.tls_files(), broker_logs="disconnected, not authorised."
    )
    assert reason.endswith(NOT_AUTHORIZED), reason


def test_wrong_password_is_refused(passwords: SecureBroker) -> None:
    """A known user with a wrong password is refused as not authorised."""
    settings = passwords.settings("cleveland")
    endpoint = settings.broker_url
    wrong = BrokerEndpoint(
        endpoint.host,
        endpoint.port,
        tls=True,
        username="cleveland",
        password="guess",  # noqa: S106 - a wrong one on purpose
    )
    reason = refused(
        passwords, wrong, settings.tls_files(), broker_logs="disconnected, not authorised."
    )
    assert reason.endswith(NOT_AUTHORIZED), reason


def test_another_identitys_password_is_refused(passwords: SecureBroker) -> None:
    """One hospital's password does not log in as another hospital."""
    settings = passwords.settings("cleveland")
    endpoint = settings.broker_url
    borrowed = BrokerEndpoint(
        endpoint.host,
        endpoint.port,
        tls=True,
        username="hungarian",
        password=endpoint.password,
    )
    reason = refused(
        passwords, borrowed, settings.tls_files(), broker_logs="disconnected, not authorised."
    )
    assert reason.endswith(NOT_AUTHORIZED), reason


def test_client_without_certificate_is_refused_on_the_mtls_listener(mtls: SecureBroker) -> None:
    """Trusting the CA is not enough: a client that shows no certificate fails the handshake."""
    settings = mtls.settings("cleveland")
    refused(
        mtls,
        settings.broker_url,
        TlsFiles(ca_file=settings.ca_file),
        broker_logs="peer did not return a certificate",
    )


def test_certificate_of_another_ca_is_refused(mtls: SecureBroker, tmp_path: Path) -> None:
    """A certificate named like a hospital but issued by another deployment's CA is refused."""
    with secure_broker(tmp_path, auth=AuthMode.MTLS, federation=mtls.federation) as other:
        foreign = other.settings("cleveland")
        ours = mtls.settings("cleveland")
        refused(
            mtls,
            ours.broker_url,
            TlsFiles(ca_file=ours.ca_file, cert_file=foreign.cert_file, key_file=foreign.key_file),
            broker_logs="certificate verify failed",
        )


def test_plain_mqtt_is_refused_on_the_tls_listener(passwords: SecureBroker) -> None:
    """A client that skips TLS never gets an MQTT session, even with the right password."""
    endpoint = passwords.settings("cleveland").broker_url
    plain = BrokerEndpoint(
        endpoint.host, endpoint.port, username=endpoint.username, password=endpoint.password
    )
    refused(passwords, plain, broker_logs="SSL routines::wrong version number")


def test_a_client_that_does_not_trust_the_ca_refuses_the_broker(mtls: SecureBroker) -> None:
    """With the system trust store instead of the federation's CA, the broker is not believed."""
    settings = mtls.settings("cleveland")
    reason = refused(
        mtls,
        settings.broker_url,
        TlsFiles(cert_file=settings.cert_file, key_file=settings.key_file),
        broker_logs="tlsv1 alert unknown ca",
    )
    assert "SSLCertVerificationError: [SSL: CERTIFICATE_VERIFY_FAILED]" in reason, reason


# -- what each identity may do


def test_a_hospital_cannot_publish_as_another_or_as_the_aggregator_or_operator(
    mtls: SecureBroker,
) -> None:
    """cleveland's writes to hungarian's update topic, the model, acks, status, versions and
    control all vanish; its own update arrives."""
    tree = tree_of(mtls)
    with (
        mtls.client("aggregator") as aggregator,
        mtls.client("hungarian") as hungarian,
        mtls.client("operator") as operator,
        mtls.client("cleveland") as cleveland,
    ):
        aggregator.subscribe(tree.all_updates())
        aggregator.subscribe(tree.control_requests())
        hungarian.subscribe(tree.manifest())
        hungarian.subscribe(tree.all_chunks())
        hungarian.subscribe(tree.ack("hungarian"))
        hungarian.subscribe(tree.aggregator_status())
        operator.subscribe(tree.versions())
        operator.subscribe(tree.route_filter(tree.control_reply("x").route))
        forged = b"forged by cleveland"
        for topic in (
            tree.update("hungarian"),
            tree.manifest(),
            tree.chunk(0, 0),
            tree.ack("hungarian"),
            tree.aggregator_status(),
            tree.versions(),
            tree.control_requests(),
            tree.control_reply("req1"),
        ):
            cleveland.publish(topic, forged, wait=WAIT)
        own = b"cleveland's own update"
        cleveland.publish(tree.update("cleveland"), own, wait=WAIT)
        assert [m.payload for m in until(aggregator, tree.update("cleveland"), own)] == [own]
        for watcher, topic in (
            (hungarian, tree.manifest()),
            (operator, tree.versions()),
        ):
            real = b"from the aggregator"
            aggregator.publish(topic, real, wait=WAIT)
            assert [m.payload for m in until(watcher, topic, real)] == [real]
        real_reply = b"reply"
        aggregator.publish(tree.control_reply("req2"), real_reply, wait=WAIT)
        assert [m.payload for m in until(operator, tree.control_reply("req2"), real_reply)] == [
            real_reply
        ]
        aggregator.clear_retained(tree.manifest())


def test_a_hospital_cannot_read_another_hospitals_updates_or_acks(mtls: SecureBroker) -> None:
    """Subscribed to the whole federation, cleveland gets the model and status, never hungarian's
    update or ack (nor control traffic)."""
    tree = tree_of(mtls)
    with (
        mtls.client("aggregator") as aggregator,
        mtls.client("operator") as operator,
        mtls.client("hungarian") as hungarian,
        mtls.client("cleveland") as cleveland,
    ):
        cleveland.subscribe(tree.everything())
        cleveland.subscribe(tree.all_updates())
        cleveland.subscribe(tree.ack("hungarian"))
        hungarian.publish(tree.update("hungarian"), b"hungarian's update", wait=WAIT)
        aggregator.publish(tree.ack("hungarian"), b"hungarian's ack", wait=WAIT)
        operator.publish(tree.control_requests(), b"a request", wait=WAIT)
        aggregator.publish(tree.control_reply("r1"), b"a reply", wait=WAIT)
        aggregator.publish(tree.versions(), b"a version record", wait=WAIT)
        aggregator.publish(tree.ack("cleveland"), b"cleveland's ack", wait=WAIT)
        marker = b"the model"
        aggregator.publish(tree.manifest(), marker, wait=WAIT)
        got = until(cleveland, tree.manifest(), marker)
        assert [(m.topic, m.payload) for m in got] == [
            (str(tree.ack("cleveland")), b"cleveland's ack"),
            (str(tree.manifest()), marker),
        ]
        aggregator.clear_retained(tree.manifest())


def test_the_dashboard_sees_statuses_and_versions_but_no_model_or_updates(
    mtls: SecureBroker,
) -> None:
    """The dashboard, subscribed to everything, receives statuses, evaluations and version
    records only."""
    tree = tree_of(mtls)
    with (
        mtls.client("aggregator") as aggregator,
        mtls.client("cleveland") as cleveland,
        mtls.client("dashboard") as dashboard,
    ):
        dashboard.subscribe(tree.everything())
        aggregator.publish(tree.chunk(3, 0), b"weights", wait=WAIT)
        aggregator.publish(tree.manifest(), b"manifest", wait=WAIT)
        cleveland.publish(tree.update("cleveland"), b"delta", wait=WAIT)
        cleveland.publish(tree.node_eval("cleveland"), b"eval", wait=WAIT)
        aggregator.publish(tree.ack("cleveland"), b"ack", wait=WAIT)
        cleveland.publish(tree.node_status("cleveland"), b"node status", wait=WAIT)
        aggregator.publish(tree.versions(), b"version record", wait=WAIT)
        aggregator.publish(tree.aggregator_status(), b"status", wait=WAIT)
        got = until(dashboard, tree.aggregator_status(), b"status")
        assert sorted(m.payload for m in got) == [
            b"eval",
            b"node status",
            b"status",
            b"version record",
        ]
        for topic in (tree.chunk(3, 0), tree.manifest(), tree.aggregator_status()):
            aggregator.clear_retained(topic)
        cleveland.clear_retained(tree.node_status("cleveland"))


def test_the_dashboard_cannot_write_anything(mtls: SecureBroker) -> None:
    """Control requests, updates and statuses from the dashboard are all dropped."""
    tree = tree_of(mtls)
    with (
        mtls.client("aggregator") as aggregator,
        mtls.client("operator") as operator,
        mtls.client("dashboard") as dashboard,
    ):
        aggregator.subscribe(tree.control_requests())
        aggregator.subscribe(tree.all_updates())
        aggregator.subscribe(tree.all_node_evals())
        operator.subscribe(tree.aggregator_status())
        operator.subscribe(tree.all_node_status())
        for topic in (
            tree.control_requests(),
            tree.update("dashboard"),
            tree.update("cleveland"),
            tree.node_eval("dashboard"),
            tree.node_status("dashboard"),
            tree.aggregator_status(),
        ):
            dashboard.publish(topic, b"from the dashboard", wait=WAIT)
        operator.publish(tree.control_requests(), b"operator", wait=WAIT)
        assert [m.payload for m in until(aggregator, tree.control_requests(), b"operator")] == [
            b"operator"
        ]
        aggregator.publish(tree.aggregator_status(), b"aggregator", wait=WAIT)
        got = until(operator, tree.aggregator_status(), b"aggregator")
        assert [m.payload for m in got] == [b"aggregator"]
        aggregator.clear_retained(tree.aggregator_status())


def test_only_the_operator_sends_control_requests_and_reads_replies(mtls: SecureBroker) -> None:
    """A hospital's control request is dropped and it cannot read replies; the operator's works."""
    tree = tree_of(mtls)
    with (
        mtls.client("aggregator") as aggregator,
        mtls.client("operator") as operator,
        mtls.client("cleveland") as cleveland,
    ):
        aggregator.subscribe(tree.control_requests())
        cleveland.subscribe(tree.route_filter(tree.control_reply("x").route))
        cleveland.subscribe(tree.ack("cleveland"))
        operator.subscribe(tree.route_filter(tree.control_reply("x").route))
        cleveland.publish(tree.control_requests(), b"stop, says cleveland", wait=WAIT)
        operator.publish(tree.control_requests(), b"status, says the operator", wait=WAIT)
        got = until(aggregator, tree.control_requests(), b"status, says the operator")
        assert [m.payload for m in got] == [b"status, says the operator"]
        aggregator.publish(tree.control_reply("r9"), b"reply", wait=WAIT)
        until(operator, tree.control_reply("r9"), b"reply")
        # After the reply, a message cleveland may read: it must arrive alone.
        aggregator.publish(tree.ack("cleveland"), b"cleveland's ack", wait=WAIT)
        got = until(cleveland, tree.ack("cleveland"), b"cleveland's ack")
        assert [m.payload for m in got] == [b"cleveland's ack"]


def test_a_hospital_cannot_take_over_the_aggregators_session(mtls: SecureBroker) -> None:
    """Client ids are the identities: connecting with the aggregator's client id as cleveland
    neither kicks the aggregator off nor touches its session."""
    tree = tree_of(mtls)
    with mtls.client("aggregator", persistent_session=True) as aggregator:
        aggregator.subscribe(tree.all_updates())
        with mtls.client("cleveland", client_id="aggregator") as impostor:
            impostor.publish(tree.update("cleveland"), b"hello", wait=WAIT)
            # A takeover would close the aggregator's connection before hello could reach it
            # (on the session's next connection): the loss would be on the inbox first.
            got = items_until(aggregator, tree.update("cleveland"), b"hello")
        events = [item.connected for item in got if isinstance(item, ConnectionEvent)]
        assert events == [True], got  # the first connect, and no loss since
        assert aggregator.connected


def test_publishing_from_another_thread_over_tls_keeps_the_connection_intact(
    mtls: SecureBroker,
) -> None:
    """Large publishes from the caller's thread while messages arrive on the network thread all
    get through, and the TLS session survives (only the network thread writes the socket)."""
    tree = tree_of(mtls)
    with (
        mtls.client("aggregator") as aggregator,
        mtls.client("cleveland") as cleveland,
    ):
        aggregator.subscribe(tree.all_updates())
        cleveland.subscribe(tree.ack("cleveland"))
        blob = bytes(range(256)) * 400  # 100 KiB
        for i in range(60):
            cleveland.publish(tree.update("cleveland"), blob + i.to_bytes(2, "big"))
            aggregator.publish(tree.ack("cleveland"), i.to_bytes(2, "big") + blob)
        assert cleveland.flush(WAIT)
        assert aggregator.flush(WAIT)
        last = (59).to_bytes(2, "big")
        updates = until(aggregator, tree.update("cleveland"), blob + last)
        acks = until(cleveland, tree.ack("cleveland"), last + blob)
        assert len(updates) == len(acks) == 60
        assert aggregator.connected
        assert cleveland.connected
