"""Specification of a holder's share inbox without a broker: what waits, and what is refused."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from common.codec import encode, envelope
from common.inbound import Inbound, receive
from common.secure_aggregation.directory import KeyDirectory
from common.secure_aggregation.events import SealedShare
from common.secure_aggregation.policy import SecureAggregationPolicy
from common.secure_aggregation.wire import to_share
from common.topics import TopicTree
from edge_node.secure_holder import ShareHolder
from edge_node.secure_shares import MAX_WAITING, ShareInbox
from healthnet.deploy.pki import CertificateAuthority

FEDERATION = "heart"
POLICY = SecureAggregationPolicy(holders=("cleveland", "hungarian", "switzerland", "va"))
tree = TopicTree(FEDERATION)


def inbound(share: SealedShare, sender: str) -> Inbound:
    topic = tree.secagg_share(share.recipient, share.sender)
    payload = encode(envelope(to_share(share), sender=sender, sent_at=1.0))
    received = receive(str(topic), payload, topics=tree, max_bytes=1 << 20)
    assert isinstance(received, Inbound)
    return received


def test_shares_wait_for_their_senders_key_up_to_a_bound_and_bad_ones_are_counted(
    tmp_path: Path,
) -> None:
    """With no key proven, shares wait (MAX_WAITING of them); one more is refused as no_key;
    a share whose envelope names another sender than its topic is refused as wrong_sender.
    Nothing is stored, so nothing is receipted."""
    ca = CertificateAuthority.create(FEDERATION, days=1)
    keys = KeyDirectory(federation=FEDERATION, ca_certificate_pem=ca.certificate_pem)
    with ShareHolder(
        tmp_path,
        federation=FEDERATION,
        identity="hungarian",
        policy=POLICY,
        size=28,
        own_key=X25519PrivateKey.generate(),
    ) as holder:
        inbox = ShareInbox(holder, keys)
        digest = POLICY.digest()
        for index in range(MAX_WAITING + 1):
            share = SealedShare(f"u-{index}", "cleveland", "hungarian", digest, bytes(84 + 28))
            assert inbox.take(inbound(share, "cleveland")) == ()
        share = SealedShare("u-x", "cleveland", "hungarian", digest, bytes(84 + 28))
        assert inbox.take(inbound(share, "va")) == ()
        assert inbox.waiting == MAX_WAITING
        assert inbox.refusals == {"no_key": 1, "wrong_sender": 1}
        assert holder.held() == {}
