"""Secure aggregation's events as envelope bodies, and back, with the checks the topic allows.

Theory of operation. The parties (``edge_node.secure_holder``, ``aggregator.secure_unmask``) speak
the typed events of :mod:`common.secure_aggregation.events` and :class:`KeyRecord`; on the broker
each travels as a body of :mod:`common.messages` on its route of :mod:`common.topics`. The
``to_*`` functions build the body a party publishes; the ``*_of`` functions turn a received
:class:`common.inbound.Inbound` into the event, or a :class:`WireRefusal` saying why not.
Every route names its sender in the topic (``secagg/{kind}/{node}``,
``secagg/shares/{recipient}/{sender}``), which the broker's ACL lets only that identity write;
the envelope must name the same sender, and a share must be addressed to the topic's recipient.
Pure: no I/O, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from common.inbound import Inbound
from common.messages import (
    SecAggAnswer,
    SecAggKey,
    SecAggReceipt,
    SecAggShare,
    SecAggTerm,
    SecAggUnmask,
)
from common.secure_aggregation.events import (
    Receipt,
    SealedShare,
    UnmaskAnswer,
    UnmaskRefusal,
    UnmaskRequest,
)
from common.secure_aggregation.release import Term
from common.topics import Route

if TYPE_CHECKING:
    # keys brings in cryptography: loaded only where a key record is read.
    from common.secure_aggregation.keys import KeyRecord

__all__ = [
    "WireRefusal",
    "WireRefused",
    "answer_of",
    "key_record_of",
    "receipts_of",
    "share_of",
    "to_answer",
    "to_key_record",
    "to_receipt",
    "to_share",
    "to_unmask",
    "unmask_of",
]


class WireRefused(StrEnum):
    """Why a well-formed secure aggregation message is not taken (a metrics label)."""

    WRONG_ROUTE = "wrong_route"  # the body arrived on another route than its own
    WRONG_SENDER = "wrong_sender"  # the envelope's sender is not the topic's node
    WRONG_RECIPIENT = "wrong_recipient"  # a share's body and topic name different recipients
    KEY_NOT_PROVEN = "key_not_proven"  # a key record that does not verify (KeyDirectory)


@dataclass(frozen=True, slots=True)
class WireRefusal:
    reason: WireRefused
    detail: str


def to_key_record(record: KeyRecord) -> SecAggKey:
    return SecAggKey(
        federation=record.federation,
        identity=record.identity,
        public_key=record.public_key,
        certificate=record.certificate,
        signature=record.signature,
    )


def key_record_of(inbound: Inbound) -> KeyRecord | WireRefusal:
    """The key record published on ``secagg/keys/{node}``, not yet verified: that is
    :class:`common.secure_aggregation.directory.KeyDirectory`'s job."""
    body = inbound.body
    if not isinstance(body, SecAggKey) or inbound.topic.route is not Route.SECAGG_KEY:
        return _wrong_route(inbound)
    if (refusal := _sender_refusal(inbound)) is not None:
        return refusal
    from common.secure_aggregation.keys import KeyRecord

    return KeyRecord(
        federation=body.federation,
        identity=body.identity,
        public_key=body.public_key,
        certificate=body.certificate,
        signature=body.signature,
    )


def to_share(share: SealedShare) -> SecAggShare:
    return SecAggShare(
        update_id=share.update_id,
        recipient=share.recipient,
        policy_digest=share.policy_digest,
        sealed=share.sealed,
    )


def share_of(inbound: Inbound) -> SealedShare | WireRefusal:
    """A sealed share received on ``secagg/shares/{recipient}/{sender}``."""
    body = inbound.body
    if not isinstance(body, SecAggShare) or inbound.topic.route is not Route.SECAGG_SHARE:
        return _wrong_route(inbound)
    if (refusal := _sender_refusal(inbound)) is not None:
        return refusal
    if body.recipient != inbound.topic.recipient:
        return WireRefusal(
            WireRefused.WRONG_RECIPIENT,
            f"a share for {body.recipient!r} on {inbound.topic.recipient!r}'s topic",
        )
    return SealedShare(
        update_id=body.update_id,
        sender=inbound.sender,
        recipient=body.recipient,
        policy_digest=body.policy_digest,
        sealed=bytes(body.sealed),
    )


