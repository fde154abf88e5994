"""Specification of the dashboard server on a real Mosquitto: snapshot, event stream, the page."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from common.broker_url import BrokerEndpoint
from common.codec import encode, envelope
from common.messages import Body, NodeState, NodeStatus
from common.mqtt import MqttClient
from common.settings import ConnectionSettings
from common.topics import Topic, TopicTree
from healthnet.broker import EmbeddedBroker
from healthnet.dashboard import LISTEN_BACKLOG, DashboardServer
from healthnet.feed import FederationFeed, subscriptions
from tests.healthnet.test_observe import evaluation, record, status

pytestmark = [pytest.mark.broker, pytest.mark.timeout(60)]

WAIT = 15.0


class Publisher:
    """Plays the aggregator and a node on the broker."""

    def __init__(self, url: str, tree: TopicTree) -> None:
        self.tree = tree
        self.client = MqttClient(BrokerEndpoint.parse(url), f"pub-{uuid.uuid4().hex[:8]}")

    def send(self, topic: Topic, body: Body, sender: str = "aggregator") -> None:
        self.client.publish(
            topic, encode(envelope(body, sender=sender, sent_at=time.time())), wait=WAIT
        )


@pytest.fixture
def tree() -> TopicTree:
    return TopicTree(f"dash{uuid.uuid4().hex[:12]}")


@pytest.fixture
def publisher(mosquitto: EmbeddedBroker, tree: TopicTree) -> Iterator[Publisher]:
    pub = Publisher(mosquitto.url, tree)
    with pub.client:
        yield pub


@pytest.fixture
def feed(mosquitto: EmbeddedBroker, tree: TopicTree) -> Iterator[FederationFeed]:
    settings = ConnectionSettings(broker_url=mosquitto.url, federation=tree.federation)  # type: ignore[arg-type]
    with FederationFeed(settings) as running:
        yield running


@pytest.fixture
def server(feed: FederationFeed) -> Iterator[DashboardServer]:
    with DashboardServer(feed, "127.0.0.1", 0) as running:
        yield running


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})  # noqa: S310 - loopback test URL
    try:
        with urllib.request.urlopen(request, timeout=WAIT) as response:  # noqa: S310
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def eventually(probe: Callable[[], Any], what: str) -> Any:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if found := probe():
            return found
        time.sleep(0.1)
    raise AssertionError(f"no {what} within {WAIT}s")


def publish_run(publisher: Publisher) -> None:
    tree = publisher.tree
    publisher.send(tree.aggregator_status(), status(2, updated_at=time.time()))
    publisher.send(tree.versions(), record(2, 0, 1))
    publisher.send(tree.node_status("n0"), NodeStatus(state=NodeState.TRAINING, version=2), "n0")
    publisher.send(tree.node_eval("n0"), evaluation(2, 0.75), "n0")


def test_snapshot_reflects_what_the_federation_published(
    server: DashboardServer, publisher: Publisher
) -> None:
    """/api/snapshot shows the status, the version record, the node and its evaluation."""
    publish_run(publisher)

    def complete() -> dict[str, Any] | None:
        _, _, body = get(server.url + "api/snapshot")
        snap = json.loads(body)
        ready = snap["version"] == 2 and snap["versions_seen"] == 1 and snap["accuracy"]["versions"]
        return snap if ready and snap["nodes"] else None

    snap = eventually(complete, "complete snapshot")
    assert snap["federation"] == publisher.tree.federation
    assert snap["connected"] is True
    assert snap["accuracy"]["nodes"] == {"n0": [0.75]}
    assert snap["staleness_counts"] == [1, 1]
    assert [n["node"] for n in snap["nodes"]] == ["n0"]
    assert snap["nodes"][0]["state"] == "training"


def test_event_stream_pushes_snapshots(server: DashboardServer, publisher: Publisher) -> None:
    """/api/events is a text/event-stream whose events carry the snapshot, pushed on change."""
    host, port = server.url.removeprefix("http://").rstrip("/").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=WAIT)
    try:
        connection.request("GET", "/api/events")
        response = connection.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Type") == "text/event-stream"
        publish_run(publisher)
        deadline = time.monotonic() + WAIT
        version = None
        while version != 2 and time.monotonic() < deadline:
            event = b""
            while not event.endswith(b"\n\n"):
                event += response.fp.readline()
            assert event.startswith(b"event: snapshot\ndata: ")
            version = json.loads(event.split(b"data: ", 1)[1])["version"]
        assert version == 2
    finally:
        connection.close()


def test_page_and_vendored_chart_library_are_served_with_a_strict_policy(
    server: DashboardServer,
) -> None:
    """The page, its script and uPlot with its licence come from the package, under a CSP."""
    code, headers, body = get(server.url)
    assert code == 200
    assert b'<script src="/dashboard.js">' in body
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff"
    code, headers, body = get(server.url + "vendor/uPlot.iife.min.js")
    assert (code, headers["Content-Type"]) == (200, "text/javascript; charset=utf-8")
    assert body.startswith(b"/*! https://github.com/leeoniya/uPlot (v1.6.32) */")
    assert b"MIT License" in get(server.url + "vendor/uPlot.LICENSE")[2]


@pytest.mark.parametrize(
    ("path", "headers", "expected"),
    [
        pytest.param("nope", {}, 404, id="unknown-path"),
        pytest.param("../pyproject.toml", {}, 404, id="traversal"),
        pytest.param("api/snapshot", {"Host": "attacker.example"}, 421, id="dns-rebinding"),
        pytest.param("api/snapshot", {"Host": "localhost:1"}, 200, id="localhost-name"),
    ],
)
def test_requests_outside_the_page_are_refused(
    server: DashboardServer, path: str, headers: dict[str, str], expected: int
) -> None:
    """Only the listed files and APIs answer, and only to a loopback Host."""
    assert get(server.url + path, headers)[0] == expected


def test_the_dashboard_is_read_only(server: DashboardServer) -> None:
    """A POST is not a method the dashboard knows."""
    request = urllib.request.Request(server.url + "api/snapshot", data=b"{}", method="POST")  # noqa: S310
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=WAIT)  # noqa: S310
    raised.value.close()
    assert raised.value.code == 501


def test_the_feed_reads_status_versions_and_node_topics_only(tree: TopicTree) -> None:
    """No model chunk and no update is ever subscribed to: the read-only identity suffices."""
    filters = tuple(str(topic_filter) for topic_filter in subscriptions(tree))
    assert filters == (
        f"{tree.prefix}/aggregator/status",
        f"{tree.prefix}/versions",
        f"{tree.prefix}/nodes/+/status",
        f"{tree.prefix}/nodes/+/eval",
    )


def test_dashboard_command_serves_until_interrupted(mosquitto: EmbeddedBroker) -> None:
    """`healthnet dashboard --port 0` prints its URL, serves the page and exits 0 on Ctrl-C."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "healthnet", "dashboard", "--broker-url", mosquitto.url,
         "--federation", "cli-test", "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        match = re.search(r"at (http://127\.0\.0\.1:\d+/)", line)
        assert match, line
        code, _, body = get(match.group(1) + "api/snapshot")
        assert code == 200
        assert json.loads(body)["federation"] == "cli-test"
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(WAIT) == 0
        assert proc.stderr is not None
        proc.stderr.close()


VIEWERS = 200  # connections opened at once, within LISTEN_BACKLOG and the kernel's cap


def test_many_connections_at_once_wait_on_no_backlog(feed: FederationFeed) -> None:
    """200 connections opened together, before the server accepts any, all connect at once.

    Nothing is accepted until the server starts, so the listen backlog alone holds them: with
    socketserver's 5, the sixth and later ones would wait out a SYN retransmit (a second, then
    three). Then every one of them is served.
    """
    assert VIEWERS <= LISTEN_BACKLOG
    server = DashboardServer(feed, "127.0.0.1", 0)  # listening, not yet accepting
    host, port = server.url.removeprefix("http://").rstrip("/").rsplit(":", 1)
    connections: list[socket.socket] = []
    try:
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            # While nothing is accepted, a connection the backlog has no room for never completes
            # (the kernel drops its SYN, and every retry): the timeout only bounds the failure.
            futures = [
                pool.submit(socket.create_connection, (host, int(port)), 5.0)
                for _ in range(VIEWERS)
            ]
            stalled = 0
            for future in futures:
                try:
                    connections.append(future.result())
                except OSError:
                    stalled += 1
        assert stalled == 0, f"{stalled} of {VIEWERS} connections found no room in the backlog"
        with server:
            request = f"GET /api/snapshot HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
            for connection in connections:
                connection.settimeout(WAIT)
                connection.sendall(request)
            for connection in connections:
                assert connection.recv(12) == b"HTTP/1.1 200"
    finally:
        for connection in connections:
            connection.close()
        server.close()
