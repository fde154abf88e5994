"""Specification of the topic tree: every route builds, parses back, and carries its QoS/retain."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.errors import TopicError
from common.topics import (
    ROOT,
    SECURE_AGGREGATION_ROUTES,
    Role,
    Route,
    Topic,
    TopicFilter,
    TopicTree,
    validate_identifier,
)

FED = "fed-1"
PREFIX = f"{ROOT}/{FED}"
tree = TopicTree(FED)

identifiers = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", fullmatch=True)

ROUTES = [
    pytest.param(lambda t: t.manifest(), f"{PREFIX}/model/manifest", id="manifest"),
    pytest.param(lambda t: t.chunk(12, 3), f"{PREFIX}/model/v12/chunk/3", id="chunk"),
    pytest.param(lambda t: t.delta(), f"{PREFIX}/model/delta", id="delta"),
    pytest.param(lambda t: t.update("hosp-a"), f"{PREFIX}/updates/hosp-a", id="update"),
    pytest.param(lambda t: t.ack("hosp-a"), f"{PREFIX}/acks/hosp-a", id="ack"),
    pytest.param(lambda t: t.node_status("hosp-a"), f"{PREFIX}/nodes/hosp-a/status", id="status"),
    pytest.param(lambda t: t.node_eval("hosp-a"), f"{PREFIX}/nodes/hosp-a/eval", id="eval"),
    pytest.param(lambda t: t.control_requests(), f"{PREFIX}/control/requests", id="control"),
    pytest.param(lambda t: t.control_reply("req.7"), f"{PREFIX}/control/replies/req.7", id="reply"),
    pytest.param(lambda t: t.aggregator_status(), f"{PREFIX}/aggregator/status", id="agg-status"),
    pytest.param(lambda t: t.versions(), f"{PREFIX}/versions", id="versions"),
    pytest.param(lambda t: t.secagg_key("hosp-a"), f"{PREFIX}/secagg/keys/hosp-a", id="key"),
    pytest.param(
        lambda t: t.secagg_share("hosp-b", "hosp-a"),
        f"{PREFIX}/secagg/shares/hosp-b/hosp-a",
        id="share",
    ),
    pytest.param(
        lambda t: t.secagg_receipt("hosp-a"), f"{PREFIX}/secagg/receipts/hosp-a", id="receipt"
    ),
    pytest.param(
        lambda t: t.secagg_unmask("hosp-a"), f"{PREFIX}/secagg/unmask/hosp-a", id="unmask"
    ),
    pytest.param(
        lambda t: t.secagg_answer("hosp-a"), f"{PREFIX}/secagg/answers/hosp-a", id="answer"
    ),
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


RETAINED = {
    Route.MANIFEST,
    Route.CHUNK,
    Route.DELTA,
    Route.NODE_STATUS,
    Route.AGGREGATOR_STATUS,
    Route.SECAGG_KEY,  # a key record is state: a node that starts late must find every key
}


@pytest.mark.parametrize("route", list(Route), ids=[r.name.lower() for r in Route])
def test_every_route_is_qos_1_and_only_state_routes_are_retained(route: Route) -> None:
    """All routes use QoS 1; manifest, chunks, the latest delta, statuses and key records are
    retained, events are not."""
    topic = Topic(FED, route, node="n", version=1, chunk=0, request_id="r", recipient="m")
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
    invalid = f"{re.escape(repr(value))} is invalid: use 1-64 letters, digits"
    with pytest.raises(TopicError, match=f"^identifier {invalid}"):
        validate_identifier(value)
    for build in (tree.update, tree.ack, tree.node_status, tree.node_eval):
        with pytest.raises(TopicError, match=f"^node {invalid}"):
            build(value)
    with pytest.raises(TopicError, match=f"^request id {invalid}"):
        tree.control_reply(value)
    for build in (tree.secagg_key, tree.secagg_receipt, tree.secagg_unmask, tree.secagg_answer):
        with pytest.raises(TopicError, match=f"^node {invalid}"):
            build(value)
    with pytest.raises(TopicError, match=f"^recipient {invalid}"):
        tree.secagg_share(value, "hosp-a")
    with pytest.raises(TopicError, match=f"^sender {invalid}"):
        tree.secagg_share("hosp-a", value)
    with pytest.raises(TopicError, match=f"^federation {invalid}"):
        TopicTree(value)


def test_identifiers_of_64_characters_are_accepted() -> None:
    """The longest allowed identifier is 64 characters."""
    assert validate_identifier("a" * 64) == "a" * 64


@pytest.mark.parametrize(
    ("topic", "reason"),
    [
        pytest.param(
            f"{ROOT}/other/model/manifest",
            " is not under 'healthnet/v1/fed-1'",
            id="other-federation",
        ),
        pytest.param(
            f"{ROOT}/{FED}x/model/manifest",
            " is not under 'healthnet/v1/fed-1'",
            id="federation-prefix-lookalike",
        ),
        pytest.param(
            f"healthnet/v2/{FED}/model/manifest",
            " is not under 'healthnet/v1/fed-1'",
            id="other-protocol-version",
        ),
        pytest.param(f"{PREFIX}", " is not under 'healthnet/v1/fed-1'", id="prefix-only"),
        pytest.param(f"{PREFIX}/", " is not a healthNET route", id="prefix-slash"),
        pytest.param(
            f"{PREFIX}/model/manifest/extra", " is not a healthNET route", id="extra-level"
        ),
        pytest.param(f"{PREFIX}/model", " is not a healthNET route", id="missing-level"),
        pytest.param(f"{PREFIX}/updates", " is not a healthNET route", id="update-without-node"),
        pytest.param(f"{PREFIX}/updates/", ": node '' is invalid", id="update-empty-node"),
        pytest.param(f"{PREFIX}/updates/+", ": node '+' is invalid", id="update-wildcard-node"),
        pytest.param(
            f"{PREFIX}/nodes/a/unknown", " is not a healthNET route", id="unknown-node-route"
        ),
        pytest.param(
            f"{PREFIX}/control/replies/a b", ": request id 'a b' is invalid", id="reply-with-space"
        ),
        pytest.param(f"{PREFIX}/Versions", " is not a healthNET route", id="wrong-case"),
        pytest.param(
            f"{PREFIX}/secagg/shares/hosp-a", " is not a healthNET route", id="share-one-node"
        ),
        pytest.param(
            f"{PREFIX}/secagg/shares/+/hosp-a",
            ": recipient '+' is invalid",
            id="share-wildcard-recipient",
        ),
        pytest.param(
            f"{PREFIX}/secagg/unknown/hosp-a", " is not a healthNET route", id="unknown-secagg"
        ),
        pytest.param(f"{PREFIX}/secagg/keys/#", ": node '#' is invalid", id="key-wildcard"),
        pytest.param(
            f"/{PREFIX}/versions", " is not under 'healthnet/v1/fed-1'", id="leading-slash"
        ),
        pytest.param("", " is not under 'healthnet/v1/fed-1'", id="empty"),
    ],
)
def test_topics_not_of_this_federation_or_of_unknown_shape_are_rejected(
    topic: str, reason: str
) -> None:
    """parse() raises TopicError for anything that is not one of this federation's routes, naming
    the topic and what is wrong with it."""
    with pytest.raises(TopicError, match=f"^{re.escape(f'topic {topic!r}{reason}')}"):
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
    ("segment", "index", "reason"),
    [
        pytest.param("12", "0", " is not a healthNET route", id="no-v"),
        pytest.param("v-1", "0", ": '-1' is not a non-negative integer", id="negative-version"),
        pytest.param("v", "0", ": '' is not a non-negative integer", id="v-without-number"),
        pytest.param("vv1", "0", ": 'v1' is not a non-negative integer", id="double-v"),
        pytest.param("V1", "0", " is not a healthNET route", id="capital-v"),
        pytest.param("v1.5", "0", ": '1.5' is not a non-negative integer", id="fractional-version"),
        pytest.param("v+1", "0", ": '+1' is not a non-negative integer", id="plus-sign"),
        pytest.param("v 1", "0", ": ' 1' is not a non-negative integer", id="space"),
        pytest.param("v1", "-1", ": '-1' is not a non-negative integer", id="negative-index"),
        pytest.param("v1", "x", ": 'x' is not a non-negative integer", id="non-numeric-index"),
        pytest.param("v1", "", ": '' is not a non-negative integer", id="empty-index"),
        pytest.param(
            "v1234567890123",
            "0",
            ": '1234567890123' is not a non-negative integer",
            id="thirteen-digits",
        ),
        pytest.param("v²", "0", ": '²' is not a non-negative integer", id="superscript-digit"),
        pytest.param(
            "v1", "\u0661", ": '\u0661' is not a non-negative integer", id="arabic-indic-digit"
        ),
    ],
)
def test_malformed_chunk_versions_and_indices_are_rejected(
    segment: str, index: str, reason: str
) -> None:
    """Only `v<digits>` and `<digits>` (ASCII digits) parse as a chunk's version and index."""
    topic = f"{PREFIX}/model/{segment}/chunk/{index}"
    with pytest.raises(TopicError, match=f"^{re.escape(f'topic {topic!r}{reason}')}$"):
        tree.parse(topic)


