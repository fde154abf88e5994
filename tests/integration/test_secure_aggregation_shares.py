"""Secure aggregation's share distribution over a real Mosquitto with `healthnet deploy init
--auth mtls`'s files: a node masks an update and publishes its sealed shares; each other holder,
subscribed as its service would be, stores its share durably and publishes a receipt, which the
aggregator receives. A share that does not open, and a second, different share of an update
already held, are refused and never receipted.

Waits are bounded (a message that has not arrived within WAIT never will); nothing asserts on
how long anything took.
"""

from __future__ import annotations

import queue
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from common.inbound import Inbound, receive
from common.mqtt import Message, MqttClient
from common.secure_aggregation.directory import KeyDirectory
from common.secure_aggregation.events import Receipt, SealedShare
from common.secure_aggregation.policy import SecureAggregationPolicy
from common.secure_aggregation.wire import receipts_of
from common.topics import Role, Route, TopicTree
from edge_node.secure_holder import SecureUpload, ShareHolder, load_agreement_key, mask_for_upload
from edge_node.secure_shares import ShareInbox, publish_receipts, publish_shares
from healthnet.deploy import AuthMode
from tests.integration.test_secure_aggregation_keys import directory_of, publish_own_records
from tests.secure import HOSPITALS, SecureBroker, secure_broker

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]

WAIT = 10.0  # seconds
LIMIT = 1 << 20
SIZE = 28  # the heart federation's logistic regression
POLICY = SecureAggregationPolicy(holders=HOSPITALS)
SENDER = "cleveland"
HOLDERS = tuple(h for h in HOSPITALS if h != SENDER)


@dataclass
class Holder:
    """One hospital's side, as its service would run it: keys, shares in, receipts out."""

    identity: str
    client: MqttClient
    tree: TopicTree
    keys: KeyDirectory
    inbox: ShareInbox
    receipted: list[Receipt] = field(default_factory=list)

    def take(self, inbound: Inbound) -> None:
        receipts: tuple[Receipt, ...] = ()
        match inbound.topic.route:
            case Route.SECAGG_KEY:
                proven = isinstance(self.keys.offer(inbound), X25519PublicKey)
                if proven and inbound.topic.node:
                    receipts = self.inbox.key_proven(inbound.topic.node)
            case Route.SECAGG_SHARE:
                receipts = self.inbox.take(inbound)
            case _:
                pass
        publish_receipts(self.client, self.tree, POLICY.digest(), receipts, sent_at=time.time())
        self.receipted += receipts


