"""Specification of the topic tree: every route builds, parses back, and carries its QoS/retain."""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.errors import TopicError
from common.topics import ROOT, Route, Topic, TopicTree, validate_identifier

FED = "fed-1"
PREFIX = f"{ROOT}/{FED}"
tree = TopicTree(FED)

identifiers = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", fullmatch=True)

ROUTES = [
    pytest.param(lambda t: t.manifest(), f"{PREFIX}/model/manifest", id="manifest"),
    pytest.param(lambda t: t.chunk(12, 3), f"{PREFIX}/model/v12/chunk/3", id="chunk"),
    pytest.param(lambda t: t.update("hosp-a"), f"{PREFIX}/updates/hosp-a", id="update"),
    pytest.param(lambda t: t.ack("hosp-a"), f"{PREFIX}/acks/hosp-a", id="ack"),
    pytest.param(lambda t: t.node_status("hosp-a"), f"{PREFIX}/nodes/hosp-a/status", id="status"),
    pytest.param(lambda t: t.node_eval("hosp-a"), f"{PREFIX}/nodes/hosp-a/eval", id="eval"),
    pytest.param(lambda t: t.control_requests(), f"{PREFIX}/control/requests", id="control"),
    pytest.param(lambda t: t.control_reply("req.7"), f"{PREFIX}/control/replies/req.7", id="reply"),
    pytest.param(lambda t: t.aggregator_status(), f"{PREFIX}/aggregator/status", id="agg-status"),
    pytest.param(lambda t: t.versions(), f"{PREFIX}/versions", id="versions"),
]


@pytest.mark.parametrize(("build", "expected"), ROUTES)
def test_every_route_builds_its_documented_topic_and_parses_back(
    build: Callable[[TopicTree], Topic], expected: str
) -> None:
    """Each route's topic string is the documented one, and parse() returns the same Topic."""
    topic = build(tree)
    assert str(topic) == expected
    assert tree.parse(expected) == topic


def test_the_route_table_covers_every_route() -> None:
    """The round-trip table above has one row per Route, so a new route cannot go untested."""
    builders = [cast("Callable[[TopicTree], Topic]", param.values[0]) for param in ROUTES]
    routes = {build(tree).route for build in builders}
    assert routes == set(Route)


RETAINED = {Route.MANIFEST, Route.CHUNK, Route.NODE_STATUS, Route.AGGREGATOR_STATUS}


@pytest.mark.parametrize("route", list(Route), ids=[r.name.lower() for r in Route])
def test_every_route_is_qos_1_and_only_state_routes_are_retained(route: Route) -> None:
    """All routes use QoS 1; manifest, chunks and statuses are retained, events are not."""
    topic = Topic(FED, route, node="n", version=1, chunk=0, request_id="r")
    assert (topic.qos, route.qos) == (1, 1)
    assert topic.retain is route.retain is (route in RETAINED)


BAD_IDENTIFIERS = [
    pytest.param("", id="empty"),
    pytest.param("a" * 65, id="too-long"),
    pytest.param("+", id="single-level-wildcard"),
    pytest.param("node#", id="multi-level-wildcard"),
    pytest.param("a/b", id="slash"),
    pytest.param("a b", id="space"),
    pytest.param("-lead", id="leading-dash"),
    pytest.param(".hidden", id="leading-dot"),
    pytest.param("nö", id="non-ascii"),
    pytest.param("a\n", id="trailing-newline"),
    pytest.param("a\x00", id="nul"),
]


@pytest.mark.parametrize("value", BAD_IDENTIFIERS)
def test_unsafe_identifiers_are_rejected_everywhere(value: str) -> None:
    """Wildcards, slashes, spaces, empty and over-long identifiers raise TopicError on every use."""
    with pytest.raises(TopicError, match="invalid"):
        validate_identifier(value)
    for build in (tree.update, tree.ack, tree.node_status, tree.node_eval, tree.control_reply):
        with pytest.raises(TopicError):
            build(value)
    with pytest.raises(TopicError):
        TopicTree(value)


def test_identifiers_of_64_characters_are_accepted() -> None:
    """The longest allowed identifier is 64 characters."""
    assert validate_identifier("a" * 64) == "a" * 64


@pytest.mark.parametrize(
    "topic",
    [
        pytest.param(f"{ROOT}/other/model/manifest", id="other-federation"),
        pytest.param(f"{ROOT}/{FED}x/model/manifest", id="federation-prefix-lookalike"),
        pytest.param(f"healthnet/v2/{FED}/model/manifest", id="other-protocol-version"),
        pytest.param(f"{PREFIX}", id="prefix-only"),
        pytest.param(f"{PREFIX}/", id="prefix-slash"),
        pytest.param(f"{PREFIX}/model/manifest/extra", id="extra-level"),
        pytest.param(f"{PREFIX}/model", id="missing-level"),
        pytest.param(f"{PREFIX}/updates", id="update-without-node"),
        pytest.param(f"{PREFIX}/updates/", id="update-empty-node"),
        pytest.param(f"{PREFIX}/updates/+", id="update-wildcard-node"),
        pytest.param(f"{PREFIX}/nodes/a/unknown", id="unknown-node-route"),
        pytest.param(f"{PREFIX}/control/replies/a b", id="reply-with-space"),
        pytest.param(f"{PREFIX}/Versions", id="wrong-case"),
        pytest.param(f"/{PREFIX}/versions", id="leading-slash"),
        pytest.param("", id="empty"),
    ],
)
def test_topics_not_of_this_federation_or_of_unknown_shape_are_rejected(topic: str) -> None:
    """parse() raises TopicError for anything that is not one of this federation's routes."""
    with pytest.raises(TopicError):
        tree.parse(topic)


