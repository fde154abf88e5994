"""The operator's side of the control protocol: requests with replies, and status snapshots."""

from __future__ import annotations

import queue
import time
from types import TracebackType
from typing import Self, assert_never

from common.codec import DEFAULT_MAX_MESSAGE_BYTES, encode, envelope, new_id
from common.errors import BrokerUnavailable, ControlError
from common.inbound import Chunk, Inbound, Received, Refusal, receive
from common.messages import (
    AggregatorStatus,
    ControlCommand,
    ControlReply,
    ControlRequest,
    NodeStatus,
)
from common.mqtt import Message, MqttClient
from common.settings import ConnectionSettings
from common.topics import TopicTree

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
        self._client.subscribe(reply_topic)
        payload = encode(envelope(request, sender=self.client_id, sent_at=time.time()))
        self._client.publish(self.topics.control_requests(), payload, wait=timeout)
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            match received := self._next(remaining):
                case Inbound(topic=topic, body=ControlReply() as reply) if (
                    topic == reply_topic and reply.request_id == request.request_id
                ):
                    if not reply.ok:
                        raise ControlError(reply.message)
                    return reply
                case None | Inbound() | Chunk() | Refusal():
                    pass  # another request's reply, or nothing in time
                case _:
                    assert_never(received)
        raise ControlError(
            f"no reply to {command.value} within {timeout:.0f}s: is the aggregator of federation "
            f"{self.settings.federation!r} running on {self.settings.broker_url.redacted()}?"
        )

    def status(self, *, timeout: float = 5.0) -> AggregatorStatus:
        """The aggregator's retained status."""
        topic = self.topics.aggregator_status()
        self._client.subscribe(topic)
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            match received := self._next(remaining):
                case Inbound(body=AggregatorStatus() as status) if received.topic == topic:
                    return status
                case None | Inbound() | Chunk() | Refusal():
                    pass
                case _:
                    assert_never(received)
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
            match received := self._next(remaining):
                case Inbound(body=NodeStatus() as status) if received.topic.node:
                    found[received.topic.node] = status
                case None | Inbound() | Chunk() | Refusal():
                    pass  # a cleared status, or a message that is not a node's status
                case _:
                    assert_never(received)
        return found

    def _next(self, timeout: float) -> Received | None:
        """The next message received within ``timeout``, typed or refused; None if none came."""
        try:
            item = self._client.inbox.get(timeout=timeout)
        except queue.Empty:
            return None
        if not isinstance(item, Message):
            return None
        return receive(
            item.topic, item.payload, topics=self.topics, max_bytes=DEFAULT_MAX_MESSAGE_BYTES
        )
