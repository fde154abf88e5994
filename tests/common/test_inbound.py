"""Specification of the one inbound path: a received message is typed by its route, or refused."""

from __future__ import annotations

from typing import cast

import pytest

from common.codec import encode, envelope
from common.inbound import (
    Chunk,
    Decoded,
    Fault,
    Inbound,
    Received,
    Refusal,
    Refused,
    decode_body,
    receive,
)
from common.messages import Ack, Body, RejectReason, Update
from common.topics import Route, Topic, TopicTree
from tests.common.test_codec import BODIES, UPDATE

tree = TopicTree("fed-1")
LIMIT = 1 << 20
SAMPLES: dict[type[Body], Body] = {
    type(body): body for body in (cast("Body", param.values[0]) for param in BODIES)
}


def topic_of(route: Route) -> Topic:
    """One topic of ``route`` in ``tree``, as the tree parses it."""
    return tree.parse(
        str(
            Topic(
                tree.federation,
                route,
                node="hosp-a",
                version=3,
                chunk=1,
                request_id="r1",
                recipient="hosp-b",
            )
        )
    )


def wire(body: Body, sender: str = "hosp-a") -> bytes:
    return encode(envelope(body, sender=sender, sent_at=1.0))


def received(topic: Topic | str, payload: bytes, max_bytes: int = LIMIT) -> Received:
    return receive(str(topic), payload, topics=tree, max_bytes=max_bytes)


ENVELOPE_ROUTES = [route for route in Route if route is not Route.CHUNK]


@pytest.mark.parametrize("route", ENVELOPE_ROUTES, ids=[r.name.lower() for r in ENVELOPE_ROUTES])
def test_every_envelope_route_yields_its_declared_body_with_topic_and_sender(route: Route) -> None:
    """A well-formed envelope of the route's body type comes back as an Inbound of that body."""
    body_type = route.body_type
    assert not issubclass(body_type, bytes)
    body = SAMPLES[body_type]
    payload = wire(body)
    result = received(topic_of(route), payload)
    assert result == Inbound(topic_of(route), "hosp-a", body, len(payload))


def test_every_route_declares_a_body_type_and_only_chunks_carry_raw_bytes() -> None:
    """Each route names what it carries; the chunk route alone carries bytes, not an envelope."""
    raw = {route for route in Route if issubclass(route.body_type, bytes)}
    assert raw == {Route.CHUNK}
    assert {route.body_type for route in ENVELOPE_ROUTES} == set(SAMPLES)


def test_a_chunk_comes_back_as_its_version_index_and_bytes() -> None:
    """A chunk topic's payload is not decoded: it is the blob's slice, with its place in it."""
    topic = tree.chunk(12, 3)
    assert received(topic, b"\x00weights") == Chunk(topic, 12, 3, b"\x00weights")


def test_an_empty_chunk_on_a_retained_route_is_a_cleared_retained_message() -> None:
    """The aggregator clears an old version's chunks with empty payloads: refused as EMPTY."""
    topic = tree.chunk(2, 0)
    assert received(topic, b"") == Refusal(
        str(topic), topic, Refused.EMPTY, "a cleared retained message", 0
    )


@pytest.mark.parametrize(
    "route",
    [Route.MANIFEST, Route.NODE_STATUS, Route.AGGREGATOR_STATUS],
    ids=["manifest", "node-status", "aggregator-status"],
)
def test_an_empty_payload_on_a_retained_route_is_refused_as_empty(route: Route) -> None:
    """No payload on a retained route is the broker's cleared retained message, not an error."""
    result = received(topic_of(route), b"")
    assert isinstance(result, Refusal)
    assert (result.reason, result.size) == (Refused.EMPTY, 0)


def test_an_empty_payload_on_an_event_route_is_malformed() -> None:
    """Events are never cleared: an empty update is a malformed one."""
    result = received(tree.update("hosp-a"), b"")
    assert isinstance(result, Refusal)
    assert result.reason is Refused.MALFORMED
    assert result.topic == tree.update("hosp-a")


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("healthnet/v1/other-fed/versions", id="other-federation"),
        pytest.param("healthnet/v1/fed-1/no/such/route", id="no-route"),
        pytest.param("healthnet/v1/fed-1/updates/bad+node", id="bad-identifier"),
    ],
)
def test_a_message_on_a_topic_not_of_this_tree_is_refused_as_unknown(name: str) -> None:
    """The topic is parsed first: a name the tree does not know has no Topic."""
    result = received(name, wire(UPDATE))
    assert isinstance(result, Refusal)
    assert (result.name, result.topic, result.reason) == (name, None, Refused.UNKNOWN_TOPIC)
    assert result.size == len(wire(UPDATE))


@pytest.mark.parametrize(
    "topic",
    [pytest.param(tree.update("hosp-a"), id="update"), pytest.param(tree.chunk(1, 0), id="chunk")],
)
def test_a_payload_over_the_limit_is_refused_before_it_is_read(topic: Topic) -> None:
    """Over max_bytes, on any route, chunks included: TOO_LARGE, with the size."""
    payload = b"\xc1" * 101  # not msgpack either: it must not be decoded
    result = received(topic, payload, max_bytes=100)
    assert result == Refusal(
        str(topic), topic, Refused.TOO_LARGE, "101 bytes, over the limit of 100", 101
    )


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"\xc1", id="not-msgpack"),
        pytest.param(wire(UPDATE)[:-3], id="truncated"),
        pytest.param(b"\x93\x01\x02\x03", id="not-an-envelope"),
    ],
)
def test_bytes_that_are_not_an_envelope_are_refused_as_malformed(payload: bytes) -> None:
    """Anything the codec refuses is MALFORMED, with the codec's reason as the detail."""
    result = received(tree.update("hosp-a"), payload)
    assert isinstance(result, Refusal)
    assert result.reason is Refused.MALFORMED
    assert result.detail
    assert result.size == len(payload)


def test_an_envelope_of_another_kind_than_the_route_carries_is_refused_as_wrong_kind() -> None:
    """An ack on an update topic is well formed but not what the topic carries."""
    ack = Ack(update_id="u-1", accepted=True, current_version=1)
    payload = wire(ack)
    topic = tree.update("hosp-a")
    assert received(topic, payload) == Refusal(
        str(topic), topic, Refused.WRONG_KIND, "ack on the update topic", len(payload)
    )


def test_the_refusal_reasons_that_the_aggregator_also_rejects_for_share_its_values() -> None:
    """TOO_LARGE and MALFORMED spell the aggregator's RejectReason values."""
    assert Refused.TOO_LARGE.value == RejectReason.TOO_LARGE.value
    assert Refused.MALFORMED.value == RejectReason.MALFORMED.value


def test_decode_body_gives_the_sender_and_the_asked_type() -> None:
    """The decode for stored records (WAL, outbox) types the body without a topic."""
    assert decode_body(Update, wire(UPDATE, "n1"), max_bytes=LIMIT) == Decoded("n1", UPDATE)


def test_decode_body_says_why_bytes_are_not_the_asked_type() -> None:
    """Damaged bytes are MALFORMED; another body type is WRONG_KIND, named."""
    assert decode_body(Update, b"", max_bytes=LIMIT) == Fault(
        Refused.MALFORMED, "not a msgpack document: it is truncated"
    )
    ack = Ack(update_id="u-1", accepted=True, current_version=1)
    assert decode_body(Update, wire(ack), max_bytes=LIMIT) == Fault(
        Refused.WRONG_KIND, "ack where Update belongs"
    )