@pytest.mark.parametrize(
    ("segment", "version"),
    [
        pytest.param("v0", 0, id="v0"),
        pytest.param("v12", 12, id="v12"),
        pytest.param("v999999999999", 999_999_999_999, id="twelve-digits"),
    ],
)
def test_chunk_versions_are_v_followed_by_digits(segment: str, version: int) -> None:
    """A chunk topic's version segment is `v` and a non-negative decimal number."""
    topic = tree.parse(f"{PREFIX}/model/{segment}/chunk/4")
    assert (topic.route, topic.version, topic.chunk) == (Route.CHUNK, version, 4)


@pytest.mark.parametrize(
    ("segment", "index"),
    [
        pytest.param("12", "0", id="no-v"),
        pytest.param("v-1", "0", id="negative-version"),
        pytest.param("v", "0", id="v-without-number"),
        pytest.param("vv1", "0", id="double-v"),
        pytest.param("V1", "0", id="capital-v"),
        pytest.param("v1.5", "0", id="fractional-version"),
        pytest.param("v+1", "0", id="plus-sign"),
        pytest.param("v 1", "0", id="space"),
        pytest.param("v1", "-1", id="negative-index"),
        pytest.param("v1", "x", id="non-numeric-index"),
        pytest.param("v1", "", id="empty-index"),
        pytest.param("v1234567890123", "0", id="thirteen-digits"),
        pytest.param("v²", "0", id="superscript-digit"),
        pytest.param("v1", "\u0661", id="arabic-indic-digit"),
    ],
)
def test_malformed_chunk_versions_and_indices_are_rejected(segment: str, index: str) -> None:
    """Only `v<digits>` and `<digits>` (ASCII digits) parse as a chunk's version and index."""
    with pytest.raises(TopicError):
        tree.parse(f"{PREFIX}/model/{segment}/chunk/{index}")


@pytest.mark.parametrize(
    ("version", "index"),
    [pytest.param(-1, 0, id="negative-version"), pytest.param(0, -1, id="negative-index")],
)
def test_building_a_chunk_topic_with_negative_numbers_is_refused(version: int, index: int) -> None:
    """TopicTree.chunk() refuses negative versions and indices."""
    with pytest.raises(TopicError):
        tree.chunk(version, index)


def test_subscription_filters_are_the_only_topics_with_wildcards() -> None:
    """The filters cover exactly the per-node and per-chunk routes of this federation."""
    assert tree.all_updates() == f"{PREFIX}/updates/+"
    assert tree.all_chunks() == f"{PREFIX}/model/+/chunk/+"
    assert tree.all_node_status() == f"{PREFIX}/nodes/+/status"
    assert tree.all_node_evals() == f"{PREFIX}/nodes/+/eval"


@given(
    federation=identifiers,
    node=identifiers,
    request_id=identifiers,
    version=st.integers(0, 10**12 - 1),
    index=st.integers(0, 10**12 - 1),
)
def test_every_valid_identifier_round_trips_through_every_route(
    federation: str, node: str, request_id: str, version: int, index: int
) -> None:
    """For any valid identifiers and numbers, parse(str(topic)) == topic on every route."""
    t = TopicTree(federation)
    topics = [
        t.manifest(),
        t.chunk(version, index),
        t.update(node),
        t.ack(node),
        t.node_status(node),
        t.node_eval(node),
        t.control_requests(),
        t.control_reply(request_id),
        t.aggregator_status(),
        t.versions(),
    ]
    for topic in topics:
        assert t.parse(str(topic)) == topic
        assert str(t.parse(str(topic))) == str(topic)


def _matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter matching with + and # (enough for the filters the tree builds)."""
    levels, parts = topic_filter.split("/"), topic.split("/")
    for i, level in enumerate(levels):
        if level == "#":
            return True
        if i >= len(parts) or (level not in ("+", parts[i])):
            return False
    return len(levels) == len(parts)


@pytest.mark.parametrize(("build", "expected"), ROUTES)
def test_route_filter_matches_its_routes_topics_and_no_other(
    build: Callable[[TopicTree], Topic], expected: str
) -> None:
    """A route's filter matches every topic of that route and none of another route."""
    route = build(tree).route
    assert _matches(tree.route_filter(route), expected)
    for param in ROUTES:
        other = cast("Callable[[TopicTree], Topic]", param.values[0])(tree)
        assert _matches(tree.route_filter(route), str(other)) is (other.route is route)


def test_route_filter_puts_a_substitution_in_the_node_segment() -> None:
    """route_filter(route, "%u") gives the Mosquitto ACL pattern of a node's own topic."""
    assert tree.route_filter(Route.UPDATE, "%u") == f"{PREFIX}/updates/%u"
    assert tree.route_filter(Route.NODE_EVAL, "%u") == f"{PREFIX}/nodes/%u/eval"