@pytest.mark.parametrize(
    ("version", "index"),
    [pytest.param(-1, 0, id="negative-version"), pytest.param(0, -1, id="negative-index")],
)
def test_building_a_chunk_topic_with_negative_numbers_is_refused(version: int, index: int) -> None:
    """TopicTree.chunk() refuses negative versions and indices."""
    with pytest.raises(
        TopicError, match=f"^chunk topic needs non-negative version and index: {version}/{index}$"
    ):
        tree.chunk(version, index)


def test_subscription_filters_are_the_only_topics_with_wildcards() -> None:
    """The filters cover exactly the per-node and per-chunk routes of this federation."""
    assert str(tree.all_updates()) == f"{PREFIX}/updates/+"
    assert str(tree.all_chunks()) == f"{PREFIX}/model/+/chunk/+"
    assert str(tree.all_node_status()) == f"{PREFIX}/nodes/+/status"
    assert str(tree.all_node_evals()) == f"{PREFIX}/nodes/+/eval"


@given(
    federation=identifiers,
    node=identifiers,
    other=identifiers,
    request_id=identifiers,
    version=st.integers(0, 10**12 - 1),
    index=st.integers(0, 10**12 - 1),
)
def test_every_valid_identifier_round_trips_through_every_route(
    federation: str, node: str, other: str, request_id: str, *, version: int, index: int
) -> None:
    """For any valid identifiers and numbers, parse(str(topic)) == topic on every route."""
    t = TopicTree(federation)
    topics = [
        t.manifest(),
        t.chunk(version, index),
        t.delta(),
        t.update(node),
        t.ack(node),
        t.node_status(node),
        t.node_eval(node),
        t.control_requests(),
        t.control_reply(request_id),
        t.aggregator_status(),
        t.versions(),
        t.secagg_key(node),
        t.secagg_share(other, node),
        t.secagg_receipt(node),
        t.secagg_unmask(node),
        t.secagg_answer(node),
    ]
    assert {topic.route for topic in topics} == set(Route)
    for topic in topics:
        assert t.parse(str(topic)) == topic
        assert str(t.parse(str(topic))) == str(topic)


