"""A read-only subscription to one federation's public state, folded into an :class:`Observer`.

It subscribes to what an observer may read and nothing more: the aggregator's status, the
versions log, the nodes' statuses and their evaluations. It never subscribes to model chunks or
updates, and never publishes, so it runs under the broker's read-only dashboard identity. One named
thread drains the MQTT inbox; readers take snapshots under a lock, and may wait for the next change.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Self, assert_never

from common.codec import DEFAULT_MAX_MESSAGE_BYTES, new_id
from common.inbound import Chunk, Inbound, Refusal, Refused, receive
from common.mqtt import ConnectionEvent, Message, MqttClient
from common.settings import ConnectionSettings
from common.topics import Role, TopicFilter, TopicTree
from healthnet.observe import Observer, Snapshot

__all__ = ["FederationFeed", "subscriptions"]

log = logging.getLogger(__name__)


def subscriptions(topics: TopicTree) -> tuple[TopicFilter, ...]:
    """The topic filters an observer reads: status, versions, node status and evaluations.

    The dashboard's reads in the table the broker's ACL is generated from (an operator's, for
    `healthnet watch`, include them).
    """
    return topics.subscriptions(Role.DASHBOARD)


class FederationFeed:
    """Keeps an :class:`Observer` current from the broker until closed."""

    def __init__(
        self,
        settings: ConnectionSettings,
        *,
        client_id: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.topics = TopicTree(settings.federation)
        self.observer = Observer(settings.federation)
        self.ignored = 0  # messages that could not be decoded or were not ours
        self._clock = clock
        self._client = MqttClient.from_settings(settings, client_id or f"observer-{new_id()[:12]}")
        for topic_filter in subscriptions(self.topics):
            self._client.subscribe(topic_filter)
        self._changed = threading.Condition()
        self._generation = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._drain, name=f"feed-{settings.federation}", daemon=True
        )

    def __enter__(self) -> Self:
        self._client.start()
        with self._changed:
            self.observer.connected = True
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
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)
        self._client.close()
        with self._changed:
            self._generation += 1
            self._changed.notify_all()

    @property
    def closed(self) -> bool:
        return self._stop.is_set()

    @property
    def generation(self) -> int:
        """Grows by one with every change; pass it to :meth:`wait_for_change`."""
        with self._changed:
            return self._generation

    def snapshot(self) -> Snapshot:
        with self._changed:
            return self.observer.snapshot(self._clock())

    def wait_for_change(self, generation: int, timeout: float) -> int:
        """Block until the picture changed after ``generation`` (or ``timeout``); the new one."""
        with self._changed:
            self._changed.wait_for(
                lambda: self._generation != generation or self._stop.is_set(), timeout
            )
            return self._generation

    def _drain(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._client.inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            with self._changed:
                if self._take(item):
                    self._generation += 1
                    self._changed.notify_all()

    def _take(self, item: Message | ConnectionEvent) -> bool:
        if isinstance(item, ConnectionEvent):
            self.observer.connected = item.connected
            if not item.connected:
                log.warning("observer lost the broker (%s); reconnecting", item.reason)
            return True
        match received := receive(
            item.topic, item.payload, topics=self.topics, max_bytes=DEFAULT_MAX_MESSAGE_BYTES
        ):
            case Inbound():
                return self.observer.observe(
                    received.topic, received.body, self._clock(), retained=item.retain
                )
            case Refusal(reason=Refused.EMPTY):
                return False  # a cleared retained message
            case Refusal():
                self.ignored += 1
                log.warning("observer ignored a message on %s: %s", item.topic, received.detail)
                return False
            case Chunk():
                return False  # model chunks are not an observer's
            case _:
                assert_never(received)