def to_receipt(policy_digest: str, receipts: tuple[Receipt, ...]) -> SecAggReceipt:
    """One message for a holder's receipts (all of them its own, under one policy)."""
    holders = {receipt.holder for receipt in receipts}
    if len(holders) != 1:
        raise ValueError(f"one receipt message is one holder's: got {sorted(holders)}")
    return SecAggReceipt(
        policy_digest=policy_digest, update_ids=tuple(r.update_id for r in receipts)
    )


def receipts_of(inbound: Inbound) -> tuple[str, tuple[Receipt, ...]] | WireRefusal:
    """The policy digest and the receipts published on ``secagg/receipts/{holder}``."""
    body = inbound.body
    if not isinstance(body, SecAggReceipt) or inbound.topic.route is not Route.SECAGG_RECEIPT:
        return _wrong_route(inbound)
    if (refusal := _sender_refusal(inbound)) is not None:
        return refusal
    holder = inbound.sender
    return body.policy_digest, tuple(Receipt(holder, update_id) for update_id in body.update_ids)


def to_unmask(request: UnmaskRequest) -> SecAggUnmask:
    return SecAggUnmask(
        fold_id=request.fold_id,
        policy_digest=request.policy_digest,
        terms=tuple(
            SecAggTerm(update_id=t.update_id, sender=t.sender, weight=t.weight)
            for t in request.terms
        ),
    )


def unmask_of(inbound: Inbound, aggregator: str) -> UnmaskRequest | WireRefusal:
    """An unmask request on the holder's ``secagg/unmask/{holder}``, sent by ``aggregator``
    (the aggregator's identity; the ACL lets no one else write the route)."""
    body = inbound.body
    if not isinstance(body, SecAggUnmask) or inbound.topic.route is not Route.SECAGG_UNMASK:
        return _wrong_route(inbound)
    if inbound.sender != aggregator:
        return WireRefusal(
            WireRefused.WRONG_SENDER,
            f"an unmask request from {inbound.sender!r}, not the aggregator {aggregator!r}",
        )
    return UnmaskRequest(
        fold_id=body.fold_id,
        policy_digest=body.policy_digest,
        terms=tuple(Term(t.update_id, t.sender, t.weight) for t in body.terms),
    )


def to_answer(answer: UnmaskAnswer | UnmaskRefusal) -> SecAggAnswer:
    if isinstance(answer, UnmaskAnswer):
        return SecAggAnswer(fold_id=answer.fold_id, share_sum=answer.share_sum)
    return SecAggAnswer(fold_id=answer.fold_id, refusal=answer.reason[:500])


def answer_of(inbound: Inbound) -> UnmaskAnswer | UnmaskRefusal | WireRefusal:
    """A holder's answer (or refusal) on ``secagg/answers/{holder}``."""
    body = inbound.body
    if not isinstance(body, SecAggAnswer) or inbound.topic.route is not Route.SECAGG_ANSWER:
        return _wrong_route(inbound)
    if (refusal := _sender_refusal(inbound)) is not None:
        return refusal
    if body.share_sum is None:
        return UnmaskRefusal(fold_id=body.fold_id, holder=inbound.sender, reason=body.refusal)
    return UnmaskAnswer(
        fold_id=body.fold_id, holder=inbound.sender, share_sum=bytes(body.share_sum)
    )


def _sender_refusal(inbound: Inbound) -> WireRefusal | None:
    if inbound.sender == inbound.topic.node:
        return None
    return WireRefusal(
        WireRefused.WRONG_SENDER,
        f"{inbound.sender!r} sent on {inbound.topic.node!r}'s {inbound.topic.route} topic",
    )


def _wrong_route(inbound: Inbound) -> WireRefusal:
    return WireRefusal(
        WireRefused.WRONG_ROUTE,
        f"a {type(inbound.body).__name__} on the {inbound.topic.route} route",
    )