def _matches(topic_filter: TopicFilter, topic: str) -> bool:
    """MQTT filter matching with + and # (enough for the filters the tree builds)."""
    levels, parts = str(topic_filter).split("/"), topic.split("/")
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
    assert str(tree.route_filter(Route.UPDATE, "%u")) == f"{PREFIX}/updates/%u"
    assert str(tree.route_filter(Route.NODE_EVAL, "%u")) == f"{PREFIX}/nodes/%u/eval"
    # A share's topic has two: its sender (the node) and its recipient.
    assert str(tree.route_filter(Route.SECAGG_SHARE, "%u")) == f"{PREFIX}/secagg/shares/+/%u"
    assert str(tree.route_filter(Route.SECAGG_SHARE, recipient="%u")) == (
        f"{PREFIX}/secagg/shares/%u/+"
    )


def test_secure_aggregation_routes_are_subscribed_only_when_asked() -> None:
    """With the policy off a service subscribes to what it did before secure aggregation; with
    it on, a hospital reads every key record, the shares addressed to it and its own unmask
    requests, and the aggregator every key record, receipt and answer."""
    for role in Role:
        plain = tree.subscriptions(role, "hosp-a")
        assert not {f.route for f in plain} & SECURE_AGGREGATION_ROUTES
    hospital = tree.subscriptions(Role.HOSPITAL, "hosp-a", secure_aggregation=True)
    assert [str(f) for f in hospital if f.route in SECURE_AGGREGATION_ROUTES] == [
        f"{PREFIX}/secagg/keys/+",
        f"{PREFIX}/secagg/shares/hosp-a/+",
        f"{PREFIX}/secagg/unmask/hosp-a",
    ]
    aggregator = tree.subscriptions(Role.AGGREGATOR, secure_aggregation=True)
    assert [str(f) for f in aggregator if f.route in SECURE_AGGREGATION_ROUTES] == [
        f"{PREFIX}/secagg/keys/+",
        f"{PREFIX}/secagg/receipts/+",
        f"{PREFIX}/secagg/answers/+",
    ]


@pytest.mark.parametrize("route", list(Route), ids=[r.name.lower() for r in Route])
def test_a_route_filter_is_a_typed_filter_that_names_its_route(route: Route) -> None:
    """Filters are TopicFilter values (never bare strings) that say which route they match."""
    topic_filter = tree.route_filter(route)
    assert isinstance(topic_filter, TopicFilter)
    assert topic_filter.route is route


def test_everything_matches_every_topic_of_the_federation_and_no_other() -> None:
    """The whole-federation filter is the prefix and '#'."""
    assert str(tree.everything()) == f"{PREFIX}/#"
    assert _matches(tree.everything(), str(tree.update("n1")))
    assert not _matches(tree.everything(), str(TopicTree("other").update("n1")))
