"""Secure aggregation's key directory over a real Mosquitto with `healthnet deploy init --auth
mtls`'s files: every hospital publishes its signed key record, retained, and a peer or the
aggregator that starts later verifies each one against the federation's CA; a substituted record
is refused with its reason, and the generated ACL keeps one hospital from overwriting another's
record or reading the shares addressed to another.

Waits are bounded (a record that has not arrived within WAIT never will); nothing asserts on
how long anything took.
"""

from __future__ import annotations

import datetime as dt
import queue
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from common.codec import encode, envelope
from common.inbound import Inbound, receive
from common.mqtt import Message, MqttClient
from common.secure_aggregation import KeyRecord, sign_key_record
from common.secure_aggregation.directory import KeyDirectory
from common.secure_aggregation.events import SealedShare
from common.secure_aggregation.wire import WireRefused, share_of, to_key_record, to_share
from common.topics import Role, TopicFilter, TopicTree
from edge_node.secure_holder import load_agreement_key
from edge_node.secure_keys import own_key_record, publish_key_record
from healthnet.deploy import AuthMode
from healthnet.deploy.pki import CertificateAuthority
from tests.secure import HOSPITALS, SecureBroker, secure_broker

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]

WAIT = 10.0  # seconds
LIMIT = 1 << 20


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[SecureBroker]:
    federation = f"keys{uuid.uuid4().hex[:8]}"
    with secure_broker(tmp_path, auth=AuthMode.MTLS, federation=federation) as b:
        yield b