def drain(
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


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[SecureBroker]:
    federation = f"shares{uuid.uuid4().hex[:8]}"
    with secure_broker(tmp_path, auth=AuthMode.MTLS, federation=federation) as b:
        yield b


def start_holder(
    stack: ExitStack, broker: SecureBroker, nodes: Path, identity: str, *, subscribed: bool
) -> Holder:
    """A holder with its share files and a connected client: subscribed as its service would
    be under the policy, or (``subscribed`` False) to the shares sent to it by SENDER only."""
    tree = TopicTree(broker.federation)
    keys = directory_of(broker, identity)
    share_holder = stack.enter_context(
        ShareHolder(
            nodes / identity / "holder",
            federation=broker.federation,
            identity=identity,
            policy=POLICY,
            size=SIZE,
            own_key=load_agreement_key(nodes / identity),
        )
    )
    client = broker.client(identity, f"{identity}.holder")
    if subscribed:
        for topic_filter in tree.subscriptions(Role.HOSPITAL, identity, secure_aggregation=True):
            client.subscribe(topic_filter)
    else:
        client.subscribe(tree.secagg_share(identity, SENDER))
    stack.enter_context(client)
    return Holder(identity, client, tree, keys, ShareInbox(share_holder, keys))


def mask(root: Path, keys: KeyDirectory, update_id: str, seed: int) -> SecureUpload:
    holder_keys = {h: k for h in HOLDERS if (k := keys.key(h)) is not None}
    return mask_for_upload(
        np.random.default_rng(seed).normal(size=SIZE),
        policy=POLICY,
        federation=keys.federation,
        identity=SENDER,
        own_key=load_agreement_key(root / SENDER),
        holder_keys=holder_keys,
        update_id=update_id,
        base_version=0,
        num_samples=100,
        rng=np.random.default_rng(seed),
        random_bytes=np.random.default_rng(seed + 1).bytes,
    )


def test_shares_reach_their_holders_who_store_them_and_receipt_them_to_the_aggregator(
    broker: SecureBroker, tmp_path: Path
) -> None:
    """cleveland masks u-1 and publishes its three shares; each other hospital stores its own
    and receipts it; the aggregator holds three receipts for u-1. Then a share from va that
    does not open (bytes no pair key sealed) and a second, different share of u-1 (another
    mask for the same update id) are refused and counted, and never receipted; a later share
    is."""
    nodes = tmp_path / "nodes"
    publish_own_records(broker, nodes)
    tree = TopicTree(broker.federation)
    receipts: dict[str, set[str]] = {}

    def take_receipts(inbound: Inbound) -> None:
        if inbound.topic.route is not Route.SECAGG_RECEIPT:
            return  # the aggregator reads key records and answers too
        got = receipts_of(inbound)
        assert isinstance(got, tuple), got
        digest, batch = got
        assert digest == POLICY.digest()
        for receipt in batch:
            receipts.setdefault(receipt.update_id, set()).add(receipt.holder)

    with ExitStack() as stack:
        holders = {
            identity: start_holder(stack, broker, nodes, identity, subscribed=True)
            for identity in HOLDERS
        }
        aggregator = broker.client("aggregator")
        for topic_filter in tree.subscriptions(Role.AGGREGATOR, secure_aggregation=True):
            aggregator.subscribe(topic_filter)
        stack.enter_context(aggregator)
        sender_keys = directory_of(broker, SENDER)
        sender = broker.client(SENDER, f"{SENDER}.sender")
        sender.subscribe(tree.route_filter(Route.SECAGG_KEY))
        stack.enter_context(sender)
        drain(sender, tree, sender_keys.offer, lambda: not sender_keys.missing(HOLDERS))
        assert sender_keys.missing(HOLDERS) == ()

        upload = mask(nodes, sender_keys, "u-1", seed=1)
        publish_shares(sender, tree, upload.shares, sent_at=time.time())
        for holder in holders.values():
            drain(holder.client, tree, holder.take, lambda h=holder: bool(h.receipted))  # type: ignore[misc]
            assert holder.receipted == [Receipt(holder.identity, "u-1")]
            assert holder.inbox.holder.held() == {"u-1": SENDER}
        drain(aggregator, tree, take_receipts, lambda: receipts.get("u-1") == set(HOLDERS))
        assert receipts == {"u-1": set(HOLDERS)}

        forged = SealedShare("u-2", "va", "hungarian", POLICY.digest(), bytes(SIZE * 4 + 28))
        with broker.client("va", "va.forger") as va:
            publish_shares(va, tree, [forged], sent_at=time.time())
            assert va.flush(WAIT)
        remasked = mask(nodes, sender_keys, "u-1", seed=2)
        again = [s for s in remasked.shares if s.recipient == "hungarian"]
        later = [
            s for s in mask(nodes, sender_keys, "u-3", seed=3).shares if s.recipient == "hungarian"
        ]
        publish_shares(sender, tree, [*again, *later], sent_at=time.time())
        hungarian = holders["hungarian"]
        drain(
            hungarian.client,
            tree,
            hungarian.take,
            lambda: len(hungarian.receipted) == 2 and hungarian.inbox.refusals.total() == 2,
        )
        assert hungarian.receipted == [Receipt("hungarian", "u-1"), Receipt("hungarian", "u-3")]
        assert hungarian.inbox.refusals == {"share_refused": 2}
        drain(aggregator, tree, take_receipts, lambda: "u-3" in receipts)
        assert receipts == {"u-1": set(HOLDERS), "u-3": {"hungarian"}}
        assert hungarian.inbox.holder.held() == {"u-1": SENDER, "u-3": SENDER}


def test_a_share_that_arrives_before_its_senders_key_waits_for_it(
    broker: SecureBroker, tmp_path: Path
) -> None:
    """hungarian's holder starts with no key records; cleveland's share waits in memory and is
    stored and receipted the moment cleveland's record is proven."""
    nodes = tmp_path / "nodes"
    publish_own_records(broker, nodes)
    tree = TopicTree(broker.federation)
    sender_keys = directory_of(broker, SENDER)
    with ExitStack() as stack:
        sender = stack.enter_context(broker.client(SENDER, f"{SENDER}.sender"))
        sender.subscribe(tree.route_filter(Route.SECAGG_KEY))
        drain(sender, tree, sender_keys.offer, lambda: not sender_keys.missing(HOLDERS))
        holder = start_holder(stack, broker, nodes, "hungarian", subscribed=False)
        client, inbox = holder.client, holder.inbox
        upload = mask(nodes, sender_keys, "u-1", seed=1)
        publish_shares(sender, tree, upload.shares, sent_at=time.time())
        drain(client, tree, holder.take, lambda: inbox.waiting == 1)
        assert (inbox.waiting, holder.receipted) == (1, [])
        client.subscribe(tree.route_filter(Route.SECAGG_KEY))
        drain(client, tree, holder.take, lambda: bool(holder.receipted))
        assert holder.receipted == [Receipt("hungarian", "u-1")]
        assert inbox.waiting == 0
        assert not inbox.refusals
