"""The operator's side of the control protocol: requests with replies, and status snapshots."""

from __future__ import annotations

import queue
import time
from types import TracebackType
from typing import Self

from common.codec import decode, encode, envelope, new_id
from common.errors import BrokerUnavailable, ControlError, ProtocolError
from common.messages import (
    AggregatorStatus,
    ControlCommand,
    ControlReply,
    ControlRequest,
    NodeStatus,
)
from common.mqtt import Message, MqttClient
from common.settings import ConnectionSettings
from common.topics import Route, TopicTree

__all__ = ["ControlClient"]


class ControlClient:
    """A short-lived operator connection (one per CLI command)."""

    def __init__(self, settings: ConnectionSettings, *, client_id: str | None = None) -> None:
        self.settings = settings
        self.topics = TopicTree(settings.federation)
        self.client_id = client_id or f"operator-{new_id()[:12]}"
        self._client = MqttClient.from_settings(settings, self.client_id)

    def __enter__(self) -> Self:
        self._client.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._client.close()

    def request(
        self,
        command: ControlCommand,
        knobs: dict[str, int | float | str | bool | None] | None = None,
        *,
        node: str | None = None,
        version: int | None = None,
        timeout: float = 10.0,
    ) -> ControlReply:
        """Send one command and wait for its reply; ControlError when refused or unanswered."""
        request = ControlRequest(
            request_id=new_id(), command=command, knobs=knobs or {}, node=node, version=version
        )
        reply_topic = self.topics.control_reply(request.request_id)
        self._client.subscribe(str(reply_topic))
        payload = encode(envelope(request, sender=self.client_id, sent_at=time.time()))
        self._client.publish(self.topics.control_requests(), payload, wait=timeout)
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            message = self._next_message(remaining)
            if message is None or message.topic != str(reply_topic):
                continue
            body = _body(message)
            if isinstance(body, ControlReply) and body.request_id == request.request_id:
                if not body.ok:
                    raise ControlError(body.message)
                return body
        raise ControlError(
            f"no reply to {command.value} within {timeout:.0f}s: is the aggregator of federation "
            f"{self.settings.federation!r} running on {self.settings.broker_url.redacted()}?"
        )

    def status(self, *, timeout: float = 5.0) -> AggregatorStatus:
        """The aggregator's retained status."""
        topic = str(self.topics.aggregator_status())
        self._client.subscribe(topic)
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            message = self._next_message(remaining)
            if message is not None and message.topic == topic and message.payload:
                body = _body(message)
                if isinstance(body, AggregatorStatus):
                    return body
        raise BrokerUnavailable(
            f"no aggregator status for federation {self.settings.federation!r} within "
            f"{timeout:.0f}s"
        )

    def nodes(self, *, settle: float = 1.0) -> dict[str, NodeStatus]:
        """Every node's retained status, collected for ``settle`` seconds."""
        self._client.subscribe(self.topics.all_node_status())
        found: dict[str, NodeStatus] = {}
        deadline = time.monotonic() + settle
        while (remaining := deadline - time.monotonic()) > 0:
            message = self._next_message(remaining)
            if message is None or not message.payload:
                continue
            topic = self.topics.parse(message.topic)
            body = _body(message)
            if topic.route is Route.NODE_STATUS and isinstance(body, NodeStatus) and topic.node:
                found[topic.node] = body
        return found

    def _next_message(self, timeout: float) -> Message | None:
        try:
            item = self._client.inbox.get(timeout=timeout)
        except queue.Empty:
            return None
        return item if isinstance(item, Message) else None


def _body(message: Message) -> object:
    try:
        return decode(message.payload).body
    except ProtocolError:
        return None