def raw(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def publish_own_records(broker: SecureBroker, root: Path) -> dict[str, bytes]:
    """Each hospital signs its agreement key (made on first use, 0600) with its client
    certificate and publishes the record, retained; returns each one's raw public key."""
    tree = TopicTree(broker.federation)
    published = {}
    for hospital in HOSPITALS:
        settings = broker.settings(hospital)
        key = load_agreement_key(root / hospital)
        record = own_key_record(
            federation=broker.federation,
            identity=hospital,
            agreement_key=key,
            cert_file=settings.cert_file,
            key_file=settings.key_file,
            ca_file=settings.ca_file,
            now=dt.datetime.now(dt.UTC),
        )
        with broker.client(hospital) as client:
            publish_key_record(client, tree, record, sent_at=time.time())
            assert client.flush(WAIT)
        published[hospital] = raw(key.public_key())
    return published


def directory_of(broker: SecureBroker, identity: str) -> KeyDirectory:
    ca = Path(broker.settings(identity).ca_file or "").read_bytes()
    return KeyDirectory(federation=broker.federation, ca_certificate_pem=ca)


def collect(
    client: MqttClient, tree: TopicTree, take: Callable[[Inbound], object], done: Callable[[], bool]
) -> None:
    """Hand every message the client receives to ``take`` until ``done()`` or WAIT passes."""
    deadline = time.monotonic() + WAIT
    while not done() and (left := deadline - time.monotonic()) > 0:
        try:
            item = client.inbox.get(timeout=min(left, 0.2))
        except queue.Empty:
            continue
        if isinstance(item, Message):
            received = receive(item.topic, item.payload, topics=tree, max_bytes=LIMIT)
            if isinstance(received, Inbound):
                take(received)


def late_reader(
    broker: SecureBroker, identity: str, role: Role, until: Callable[[KeyDirectory], bool]
) -> KeyDirectory:
    """A reader that connects after the records were published: it finds them retained."""
    tree = TopicTree(broker.federation)
    keys = directory_of(broker, identity)
    client = broker.client(identity, f"{identity}.late.{uuid.uuid4().hex[:6]}")
    for topic_filter in tree.subscriptions(role, identity, secure_aggregation=True):
        client.subscribe(topic_filter)
    with client:
        collect(client, tree, keys.offer, lambda: until(keys))
    return keys


def test_every_hospitals_key_record_is_verified_by_a_peer_and_the_aggregator(
    broker: SecureBroker, tmp_path: Path
) -> None:
    """Published once at each node's start and retained, the four records reach a hospital and
    the aggregator that start afterwards, and each verifies all four against the CA."""
    published = publish_own_records(broker, tmp_path / "nodes")
    for identity, role in (("cleveland", Role.HOSPITAL), ("aggregator", Role.AGGREGATOR)):
        keys = late_reader(broker, identity, role, lambda k: not k.missing(HOSPITALS))
        assert keys.missing(HOSPITALS) == (), identity
        held = {h: keys.key(h) for h in HOSPITALS}
        assert {h: raw(key) for h, key in held.items() if key is not None} == published
        assert not keys.refusals


def forged_record(federation: str, identity: str) -> KeyRecord:
    """What a broker or an aggregator could make: a key of its own, signed with a certificate
    for the hospital's name from a CA of its own."""
    rogue = CertificateAuthority.create(federation, days=1)
    issued = rogue.issue_client(identity, federation=federation, days=1)
    return sign_key_record(
        federation=federation,
        identity=identity,
        public_key=X25519PrivateKey.generate().public_key(),
        certificate_pem=issued.certificate,
        signing_key_pem=issued.private_key,
    )


def test_a_substituted_key_record_is_refused_and_the_acl_keeps_each_record_its_owners(
    broker: SecureBroker, tmp_path: Path
) -> None:
    """va, after publishing its genuine record, replaces it with a forged one (a rogue CA's
    certificate), tries to overwrite cleveland's record (the ACL drops the publish) and
    republishes cleveland's genuine record on its own topic. A reader that starts afterwards
    holds cleveland's genuine key, refuses both of va's records with their reasons, and so
    holds no key for va: va can take no part until it publishes a record the CA proves."""
    tree = TopicTree(broker.federation)
    published = publish_own_records(broker, tmp_path / "nodes")
    genuine = own_key_record(
        federation=broker.federation,
        identity="cleveland",
        agreement_key=load_agreement_key(tmp_path / "nodes" / "cleveland"),
        cert_file=broker.settings("cleveland").cert_file,
        key_file=broker.settings("cleveland").key_file,
        ca_file=broker.settings("cleveland").ca_file,
        now=dt.datetime.now(dt.UTC),
    )
    with broker.client("va") as va:
        publish_key_record(va, tree, forged_record(broker.federation, "va"), sent_at=time.time())
        forged_cleveland = forged_record(broker.federation, "cleveland")
        va.publish(
            tree.secagg_key("cleveland"),
            encode(
                envelope(to_key_record(forged_cleveland), sender="cleveland", sent_at=time.time())
            ),
        )
        va.publish(
            tree.secagg_key("va"),
            encode(envelope(to_key_record(genuine), sender="va", sent_at=time.time())),
        )
        assert va.flush(WAIT)

    keys = late_reader(
        broker,
        "switzerland",
        Role.HOSPITAL,
        lambda k: bool(k.refusals) and k.missing(HOSPITALS) == ("va",),
    )
    cleveland = keys.key("cleveland")
    assert cleveland is not None
    assert raw(cleveland) == published["cleveland"]
    assert keys.key("va") is None
    assert keys.missing(HOSPITALS) == ("va",)
    # Retained: only va's last record is there to refuse (cleveland's genuine record on va's
    # topic: it names cleveland); the forged one it replaced is refused by a reader who saw it
    # (the next test).
    assert keys.refusals == {WireRefused.KEY_NOT_PROVEN: 1}
    assert keys.last_refusal is not None
    assert "names 'cleveland'" in keys.last_refusal


def test_a_reader_subscribed_early_refuses_the_forged_record_and_keeps_the_proven_key(
    broker: SecureBroker, tmp_path: Path
) -> None:
    """The aggregator, already subscribed, sees va's genuine record and then a forged one that
    replaces it on the broker: it refuses the forgery (not issued by the CA) and keeps the key
    it had proven."""
    tree = TopicTree(broker.federation)
    keys = directory_of(broker, "aggregator")
    refusals: list[str] = []

    def take(inbound: Inbound) -> None:
        result = keys.offer(inbound)
        if not isinstance(result, X25519PublicKey):
            refusals.append(result.detail)

    client = broker.client("aggregator")
    for topic_filter in tree.subscriptions(Role.AGGREGATOR, secure_aggregation=True):
        client.subscribe(topic_filter)
    with client:
        published = publish_own_records(broker, tmp_path / "nodes")
        collect(client, tree, take, lambda: not keys.missing(HOSPITALS))
        with broker.client("va") as va:
            publish_key_record(
                va, tree, forged_record(broker.federation, "va"), sent_at=time.time()
            )
            assert va.flush(WAIT)
        collect(client, tree, take, lambda: bool(refusals))
    assert len(refusals) == 1
    assert "not issued by the federation's CA" in refusals[0]
    va_key = keys.key("va")
    assert va_key is not None
    assert raw(va_key) == published["va"]


def test_a_share_reaches_only_its_recipient(broker: SecureBroker) -> None:
    """cleveland sends a share to each other hospital, hungarian's last; hungarian, subscribed
    to every share topic (secagg/shares/#), receives only the one addressed to it. (One
    connection's messages reach a subscriber in order, so another's share would have come
    first.)"""
    tree = TopicTree(broker.federation)
    reader = broker.client("hungarian")
    reader.subscribe(TopicFilter(f"{tree.prefix}/secagg/shares/#"))
    got: list[SealedShare] = []
    digest = "cd" * 32
    with reader, broker.client("cleveland") as sender:
        for recipient in ("switzerland", "va", "hungarian"):
            share = SealedShare("u-1", "cleveland", recipient, digest, recipient.encode() * 40)
            sender.publish(
                tree.secagg_share(recipient, "cleveland"),
                encode(envelope(to_share(share), sender="cleveland", sent_at=time.time())),
            )
        assert sender.flush(WAIT)

        def take(inbound: Inbound) -> None:
            share = share_of(inbound)
            assert isinstance(share, SealedShare)
            got.append(share)

        collect(reader, tree, take, lambda: any(s.recipient == "hungarian" for s in got))
    assert [share.recipient for share in got] == ["hungarian"]
