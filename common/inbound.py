"""The one inbound path: a received MQTT message becomes a typed value or a refusal.

Theory of operation. :func:`receive` takes what the broker delivered (a topic name and its payload)
and returns exactly one of:

- :class:`Inbound`: an envelope on one of our topics, whose body is the type that its route
  declares (:attr:`common.topics.Route.body_type`), with the sender the envelope names;
- :class:`Chunk`: a slice of a model blob on a chunk topic (chunks are raw bytes, no envelope);
- :class:`Refusal`: why the message is not one of those (:class:`Refused`), with its size.

It never raises for anything a peer sent. Every consumer matches on the result and ends with
``typing.assert_never``, so a new route or result type is a type error until each one decides what
to do with it. The checks run cheapest first: the topic, the size, an empty payload on a retained
route (the broker's way of clearing a retained message), the envelope, then the body's type
against the route's. :func:`decode_body` is the same envelope decode for bytes that come back from
disk (the aggregator's write-ahead log, a node's outbox), where the body type is known but there is
no topic.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Generic, TypeVar

from common.codec import decode
from common.errors import ProtocolError, TopicError
from common.messages import Body, RejectReason
from common.topics import Topic, TopicTree

__all__ = [
    "Chunk",
    "Decoded",
    "Fault",
    "Inbound",
    "Received",
    "Refusal",
    "Refused",
    "decode_body",
    "receive",
]

B = TypeVar("B", bound=Body)


class Refused(StrEnum):
    """Why a received message did not become an :class:`Inbound` or a :class:`Chunk`."""

    UNKNOWN_TOPIC = "unknown_topic"  # not a topic of this federation's tree
    TOO_LARGE = RejectReason.TOO_LARGE.value  # over the receiver's size limit; never decoded
    EMPTY = "empty"  # no payload on a retained route: a cleared retained message
    MALFORMED = RejectReason.MALFORMED.value  # not a well-formed envelope of our schema
    WRONG_KIND = "wrong_kind"  # a well-formed envelope of another kind than its route carries


@dataclass(frozen=True, slots=True)
class Inbound:
    """An envelope received on ``topic``; ``body`` is of the type ``topic.route`` carries."""

    topic: Topic
    sender: str  # as the envelope names it; the topic's node is the broker identity
    body: Body
    size: int  # bytes on the wire


@dataclass(frozen=True, slots=True)
class Chunk:
    """Chunk ``index`` of model version ``version``'s blob, received on ``topic``."""

    topic: Topic
    version: int
    index: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Refusal:
    """A received message that is not one of ours, or not what its topic carries."""

    name: str  # the topic name as received
    topic: Topic | None  # None when ``name`` is not a topic of this federation
    reason: Refused
    detail: str
    size: int  # bytes of payload


Received = Inbound | Chunk | Refusal


@dataclass(frozen=True, slots=True)
class Decoded(Generic[B]):
    """An envelope whose body has the type that was asked for."""

    sender: str
    body: B


@dataclass(frozen=True, slots=True)
class Fault:
    """Why bytes did not decode to the body type that was asked for."""

    reason: Refused
    detail: str


def receive(name: str, payload: bytes, *, topics: TopicTree, max_bytes: int) -> Received:
    """The typed value of a message received on topic ``name``, or why it is refused.

    ``max_bytes`` bounds the payload of every route (chunks included); a larger one is refused
    before any byte of it is read.
    """
    size = len(payload)
    try:
        topic = topics.parse(name)
    except TopicError as exc:
        return Refusal(name, None, Refused.UNKNOWN_TOPIC, str(exc), size)
    if size > max_bytes:
        detail = f"{size} bytes, over the limit of {max_bytes}"
        return Refusal(name, topic, Refused.TOO_LARGE, detail, size)
    if not payload and topic.route.retain:
        return Refusal(name, topic, Refused.EMPTY, "a cleared retained message", size)
    body_type = topic.route.body_type
    if issubclass(body_type, bytes):
        return Chunk(topic, topic.version or 0, topic.chunk or 0, payload)
    decoded = decode_body(body_type, payload, max_bytes=max_bytes, where=topic.route.name.lower())
    if isinstance(decoded, Fault):
        return Refusal(name, topic, decoded.reason, decoded.detail, size)
    return Inbound(topic, decoded.sender, decoded.body, size)


def decode_body(
    body_type: type[B], payload: bytes, *, max_bytes: int, where: str | None = None
) -> Decoded[B] | Fault:
    """The sender and body of an envelope that must carry a ``body_type``, or why not.

    ``where`` names the route the bytes came on, for a :attr:`Refused.WRONG_KIND` detail
    (``"ack on the update topic"``).
    """
    try:
        env = decode(payload, max_bytes=max_bytes)
    except ProtocolError as exc:
        return Fault(Refused.MALFORMED, str(exc))
    if not isinstance(env.body, body_type):
        on = f"on the {where} topic" if where else f"where {body_type.__name__} belongs"
        return Fault(Refused.WRONG_KIND, f"{env.kind} {on}")
    return Decoded(env.sender, env.body)
