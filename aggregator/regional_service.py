"""A regional aggregator's shell: MQTT, disk and clocks around
:class:`~aggregator.regional.RegionalCombiner`.

Theory of operation. A regional aggregator holds one connection, to its region's broker, as the
identity ``region-<region>`` (a persistent session with manual acks, as the core aggregator's):

* its hospitals' updates (``updates/<h>``) come in; each is judged by the combiner, written to its
  write-ahead log if accepted, and only then acknowledged: to the hospital on ``acks/<h>`` and to
  the broker with the manual PUBACK, so that the broker redelivers whatever a crash interrupted;
* the core's retained status and manifest come in through the bridge: the run, its version (which
  the combiner follows, for staleness) and its knobs (with the region's own buffer and
  per-hospital defences, :func:`~aggregator.regional_settings.regional_knobs`);
* a combined update goes out on ``updates/region-<region>`` and the bridge carries it to the core,
  whose ack comes back on ``acks/region-<region>``. Until then it stays in the combiner's outbox
  and is resent after every reconnect and every ``ack_timeout`` (:class:`Resends`), as a hospital
  resends; the core answers a resend of what it folded as a duplicate.

Through the bridge rather than a second connection to the core: the bridge already carries the
region's traffic with a persistent session at each end, so a combined update queues while the link
is down exactly as a hospital's does, the core's ACL keeps naming only bridges and services, and
a regional aggregator needs one identity, on its own broker (``healthnet deploy init
--regional-aggregators`` makes the bridge carry the region's combined updates instead of its
hospitals' updates, see :mod:`healthnet.deploy.regions`).

Until the core's run is known (its status and manifest arrive retained just after connecting),
every other message is held unacknowledged, so none is judged against a run it may not belong
to. A regional aggregator serves one run: its state directory remembers which, and it stops when
that run stops.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import assert_never

from aggregator.core import AggregatorCore, Verdict
from aggregator.regional import RegionalCombiner, Upstream
from aggregator.regional_settings import RegionalSettings, core_conflicts, regional_knobs
from aggregator.regional_store import RegionalStore
from aggregator.state_lock import locked_state_dir
from aggregator.update_log import UpdateEvent, UpdateLog, UpdateLogEntry
from common.codec import encode, envelope
from common.errors import ControlError, HealthNetError
from common.files import atomic_write
from common.inbound import Chunk, Inbound, Refusal, Refused, receive
from common.messages import (
    Ack,
    AggregatorState,
    AggregatorStatus,
    ControlReply,
    ControlRequest,
    Evaluation,
    Knobs,
    Manifest,
    ModelDelta,
    NodeStatus,
    SecAggAnswer,
    SecAggKey,
    SecAggReceipt,
    SecAggShare,
    SecAggUnmask,
    Update,
    VersionRecord,
)
from common.mqtt import ConnectionEvent, Message, MqttClient
from common.topics import Route, Topic, TopicFilter, TopicTree

__all__ = ["RUN_ID_FILE", "RegionalService", "Resends"]

log = logging.getLogger(__name__)

RUN_ID_FILE = "run_id"
_IDLE_WAIT = 1.0


class Resends:
    """When to (re)send each combined update awaiting the core's ack (pure: time is an argument).

    An update is due when it was never sent on this connection, or was sent ``ack_timeout``
    seconds ago without an answer.
    """

    def __init__(self, *, ack_timeout: float) -> None:
        self._ack_timeout = ack_timeout
        self._sent_at: dict[str, float | None] = {}  # None: due at once

    def queued(self, update_id: str) -> None:
        self._sent_at.setdefault(update_id, None)

    def sent(self, update_id: str, now: float) -> None:
        if update_id in self._sent_at:
            self._sent_at[update_id] = now

    def acked(self, update_id: str) -> None:
        self._sent_at.pop(update_id, None)

    def reconnected(self) -> None:
        """A new connection: the broker may have lost what was sent, so everything is due."""
        self._sent_at = dict.fromkeys(self._sent_at)

    def due(self, now: float) -> list[str]:
        return [
            uid for uid, at in self._sent_at.items() if at is None or now - at >= self._ack_timeout
        ]

    def next_due(self) -> float | None:
        """When the earliest unanswered update falls due (None: nothing waits)."""
        times = [at + self._ack_timeout for at in self._sent_at.values() if at is not None]
        if any(at is None for at in self._sent_at.values()):
            return 0.0
        return min(times, default=None)

    def __len__(self) -> int:
        return len(self._sent_at)


class RegionalService:
    """Runs one region's aggregator until the core's run stops or ``stop_event`` is set."""

    def __init__(
        self, settings: RegionalSettings, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.settings = settings
        self.node_id = settings.identity()
        self.topics = TopicTree(settings.federation)
        self.update_log = UpdateLog(settings.state_dir)
        self._clock = clock
        self._combiner: RegionalCombiner | None = None
        self._client: MqttClient | None = None
        self._status: AggregatorStatus | None = None
        self._manifest: Manifest | None = None
        self._core_knobs: Knobs | None = None
        self._held: list[Message] = []
        self._resends = Resends(ack_timeout=settings.ack_timeout)
        self._finished = False
        # Set once connected with its subscriptions granted (for whoever waits on it: tests).
        self.connected = threading.Event()

    @property
    def combiner(self) -> RegionalCombiner:
        if self._combiner is None:
            raise HealthNetError("the regional aggregator has not joined the core's run yet")
        return self._combiner

    def run(self, stop_event: threading.Event | None = None) -> bool:
        """Serve until ``stop_event`` is set (returns False) or the core's run stops (True)."""
        stop_event = stop_event or threading.Event()
        directory = self.settings.state_dir
        with (
            locked_state_dir(directory, "regional-aggregator"),
            contextlib.closing(self.update_log),
            self._connect() as client,
        ):
            self.update_log.open()
            self._client = client
            self.connected.set()
            log.info(
                "region %s: aggregator %s connected to %s",
                self.settings.region,
                self.node_id,
                self.settings.broker_url.redacted(),
            )
            try:
                self._serve(client, stop_event)
            finally:
                if self._combiner is not None:
                    self._combiner.close()
        return self._finished

    # -- connecting

    def subscriptions(self) -> tuple[TopicFilter | Topic, ...]:
        """What it reads: its hospitals' updates, the core's status and manifest, its own acks.

        The regional broker's ACL narrows ``updates/+`` to this region's hospitals.
        """
        return (
            self.topics.aggregator_status(),
            self.topics.manifest(),
            self.topics.ack(self.node_id),
            self.topics.all_updates(),
        )

    def _connect(self) -> MqttClient:
        client = MqttClient.from_settings(
            self.settings,
            self.node_id,
            persistent_session=True,
            # PUBACK only once an update is durably judged, so that the broker redelivers what
            # a crash interrupted (as the core aggregator does).
            manual_ack=True,
        )
        for subscription in self.subscriptions():
            client.subscribe(subscription)
        return client

    # -- the loop

    def _serve(self, client: MqttClient, stop_event: threading.Event) -> None:
        while not stop_event.is_set() and not self._finished:
            try:
                item = client.inbox.get(timeout=self._wait_time())
            except queue.Empty:
                item = None
            match item:
                case Message():
                    if self._on_message(item):
                        client.ack(item)
                case ConnectionEvent(connected=True):
                    self._resends.reconnected()
                case ConnectionEvent(connected=False):
                    log.warning(
                        "region %s: lost the broker (%s)", self.settings.region, item.reason
                    )
                case None:
                    pass
            self._maybe_join()
            self._maybe_combine()
            self._resend()

    def _wait_time(self) -> float:
        now = self._clock()
        wait = _IDLE_WAIT
        if self._combiner is not None:
            deadline = self._combiner.validator.next_deadline()
            if deadline is not None:
                wait = min(wait, deadline - now)
        due = self._resends.next_due()
        if due is not None:
            wait = min(wait, due - now)
        return max(wait, 0.01)

    def _on_message(self, message: Message) -> bool:
        """Handle one message; False when it is held for later (not to be acked yet)."""
        received = receive(
            message.topic,
            message.payload,
            topics=self.topics,
            max_bytes=self.settings.max_update_bytes,
        )
        route = received.topic.route if received.topic is not None else None
        if self._combiner is None and route not in (Route.AGGREGATOR_STATUS, Route.MANIFEST):
            self._held.append(message)
            return False
        match received:
            case Inbound():
                self._on_inbound(received, message.payload)
            case Refusal(topic=Topic(route=Route.UPDATE, node=str() as node)):
                if node != self.node_id:
                    self._on_unreadable_update(node, received)
            case Refusal(reason=Refused.UNKNOWN_TOPIC):
                log.warning("ignoring message on unexpected topic: %s", received.detail)
            case Refusal(reason=Refused.EMPTY) | Chunk():
                log.debug("ignoring %s", message.topic)
            case Refusal():
                log.warning("dropping malformed message on %s: %s", message.topic, received.detail)
            case _:
                assert_never(received)
        return True

    def _on_inbound(self, inbound: Inbound, payload: bytes) -> None:
        node, body = inbound.topic.node, inbound.body
        match body:
            case Update():
                if node is not None and node != self.node_id:  # not its own, come back
                    self._on_update(node, inbound.sender, body, payload)
            case Ack():
                if node == self.node_id:
                    self._on_core_ack(body)
            case AggregatorStatus():
                self._on_core_status(body)
            case Manifest():
                self._on_manifest(body)
            case (
                ModelDelta()
                | Evaluation()
                | NodeStatus()
                | ControlRequest()
                | ControlReply()
                | VersionRecord()
                | SecAggKey()
                | SecAggShare()
                | SecAggReceipt()
                | SecAggUnmask()
                | SecAggAnswer()
            ):
                log.debug("ignoring %s", inbound.topic)
            case _:
                assert_never(body)

    # -- following the core

    def _on_core_status(self, status: AggregatorStatus) -> None:
        self._status = status
        self._follow(status.run_id, status.version)
        if status.state is AggregatorState.STOPPED:
            log.info(
                "region %s: the core's run %s stopped at v%d; nothing more to combine",
                self.settings.region,
                status.run_id,
                status.version,
            )
            self._finished = True
        if status.knobs != self._core_knobs:
            self._core_knobs = status.knobs
            for problem in core_conflicts(status.knobs):
                log.error(
                    "region %s: the core refuses every combined update under %s",
                    self.settings.region,
                    problem,
                )
            if self._combiner is not None:
                self._apply_knobs(status.knobs)

    def _on_manifest(self, manifest: Manifest) -> None:
        self._manifest = manifest
        self._follow(manifest.run_id, manifest.version)

    def _follow(self, run_id: str, version: int) -> None:
        combiner = self._combiner
        if combiner is None:
            return
        if run_id != combiner.validator.run_id:
            raise HealthNetError(
                f"the core now runs {run_id}, not {combiner.validator.run_id}: a regional "
                "aggregator serves one run; start it with a new state directory"
            )
        if version > combiner.validator.version:
            combiner.validator.follow(version)

    def _apply_knobs(self, core: Knobs) -> None:
        validator = self.combiner.validator
        wanted = regional_knobs(core, self.settings)
        current = validator.knobs.model_dump()
        changed = {
            key: value for key, value in wanted.model_dump().items() if current[key] != value
        }
        if not changed:
            return
        try:
            validator.set_knobs(changed)
        except ControlError as exc:
            log.warning(  # a knob the region cannot take; it keeps the ones it has
                "region %s: cannot follow the core's knobs: %s", self.settings.region, exc
            )
            return
        log.info("region %s: following the core's knobs %s", self.settings.region, sorted(changed))

    def _maybe_join(self) -> None:
        """Once the core's run is known: open the state, resend its outbox, handle what waited."""
        status, manifest = self._status, self._manifest
        if self._combiner is not None or status is None or manifest is None:
            return
        if manifest.run_id != status.run_id:
            return  # one of them is from the run before: wait for the other
        self._check_run(status.run_id)
        if self._finished:
            return
        self._combiner = self._open_combiner(status, manifest)
        for upstream in self._combiner.open(self._clock()):
            self._resends.queued(upstream.update_id)
        log.info(
            "region %s: joined run %s at v%d; %d buffered, %d combined updates to send",
            self.settings.region,
            status.run_id,
            self._combiner.validator.version,
            len(self._combiner.validator.buffer),
            len(self._resends),
        )
        held, self._held = self._held, []
        client = self._require_client()
        for message in held:
            if self._on_message(message):
                client.ack(message)

    def _check_run(self, run_id: str) -> None:
        """The state directory serves one run: remember it, or refuse another."""
        path = self.settings.state_dir / RUN_ID_FILE
        if not path.exists():
            atomic_write(path, run_id.encode())
            return
        served = path.read_text(encoding="utf-8").strip()
        if served != run_id:
            raise HealthNetError(
                f"{self.settings.state_dir} holds run {served}, but the core runs {run_id}: "
                "start the regional aggregator with a new state directory"
            )

    def _open_combiner(self, status: AggregatorStatus, manifest: Manifest) -> RegionalCombiner:
        from common.models import build_model, model_params

        params = model_params(build_model(manifest.model, seed=self.settings.seed))
        validator = AggregatorCore(
            run_id=status.run_id,
            params=params,
            knobs=regional_knobs(status.knobs, self.settings),
            version=max(status.version, manifest.version),
            state=AggregatorState.RUNNING,
        )
        return RegionalCombiner(
            region=self.settings.region,
            node_id=self.node_id,
            validator=validator,
            store=RegionalStore(self.settings.state_dir),
            max_bytes=self.settings.max_update_bytes,
        )

    # -- the region's hospitals

    def _on_update(self, node: str, sender: str, update: Update, payload: bytes) -> None:
        combiner, now = self.combiner, self._clock()
        verdict = combiner.receive(node, sender, update, payload, now)
        self._record(node, update, verdict, len(payload), now)
        version = combiner.validator.version
        if verdict.accepted:
            log.info(
                "node %s: update %s from v%d accepted at v%d%s",
                node,
                update.update_id[:8],
                update.base_version,
                version,
                " (duplicate)" if verdict.duplicate else "",
            )
        else:
            log.warning(
                "node %s: update %s from v%d rejected at v%d: %s (%s)",
                node,
                update.update_id[:8],
                update.base_version,
                version,
                verdict.reason.value if verdict.reason else "?",
                verdict.detail,
            )
        ack = Ack(
            update_id=update.update_id,
            accepted=verdict.accepted,
            reason=verdict.reason,
            detail=verdict.detail,
            current_version=version,
        )
        self._require_client().publish(self.topics.ack(node), self._encode(ack))

    def _record(self, node: str, update: Update, verdict: Verdict, size: int, now: float) -> None:
        """The verdict in the region's update log; a rejection synced before its ack (an
        acceptance is durable in the write-ahead log already)."""
        event = (
            UpdateEvent.DUPLICATE
            if verdict.duplicate
            else UpdateEvent.ACCEPTED
            if verdict.accepted
            else UpdateEvent.REJECTED
        )
        entry = UpdateLogEntry(
            event=event,
            at=now,
            node=node,
            update_id=update.update_id,
            base_version=update.base_version,
            version=self.combiner.validator.version,
            reason=verdict.reason.value if verdict.reason is not None else None,
            detail=verdict.detail,
            bytes=size,
        )
        if event is UpdateEvent.REJECTED:
            self.update_log.write([entry])
        else:
            self.update_log.append([entry])

    def _on_unreadable_update(self, node: str, refusal: Refusal) -> None:
        """Not an update on a hospital's update topic: judged, counted and logged; no ack."""
        validator, now = self.combiner.validator, self._clock()
        unreadable = validator.refuse(node, refusal, now)
        self.update_log.append(
            [
                UpdateLogEntry(
                    event=UpdateEvent.REJECTED,
                    at=now,
                    node=node,
                    version=validator.version,
                    reason=unreadable.reason.value,
                    detail=unreadable.detail,
                    bytes=unreadable.size,
                )
            ]
        )
        log.warning(
            "node %s: dropped an update at v%d: %s (%s)",
            node,
            validator.version,
            unreadable.reason.value,
            refusal.detail,
        )

    # -- upstream

    def _maybe_combine(self) -> None:
        if self._combiner is None:
            return
        while (upstream := self._combiner.combine_due(self._clock())) is not None:
            self._resends.queued(upstream.update_id)

    def _resend(self) -> None:
        if self._combiner is None:
            return
        now = self._clock()
        for update_id in self._resends.due(now):
            payload = self._combiner.store.unacked_message(update_id)
            if payload is None:
                self._resends.acked(update_id)
                continue
            self._publish_upstream(Upstream(update_id, payload), now)

    def _publish_upstream(self, upstream: Upstream, now: float) -> None:
        self._require_client().publish(self.topics.update(self.node_id), upstream.payload)
        self._resends.sent(upstream.update_id, now)
        log.debug("region %s: sent %s to the core", self.settings.region, upstream.update_id)

    def _on_core_ack(self, ack: Ack) -> None:
        if self.combiner.core_acked(ack):
            log.info(
                "region %s: the core %s %s at v%d",
                self.settings.region,
                "accepted" if ack.accepted else "refused",
                ack.update_id,
                ack.current_version,
            )
        self._resends.acked(ack.update_id)
        self._follow(self.combiner.validator.run_id, ack.current_version)

    def _encode(self, ack: Ack) -> bytes:
        return encode(envelope(ack, sender=self.node_id, sent_at=self._clock()))

    def _require_client(self) -> MqttClient:
        if self._client is None:
            raise HealthNetError("the regional aggregator is not connected")
        return self._client
