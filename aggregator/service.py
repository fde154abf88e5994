"""The aggregator's shell: MQTT, disk and clocks around :class:`~aggregator.core.AggregatorCore`.

One service thread drains the MQTT inbox and does all the work (decoding, validation, folding,
checkpointing), so paho's network thread only moves bytes. Every verdict on an update is durable
(write-ahead log and ledger, see :mod:`aggregator.journal`) before it is acknowledged, both to the
node (the application ack) and to the broker (a manual PUBACK on a persistent session, so that the
broker redelivers whatever a crash interrupted); every version is logged (and so recoverable)
before it is announced.

Under secure aggregation (docs/secure-aggregation.md#message-flow, steps 4 to 7) the service also
takes the holders' receipts (``secagg/receipts/+``, made durable before the PUBACK) and answers
(``secagg/answers/+``); when the buffer is due it records the core's fold plan in the unmask
ledger before it publishes the plan's requests on ``secagg/unmask/{holder}``, records the answers
that unmask it before the version is committed, and closes the plan once the version is. After a
restart the open plan is asked again, unchanged, or folded at once from its recorded answers.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import assert_never

from aggregator.core import AggregatorCore, Broadcast, Discard, Fold, Probe, Verdict
from aggregator.journal import Journal
from aggregator.metrics import AggregatorMetrics, serve_metrics
from aggregator.secure_unmask import FoldPlan
from aggregator.settings import AggregatorSettings
from aggregator.state_lock import locked_state_dir
from common.codec import encode, envelope, new_id
from common.errors import ControlError, HealthNetError, ProtocolError
from common.inbound import Chunk, Inbound, Refusal, Refused, receive
from common.messages import (
    Ack,
    AggregatorState,
    AggregatorStatus,
    Body,
    ControlCommand,
    ControlReply,
    ControlRequest,
    Evaluation,
    Manifest,
    ModelDelta,
    NodeStatus,
    RejectReason,
    SecAggAnswer,
    SecAggKey,
    SecAggReceipt,
    SecAggShare,
    SecAggUnmask,
    Update,
    VersionRecord,
)
from common.mqtt import ConnectionEvent, Message, MqttClient, Will
from common.secure_aggregation.events import UnmaskRefusal
from common.secure_aggregation.wire import WireRefusal, answer_of, receipts_of, to_unmask
from common.topics import Role, Route, Topic, TopicTree

__all__ = ["AggregatorService"]

log = logging.getLogger(__name__)

_STATUS_MIN_INTERVAL = 0.5


class AggregatorService:
    """Runs one federation's aggregator until the run stops or ``stop_event`` is set."""

    def __init__(
        self, settings: AggregatorSettings, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.settings = settings
        self.topics = TopicTree(settings.federation)
        self.journal = Journal(
            settings.state_dir,
            model=settings.model,
            keep_checkpoints=settings.keep_checkpoints,
            checkpoint_every=settings.checkpoint_every,
            archive_models=settings.archive_models,
            clock=clock,
        )
        self._clock = clock
        self._core: AggregatorCore | None = None
        self._client: MqttClient | None = None
        self._published_chunks: tuple[int, int] | None = None
        self._status_dirty = True
        self._last_status = 0.0
        # Whether the log has said that every node's privacy budget is spent (said once).
        self._spent_said = False
        self.metrics = AggregatorMetrics()
        self.metrics_url: str | None = None
        self._connected_before = False
        self._probe: Probe | None = None
        # Why the due buffer could not be planned yet (secure aggregation; logged once).
        self._plan_wait = ""

    @property
    def core(self) -> AggregatorCore:
        if self._core is None:
            raise HealthNetError("aggregator is not running")
        return self._core

    def run(self, stop_event: threading.Event | None = None) -> AggregatorState:
        """Serve until the run is stopped (returns STOPPED) or ``stop_event`` is set."""
        stop_event = stop_event or threading.Event()
        with (
            locked_state_dir(self.settings.state_dir, "aggregator"),
            contextlib.closing(self.journal),
        ):
            self._core = self._restore()
            if self.core.state is AggregatorState.STOPPED:
                log.warning(
                    "run %s in %s is already stopped at v%d; start a new run in a new state dir",
                    self.core.run_id,
                    self.settings.state_dir,
                    self.core.version,
                )
                return AggregatorState.STOPPED
            with self._connect() as client, self._metrics_endpoint():
                log.info("aggregator connected to %s", self.settings.broker_url.redacted())
                self._client = client
                self._publish_model()
                self._resume_plan()
                self._publish_status(force=True)
                self._warm_probe()
                self._serve(client, stop_event)
                self.journal.checkpoint(self.core)  # a clean stop leaves nothing to fold again
                # A clean disconnect sends no Last Will: say so ourselves, unless the run stopped.
                self._publish_status(force=True, leaving=True)
            return self.core.state

    # -- start-up

    def _restore(self) -> AggregatorCore:
        from common.model_init import model_probe

        self._probe = model_probe(self.settings.model)  # None (logged): finiteness checks only
        core, checkpoint, _ = self.journal.resume(
            self._fresh_core, max_bytes=self.settings.max_update_bytes, probe=self._probe
        )
        if checkpoint is None:
            log.info("run %s: new, v0 from model %s", core.run_id, self.settings.model.name)
        else:
            log.info(
                "run %s: resumed at v%d (%s) with %d buffered updates",
                core.run_id,
                core.version,
                core.state.value,
                len(core.buffer),
            )
        return core

    def _warm_probe(self) -> None:
        """Build a deferred probe (torch and the model) in the background now that the first
        version is out, so that the first fold does not wait for it. A build that finds no input
        shape leaves no probe (logged, as at start-up); one that raises is logged here and raised
        again where the probe is first called."""
        from common.model_init import DeferredProbe

        probe = self._probe
        if not isinstance(probe, DeferredProbe) or probe.built:
            return

        def warm() -> None:
            try:
                probe.warm()
            except Exception:
                log.exception("model %s: cannot build the output probe", probe.spec.name)

        threading.Thread(target=warm, name="probe-warm-up", daemon=True).start()

    def _fresh_core(self) -> AggregatorCore:
        from common.model_init import initial_params

        params = initial_params(self.settings.model, seed=self.settings.seed)
        core = AggregatorCore(
            run_id=self.settings.run_id or f"run-{time.strftime('%Y%m%d-%H%M%S')}-{new_id()[:6]}",
            params=params,
            knobs=self.settings.knobs,
            probe=self._probe,
        )
        if self.settings.autostart:
            core.command(ControlCommand.START)
        return core

    @contextlib.contextmanager
    def _metrics_endpoint(self) -> Iterator[None]:
        port = self.settings.metrics_port
        if port is None:
            yield
            return
        with serve_metrics(self.metrics, self.settings.metrics_host, port) as url:
            self.metrics_url = url
            yield

    def _connect(self) -> MqttClient:
        settings = self.settings
        # If this process dies, the broker replaces the retained status with this one, so that
        # no one keeps reading "running" from an aggregator that is gone. The will is fixed when
        # the connection is made: its version and counters are those of that moment, its
        # updated_at that moment too (readers show its age).
        offline = self._status_body(self._clock(), leaving=True)
        client = MqttClient.from_settings(
            settings,
            settings.mqtt_client_id(),
            persistent_session=True,
            will=Will(self.topics.aggregator_status(), self._encode(offline)),
            # PUBACK only once a message is handled (an update: durably recorded), so that the
            # broker redelivers what a crash interrupted.
            manual_ack=True,
        )
        # The table the broker's ACL is generated from: what is subscribed here is readable there.
        secure = self.core.secure_policy is not None
        for topic_filter in self.topics.subscriptions(Role.AGGREGATOR, secure_aggregation=secure):
            client.subscribe(topic_filter)
        return client

    # -- the loop

    def _serve(self, client: MqttClient, stop_event: threading.Event) -> None:
        while not stop_event.is_set() and self.core.state is not AggregatorState.STOPPED:
            try:
                item = client.inbox.get(timeout=self._wait_time())
            except queue.Empty:
                item = None
            match item:
                case Message():
                    self._on_message(item)
                    client.ack(item)
                case ConnectionEvent(connected=True):
                    self._status_dirty = True
                    if self._connected_before:
                        # A broker that crashed may have come back with older retained messages
                        # (or none): announce the current version again, and ask the open
                        # plan again (a holder answers a repeated request with the same bytes).
                        self._publish_model()
                        if self.core.open_plan is not None:
                            self._ask(self.core.open_plan, self.core.askable())
                    self._connected_before = True
                case ConnectionEvent(connected=False):
                    log.warning("lost the broker (%s); reconnecting", item.reason)
                case None:
                    pass
            self._maybe_fold()
            self._publish_status()

    def _wait_time(self) -> float:
        now = self._clock()
        wait = self.settings.status_interval
        if self._status_dirty:
            wait = min(wait, _STATUS_MIN_INTERVAL)
        deadline = self.core.next_deadline()
        if deadline is not None:
            wait = min(wait, deadline - now)
        return max(wait, 0.01)

    def _on_message(self, message: Message) -> None:
        received = receive(
            message.topic,
            message.payload,
            topics=self.topics,
            max_bytes=self.settings.max_update_bytes,
        )
        match received:
            case Inbound():
                self._on_inbound(received, message.payload)
            case Refusal(topic=Topic(route=Route.UPDATE, node=str() as node)):
                self._on_unreadable_update(node, received)
            case Refusal(reason=Refused.UNKNOWN_TOPIC):
                log.warning("ignoring message on unexpected topic: %s", received.detail)
            case Refusal(reason=Refused.EMPTY) | Chunk():
                log.debug("ignoring %s", message.topic)
            case Refusal():
                log.warning("dropping malformed message on %s: %s", message.topic, received.detail)
            case _:
                assert_never(received)

    def _on_inbound(self, inbound: Inbound, payload: bytes) -> None:
        node, body = inbound.topic.node, inbound.body
        match body:
            case Update():
                self._on_update(node or "", inbound.sender, body, payload)
            case Evaluation():
                self._on_evaluation(inbound, body)
            case NodeStatus():
                if inbound.sender == node:
                    self._on_node_status(node, body)
            case ControlRequest():
                self._on_control(body)
            case (
                Manifest()
                | ModelDelta()
                | Ack()
                | ControlReply()
                | AggregatorStatus()
                | VersionRecord()
            ):
                log.debug("ignoring %s", inbound.topic)
            case SecAggReceipt():
                self._on_receipts(inbound)
            case SecAggAnswer():
                self._on_answer(inbound)
            case SecAggKey() | SecAggShare() | SecAggUnmask():
                # Keys are the hospitals' to verify; shares and requests are not ours to read.
                log.debug("ignoring %s", inbound.topic)
            case _:
                assert_never(body)

    def _on_receipts(self, inbound: Inbound) -> None:
        """A holder's receipts: durable (fsync) before the PUBACK, then counted in the core."""
        received = receipts_of(inbound)
        if isinstance(received, WireRefusal):
            self._refuse_secagg("receipt", received.reason.value, received.detail)
            return
        digest, receipts = received
        holder, update_ids = inbound.sender, [r.update_id for r in receipts]
        refusal = self.core.record_receipts(holder, digest, update_ids)
        if refusal:
            self._refuse_secagg("receipt", "policy", f"{holder}: {refusal}")
            return
        self.journal.receipts.write(holder, update_ids)
        log.debug("holder %s receipted %d updates", holder, len(update_ids))
        self._status_dirty = True
        plan = self.core.open_plan
        if plan is not None:
            # A holder that now holds every share of the open plan can answer it too.
            self._ask(plan, self.core.take_holders_to_ask())

    def _on_answer(self, inbound: Inbound) -> None:
        """A holder's answer (or refusal) to the open fold plan."""
        received = answer_of(inbound)
        if isinstance(received, WireRefusal):
            self._refuse_secagg("answer", received.reason.value, received.detail)
            return
        refusal = self.core.record_answer(received)
        if refusal:
            self._refuse_secagg("answer", "not_asked", refusal)
            return
        if isinstance(received, UnmaskRefusal):
            log.warning(
                "holder %s refuses fold %s at v%d: %s",
                received.holder,
                received.fold_id,
                self.core.version,
                received.reason,
            )
        self._status_dirty = True

    def _refuse_secagg(self, kind: str, reason: str, detail: str) -> None:
        log.warning("dropping a secure aggregation %s at v%d: %s", kind, self.core.version, detail)
        self.metrics.secagg_refused.labels(kind=kind, reason=reason).inc()

    def _on_node_status(self, node: str, status: NodeStatus) -> None:
        """A node's own status: its state for the metrics, its privacy ledger and whether it
        has spent its budget for its tally."""
        self.metrics.observe_node_status(node, status)
        if status.privacy is not None:
            self.core.record_privacy(node, status.privacy)
            self._status_dirty = True
        if self.core.record_node_state(node, status.state, status.version):
            log.info("node %s: %s at v%d", node, status.state.value, self.core.version)
            self._status_dirty = True

    def _on_evaluation(self, inbound: Inbound, evaluation: Evaluation) -> None:
        node = inbound.sender
        if node != inbound.topic.node:
            log.warning("dropping %s's evaluation sent on %s", node, inbound.topic)
            return
        self.core.record_evaluation(node, evaluation)
        self._status_dirty = True
        if evaluation.run_id == self.core.run_id:
            self.journal.store.append_evaluation(node, evaluation, self._clock())

    def _on_unreadable_update(self, node: str, refusal: Refusal) -> None:
        """A message on ``node``'s update topic that is not an update: the core judges and counts
        it, the ledger records it; no ack (it has no update id)."""
        core = self.core
        self._status_dirty = True
        unreadable = core.refuse(node, refusal, self._clock())
        self.journal.record_unreadable(
            core, node, unreadable.reason, unreadable.detail, unreadable.size
        )
        log.warning(
            "node %s: dropped an update at v%d: %s (%s)",
            node,
            core.version,
            unreadable.reason.value,
            refusal.detail,
        )

    def _on_update(self, node: str, sender: str, update: Update, payload: bytes) -> None:
        core, now = self.core, self._clock()
        self._status_dirty = True
        verdict = self._receive(node, sender, update, len(payload), now)
        self.journal.record_update(core, node, update, verdict, payload)
        if verdict.accepted:
            log.info(
                "node %s: update %s from v%d accepted at v%d%s",
                node,
                update.update_id[:8],
                update.base_version,
                core.version,
                " (duplicate)" if verdict.duplicate else "",
            )
        else:
            log.warning(
                "node %s: update %s from v%d rejected at v%d: %s (%s)",
                node,
                update.update_id[:8],
                update.base_version,
                core.version,
                verdict.reason.value if verdict.reason else "?",
                verdict.detail,
            )
        ack = Ack(
            update_id=update.update_id,
            accepted=verdict.accepted,
            reason=verdict.reason,
            detail=verdict.detail,
            current_version=core.version,
        )
        self._send(self.topics.ack(node), ack)

    def _receive(self, node: str, sender: str, update: Update, size: int, now: float) -> Verdict:
        """The core's verdict on an update, and how long it took (decoding and validation)."""
        started = time.perf_counter()
        verdict = self.core.receive(node, sender, update, size, now)
        if verdict.accepted and not verdict.duplicate:  # a resend's check is not its decoding
            self.core.record_decode_seconds(update.update_id, time.perf_counter() - started)
        return verdict

    def _on_control(self, request: ControlRequest) -> None:
        core = self.core
        try:
            match request.command:
                case ControlCommand.SET:
                    core.set_knobs(request.knobs)
                    message = f"knobs set: {', '.join(sorted(request.knobs))}"
                    log.info("%s at v%d", message, core.version)
                case ControlCommand.STATUS:
                    message = f"{core.state.value} at v{core.version}"
                case ControlCommand.QUARANTINE | ControlCommand.READMIT:
                    message = self._on_quarantine(request)
                case ControlCommand.ROLLBACK:
                    message = self._on_rollback(request.version or 0)
                case ControlCommand.ABANDON_PLAN:
                    message = self._on_abandon_plan()
                case _:
                    state = core.command(request.command)
                    message = f"run is {state.value} at v{core.version}"
                    log.info("operator: %s -> %s", request.command.value, message)
            if request.command not in (ControlCommand.STATUS, ControlCommand.ROLLBACK):
                self.journal.checkpoint(core)  # a rollback wrote its own
            reply = ControlReply(
                request_id=request.request_id,
                ok=True,
                message=message,
                status=core.status(self._clock()),
            )
        except ControlError as exc:
            log.warning("operator %s refused: %s", request.command.value, exc)
            reply = ControlReply(
                request_id=request.request_id,
                ok=False,
                message=str(exc),
                status=core.status(self._clock()),
            )
        self._status_dirty = True
        self._send(self.topics.control_reply(request.request_id), reply)
        self._maybe_fold()
        self._publish_status(force=True)

    def _on_quarantine(self, request: ControlRequest) -> str:
        core, node = self.core, request.node or ""
        if request.command is ControlCommand.READMIT:
            core.readmit(node)
            message = f"node {node} readmitted"
        else:
            # The control path checkpoints next; that drops their write-ahead entries with it.
            dropped = core.quarantine(node)
            message = f"node {node} quarantined; {len(dropped)} buffered updates dropped"
        log.warning("operator: %s at v%d", message, core.version)
        return message

    def _on_abandon_plan(self) -> str:
        """Give up the open fold plan: its batch is discarded (the nodes are told), the ledger
        closes it as abandoned, and its updates' masks are never asked for in another sum."""
        core = self.core
        plan = core.open_plan
        if plan is None:
            raise ControlError("no fold plan is open")
        discard = core.abandon_plan()
        self.journal.commit_discard(core, discard)
        self.journal.unmask.abandon(plan.fold_id)
        self._tell_discarded(discard)
        message = f"fold plan {plan.fold_id} abandoned; {len(discard.update_ids)} updates dropped"
        log.warning("operator: %s at v%d", message, core.version)
        return message

    def _on_rollback(self, target: int) -> str:
        core = self.core
        params, optimizer = self.journal.rollback_source(core, target)
        fold = core.rollback(target, params, optimizer, self._clock())
        broadcast = self._broadcast()
        self._announce(self.journal.commit_rollback(core, fold, broadcast.blob), broadcast)
        message = f"rolled back to v{target}'s weights as v{fold.version}"
        log.warning("operator: %s", message)
        return message

    # -- folding and publishing

    def _maybe_fold(self) -> None:
        core = self.core
        if core.secure_policy is not None:
            self._advance_secure()
        while core.secure_policy is None and (reason := core.fold_due(self._clock())) is not None:
            if reason == "budgets_spent":
                log.info(
                    "folding a partial buffer of %d/%d at v%d: every node that could fill it "
                    "has spent its privacy budget, and these updates are charged to theirs",
                    len(core.buffer),
                    core.knobs.buffer_size,
                    core.version,
                )
            started = time.perf_counter()
            match core.fold(self._clock()):
                case Fold() as fold:
                    self._commit(fold.timed(time.perf_counter() - started))
                case Discard() as discard:
                    log.error(
                        "discarded %d buffered updates at v%d: %s",
                        len(discard.update_ids),
                        core.version,
                        discard.detail,
                    )
                    self.journal.commit_discard(core, discard)
                    self._tell_discarded(discard)
        spent = core.budgets_spent() and not core.buffer
        if spent and not self._spent_said:
            log.warning(
                "every node has spent its privacy budget: v%d is the run's last version; "
                "stop the run when its evaluations are in",
                core.version,
            )
        self._spent_said = spent

    # -- secure aggregation's fold

    def _advance_secure(self) -> None:
        """Plan a due buffer (durably, then ask its holders), or fold the open plan once its
        answers are in (answers durable, then the version, then the plan closed)."""
        core, ledger = self.core, self.journal.unmask
        plan = core.open_plan
        if plan is None:
            if core.fold_due(self._clock()) is None:
                return
            planned = core.plan(new_id(), self._clock())
            if isinstance(planned, str):
                if planned != self._plan_wait:
                    log.info("buffer due at v%d, not planned yet: %s", core.version, planned)
                self._plan_wait = planned
                return
            self._plan_wait = ""
            try:
                ledger.record(planned)  # before anyone is asked: a mask is asked for in one sum
            except ValueError as exc:
                # An update an earlier plan named: its mask is bound to that sum, never asked
                # for in another. Only damaged state gets here; drop the batch, loudly.
                log.error("fold %s cannot be planned: %s", planned.fold_id, exc)  # noqa: TRY400
                discard = core.abandon_plan()
                self.journal.commit_discard(core, discard)
                self._tell_discarded(discard)
                return
            log.info(
                "fold %s planned at v%d: %d updates, asking %d holders",
                planned.fold_id,
                core.version,
                len(planned.update_ids),
                len(planned.holders),
            )
            self._ask(planned, core.take_holders_to_ask())
            self._status_dirty = True
            return
        if not core.answers_complete():
            return
        ledger.answered(plan.fold_id, core.plan_answers)
        started = time.perf_counter()
        try:
            result = core.fold_secure(self._clock())
        except ProtocolError as exc:
            # The answers are the fault, not this code: the reason is the message.
            log.error("fold %s at v%d does not unmask: %s", plan.fold_id, core.version, exc)  # noqa: TRY400
            self._status_dirty = True
            return
        match result:
            case Fold() as fold:
                self._commit(fold.timed(time.perf_counter() - started))
                ledger.close(plan.fold_id, fold.version)
            case Discard() as discard:
                log.error(
                    "fold %s: discarded %d updates at v%d: %s",
                    plan.fold_id,
                    len(discard.update_ids),
                    core.version,
                    discard.detail,
                )
                self.journal.commit_discard(core, discard)
                ledger.abandon(plan.fold_id)
                self._tell_discarded(discard)

    def _ask(self, plan: FoldPlan, holders: tuple[str, ...]) -> None:
        """Publish the plan's request to ``holders`` (the same request every time)."""
        request = to_unmask(plan.request())
        for holder in holders:
            self._send(self.topics.secagg_unmask(holder), request)

    def _resume_plan(self) -> None:
        """After a restart: fold the open plan from its recorded answers, or ask it again."""
        core = self.core
        plan = core.open_plan
        if plan is None:
            return
        for answer in self.journal.unmask.answers(plan.fold_id):
            core.record_answer(answer)
        if core.answers_complete():
            log.info("fold %s: folding from its recorded answers", plan.fold_id)
            self._maybe_fold()
            return
        log.info("fold %s is open at v%d; asking its holders again", plan.fold_id, core.version)
        self._ask(plan, core.take_holders_to_ask())

    def _tell_discarded(self, discard: Discard) -> None:
        """A second ack, after the accepted one: the node's work went nowhere, and why.

        Sent after the ledger has it; a crash before this send loses only the message (the
        node had already let the update go), never the record.
        """
        for update_id, node in zip(discard.update_ids, discard.nodes, strict=True):
            log.warning(
                "node %s: update %s discarded at v%d: %s",
                node,
                update_id[:8],
                self.core.version,
                discard.detail,
            )
            ack = Ack(
                update_id=update_id,
                accepted=False,
                reason=RejectReason.DISCARDED,
                detail=discard.detail,
                current_version=self.core.version,
            )
            self._send(self.topics.ack(node), ack)
        self._status_dirty = True

    def _commit(self, fold: Fold) -> None:
        broadcast = self._broadcast()
        self._announce(self.journal.commit_fold(self.core, fold, broadcast.blob), broadcast)

    def _announce(self, record: VersionRecord, broadcast: Broadcast) -> None:
        """Publish a committed version: its model, its record, the metrics and the log line."""
        self._publish_model(broadcast)
        self._send(self.topics.versions(), record)
        self.metrics.observe_version(record)
        stalenesses = [c.staleness for c in record.contributions]
        if record.rollback_of is None:
            log.info(
                "v%d folded from %d updates (staleness %s, %s)",
                record.version,
                len(stalenesses),
                stalenesses,
                record.reason,
            )
        self._publish_status(force=True)

    def _broadcast(self) -> Broadcast:
        """The current version as the core would broadcast it now."""
        core, settings = self.core, self.settings
        broadcast = core.broadcast(
            model=settings.model, chunk_size=settings.chunk_size, now=self._clock()
        )
        if broadcast.widened:
            log.warning(
                "v%d has weights beyond float16's range; broadcast as float32", core.version
            )
        return broadcast

    def _publish_model(self, broadcast: Broadcast | None = None) -> None:
        """The delta from the previous version when the chain made one, then the chunks, the
        manifest last (all retained), then clear the previous version's chunks. A node that
        follows the chain has the version from the delta before its manifest arrives, so the
        manifest tells it nothing is missing (common.broadcast_chain).

        ``broadcast`` is the current version's, when the caller has made it.
        """
        core, client = self.core, self._require_client()
        if broadcast is None:
            broadcast = self._broadcast()
            if self.journal.store.archived_model(core.version) is None:
                # v0, or a run from before the archive: keep the version being announced too.
                self.journal.store.archive_model(core.version, broadcast.blob)
        if broadcast.delta is not None:
            self._send(self.topics.delta(), broadcast.delta)
        for index, chunk in enumerate(broadcast.chunks):
            client.publish(self.topics.chunk(core.version, index), chunk)
        self._send(self.topics.manifest(), broadcast.manifest)
        previous = self._published_chunks
        if previous is not None and previous[0] != core.version:
            for index in range(previous[1]):
                client.clear_retained(self.topics.chunk(previous[0], index))
        self._published_chunks = (core.version, len(broadcast.chunks))

    def _publish_status(self, *, force: bool = False, leaving: bool = False) -> None:
        now = self._clock()
        due = now - self._last_status >= self.settings.status_interval
        throttled = now - self._last_status < _STATUS_MIN_INTERVAL
        if not (force or due or (self._status_dirty and not throttled)):
            return
        status = self._status_body(now, leaving=leaving)
        self._send(self.topics.aggregator_status(), status)
        self.metrics.observe_status(status)
        self._status_dirty = False
        self._last_status = now

    def _status_body(self, now: float, *, leaving: bool = False) -> AggregatorStatus:
        """The run's status; as this aggregator leaves, OFFLINE unless the run is over."""
        status = self.core.status(now)
        if leaving and status.state is not AggregatorState.STOPPED:
            status = status.model_copy(update={"state": AggregatorState.OFFLINE})
        return status

    def _send(self, topic: Topic, body: Body) -> None:
        self._require_client().publish(topic, self._encode(body))

    def _encode(self, body: Body) -> bytes:
        return encode(envelope(body, sender=self.settings.mqtt_client_id(), sent_at=self._clock()))

    def _require_client(self) -> MqttClient:
        if self._client is None:
            raise HealthNetError("aggregator is not connected")
        return self._client
