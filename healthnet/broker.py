"""Start, probe, restart and stop the embedded MQTT broker used by first runs, the demo and tests.

Theory of operation
-------------------
Production runs Mosquitto configured from ``deploy/``. For a first run on a laptop, the demo and the
integration tests we start a broker of our own, always as a child process that we own:

* ``mosquitto`` when a binary is found on PATH or in the sbin folders that a non-root PATH often
  lacks, run in the foreground (``-c``, never ``-d``) with a config generated into a work folder;
* otherwise amqtt (pure Python, MQTT 3.1.1 only) via ``python -m healthnet._amqtt_broker``.

The child gets its own process group so that a Ctrl-C meant for the CLI does not kill the broker
under the clients that are still draining; :meth:`EmbeddedBroker.stop` ends it with SIGTERM, then
SIGKILL. Ready means MQTT, not TCP: :meth:`EmbeddedBroker.start` returns only once a raw MQTT 3.1.1
CONNECT is answered by CONNACK 0. The port is chosen once per :class:`EmbeddedBroker` and kept, so
:meth:`EmbeddedBroker.restart` comes back where the clients expect it. The work folder (config, log,
persistence) is a private temporary folder unless one is configured; a temporary one is removed by
``stop()`` but kept when start-up fails, so that the log named in the error can still be read.

An :class:`EmbeddedBroker` is not thread-safe: one owner starts and stops it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

from common import errors

__all__ = [
    "BrokerConfig",
    "BrokerImplementation",
    "BrokerProcessError",
    "EmbeddedBroker",
    "find_mosquitto",
    "free_port",
]

_log = logging.getLogger(__name__)

BrokerImplementation = Literal["auto", "mosquitto", "amqtt"]
RunningImplementation = Literal["mosquitto", "amqtt"]

# Where distributions and Homebrew put mosquitto; sbin is often missing from a non-root PATH.
_MOSQUITTO_DIRS = ("/usr/sbin", "/usr/local/sbin", "/opt/homebrew/sbin")
_MQTT_MAX_PACKET = 268_435_455  # the largest remaining length MQTT can encode
_MIN_PACKET = 64 * 1024  # below this even a manifest would not fit; certainly a typo
_AUTOSAVE_SECONDS = 60  # bounds what a broker crash loses without rewriting a large store often
_POLL_SECONDS = 0.05
_PROBE_TIMEOUT = 1.0
_KILL_WAIT_SECONDS = 5.0
_LOG_TAIL_LINES = 25
_LOG_NAME = "broker.log"
_PROBE_CLIENT_ID = b"healthnet-ready-probe"  # 21 bytes: within the 23 that MQTT 3.1 brokers allow
_PROBE_KEEPALIVE = 10


class BrokerProcessError(errors.BrokerError, RuntimeError):
    """The broker process could not be found, started or stopped; the message names its log.

    It is a :class:`common.errors.BrokerError` (talking to a broker failed), so a handler for
    healthNET's errors catches it.
    """


@dataclass(frozen=True)
class BrokerConfig:
    """How to run the embedded broker; the defaults suit a first run on one machine."""

    host: str = "127.0.0.1"
    """Address the listener binds to; anything but loopback exposes an anonymous broker."""
    port: int = 0
    """TCP port; 0 picks a free one at the first start and keeps it for restarts."""
    implementation: BrokerImplementation = "auto"
    """``auto`` runs mosquitto when :func:`find_mosquitto` finds it, otherwise amqtt."""
    workdir: Path | None = None
    """Folder for the config, log and persistence; None means a temporary one, removed on stop."""
    persistence: bool = False
    """Keep retained messages and persistent sessions across restarts (mosquitto only)."""
    max_packet_bytes: int = 128 * 1024 * 1024
    """Largest MQTT packet accepted: twice a 64 MiB message, so that one packet cannot exhaust
    memory. mosquitto enforces it; amqtt has no limit over TCP."""
    max_queued_messages: int = 10_000
    """Messages mosquitto queues per client beyond the in-flight window before it drops them."""
    startup_timeout: float = 15.0
    """Seconds to wait for CONNACK (and, on restart, for the port to be released)."""

    def __post_init__(self) -> None:
        if not self.host or any(char.isspace() for char in self.host):
            raise ValueError(f"broker host {self.host!r} must be an address without spaces")
        if not 0 <= self.port <= 65_535:
            raise ValueError(f"broker port {self.port} is outside 0-65535")
        if not _MIN_PACKET <= self.max_packet_bytes <= _MQTT_MAX_PACKET:
            raise ValueError(
                f"max_packet_bytes {self.max_packet_bytes} is outside "
                f"{_MIN_PACKET}-{_MQTT_MAX_PACKET}"
            )
        if self.max_queued_messages < 0:
            raise ValueError(f"max_queued_messages {self.max_queued_messages} is negative")
        if self.startup_timeout <= 0:
            raise ValueError(f"startup_timeout {self.startup_timeout} must be positive")
        if self.workdir is not None and "\n" in str(self.workdir):
            raise ValueError(f"broker workdir {str(self.workdir)!r} contains a newline")


def find_mosquitto() -> Path | None:
    """Return the mosquitto binary on PATH or in the usual sbin folders, or None."""
    search = os.pathsep.join([os.environ.get("PATH", os.defpath), *_MOSQUITTO_DIRS])
    found = shutil.which("mosquitto", path=search)
    return Path(found) if found is not None else None


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that nothing listens on now (the OS picks it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
    return port


class EmbeddedBroker:
    """A broker child process: ``with EmbeddedBroker(BrokerConfig()) as broker: broker.url``."""

    def __init__(self, config: BrokerConfig) -> None:
        self._config = config
        self._implementation: RunningImplementation | None = None
        self._mosquitto: Path | None = None
        self._port: int | None = config.port or None
        self._workdir: Path | None = None
        self._owns_workdir = False
        self._log_path: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    # -- lifecycle

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Write the config, start the child and return once it answers an MQTT CONNACK."""
        if self.pid is not None:
            raise BrokerProcessError(
                f"the embedded broker is already running at {self.url} (pid {self.pid})"
            )
        self._stop_process(timeout=0.0)  # reap a child that died on its own
        self._start(port_wait=0.0)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the broker, SIGKILL it after ``timeout`` seconds, remove a temporary work folder.

        Safe to call more than once, and after :meth:`kill`.
        """
        self._stop_process(timeout)
        if self._owns_workdir and self._workdir is not None:
            try:
                shutil.rmtree(self._workdir)
            except OSError as exc:
                _log.warning("could not remove the broker work folder %s: %s", self._workdir, exc)
            self._workdir = None
            self._owns_workdir = False

    def kill(self) -> None:
        """SIGKILL the broker as a crash would: nothing is saved and the work folder stays."""
        process = self._process
        if process is None:
            return
        _signal_group(process, signal.SIGKILL)
        self._reap(process, _KILL_WAIT_SECONDS)
        self._process = None
        _log.info(
            "killed the %s broker (pid %d) on port %d", self.implementation, process.pid, self.port
        )

    def restart(self) -> None:
        """Stop the broker and start it again on the same port and work folder.

        With persistence on, retained messages and persistent sessions survive.
        """
        self._stop_process(timeout=5.0)
        self._start(port_wait=self._config.startup_timeout)

    # -- what callers read

    @property
    def implementation(self) -> RunningImplementation:
        """The broker that runs or will run: ``auto`` resolved on first use."""
        if self._implementation is None:
            self._implementation, self._mosquitto = _resolve(self._config.implementation)
        return self._implementation

    @property
    def port(self) -> int:
        """The TCP port, fixed at the first start (or by the config)."""
        if self._port is None:
            raise BrokerProcessError("the embedded broker has no port yet: call start() first")
        return self._port

    @property
    def url(self) -> str:
        """``mqtt://host:port`` for clients."""
        host = f"[{self._config.host}]" if ":" in self._config.host else self._config.host
        return f"mqtt://{host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs, else None."""
        if self._process is None or self._process.poll() is not None:
            return None
        return self._process.pid

    @property
    def log_path(self) -> Path:
        """The broker's log file (it may be gone after ``stop()`` removed a temporary folder)."""
        if self._log_path is None:
            raise BrokerProcessError("the embedded broker has no log yet: call start() first")
        return self._log_path

    # -- internals

    def _start(self, port_wait: float) -> None:
        implementation = self.implementation
        config = self._config
        if config.persistence and implementation == "amqtt":
            raise BrokerProcessError(
                "broker persistence needs mosquitto: amqtt keeps sessions and retained messages "
                "in memory only (install mosquitto and use implementation 'auto' or 'mosquitto', "
                "or turn persistence off)"
            )
        if self._port is None:
            try:
                self._port = free_port(config.host)
            except OSError as exc:
                raise BrokerProcessError(
                    f"cannot listen on {config.host} ({exc.strerror}); no broker was started"
                ) from exc
        port = self._port
        _wait_port_free(config.host, port, port_wait)

        workdir = self._prepare_workdir()
        log_path = workdir / _LOG_NAME
        self._log_path = log_path
        command, env = self._command(workdir, port)
        _log.debug("starting the %s broker: %s", implementation, command)
        try:
            # The child appends to the log we name; mosquitto also writes its own log_dest there.
            with log_path.open("ab") as log_file:
                self._process = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
        except OSError as exc:
            raise BrokerProcessError(
                f"could not run the {implementation} broker ({command[0]}): {exc}; log {log_path}"
            ) from exc

        try:
            self._wait_ready(self._process, time.monotonic() + config.startup_timeout)
        except BrokerProcessError:
            self._stop_process(timeout=1.0)
            raise
        _log.info(
            "%s broker (pid %d) ready at %s, log %s",
            implementation,
            self._process.pid,
            self.url,
            log_path,
        )

    def _prepare_workdir(self) -> Path:
        if self._workdir is None:
            if self._config.workdir is not None:
                self._workdir = self._config.workdir
                self._workdir.mkdir(parents=True, exist_ok=True)
            else:
                # mkdtemp makes it 0700: the config, log and store are ours alone.
                self._workdir = Path(tempfile.mkdtemp(prefix="healthnet-broker-"))
                self._owns_workdir = True
        return self._workdir

    def _command(self, workdir: Path, port: int) -> tuple[list[str], dict[str, str]]:
        env = dict(os.environ)
        if self._mosquitto is not None:  # set exactly when the implementation is mosquitto
            conf_path = workdir / "mosquitto.conf"
            if self._config.persistence:
                (workdir / "persistence").mkdir(mode=0o700, exist_ok=True)
            conf_path.write_text(
                _mosquitto_conf(self._config, port, workdir, as_root=os.geteuid() == 0),
                encoding="utf-8",
            )
            return [str(self._mosquitto), "-c", str(conf_path)], env
        # The child must import this very healthnet, also when it runs from a source tree that is
        # on our sys.path only through the current directory or a relative PYTHONPATH.
        package_root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        return [
            sys.executable,
            "-m",
            "healthnet._amqtt_broker",
            "--host",
            self._config.host,
            "--port",
            str(port),
        ], env

    def _wait_ready(self, process: subprocess.Popen[bytes], deadline: float) -> None:
        host, port = self._config.host, self.port
        while True:
            returncode = process.poll()
            if returncode is not None:
                raise BrokerProcessError(
                    f"the {self.implementation} broker exited with status {returncode} before it "
                    f"accepted MQTT connections on {host}:{port}; {self._log_excerpt()}"
                )
            try:
                code = _probe_connack(host, port, min(_PROBE_TIMEOUT, deadline - time.monotonic()))
            except OSError:
                code = None  # not listening yet, or the timeout ran out mid-probe
            except ValueError as exc:
                raise BrokerProcessError(f"{exc}; {self._log_excerpt()}") from exc
            if code == 0:
                return
            if code is not None:
                raise BrokerProcessError(
                    f"the {self.implementation} broker on {host}:{port} refused the readiness "
                    f"probe with CONNACK return code {code}; {self._log_excerpt()}"
                )
            if time.monotonic() >= deadline:
                raise BrokerProcessError(
                    f"the {self.implementation} broker did not answer an MQTT CONNECT on "
                    f"{host}:{port} within {self._config.startup_timeout:g} s; "
                    f"{self._log_excerpt()}"
                )
            time.sleep(_POLL_SECONDS)

    def _stop_process(self, timeout: float) -> None:
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            _signal_group(process, signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                _log.warning(
                    "the %s broker (pid %d) ignored SIGTERM for %g s; killing it, log %s",
                    self.implementation,
                    process.pid,
                    timeout,
                    self._log_path,
                )
                _signal_group(process, signal.SIGKILL)
                self._reap(process, _KILL_WAIT_SECONDS)
        self._process = None
        _log.info(
            "stopped the %s broker (pid %d, exit status %s) on port %s",
            self.implementation,
            process.pid,
            process.returncode,
            self._port,
        )

    def _reap(self, process: subprocess.Popen[bytes], timeout: float) -> None:
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            raise BrokerProcessError(
                f"the {self.implementation} broker (pid {process.pid}) survived SIGKILL for "
                f"{timeout:g} s; log {self._log_path}"
            ) from exc

    def _log_excerpt(self) -> str:
        path = self._log_path
        if path is None:
            return "no log was written"
        try:
            with path.open(encoding="utf-8", errors="replace") as log_file:
                tail = "".join(deque(log_file, maxlen=_LOG_TAIL_LINES)).rstrip()
        except OSError as exc:
            return f"log {path} could not be read ({exc})"
        return f"log {path} ends with:\n{tail}" if tail else f"log {path} is empty"


def _resolve(wanted: BrokerImplementation) -> tuple[RunningImplementation, Path | None]:
    if wanted == "amqtt":
        return "amqtt", None
    binary = find_mosquitto()
    if binary is not None:
        return "mosquitto", binary
    if wanted == "mosquitto":
        raise BrokerProcessError(
            f"mosquitto was not found on PATH or in {', '.join(_MOSQUITTO_DIRS)}; install it "
            "(e.g. apt install mosquitto) or use the amqtt implementation"
        )
    _log.info("mosquitto not found; the embedded broker falls back to amqtt")
    return "amqtt", None


def _mosquitto_conf(config: BrokerConfig, port: int, workdir: Path, *, as_root: bool) -> str:
    """Return the mosquitto.conf text for the embedded broker (pure: no I/O)."""
    lines = [
        "# Generated by healthnet.broker for the embedded broker; not a production config.",
        f"listener {port} {config.host}",
        # Anonymous access is for local first runs and tests on loopback only. Production brokers
        # are configured from deploy/ with TLS, per-identity credentials and ACLs.
        "allow_anonymous true",
        "set_tcp_nodelay true",
        f"max_packet_size {config.max_packet_bytes}",
        # The in-flight window (mosquitto's default of 20 QoS 1/2 messages per client) paces
        # delivery; what waits beyond it is queued up to max_queued_messages and dropped past that,
        # as a production broker does. An unlimited window would hide that limit in
        # socket buffers, and the application-level acks are there to recover from such drops.
        "max_inflight_messages 20",
        f"max_queued_messages {config.max_queued_messages}",
        "max_queued_bytes 0",
        f"log_dest file {workdir / _LOG_NAME}",
        # One type per line: mosquitto reads only the first word of a log_type line.
        *(f"log_type {kind}" for kind in ("error", "warning", "notice", "information")),
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
    ]
    if config.persistence:
        lines += [
            "persistence true",
            # mosquitto before 2.0 joins location and file name without a separator (2.x adds one).
            f"persistence_location {workdir / 'persistence'}{os.sep}",
            f"autosave_interval {_AUTOSAVE_SECONDS}",
        ]
    else:
        lines.append("persistence false")
    if as_root:
        # Started as root, mosquitto 2.x switches to the `mosquitto` user, which cannot write the
        # log or the store in our 0700 work folder (it then runs on, silently without either).
        # The embedded broker is our child process and should run as whoever started it.
        lines.append("user root")
    return "\n".join(lines) + "\n"


def _wait_port_free(host: str, port: int, timeout: float) -> None:
    """Return once ``host:port`` can be bound as a listener would bind it, else raise."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            _probe_bind(host, port)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise BrokerProcessError(
                    f"cannot listen on {host}:{port} ({exc.strerror}); no broker was started"
                ) from exc
            if time.monotonic() >= deadline:
                waited = f" after waiting {timeout:g} s" if timeout > 0 else ""
                raise BrokerProcessError(
                    f"port {host}:{port} is in use by another process{waited} ({exc.strerror}); "
                    "no broker was started: stop that process or choose another port (0 picks one)"
                ) from exc
            time.sleep(_POLL_SECONDS)
        else:
            return


def _probe_bind(host: str, port: int) -> None:
    # SO_REUSEADDR as mosquitto and asyncio set it: connections of the previous broker lingering in
    # TIME_WAIT do not block a restart, while another listener on the port still does.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))


def _probe_connack(host: str, port: int, timeout: float) -> int:
    """Send an MQTT 3.1.1 CONNECT (clean session) and return the CONNACK return code.

    Raises OSError when nothing answers and ValueError when something that is not MQTT does.
    """
    client_id = len(_PROBE_CLIENT_ID).to_bytes(2, "big") + _PROBE_CLIENT_ID
    # Protocol name "MQTT", level 4 (3.1.1), flags: clean session only, keep-alive in seconds.
    variable_header = b"\x00\x04MQTT\x04\x02" + _PROBE_KEEPALIVE.to_bytes(2, "big")
    body = variable_header + client_id
    connect = bytes([0x10, len(body)]) + body  # under 128 bytes: one-byte remaining length
    with socket.create_connection((host, port), timeout=max(timeout, 0.01)) as sock:
        sock.sendall(connect)
        reply = b""
        while len(reply) < 4:
            chunk = sock.recv(4 - len(reply))
            if not chunk:
                raise ConnectionResetError(f"{host}:{port} closed the connection before CONNACK")
            reply += chunk
        if reply[:2] != b"\x20\x02":
            raise ValueError(f"{host}:{port} answered CONNECT with {reply!r}, not a CONNACK")
        if reply[3] == 0:
            sock.sendall(b"\xe0\x00")  # DISCONNECT, so the broker logs a clean goodbye
        return reply[3]


def _signal_group(process: subprocess.Popen[bytes], signum: signal.Signals) -> None:
    # ProcessLookupError: already gone, the group ended with its leader.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signum)
