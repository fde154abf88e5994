"""Share distribution over the broker: a node publishes its sealed shares; a holder stores each
one it receives and publishes a receipt.

Theory of operation (docs/secure-aggregation.md#message-flow, steps 2 and 3). After masking an
update (``edge_node.secure_holder.mask_for_upload``) the node keeps its own share and
:func:`publish_shares` sends each other holder's on ``secagg/shares/{holder}/{node}`` (QoS 1; the
ACL lets only the holder read it). A holder's :class:`ShareInbox` takes each share the broker
delivers: the wire checks (:func:`common.secure_aggregation.wire.share_of`: the envelope's sender
is the topic's, the share is addressed to the topic's recipient), then the sender's key from the
:class:`~common.secure_aggregation.directory.KeyDirectory`, then
:meth:`~edge_node.secure_holder.ShareHolder.accept`, which opens it, checks its policy and length
and stores it durably (fsync). Only then does it hand back the :class:`Receipt` to publish
(:func:`publish_receipts`), and only then may the service PUBACK the share: a share the holder
crashed before storing is redelivered by its persistent session.

A share whose sender has no proven key yet (its key record may arrive after its share: the
broker orders messages per topic only) waits in memory, at most :data:`MAX_WAITING` of them,
until :meth:`ShareInbox.key_proven`. Anything refused is logged and counted by reason
(:attr:`ShareInbox.refusals`); a holder never receipts a share it did not store.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable

from common.codec import encode, envelope
from common.inbound import Inbound
from common.mqtt import MqttClient
from common.secure_aggregation.directory import KeyDirectory
from common.secure_aggregation.events import Receipt, SealedShare
from common.secure_aggregation.keys import ShareRefused
from common.secure_aggregation.wire import WireRefusal, share_of, to_receipt, to_share
from common.topics import TopicTree
from edge_node.secure_holder import ShareHolder

__all__ = ["MAX_WAITING", "ShareInbox", "publish_receipts", "publish_shares"]

log = logging.getLogger(__name__)

# Shares held in memory while their sender's key record has not been proven.
MAX_WAITING = 1024


def publish_shares(
    client: MqttClient, topics: TopicTree, shares: Iterable[SealedShare], *, sent_at: float
) -> None:
    """Publish each sealed share on its recipient's topic, in the sender's name."""
    for share in shares:
        client.publish(
            topics.secagg_share(share.recipient, share.sender),
            encode(envelope(to_share(share), sender=share.sender, sent_at=sent_at)),
        )


def publish_receipts(
    client: MqttClient,
    topics: TopicTree,
    policy_digest: str,
    receipts: tuple[Receipt, ...],
    *,
    sent_at: float,
) -> None:
    """Publish one holder's receipts (stored shares) on its receipt topic."""
    if not receipts:
        return
    holder = receipts[0].holder
    client.publish(
        topics.secagg_receipt(holder),
        encode(envelope(to_receipt(policy_digest, receipts), sender=holder, sent_at=sent_at)),
    )


class ShareInbox:
    """A holder's shares as they arrive: stored and receipted, waiting for a key, or refused."""

    def __init__(self, holder: ShareHolder, keys: KeyDirectory) -> None:
        self.holder = holder
        self.keys = keys
        self.refusals: Counter[str] = Counter()
        self._waiting: dict[str, list[SealedShare]] = {}

    @property
    def waiting(self) -> int:
        return sum(len(shares) for shares in self._waiting.values())

    def take(self, inbound: Inbound) -> tuple[Receipt, ...]:
        """The receipt of a share received on the holder's share topic, once it is stored;
        none when it waits for its sender's key or is refused."""
        share = share_of(inbound)
        if isinstance(share, WireRefusal):
            self._refuse(str(inbound.topic), share.reason.value, share.detail)
            return ()
        return self._accept(share, str(inbound.topic))

    def key_proven(self, identity: str) -> tuple[Receipt, ...]:
        """The receipts of the shares that waited for ``identity``'s key, now that it is."""
        receipts: list[Receipt] = []
        for share in self._waiting.pop(identity, []):
            receipts += self._accept(share, f"{share.sender}'s share of {share.update_id}")
        return tuple(receipts)

    def _accept(self, share: SealedShare, where: str) -> tuple[Receipt, ...]:
        key = self.keys.key(share.sender)
        if key is None:
            if self.waiting >= MAX_WAITING:
                self._refuse(where, "no_key", f"{share.sender} has no proven key record")
            else:
                self._waiting.setdefault(share.sender, []).append(share)
            return ()
        try:
            return (self.holder.accept(share, key),)
        except ShareRefused as exc:
            self._refuse(where, "share_refused", str(exc))
            return ()

    def _refuse(self, where: str, reason: str, detail: str) -> None:
        self.refusals[reason] += 1
        log.warning("secure aggregation: refused the share on %s (%s): %s", where, reason, detail)
