"""The MQTT boundary: the only module that imports paho.

Theory of operation. :class:`MqttClient` owns one paho client and one named network thread. paho's
callbacks never do work: they put a :class:`Message` or a :class:`ConnectionEvent` on the client's
``inbox`` queue, which the owning service drains on its own thread. The network thread connects,
runs paho's loop, and on any loss reconnects with capped, fully jittered backoff (paho's own
reconnect delay has no jitter, so a broker restart would bring every hospital back in step).
Subscriptions are remembered and renewed on every connect. QoS 1 publishes made while offline are
queued by paho and sent on reconnect. Return codes become exceptions at the call site.

Confirmed subscriptions. A subscription is in place only once the broker's SUBACK grants it, and a
broker may refuse one (failure code 0x80 on MQTT 3.1.1, a reason code of 0x80 or more on v5).
:meth:`MqttClient.subscribe` on a connected client, and :meth:`MqttClient.start` for the
subscriptions made before it, return only once the broker has granted them on the current
connection, and raise :class:`SubscriptionRefused` when it refused; so a caller that publishes
after either knows the broker will route matching messages to it. A refusal of a renewal on a
reconnect has no caller to raise to: it is logged. (Mosquitto's ACL file does not refuse
subscriptions: it grants them and filters what it delivers.)

Manual acknowledgement. A client made with ``manual_ack=True`` does not PUBACK a QoS 1 message
when it arrives: the owner calls :meth:`MqttClient.ack` once the message is safely handled (for the
aggregator: durably recorded). With a persistent session the broker redelivers every message that
was never acked after a crash or a lost connection. Packet ids belong to one session, and a
message still on the inbox from before a reconnect has been (or will be) redelivered under its id
on the new connection; acking the old copy could acknowledge a *different* message that the broker
later sends under a reused id. So each message carries the number of the connection it came on,
and an ack for an earlier connection is not sent: the redelivered copy is acked instead.

Many connections, one thread. A thread per connection is what one service needs, and what a
simulator of thousands of light clients cannot afford. :class:`ClientLoop` drives many
:class:`LoopClient` connections from the caller's thread through paho's external-loop API: one
selector watches every socket for reading, and for writing only while paho has bytes queued
(paho's ``on_socket_register_write`` / ``unregister_write``); ``loop_misc`` runs once a second for
keep-alives. Events go straight to the client's :class:`LoopHandler` on that same thread. A lost
connection is retried after the same capped, jittered backoff; QoS 1 publishes made while offline
are not queued (the caller resends what it still owes on the next connect). Opening a connection
(TCP and the TLS handshake) blocks the loop while it lasts, so the loop opens a few per turn.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import queue
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol, Self

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from common.backoff import Backoff
from common.broker_url import BrokerEndpoint, TlsFiles
from common.errors import BrokerError, BrokerUnavailable, SubscriptionRefused
from common.settings import ConnectionSettings
from common.topics import Topic, TopicFilter

__all__ = [
    "ClientLoop",
    "ConnectionEvent",
    "LoopClient",
    "LoopHandler",
    "Message",
    "MqttClient",
    "Will",
]

log = logging.getLogger(__name__)

# A persistent session outlives a disconnect by this long (MQTT 5; 3.1.1 sessions never expire).
SESSION_EXPIRY_SECONDS = 7 * 24 * 3600


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    payload: bytes
    retain: bool
    qos: int
    # The packet id and the connection it arrived on, for MqttClient.ack (see the module docstring).
    mid: int = field(default=0, compare=False)
    connection: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class ConnectionEvent:
    """Put on the inbox on every (re)connect and loss, so services can resend or pause."""

    connected: bool
    session_present: bool = False
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Will:
    topic: Topic
    payload: bytes


InboxItem = Message | ConnectionEvent


class MqttClient:
    """A reconnecting MQTT client whose events arrive on ``inbox``."""

    def __init__(
        self,
        endpoint: BrokerEndpoint,
        client_id: str,
        *,
        persistent_session: bool = False,
        will: Will | None = None,
        tls_files: TlsFiles | None = None,
        keepalive: int = 30,
        backoff: Backoff | None = None,
        max_inflight: int = 20,
        connect_timeout: float = 15.0,
        manual_ack: bool = False,
    ) -> None:
        self.endpoint = endpoint
        self.client_id = client_id
        self.inbox: queue.Queue[InboxItem] = queue.Queue()
        self._persistent = persistent_session
        self._will = will
        self._tls_files = tls_files or TlsFiles()
        self._keepalive = keepalive
        self._backoff = backoff or Backoff()
        self._max_inflight = max_inflight
        self._connect_timeout = connect_timeout
        self._manual_ack = manual_ack
        self._connection = 0  # counts successful connects; written by the network thread only
        self._subscriptions: dict[str, int] = {}
        self._lock = threading.Lock()
        # SUBACK bookkeeping, guarded by _subacks: the filter of each SUBSCRIBE awaiting its
        # SUBACK (by packet id), the connection on which each filter was last granted, and the
        # broker's reason for each refused one. Never held while waiting on paho's locks from
        # paho's side: paho calls our callbacks without holding its own.
        self._subacks = threading.Condition()
        self._awaiting: dict[int, str] = {}
        self._granted: dict[str, int] = {}
        self._refused: dict[str, str] = {}
        self._connected = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._paho: paho.Client | None = None
        self._attempt = 0
        self._last_error = ""
        self._unconfirmed: list[paho.MQTTMessageInfo] = []

    @classmethod
    def from_settings(
        cls,
        settings: ConnectionSettings,
        client_id: str,
        *,
        persistent_session: bool = False,
        will: Will | None = None,
        backoff: Backoff | None = None,
        max_inflight: int = 20,
        manual_ack: bool = False,
    ) -> Self:
        """A client of ``settings``' broker: its endpoint, TLS files, keep-alive and timeout.

        Every role that holds settings builds its client here; the keyword arguments are what
        differs between roles (a persistent session, a Last Will, manual acknowledgement).
        """
        return cls(
            settings.broker_url,
            client_id,
            persistent_session=persistent_session,
            will=will,
            tls_files=settings.tls_files(),
            keepalive=settings.keepalive,
            backoff=backoff,
            max_inflight=max_inflight,
            connect_timeout=settings.connect_timeout,
            manual_ack=manual_ack,
        )

    # -- lifecycle

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def subscriptions(self) -> tuple[str, ...]:
        """The topic filters this client subscribes to (again on every connect)."""
        with self._lock:
            return tuple(self._subscriptions)

    def start(self, timeout: float | None = None) -> None:
        """Start the network thread and wait for the first successful connection."""
        timeout = self._connect_timeout if timeout is None else timeout
        if self._thread is not None:
            raise BrokerError(f"client {self.client_id} already started")
        self._paho = self._build()
        self._thread = threading.Thread(
            target=self._network_loop, name=f"mqtt-{self.client_id}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        if not self._connected.wait(timeout):
            self.close()
            raise BrokerUnavailable(
                f"could not connect to {self.endpoint.redacted()} as {self.client_id!r} within "
                f"{timeout:.0f}s: {self._last_error or 'no answer'}"
            )
        with self._lock:
            filters = list(self._subscriptions)
        try:
            for topic_filter in filters:
                self._await_suback(topic_filter, deadline)
        except BrokerError:
            self.close()
            raise

    def close(self, timeout: float = 5.0) -> None:
        """Flush QoS 1 publishes, disconnect cleanly (no Last Will) and stop the network thread."""
        self.flush(timeout)
        client, thread = self._paho, self._thread
        if client is not None and self._connected.is_set():
            client.disconnect()  # before _stopping, so the network thread still sends it
        self._stopping.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        if client is not None and (thread is None or not thread.is_alive()):
            sock = client.socket()
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()
            # Our bound-method callbacks make a reference cycle, so paho's __del__ (which closes
            # its wake-up socket pair) would wait for the garbage collector. Break the cycle and
            # drop the client: it is finalised, and its sockets closed, right here.
            client.on_connect = None
            client.on_disconnect = None
            client.on_message = None
            client.on_subscribe = None
            client.on_socket_register_write = None
            self._paho = None
        self._connected.clear()

    # -- operations

    def subscribe(
        self, subscription: Topic | TopicFilter, qos: int = 1, *, timeout: float | None = None
    ) -> None:
        """Subscribe now if connected, and on every (re)connect; may be called before start.

        ``subscription`` is one topic, or a wildcard filter that :class:`TopicTree` built.
        On a connected client, returns once the broker's SUBACK has granted the subscription
        (within ``timeout``, default the connect timeout); raises :class:`SubscriptionRefused`
        when the broker refused it and :class:`BrokerError` when no SUBACK came in time. Before
        start, only remembers it: :meth:`start` waits for its SUBACK.
        """
        topic_filter = str(subscription)
        with self._lock:
            self._subscriptions[topic_filter] = qos
        client = self._paho
        if client is None or not self._connected.is_set():
            return
        with self._subacks:
            self._granted.pop(topic_filter, None)
            self._refused.pop(topic_filter, None)
            # Under the condition's lock, so that the SUBACK cannot be handled before its
            # packet id is recorded.
            rc, mid = client.subscribe(topic_filter, qos)
            _check(rc, f"subscribe to {topic_filter}")
            if mid is not None and rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._awaiting[mid] = topic_filter
        # Offline (NO_CONN) after all: the next connect renews it, and its SUBACK is awaited.
        wait = self._connect_timeout if timeout is None else timeout
        self._await_suback(topic_filter, time.monotonic() + wait)

    def unsubscribe(self, subscription: Topic | TopicFilter) -> None:
        topic_filter = str(subscription)
        with self._lock:
            self._subscriptions.pop(topic_filter, None)
        with self._subacks:
            self._granted.pop(topic_filter, None)
            self._refused.pop(topic_filter, None)
        client = self._paho
        if client is not None and self._connected.is_set():
            rc, _ = client.unsubscribe(topic_filter)
            _check(rc, f"unsubscribe from {topic_filter}")

    def publish(
        self,
        topic: Topic,
        payload: bytes,
        *,
        wait: float | None = None,
    ) -> None:
        """Publish with the route's QoS and retain flag; optionally wait for the broker's ack.

        While offline, QoS 1 messages are queued and sent on reconnect.
        """
        client = self._require()
        info = self._publish(client, str(topic), payload, qos=topic.qos, retain=topic.retain)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_AGAIN):
            raise BrokerError(f"publish to {topic} failed: {paho.error_string(info.rc)}")
        if wait is not None:
            deadline = time.monotonic() + wait
            while not info.is_published():
                if time.monotonic() > deadline:
                    raise BrokerError(f"publish to {topic} not acknowledged within {wait:.1f}s")
                info.wait_for_publish(min(0.1, wait))

    def flush(self, timeout: float) -> bool:
        """Wait until the broker has acknowledged every QoS 1 publish so far; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            pending = list(self._unconfirmed)
        for info in pending:
            while not info.is_published() and self._connected.is_set():
                if time.monotonic() > deadline:
                    return False
                info.wait_for_publish(0.05)
        with self._lock:
            self._unconfirmed = [i for i in self._unconfirmed if not i.is_published()]
        return not self._unconfirmed

    def ack(self, message: Message) -> bool:
        """Acknowledge a QoS 1 message to the broker (``manual_ack`` clients only).

        Returns False, and sends nothing, when the message came on an earlier connection (the
        broker redelivers it on this one) or the client is offline; True when the PUBACK is queued
        or none is needed (QoS 0, or a client that acks on arrival).
        """
        if not self._manual_ack or message.qos == 0:
            return True
        client = self._paho
        if client is None or not self._connected.is_set() or message.connection != self._connection:
            log.debug(
                "%s: not acking %s (mid %d) from connection %d; the broker redelivers it",
                self.client_id,
                message.topic,
                message.mid,
                message.connection,
            )
            return False
        rc = client.ack(message.mid, message.qos)
        if rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            return False
        _check(rc, f"ack of {message.topic}")
        return True

    def clear_retained(self, topic: Topic) -> None:
        """Remove a retained message (a zero-length retained publish)."""
        self._publish(self._require(), str(topic), b"", qos=topic.qos, retain=True)

    def _publish(
        self, client: paho.Client, topic: str, payload: bytes, *, qos: int, retain: bool
    ) -> paho.MQTTMessageInfo:
        info = client.publish(topic, payload, qos=qos, retain=retain)
        if qos > 0 and info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            # paho keeps a QoS 1 message published while offline and sends it on reconnect, but
            # leaves NO_CONN on its info forever, so is_published() would raise even after the
            # broker acked it. AGAIN is paho's own code for "queued, will be sent".
            info.rc = MQTTErrorCode.MQTT_ERR_AGAIN
        with self._lock:
            if len(self._unconfirmed) > 256:
                self._unconfirmed = [i for i in self._unconfirmed if not i.is_published()]
            self._unconfirmed.append(info)
        return info

    # -- internals

    def _await_suback(self, topic_filter: str, deadline: float) -> None:
        """Wait until ``topic_filter`` is granted on the current connection, or refused."""
        with self._subacks:
            while True:
                refused = self._refused.get(topic_filter)
                if refused is not None:
                    raise SubscriptionRefused(
                        f"broker {self.endpoint.redacted()} refused {self.client_id!r} the "
                        f"subscription to {topic_filter}: {refused}"
                    )
                # A loss and reconnect while waiting renews the subscription under a new packet
                # id; the grant that counts is the one on the connection we have now.
                if self._granted.get(topic_filter) == self._connection and self.connected:
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BrokerError(
                        f"broker {self.endpoint.redacted()} did not confirm {self.client_id!r}'s "
                        f"subscription to {topic_filter} in time"
                    )
                self._subacks.wait(min(left, 0.5))

    def _require(self) -> paho.Client:
        if self._paho is None:
            raise BrokerError(f"client {self.client_id} is not started")
        return self._paho

    def _build(self) -> paho.Client:
        v5 = self.endpoint.protocol == "5"
        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=None if v5 else not self._persistent,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            reconnect_on_failure=False,
            manual_ack=self._manual_ack,
        )
        client.max_inflight_messages_set(self._max_inflight)
        if self.endpoint.username:
            client.username_pw_set(self.endpoint.username, self.endpoint.password)
        if self.endpoint.tls:
            files = self._tls_files
            client.tls_set(
                ca_certs=files.ca_file,
                certfile=files.cert_file,
                keyfile=files.key_file,
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        if self._will is not None:
            client.will_set(
                str(self._will.topic), self._will.payload, qos=self._will.topic.qos, retain=True
            )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        # Only the network thread may write to the socket. Without a loop_start() thread or this
        # callback, paho writes a publish (or a PUBACK) from the caller's thread, concurrently
        # with the network thread's loop(): the two interleave the bytes of large packets and
        # the broker drops the connection as malformed. With it, a publish is only queued, and
        # paho's wake-up socket makes loop() write it.
        client.on_socket_register_write = _only_the_network_thread_writes
        properties = None
        clean_start: paho.CleanStartOption = paho.MQTT_CLEAN_START_FIRST_ONLY
        if v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            if self._persistent:
                properties.SessionExpiryInterval = SESSION_EXPIRY_SECONDS
            clean_start = not self._persistent
        client.connect_async(
            self.endpoint.host,
            self.endpoint.port,
            keepalive=self._keepalive,
            clean_start=clean_start,
            properties=properties,
        )
        return client

    def _network_loop(self) -> None:
        client = self._require()
        while not self._stopping.is_set():
            try:
                rc = client.reconnect()
            except (OSError, ssl.SSLError) as exc:
                self._last_error = f"{type(exc).__name__}: {exc}"
                _close_abandoned_sockets(exc)
                rc = MQTTErrorCode.MQTT_ERR_NO_CONN
            while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and not self._stopping.is_set():
                rc = client.loop(timeout=0.5)
            if self._stopping.is_set():
                # Let paho send the DISCONNECT queued by close().
                client.loop(timeout=0.1)
                break
            delay = self._backoff.delay(self._attempt)
            self._attempt += 1
            log.info(
                "broker %s unreachable as %s (%s); retrying in %.1fs",
                self.endpoint.redacted(),
                self.client_id,
                self._last_error or paho.error_string(rc),
                delay,
            )
            self._stopping.wait(delay)

    def _on_connect(
        self,
        client: paho.Client,
        userdata: object,
        flags: paho.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            self._last_error = f"broker refused the connection: {reason_code}"
            return
        self._attempt = 0
        self._last_error = ""
        self._connection += 1
        with self._lock:
            subscriptions = list(self._subscriptions.items())
        with self._subacks:
            # SUBACKs of the lost connection never come; its packet ids are reused.
            self._awaiting.clear()
        for topic_filter, qos in subscriptions:
            # On this (the network) thread no SUBACK is handled before this callback returns, so
            # recording the packet id after the call is in time.
            rc, mid = client.subscribe(topic_filter, qos)
            if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                with self._subacks:
                    self._awaiting[mid] = topic_filter
        self._connected.set()
        self.inbox.put(ConnectionEvent(connected=True, session_present=flags.session_present))

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: object,
        flags: paho.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        if was_connected:
            self.inbox.put(ConnectionEvent(connected=False, reason=str(reason_code)))

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: object,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        with self._subacks:
            topic_filter = self._awaiting.pop(mid, None)
            if topic_filter is None:
                return
            refusals = [code for code in reason_codes if code.is_failure]
            if refusals:
                reason = f"{refusals[0]} (0x{refusals[0].value:02x})"
                self._refused[topic_filter] = reason
                log.error(
                    "broker %s refused %s the subscription to %s: %s",
                    self.endpoint.redacted(),
                    self.client_id,
                    topic_filter,
                    reason,
                )
            else:
                self._granted[topic_filter] = self._connection
            self._subacks.notify_all()

    def _on_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        self.inbox.put(
            Message(
                msg.topic,
                bytes(msg.payload),
                bool(msg.retain),
                int(msg.qos),
                mid=int(msg.mid),
                connection=self._connection,
            )
        )


def _only_the_network_thread_writes(client: paho.Client, userdata: object, sock: object) -> None:
    """paho's hook for an external event loop: ours (the network thread) needs no telling."""


def _close_abandoned_sockets(exc: BaseException) -> None:
    """Close the socket paho opened for a connection attempt that failed in the TLS handshake.

    paho wraps and handshakes the socket before it keeps a reference to it, so when the handshake
    fails (the broker's certificate is not trusted, say) the socket is only reachable from the
    exception's frames; left there, it is closed by the garbage collector with a ResourceWarning,
    once per reconnect attempt.
    """
    tb = exc.__traceback__
    while tb is not None:
        for value in list(tb.tb_frame.f_locals.values()):
            if isinstance(value, socket.socket):
                with contextlib.suppress(OSError):
                    value.close()
        tb = tb.tb_next


def _check(rc: MQTTErrorCode, what: str) -> None:
    if rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
        raise BrokerError(f"{what} failed: {paho.error_string(rc)}")


class LoopHandler(Protocol):
    """What a :class:`LoopClient` reports, on the thread of the :class:`ClientLoop` driving it."""

    def on_connection(self, client: LoopClient, event: ConnectionEvent) -> None: ...

    def on_message(self, client: LoopClient, message: Message) -> None: ...


class LoopClient:
    """One MQTT connection with no thread of its own: a :class:`ClientLoop` drives it.

    Subscriptions are fixed at construction and made on every connect, before the handler hears
    of the connection, so that whatever the handler publishes then (an update whose ack must come
    back) is answered on a subscription already requested on this connection.
    """

    def __init__(
        self,
        endpoint: BrokerEndpoint,
        client_id: str,
        handler: LoopHandler,
        *,
        subscriptions: Sequence[Topic | TopicFilter] = (),
        tls_files: TlsFiles | None = None,
        keepalive: int = 60,
        backoff: Backoff | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.client_id = client_id
        self.handler = handler
        self._subscriptions = tuple(str(s) for s in subscriptions)
        self._tls_files = tls_files or TlsFiles()
        self._keepalive = keepalive
        self._backoff = backoff or Backoff()
        self._attempt = 0
        self._connected = False
        self._loop: ClientLoop | None = None
        self._paho: paho.Client | None = None
        self.last_error = ""

    @classmethod
    def from_settings(
        cls,
        settings: ConnectionSettings,
        client_id: str,
        handler: LoopHandler,
        *,
        subscriptions: Sequence[Topic | TopicFilter] = (),
        backoff: Backoff | None = None,
    ) -> Self:
        """A client of ``settings``' broker: its endpoint, TLS files and keep-alive."""
        return cls(
            settings.broker_url,
            client_id,
            handler,
            subscriptions=subscriptions,
            tls_files=settings.tls_files(),
            keepalive=settings.keepalive,
            backoff=backoff,
        )

    @property
    def connected(self) -> bool:
        return self._connected

    def publish(self, topic: Topic, payload: bytes) -> bool:
        """Publish with the route's QoS and retain flag; False (nothing sent) while offline."""
        client = self._paho
        if client is None or not self._connected:
            return False
        info = client.publish(str(topic), payload, qos=topic.qos, retain=topic.retain)
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            return False
        _check(info.rc, f"publish to {topic}")
        return True

    # -- driven by ClientLoop, on its thread

    def _open(self, loop: ClientLoop) -> float | None:
        """Try to connect; None once the socket is open, else the seconds until the next try."""
        self._loop = loop
        if self._paho is None:
            self._paho = self._build()
        try:
            rc = self._paho.reconnect()
        except (OSError, ssl.SSLError) as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            _close_abandoned_sockets(exc)
            rc = MQTTErrorCode.MQTT_ERR_NO_CONN
        if rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            return None
        return self._retry_delay()

    def _retry_delay(self) -> float:
        delay = self._backoff.delay(self._attempt)
        self._attempt += 1
        log.debug("%s: broker %s unreachable (%s); retrying in %.1fs", self.client_id,
                  self.endpoint.redacted(), self.last_error, delay)  # fmt: skip
        return delay

    def _build(self) -> paho.Client:
        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=True,
            protocol=MQTTProtocolVersion.MQTTv311,
            reconnect_on_failure=False,
        )
        if self.endpoint.username:
            client.username_pw_set(self.endpoint.username, self.endpoint.password)
        if self.endpoint.tls:
            files = self._tls_files
            client.tls_set(
                ca_certs=files.ca_file,
                certfile=files.cert_file,
                keyfile=files.key_file,
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        client.connect_async(self.endpoint.host, self.endpoint.port, keepalive=self._keepalive)
        return client

    def _read(self) -> None:
        client = self._paho
        while client is not None:
            if client.loop_read() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return  # paho closed the socket and reported the loss
            # TLS may hold decrypted bytes that the selector cannot see.
            sock = client.socket()
            if not (isinstance(sock, ssl.SSLSocket) and sock.pending() > 0):
                return

    def _write(self) -> None:
        if self._paho is not None:
            self._paho.loop_write()

    def _misc(self) -> None:
        if self._paho is not None:
            self._paho.loop_misc()

    def _close(self) -> None:
        client = self._paho
        if client is None:
            return
        # Forgotten first: the loss that paho reports for this disconnect schedules no reconnect.
        self._paho = None
        self._connected = False
        client.disconnect()
        client.loop_write()  # sends the DISCONNECT; paho then closes the socket
        sock = client.socket()
        if isinstance(sock, socket.socket):
            if self._loop is not None:
                self._loop._forget(sock)
            with contextlib.suppress(OSError):
                sock.close()

    def _on_socket_open(self, client: paho.Client, userdata: object, sock: object) -> None:
        if self._loop is not None:
            self._loop._watch(sock, self, write=False)

    def _on_socket_close(self, client: paho.Client, userdata: object, sock: object) -> None:
        if self._loop is not None:
            self._loop._forget(sock)

    def _on_register_write(self, client: paho.Client, userdata: object, sock: object) -> None:
        if self._loop is not None:
            self._loop._watch(sock, self, write=True)

    def _on_unregister_write(self, client: paho.Client, userdata: object, sock: object) -> None:
        if self._loop is not None:
            self._loop._watch(sock, self, write=False)

    def _on_connect(
        self,
        client: paho.Client,
        userdata: object,
        flags: paho.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            self.last_error = f"broker refused the connection: {reason_code}"
            return
        self._attempt = 0
        self.last_error = ""
        self._connected = True
        for topic_filter in self._subscriptions:
            client.subscribe(topic_filter, 1)
        self.handler.on_connection(
            self, ConnectionEvent(connected=True, session_present=flags.session_present)
        )

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: object,
        flags: paho.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        was_connected = self._connected
        self._connected = False
        if self._paho is client and self._loop is not None:
            self._loop._reconnect_later(self, self._retry_delay())
        if was_connected:
            self.handler.on_connection(
                self, ConnectionEvent(connected=False, reason=str(reason_code))
            )

    def _on_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        self.handler.on_message(
            self, Message(msg.topic, bytes(msg.payload), bool(msg.retain), int(msg.qos))
        )


class ClientLoop:
    """Drives many :class:`LoopClient` connections from the caller's thread (one selector).

    ``add`` queues a client's first connect; each :meth:`run_once` opens at most
    ``opens_per_turn`` due connections (an open blocks for its TCP and TLS handshake), handles
    every ready socket, and once a second lets each client send its keep-alive. Not thread-safe:
    every call, and every handler callback, happens on the thread that calls ``run_once``.
    """

    def __init__(self, *, opens_per_turn: int = 8) -> None:
        self._selector = selectors.DefaultSelector()
        self._clients: list[LoopClient] = []
        self._due: list[tuple[float, int, LoopClient]] = []  # a heap of reconnects
        self._sequence = 0
        self._opens_per_turn = opens_per_turn
        self._last_misc = time.monotonic()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def clients(self) -> tuple[LoopClient, ...]:
        return tuple(self._clients)

    def add(self, client: LoopClient) -> None:
        self._clients.append(client)
        self._reconnect_later(client, 0.0)

    def run_once(self, timeout: float) -> None:
        """Open due connections, handle ready sockets (waiting up to ``timeout``), keep alive."""
        now = time.monotonic()
        opened = 0
        while self._due and self._due[0][0] <= now and opened < self._opens_per_turn:
            _, _, client = heapq.heappop(self._due)
            opened += 1
            delay = client._open(self)
            if delay is not None:
                self._reconnect_later(client, delay)
        wait = 0.0 if self._due and self._due[0][0] <= now else timeout
        if self._due:
            wait = min(wait, max(0.0, self._due[0][0] - now))
        for key, mask in self._selector.select(wait if self._selector.get_map() else 0.0):
            client = key.data
            if mask & selectors.EVENT_READ:
                client._read()
            if mask & selectors.EVENT_WRITE and client._paho is not None:
                client._write()
        if not self._selector.get_map() and wait > 0:
            time.sleep(wait)  # nothing to watch: the selector would not wait
        if time.monotonic() - self._last_misc >= 1.0:
            self._last_misc = time.monotonic()
            for client in self._clients:
                client._misc()

    def close(self) -> None:
        """Disconnect every client and stop watching their sockets."""
        for client in self._clients:
            client._close()
        self._due.clear()
        self._selector.close()

    def _reconnect_later(self, client: LoopClient, delay: float) -> None:
        self._sequence += 1
        heapq.heappush(self._due, (time.monotonic() + delay, self._sequence, client))

    def _watch(self, sock: object, client: LoopClient, *, write: bool) -> None:
        if not isinstance(sock, socket.socket):
            raise BrokerError(f"{client.client_id}: paho opened no socket but {sock!r}")
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if write else 0)
        try:
            self._selector.modify(sock, events, client)
        except KeyError:
            self._selector.register(sock, events, client)

    def _forget(self, sock: object) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(sock)  # type: ignore[arg-type]
