"""The web dashboard: a read-only page, a JSON snapshot and a Server-Sent Events stream.

Theory of operation. A :class:`~healthnet.feed.FederationFeed` subscribes to the federation's
public state over MQTT (the dashboard identity where security is on) and keeps one
:class:`~healthnet.observe.Observer` current. A standard-library ``ThreadingHTTPServer`` serves
four things, GET only: the page and its static files (shipped in this package: no build step, no
CDN), ``/api/snapshot`` (the current :class:`~healthnet.observe.Snapshot` as JSON) and
``/api/events`` (the same snapshot pushed on every change, at most a few times a second, and every
two seconds regardless so that ages keep counting). The browser never talks to the broker, so the
broker needs no websockets listener and no credentials reach the page.

It listens on 127.0.0.1 by default, answers only requests whose Host is that address (so a web
page elsewhere cannot read it through DNS rebinding) and sends a strict Content-Security-Policy.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import sys
import threading
import time
from collections.abc import Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from types import TracebackType
from typing import Self

from pydantic import Field, SecretStr
from rich.console import Console

from common.settings import ConnectionSettings
from healthnet.feed import FederationFeed

__all__ = [
    "DEFAULT_PORT",
    "LISTEN_BACKLOG",
    "DashboardServer",
    "DashboardSettings",
    "demo_dashboard",
]

log = logging.getLogger(__name__)

DEFAULT_PORT = 8765
# Push at most this often, and at least this often even when nothing changed.
_MIN_PUSH_INTERVAL = 0.25
_MAX_PUSH_INTERVAL = 2.0

_STATIC: dict[str, tuple[str, str]] = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
    "/vendor/uPlot.iife.min.js": ("vendor/uPlot.iife.min.js", "text/javascript; charset=utf-8"),
    "/vendor/uPlot.min.css": ("vendor/uPlot.min.css", "text/css; charset=utf-8"),
    "/vendor/uPlot.LICENSE": ("vendor/uPlot.LICENSE", "text/plain; charset=utf-8"),
}
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
}
_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]", "::1"})
# The listen backlog: connections the kernel holds until the accept loop takes them. socketserver's
# 5 is too few: a page load opens up to six connections at once (page, script, styles, chart
# library, snapshot, event stream), and every open page reconnects its event stream at the same
# moment when the server restarts, so a room of viewers overflowed it and each connection past the
# fifth waited out a SYN retransmit (a second, then three). 256 holds forty viewers loading the
# page together; Linux caps it at net.core.somaxconn (4096 by default) anyway.
LISTEN_BACKLOG = 256


class DashboardSettings(ConnectionSettings):
    """``healthnet dashboard``: the broker to observe, and where to serve the page."""

    dashboard_host: str = Field(default="127.0.0.1", description="address to bind")
    dashboard_port: int = Field(default=DEFAULT_PORT, ge=0, le=65535, description="0: any free")


def _load_static() -> dict[str, tuple[bytes, str]]:
    root = resources.files("healthnet") / "dashboard_static"
    return {path: ((root / name).read_bytes(), kind) for path, (name, kind) in _STATIC.items()}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address: tuple[str, int], feed: FederationFeed) -> None:
        super().__init__(address, _Handler)
        self.feed = feed
        self.files = _load_static()
        self.stopping = threading.Event()
        self.loopback_only = _is_loopback(address[0])

    def handle_error(self, request: object, client_address: tuple[str, int]) -> None:
        """A viewer that closes its tab mid-request is routine, not a traceback on stderr."""
        error = sys.exc_info()[1]
        if isinstance(error, ConnectionError):
            log.debug("dashboard viewer %s went away: %s", client_address[0], error)
            return
        # Called from the server's own except block, so the traceback is still at hand.
        log.error("dashboard request from %s failed", client_address[0], exc_info=error)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "healthnet-dashboard"
    sys_version = ""
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if not self._host_allowed():
            self._send(HTTPStatus.MISDIRECTED_REQUEST, b"unexpected Host header\n", "text/plain")
            return
        path = self.path.split("?", 1)[0]
        if path == "/api/snapshot":
            body = self.server.feed.snapshot().model_dump_json().encode()
            self._send(HTTPStatus.OK, body, "application/json")
        elif path == "/api/events":
            self._stream_events()
        elif path in self.server.files:
            content, kind = self.server.files[path]
            self._send(HTTPStatus.OK, content, kind)
        else:
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")

    def _host_allowed(self) -> bool:
        if not self.server.loopback_only:
            return True
        host = self.headers.get("Host", "")
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        return name.lower() in _LOOPBACK_NAMES

    def _send(self, status: HTTPStatus, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in _SECURITY_HEADERS.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _stream_events(self) -> None:
        feed, stopping = self.server.feed, self.server.stopping
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        for name, value in _SECURITY_HEADERS.items():
            self.send_header(name, value)
        self.end_headers()
        self.close_connection = True
        generation = feed.generation
        try:
            while not stopping.is_set() and not feed.closed:
                sent_at = time.monotonic()
                data = feed.snapshot().model_dump_json()
                self.wfile.write(f"event: snapshot\ndata: {data}\n\n".encode())
                self.wfile.flush()
                generation = feed.wait_for_change(generation, _MAX_PUSH_INTERVAL)
                stopping.wait(max(0.0, _MIN_PUSH_INTERVAL - (time.monotonic() - sent_at)))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the browser went away

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - base signature
        log.debug("dashboard %s: %s", self.address_string(), format % args)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class DashboardServer:
    """Serves the dashboard of ``feed`` on ``host:port`` (port 0: any free one) until closed."""

    def __init__(self, feed: FederationFeed, host: str = "127.0.0.1", port: int = DEFAULT_PORT):
        self._server = _Server((host, port), feed)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="dashboard-http", daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        name = host.decode() if isinstance(host, bytes) else host
        shown = f"[{name}]" if ":" in name else name
        return f"http://{shown}:{port}/"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._server.stopping.set()
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()


@contextlib.contextmanager
def demo_dashboard(
    broker_url: str, federation: str, console: Console, *, port: int = DEFAULT_PORT
) -> Iterator[str]:
    """The demo's dashboard on 127.0.0.1:``port``, or any free port when that is taken."""
    settings = ConnectionSettings(broker_url=SecretStr(broker_url), federation=federation)
    with FederationFeed(settings) as feed:
        try:
            server = DashboardServer(feed, "127.0.0.1", port)
        except OSError as exc:
            log.info("dashboard port %d is taken (%s); using a free one", port, exc)
            server = DashboardServer(feed, "127.0.0.1", 0)
        with server:
            console.print(f"dashboard: {server.url}")
            yield server.url
