"""The edge node's shell: MQTT, the outbox, and a worker thread around :class:`NodeSession`.

The service thread drains the MQTT inbox (model chunks, manifests, aggregator status, acks) and
hands training and evaluation to a single named worker thread, so the connection keeps being
serviced while torch runs. An update goes to the on-disk outbox before it is published and leaves
it only when the aggregator's ack arrives; on every reconnect and after ``ack_timeout`` the outbox
is resent with the same update ids. The sent log (:mod:`edge_node.sentlog`) records each update
and its ack, and tells a restarted node which version it already trained on.

The worker also compresses each delta (DESIGN §5) with the run's policy, made stricter where this
node's own settings ask for it, carrying the error-feedback residual from one update to the next.
The residual is staged on disk before its update enters the outbox and committed after
(:mod:`edge_node.residual`), so a crash neither loses nor repeats what it holds.

Under a privacy policy (the run's, tightened by this node's own) the worker trains with DP-SGD
(:mod:`edge_node.privacy`). Each version is gated when it arrives: a policy the node cannot meet
(delta not below 1/n, a model Opacus cannot make private) or a charge that would pass the budget
closes the gate, and the node only evaluates. Each update's charge is committed to the privacy
ledger (:mod:`edge_node.privacy_ledger`) before the update enters the outbox; reports leave as
the policy's metric release says (:mod:`edge_node.release`).

Under a personalisation policy the evaluation job also trains the hospital's personal model
(:mod:`edge_node.personal`) and evaluates it beside the global one; the personal model is saved
to the state directory (:mod:`edge_node.personal_store`) before its evaluation is published, and
a restarted node resumes from it.

Under a secure aggregation policy (:mod:`edge_node.secure_node`) the node publishes its signed key
record, holds and receipts its peers' mask shares and answers the aggregator's unmask requests;
it sends each update masked, once it holds a verified key for every holder of the roster, after
writing the update and its sealed shares to disk, and resends both as they were first sent.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as dt
import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import TYPE_CHECKING, assert_never

import numpy as np
from numpy.typing import NDArray

from common.blobs import ModelDownload
from common.broadcast_chain import ChainFollower, Held
from common.codec import decode_tensors, encode, envelope, new_id
from common.compression_policy import effective_policy
from common.errors import BrokerError, CompressionError, ConfigError, ProtocolError
from common.inbound import Chunk, Decoded, Fault, Inbound, Refusal, Refused, decode_body, receive
from common.messages import (
    Ack,
    AggregatorStatus,
    Body,
    ControlReply,
    ControlRequest,
    Evaluation,
    Knobs,
    Manifest,
    MetricRelease,
    ModelDelta,
    ModelSpec,
    NodeSecureAggregation,
    NodeState,
    NodeStatus,
    Personalisation,
    PrivacyPolicy,
    PrivacySpend,
    RejectReason,
    SecAggAnswer,
    SecAggKey,
    SecAggReceipt,
    SecAggShare,
    SecAggUnmask,
    TrainingConfig,
    Update,
    VersionRecord,
)
from common.mqtt import ConnectionEvent, Message, MqttClient, Will
from common.outbox import Outbox
from common.privacy_policy import delta_error
from common.topics import Role, Route, Topic, TopicTree
from common.wire_size import describe_wire_size
from edge_node.datasets import LocalDataset, load_dataset
from edge_node.personal_store import PersonalModel, PersonalStore
from edge_node.privacy_ledger import Charge, PrivacyLedger, spend_of
from edge_node.release import node_policy, release_evaluation
from edge_node.residual import ResidualStore
from edge_node.secure_keys import SecureAggregationUnavailable
from edge_node.secure_node import (
    OutgoingShares,
    Publish,
    SecureNode,
    Unmasked,
    flat_delta,
    masked_update,
)
from edge_node.sentlog import SentEntry, SentEvent, SentLog
from edge_node.session import Job, JobKind, NodeSession
from edge_node.session_state import Gate
from edge_node.settings import NodeSettings
from edge_node.training import EvalResult, TrainResult, UnusableVersion, evaluate, train
from edge_node.upload import Upload, carries_residual, compress_delta, seal_upload

if TYPE_CHECKING:
    import torch
    from torch import nn

    from edge_node.privacy import DpPlan

__all__ = ["NodeService", "Upload"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Personalised:
    """An evaluation job under a personalisation policy: the global model's result, and the
    personal model's with its weights (None: it could not be trained or evaluated)."""

    result: EvalResult
    personal: tuple[EvalResult, PersonalModel] | None


def _software_version() -> str:
    try:
        return f"healthnet {package_version('healthnet')}"
    except PackageNotFoundError:
        return "healthnet (source)"


class NodeService:
    """One hospital's node: runs until stopped, or until the run ends if so configured."""

    def __init__(self, settings: NodeSettings, *, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.topics = TopicTree(settings.federation)
        self.outbox = Outbox(settings.state_dir / "outbox")
        self.residuals = ResidualStore(
            settings.state_dir / "residual", max_bytes=settings.max_model_bytes
        )
        # (run id, residual) as last committed; read only by the worker, replaced by this thread.
        self._residual: tuple[str, Mapping[str, NDArray[np.float32]]] | None = None
        self.sent_log = SentLog(settings.state_dir)
        self.ledger = PrivacyLedger(settings.state_dir / "privacy")
        self.personal_store = PersonalStore(settings.state_dir, max_bytes=settings.max_model_bytes)
        # The personal model as last saved; read by the worker, replaced by this thread.
        self._personal: PersonalModel | None = None
        # The ledger's spend as last committed (None: nothing charged yet).
        self._spend: PrivacySpend | None = None
        # (run id, version) -> the policy and DP plan the gate admitted; read by the worker.
        self._plans: dict[tuple[str, int], tuple[PrivacyPolicy, DpPlan]] = {}
        self._noise_cache: dict[tuple[PrivacyPolicy, int, TrainingConfig], DpPlan] = {}
        self.session = NodeSession(ack_timeout=settings.ack_timeout)
        self._clock = clock
        self._download = ModelDownload(max_blob_bytes=settings.max_model_bytes)
        # The version held, from snapshots and the delta chain (common.broadcast_chain); the
        # snapshot chunks are subscribed to only while it wants one.
        self._chain = ChainFollower()
        self._chunks_subscribed = False
        # Bytes of model messages received (manifests, chunks, deltas), reported with each
        # evaluation: what the broadcast costs this node.
        self._model_bytes = 0
        self._client: MqttClient | None = None
        self._dataset: LocalDataset | None = None
        self._model: nn.Module | None = None
        self._model_spec: ModelSpec | None = None
        self._device: torch.device | None = None
        self._job: (
            tuple[Job, concurrent.futures.Future[EvalResult | Personalised | Upload | Unmasked]]
            | None
        ) = None
        self._published_state: (
            tuple[NodeState, int | None, str, PrivacySpend | None, NodeSecureAggregation | None]
            | None
        ) = None
        # Secure aggregation: the node's part under the policy of the versions it holds (None:
        # no policy seen, or the node cannot join it), its masked updates as first sent, and a
        # trained update waiting for the roster's keys before it can be masked.
        self._secure: SecureNode | None = None
        self._outgoing = OutgoingShares(settings.state_dir / "secagg" / "outgoing", self.topics)
        self._unmasked: Unmasked | None = None
        # The run's staleness bound (from the aggregator's status): how long settled updates'
        # shares are kept for a holder that comes back.
        self._max_staleness = Knobs().max_staleness

    # -- lifecycle

    def run(self, stop_event: threading.Event | None = None) -> None:
        stop_event = stop_event or threading.Event()
        settings = self.settings
        import torch

        from edge_node.training import resolve_device

        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self._device = resolve_device(settings.device)
        self._dataset = load_dataset(settings.data)
        self.outbox.open()
        self._outgoing.open()
        if recovered := self._outgoing.recover(self.outbox):
            log.info(
                "node %s: %d masked updates written before a crash put back into the outbox",
                settings.node_id,
                len(recovered),
            )
        self.sent_log.open()
        self.ledger.open()
        self._spend = self.ledger.spend()
        self.personal_store.open()
        self._personal = self.personal_store.load()
        if self._personal is not None:
            log.info(
                "node %s: resuming its personal model (%s) of run %s, trained against v%d",
                settings.node_id,
                self._personal.method.value,
                self._personal.run_id,
                self._personal.version,
            )
        self._recover_progress()
        self.residuals.open(set(self.outbox.ids()))
        for update_id in self.outbox.ids():
            self.session.queue(update_id)
        log.info(
            "node %s: %s, %d train / %d test examples, device %s, %d updates in the outbox",
            settings.node_id,
            settings.data,
            self._dataset.num_train,
            self._dataset.num_test,
            self._device,
            len(self.outbox),
        )
        client = MqttClient.from_settings(
            settings,
            f"{settings.node_id}.{settings.federation}"[:64],
            persistent_session=False,
            will=Will(self.topics.node_status(settings.node_id), self._status_bytes(offline=True)),
        )
        with (
            contextlib.closing(self.sent_log),
            concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"work-{settings.node_id}"
            ) as worker,
            client,
        ):
            self._client = client
            # The table the broker's ACL is generated from: what is subscribed here is readable.
            # Snapshot chunks only while the node needs one (see _sync_snapshot_subscription).
            for topic_filter in self.topics.subscriptions(Role.HOSPITAL, settings.node_id):
                if topic_filter.route is not Route.CHUNK:
                    client.subscribe(topic_filter)
            self._sync_snapshot_subscription()
            self._publish_status()
            try:
                self._serve(client, worker, stop_event)
            finally:
                if self._secure is not None:
                    self._secure.__exit__(None, None, None)
                client.publish(
                    self.topics.node_status(settings.node_id),
                    self._status_bytes(offline=True),
                    wait=2.0,
                )

    def _recover_progress(self) -> None:
        """Log outbox entries a crash kept out of the sent log; skip the version last trained on."""
        queued = []
        for update_id in self.outbox.ids():
            payload = self.outbox.read(update_id)
            if payload is None:
                continue
            decoded = decode_body(Update, payload, max_bytes=self.settings.max_model_bytes)
            match decoded:
                case Decoded():
                    queued.append(self._queued_entry(decoded.body, len(payload)))
                case Fault():
                    log.warning(
                        "node %s: outbox entry %s: %s",
                        self.settings.node_id,
                        update_id,
                        decoded.detail,
                    )
                case _:
                    assert_never(decoded)
        if adopted := self.sent_log.adopt(queued):
            log.info(
                "node %s: %d outbox updates added to the sent log", self.settings.node_id, adopted
            )
        last = self.sent_log.last_trained()
        if last is not None:
            self.session.mark_trained(*last)
            log.info(
                "node %s: resuming after an update from v%d of run %s",
                self.settings.node_id,
                last[1],
                last[0],
            )

    def _serve(
        self,
        client: MqttClient,
        worker: concurrent.futures.ThreadPoolExecutor,
        stop_event: threading.Event,
    ) -> None:
        while not stop_event.is_set():
            try:
                item = client.inbox.get(timeout=0.2)
            except queue.Empty:
                item = None
            match item:
                case Message():
                    self._on_message(item)
                case ConnectionEvent(connected=True):
                    self.session.reconnected()
                    self._resend()
                    self._published_state = None
                    self._republish_key()
                case ConnectionEvent(connected=False):
                    log.warning("node %s: lost the broker; reconnecting", self.settings.node_id)
                case None:
                    pass
            self._collect_job()
            self._mask_waiting()
            self._start_job(worker)
            self._resend()
            self._publish_status()
            if self.settings.exit_when_stopped and self.session.finished():
                log.info("node %s: the run is stopped; exiting", self.settings.node_id)
                return

    # -- inbound

    def _on_message(self, message: Message) -> None:
        received = receive(
            message.topic,
            message.payload,
            topics=self.topics,
            max_bytes=self.settings.max_model_bytes,
        )
        try:
            match received:
                case Chunk():
                    self._model_bytes += len(received.data)
                    self._download.on_chunk(received.version, received.index, received.data)
                    self._take_model()
                case Inbound(body=Manifest() | ModelDelta()):
                    self._model_bytes += received.size
                    self._on_inbound(received.body)
                case Inbound(body=SecAggKey() | SecAggShare() | SecAggUnmask()):
                    self._on_secure(received)
                case Inbound():
                    self._on_inbound(received.body)
                case Refusal(reason=Refused.EMPTY):
                    pass  # a cleared retained message: an old version's chunk, a gone status
                case Refusal():
                    log.warning(
                        "node %s: %s on %s: %s",
                        self.settings.node_id,
                        received.reason.value,
                        received.name,
                        received.detail,
                    )
                case _:
                    assert_never(received)
        except ProtocolError as exc:
            log.warning("node %s: %s", self.settings.node_id, exc)
        self._sync_snapshot_subscription()

    def _on_inbound(self, body: Body) -> None:
        match body:
            case Manifest():
                self._download.on_manifest(body)
                self._chain.on_manifest(body)
                self._take_model()
            case ModelDelta():
                self._on_delta(body)
            case AggregatorStatus():
                self.session.on_status(body.state, body.run_id)
                self._max_staleness = body.knobs.max_staleness
            case Ack():
                self._on_ack(body)
            case Update() | NodeStatus() | Evaluation() | ControlRequest():
                pass  # other roles' messages: a hospital does not subscribe to them
            case ControlReply() | VersionRecord():
                pass
            case SecAggKey() | SecAggShare() | SecAggUnmask():
                pass  # secure aggregation's: taken by _on_secure, with their topics
            case SecAggReceipt() | SecAggAnswer():
                pass  # the aggregator's to read
            case _:
                assert_never(body)

    def _take_model(self) -> None:
        ready = self._download.take()
        if ready is None:
            return
        manifest, blob = ready
        # float16 broadcasts too: training and the delta are float32, against these exact values.
        params = {
            name: np.asarray(array, dtype=np.float32)
            for name, array in decode_tensors(blob, max_bytes=self.settings.max_model_bytes).items()
        }
        held = self._chain.on_snapshot(manifest, params)
        if held is not None:
            self._hold(held, f"snapshot, {manifest.blob_bytes} bytes")

    def _on_delta(self, delta: ModelDelta) -> None:
        try:
            held = self._chain.on_delta(delta)
        except CompressionError as exc:
            # Not this node's base (a delta missed), or damaged: the snapshot mends either.
            log.warning(
                "node %s: delta to v%d refused (%d so far), taking the snapshot: %s",
                self.settings.node_id,
                delta.manifest.version,
                self._chain.refused,
                exc,
            )
            return
        if held is not None:
            self._hold(held, "delta")

    def _hold(self, held: Held, source: str) -> None:
        """Work on the version the node now holds, from a snapshot or the delta chain."""
        manifest = held.manifest
        self._ensure_model(manifest.model)
        self.session.on_model(manifest, held.view)
        self._gate_training(manifest)
        self._gate_secure(manifest, held.view)
        log.info(
            "node %s: model v%d of run %s ready (%s)",
            self.settings.node_id,
            manifest.version,
            manifest.run_id,
            source,
        )

    # -- secure aggregation

    def _gate_secure(self, manifest: Manifest, params: Mapping[str, NDArray[np.float32]]) -> None:
        """Join the version's secure aggregation policy, once per policy and model size; a node
        that cannot join it (no client certificate, not on the roster) never trains under it:
        its gate closes with the reason, which its status shows."""
        wire = manifest.secure_aggregation
        if wire is None:
            return  # a run without the policy; shares held for an earlier one are still answered
        policy = wire.policy()
        size = sum(int(np.asarray(a).size) for a in params.values())
        current = self._secure
        if (
            current is not None
            and current.digest == policy.digest()
            and current.holder.length == policy.scheme.share_length(size)
        ):
            return
        settings = self.settings
        refused = None
        try:
            secure = SecureNode.create(
                settings.state_dir,
                topics=self.topics,
                identity=settings.node_id,
                aggregator=settings.aggregator_identity,
                policy=policy,
                size=size,
                cert_file=settings.cert_file,
                key_file=settings.key_file,
                ca_file=settings.ca_file,
                now=dt.datetime.fromtimestamp(self._clock(), dt.UTC),
            )
        except (SecureAggregationUnavailable, ValueError) as exc:
            refused = f"cannot join secure aggregation: {exc}"
        if refused is not None:
            log.error(
                "node %s: will not train v%d: %s", settings.node_id, manifest.version, refused
            )
            self.session.close_gate(manifest.run_id, manifest.version, Gate.REFUSED, refused[:500])
            return
        if current is not None:
            current.__exit__(None, None, None)
        self._secure = secure.__enter__()
        client = self._client
        assert client is not None  # noqa: S101 - versions arrive only over the connection
        # Listen for shares before publishing the key: no peer masks for us before that.
        for topic_filter in secure.subscriptions():
            try:
                client.subscribe(topic_filter)
            except BrokerError as exc:
                # The subscription is remembered and renewed on the next connect.
                log.warning("node %s: %s: %s", settings.node_id, topic_filter, exc)
        self._publish(secure.key_record(now=self._clock()))
        log.info(
            "node %s: under secure aggregation (policy %s, %d holders, U=%d, T=%d)",
            settings.node_id,
            secure.digest[:12],
            len(policy.holders),
            policy.scheme.threshold,
            policy.privacy,
        )

    def _on_secure(self, received: Inbound) -> None:
        secure = self._secure
        if secure is None:
            log.warning(
                "node %s: a %s on %s before the node is under secure aggregation",
                self.settings.node_id,
                type(received.body).__name__,
                received.topic,
            )
            return
        for message in secure.take(received, now=self._clock()):
            self._publish(message)
        holder = received.topic.node
        if (
            isinstance(received.body, SecAggKey)
            and holder
            and holder != self.settings.node_id
            and holder in secure.policy.holders
            and secure.keys.key(holder) is not None
        ):
            self._resend_shares(holder)

    def _republish_key(self) -> None:
        """Publish the node's key record again on a reconnect: a broker that crashed may have
        lost the retained record (its peers, restarted, would wait for it for good), and shares
        sent while this node was away never reach it (its session is not persistent); a peer
        that receives the record sends it those shares again (:meth:`_resend_shares`). Its own
        receipts of its recent updates go again too: one lost with the connection is never
        sent otherwise, and a plan needs ``U`` holders that receipted every update."""
        secure = self._secure
        if secure is None:
            return
        self._publish(secure.key_record(now=self._clock()))
        newest = self.session.version
        if newest is None:
            return
        recent = self._outgoing.recent(newest=newest, window=self._max_staleness)
        for message in secure.own_receipts(recent, now=self._clock()):
            self._publish(message)

    def _resend_shares(self, holder: str) -> None:
        """``holder``'s key record arrived (it started, or this node reconnected): send it again
        its shares of the updates that may still wait to be folded, for the node's session is
        not persistent and it may have missed them while it was down. It stores an identical
        share once and receipts it again."""
        newest = self.session.version
        if newest is None:
            return
        shares = self._outgoing.for_holder(
            holder, self.settings.node_id, newest=newest, window=self._max_staleness
        )
        if not shares:
            return
        log.info(
            "node %s: key record of %s arrived: resent it %d shares (updates from v%d on, at v%d)",
            self.settings.node_id,
            holder,
            len(shares),
            max(0, newest - self._max_staleness),
            newest,
        )
        for message in shares:
            self._publish(message)

    def _settle_shares(self, update_id: str) -> None:
        newest = self.session.version
        if newest is None:
            self._outgoing.remove(update_id)
            return
        self._outgoing.settle(update_id, newest=newest, window=self._max_staleness)

    def _mask_waiting(self) -> None:
        """Mask and send the trained update that waits for the roster's keys, once it can."""
        pending, secure = self._unmasked, self._secure
        if pending is None:
            return
        policy = pending.job.manifest.secure_aggregation
        if secure is None or policy is None or secure.digest != policy.policy().digest():
            log.warning(
                "node %s: update of v%d dropped: the node is no longer under its policy",
                self.settings.node_id,
                pending.job.manifest.version,
            )
            self._unmasked = None
            return
        if secure.missing():
            return  # the status says whose keys it waits for
        self._unmasked = None
        started = time.perf_counter()
        masked = secure.mask(pending)
        update = masked_update(pending, masked)
        payload = encode(envelope(update, sender=self.settings.node_id, sent_at=self._clock()))
        upload = Upload(
            update=update,
            payload=payload,
            residual=None,
            result=pending.result,
            raw_bytes=4 * int(pending.delta.size),
            charge=pending.charge,
            secure=masked,
        )
        log.debug(
            "node %s: masked update %s in %.1f ms",
            self.settings.node_id,
            update.update_id[:8],
            (time.perf_counter() - started) * 1e3,
        )
        self._publish_update(pending.job, upload)

    def _publish(self, message: Publish) -> None:
        assert self._client is not None  # noqa: S101
        self._client.publish(*message)

    def _sync_snapshot_subscription(self) -> None:
        """Subscribe to the snapshot chunks while the chain wants a snapshot, and only then: a
        node that follows every delta never downloads the whole model again."""
        want = self._chain.wants_snapshot
        client = self._client
        if client is None or want == self._chunks_subscribed:
            return
        chunks = self.topics.all_chunks()
        try:
            if want:
                client.subscribe(chunks)  # the broker sends the retained snapshot at once
            else:
                client.unsubscribe(chunks)
        except BrokerError as exc:
            # The subscription is remembered and renewed on the next connect.
            log.warning("node %s: snapshot subscription: %s", self.settings.node_id, exc)
        self._chunks_subscribed = want

    def _privacy(self, manifest: Manifest) -> PrivacyPolicy | None:
        return node_policy(manifest.privacy, self.settings.privacy)

    def _gate_training(self, manifest: Manifest) -> None:
        """Decide whether the node may train on ``manifest``'s version under DP: as it arrives,
        and again once a charge is committed (a training of the previous version may have been
        running when it arrived, and its charge counts before this one)."""
        policy = self._privacy(manifest)
        if policy is None:
            return
        from edge_node.privacy import NotPrivatizable, check_private

        model, dataset = self._model, self._dataset
        if model is None or dataset is None:
            raise ConfigError("node is not ready: model or dataset missing")
        key = (manifest.run_id, manifest.version)
        reason = delta_error(policy, dataset.num_train)
        if reason is None:
            try:
                check_private(model)
            except NotPrivatizable as exc:
                reason = str(exc)
        if reason is not None:
            log.error(
                "node %s: will not train v%d: %s", self.settings.node_id, manifest.version, reason
            )
            self.session.close_gate(*key, Gate.REFUSED, reason)
            return
        plan = self._plan(policy, dataset.num_train, manifest.training)
        # A version trained on already: what matters is whether the next one would fit.
        next_key = key if not self.ledger.charged(*key) else (key[0], key[1] + 1)
        reason = self.ledger.budget_refusal(_charge(next_key, "planned", policy, plan, now=0.0))
        if reason is not None:
            log.warning("node %s: %s; evaluating only", self.settings.node_id, reason)
            self.session.close_gate(*key, Gate.BUDGET_SPENT, reason)
            return
        self._plans = {k: v for k, v in self._plans.items() if k[0] == manifest.run_id}
        self._plans[key] = (policy, plan)

    def _plan(self, policy: PrivacyPolicy, records: int, config: TrainingConfig) -> DpPlan:
        """One version's DP plan; calibrated noise is a search, done once per policy."""
        from edge_node.privacy import plan_training

        cache_key = (policy, records, config)
        if cache_key not in self._noise_cache:
            self._noise_cache[cache_key] = plan_training(policy, records, config)
        return self._noise_cache[cache_key]

    def _ensure_model(self, spec: ModelSpec) -> None:
        if self._model is not None and spec == self._model_spec:
            return
        from common.models import build_model

        try:
            self._model = build_model(spec)
        except ConfigError:
            log.exception("node %s: cannot build model %s", self.settings.node_id, spec.name)
            raise
        self._model_spec = spec

    def _on_ack(self, ack: Ack) -> None:
        outstanding = self.session.acked(ack.update_id)
        if ack.reason is RejectReason.DISCARDED:
            self._on_discarded(ack)
            return
        if not outstanding:
            return  # an ack we already had (a resend's, or a duplicate delivery)
        # The log line first: a crash before the removal costs a resend, never a record.
        self.sent_log.write(
            [
                SentEntry(
                    event=SentEvent.ACKED,
                    at=self._clock(),
                    update_id=ack.update_id,
                    accepted=ack.accepted,
                    reason=ack.reason.value if ack.reason else None,
                    current_version=ack.current_version,
                )
            ]
        )
        # Its shares stay a while: a holder down when they were sent gets them when it is back.
        self._settle_shares(ack.update_id)
        self.outbox.remove(ack.update_id)
        if ack.accepted:
            log.info(
                "node %s: update %s accepted (global v%d)",
                self.settings.node_id,
                ack.update_id[:8],
                ack.current_version,
            )
        else:
            log.warning(
                "node %s: update %s rejected at v%d: %s (%s)",
                self.settings.node_id,
                ack.update_id[:8],
                ack.current_version,
                ack.reason.value if ack.reason else "?",
                ack.detail,
            )

    def _on_discarded(self, ack: Ack) -> None:
        """An update accepted earlier went nowhere: its batch could not become a version."""
        log.warning(
            "node %s: update %s was accepted, then discarded at v%d: %s",
            self.settings.node_id,
            ack.update_id[:8],
            ack.current_version,
            ack.detail,
        )
        self.sent_log.write(
            [
                SentEntry(
                    event=SentEvent.ACKED,
                    at=self._clock(),
                    update_id=ack.update_id,
                    accepted=False,
                    reason=RejectReason.DISCARDED.value,
                    current_version=ack.current_version,
                )
            ]
        )
        # An accepted ack may not have come yet (it raced this one): the update is answered.
        self._outgoing.remove(ack.update_id)
        if ack.update_id in self.outbox.ids():
            self.outbox.remove(ack.update_id)

    # -- jobs

    def _start_job(self, worker: concurrent.futures.ThreadPoolExecutor) -> None:
        if self._job is not None or self._unmasked is not None:
            return  # one job at a time; none while an update waits to be masked
        job = self.session.next_job()
        if job is None:
            return
        future = worker.submit(self._run_job, job)
        self._job = (job, future)
        self._publish_status()

    def _run_job(self, job: Job) -> EvalResult | Personalised | Upload | Unmasked:
        model, dataset, device = self._model, self._dataset, self._device
        if model is None or dataset is None or device is None:
            raise ConfigError("node is not ready: model, dataset or device missing")
        if job.kind is JobKind.EVALUATE:
            evaluated = evaluate(model, job.params, dataset.test_x, dataset.test_y, device=device)
            policy = job.manifest.personalisation
            if policy is None:
                return evaluated
            return Personalised(evaluated, self._personal_job(job, policy))
        seed = _job_seed(self.settings.seed, self.settings.node_id, job.manifest.version)
        private = self._plans.get((job.manifest.run_id, job.manifest.version))
        if private is not None:
            from edge_node.privacy import train_private

            result = train_private(
                model,
                job.params,
                dataset.train_x,
                dataset.train_y,
                job.manifest.training,
                plan=private[1],
                device=device,
            )
        elif self._privacy(job.manifest) is not None:
            # The gate admits every DP version it plans; never train one without its plan.
            raise ConfigError(f"no DP plan for v{job.manifest.version}: not training it")
        else:
            result = train(
                model,
                job.params,
                dataset.train_x,
                dataset.train_y,
                job.manifest.training,
                seed=seed,
                device=device,
            )
        if self.settings.delay_seconds > 0:
            time.sleep(self.settings.delay_seconds)  # the worker thread simulates a slow site
        return self._prepare_upload(job, result, private)

    def _personal_job(
        self, job: Job, policy: Personalisation
    ) -> tuple[EvalResult, PersonalModel] | None:
        """Train the personal model against ``job``'s version and evaluate it (worker thread).

        A personal model already trained against this version (before a restart) is evaluated
        again, not trained twice. One that cannot be trained or evaluated (its outputs are not
        finite) is reported as missing; the previous one stays saved.
        """
        from edge_node.personal import (
            holdout_split,
            personalise,
            prefers_personal,
            resumes,
            start_from,
        )

        model, dataset, device = self._model, self._dataset, self._device
        if model is None or dataset is None or device is None:
            raise ConfigError("node is not ready: model, dataset or device missing")
        manifest, current = job.manifest, self._personal
        try:
            if current is not None and resumes(
                current, manifest.run_id, manifest.version, policy.method
            ):
                personal = current
            else:
                fit, held = holdout_split(
                    dataset.num_train,
                    policy.holdout,
                    _job_seed(self.settings.seed, f"{self.settings.node_id}/holdout", 0),
                )
                trained = personalise(
                    model,
                    policy,
                    start=start_from(policy, current, manifest.run_id, job.params),
                    global_params=job.params,
                    x=dataset.train_x[fit],
                    y=dataset.train_y[fit],
                    config=manifest.training,
                    seed=_job_seed(
                        self.settings.seed, f"{self.settings.node_id}/personal", manifest.version
                    ),
                    device=device,
                )
                kept_global = None
                if len(held):
                    x, y = dataset.train_x[held], dataset.train_y[held]
                    mine = evaluate(model, trained.params, x, y, device=device).accuracy
                    theirs = evaluate(model, job.params, x, y, device=device).accuracy
                    if not prefers_personal(mine, theirs):
                        kept_global = {
                            n: np.array(a, dtype=np.float32) for n, a in job.params.items()
                        }
                personal = PersonalModel(
                    run_id=manifest.run_id,
                    version=manifest.version,
                    method=policy.method,
                    model=manifest.model,
                    saved_at=self._clock(),
                    params=trained.params,
                    kept_global=kept_global,
                )
            result = evaluate(model, personal.served, dataset.test_x, dataset.test_y, device=device)
        except UnusableVersion as exc:
            log.warning(
                "node %s: no personal model for v%d: %s",
                self.settings.node_id,
                manifest.version,
                exc,
            )
            return None
        return result, personal

    def _prepare_upload(
        self, job: Job, result: TrainResult, private: tuple[PrivacyPolicy, DpPlan] | None
    ) -> Upload | Unmasked:
        """Delta, compression and envelope, on the worker thread (this is CPU work too); under
        secure aggregation the flat delta, which the service thread masks (_mask_waiting)."""
        started = time.perf_counter()
        run_id = job.manifest.run_id
        update_id = new_id()
        charge, spend, release = None, None, MetricRelease.EXACT
        if private is not None:
            key = (run_id, job.manifest.version)
            charge = _charge(key, update_id, private[0], private[1], now=self._clock())
            spend = spend_of(self.ledger.with_charge(charge))
            release = private[0].metrics
        if job.manifest.secure_aggregation is not None:
            # The policy refuses compression: the field quantization is the only one.
            return Unmasked(
                job=job,
                result=result,
                delta=flat_delta(job, result.params),
                update_id=update_id,
                encode_seconds=time.perf_counter() - started,
                charge=charge,
                privacy=spend,
                release=release,
            )
        policy = effective_policy(job.manifest.compression, self.settings.compression)
        residual = self._current_residual(run_id) if carries_residual(policy) else None
        compressed = compress_delta(job, result, policy, residual)
        return seal_upload(
            job,
            result,
            compressed,
            policy=policy,
            node_id=self.settings.node_id,
            update_id=update_id,
            encode_seconds=time.perf_counter() - started,
            now=self._clock(),
            charge=charge,
            privacy=spend,
            release=release,
        )

    def _current_residual(self, run_id: str) -> Mapping[str, NDArray[np.float32]]:
        if self._residual is None or self._residual[0] != run_id:
            self._residual = (run_id, self.residuals.load(run_id))
        return self._residual[1]

    def _collect_job(self) -> None:
        if self._job is None or not self._job[1].done():
            return
        job, future = self._job
        self._job = None
        try:
            result = future.result()
        except UnusableVersion as exc:
            # The version's fault, not the node's: say so (status, evaluation) and wait for the
            # next version, which may repair it.
            log.warning(
                "node %s: cannot %s v%d: %s; waiting for the next version",
                self.settings.node_id,
                job.kind,
                job.manifest.version,
                exc,
            )
            self.session.job_failed(job, str(exc))
            if job.kind is JobKind.EVALUATE:
                self._publish_failed_evaluation(job, str(exc))
            return
        except Exception:
            # Training code is the user's (plug-in models and data): log it, skip this version's
            # job rather than retry it in a loop, and carry on with the next version.
            log.exception(
                "node %s: %s of v%d failed", self.settings.node_id, job.kind, job.manifest.version
            )
            self.session.job_done(job)
            return
        self.session.job_done(job)
        self._collect_result(job, result)

    def _collect_result(
        self, job: Job, result: EvalResult | Personalised | Upload | Unmasked
    ) -> None:
        """Save, send or publish what a finished job made (the service thread)."""
        match result:
            case EvalResult():
                self._publish_evaluation(job, result)
            case Personalised():
                # Saved before it is reported: a reported personal model is never lost.
                self._keep_personal(result)
                self._publish_evaluation(
                    job, result.result, None if result.personal is None else result.personal[0]
                )
            case Upload():
                self._publish_update(job, result)
            case Unmasked():
                self._unmasked = result
                self._mask_waiting()

    def _keep_personal(self, result: Personalised) -> None:
        """Save a newly trained personal model to the state dir; the worker continues from it."""
        if result.personal is not None and result.personal[1] is not self._personal:
            self.personal_store.save(result.personal[1])
            self._personal = result.personal[1]

    def _publish_evaluation(
        self, job: Job, result: EvalResult, personal: EvalResult | None = None
    ) -> None:
        evaluation = Evaluation(
            run_id=job.manifest.run_id,
            version=job.manifest.version,
            loss=result.loss,
            accuracy=result.accuracy,
            correct=result.correct,
            num_examples=result.num_examples,
            personal_loss=None if personal is None else personal.loss,
            personal_accuracy=None if personal is None else personal.accuracy,
        )
        self._send_evaluation(job, evaluation)
        log.info(
            "node %s: v%d test accuracy %.3f (%d/%d)%s",
            self.settings.node_id,
            job.manifest.version,
            result.accuracy,
            result.correct,
            result.num_examples,
            "" if personal is None else f", personal model {personal.accuracy:.3f}",
        )

    def _publish_failed_evaluation(self, job: Job, reason: str) -> None:
        dataset = self._dataset
        evaluation = Evaluation(
            run_id=job.manifest.run_id,
            version=job.manifest.version,
            loss=None,
            accuracy=0.0,
            correct=0,
            num_examples=dataset.num_test if dataset else 0,
            failure=reason[:500],
        )
        self._send_evaluation(job, evaluation)

    def _send_evaluation(self, job: Job, evaluation: Evaluation) -> None:
        policy = self._privacy(job.manifest)
        evaluation = evaluation.model_copy(update={"model_bytes": self._model_bytes})
        released = evaluation if policy is None else release_evaluation(evaluation, policy.metrics)
        if released is not None:
            self._send(self.topics.node_eval(self.settings.node_id), released)

    def _publish_update(self, job: Job, upload: Upload) -> None:
        update, payload = upload.update, upload.payload
        run_id = job.manifest.run_id
        if upload.charge is not None:
            refusal = self.ledger.budget_refusal(upload.charge)
            if refusal is not None:
                # The gate is checked before every job; this last line should never be needed.
                log.error("node %s: update not sent: %s", self.settings.node_id, refusal)
                return
            # Before the outbox: from there an update leaves, even after a crash (see ledger).
            self.ledger.charge(upload.charge)
            self._spend = self.ledger.spend()
            if self.session.manifest is not None:
                self._gate_training(self.session.manifest)
        if upload.residual is not None:
            self.residuals.stage(update.update_id, run_id, upload.residual)
        shares: tuple[Publish, ...] = ()
        if upload.secure is not None and self._secure is not None:
            # Own share kept, update and sealed shares on disk, before the outbox: a resend
            # sends these bytes, and this update id is never masked again.
            shares = self._secure.stage(upload.secure, payload, self._outgoing, now=self._clock())
        self.outbox.put(update.update_id, payload)
        self.session.queue(update.update_id)
        if upload.residual is not None:
            self.residuals.commit(update.update_id)
            self._residual = (run_id, upload.residual)
        self.sent_log.write([self._queued_entry(update, len(payload))])
        for message in shares:
            self._publish(message)
        self._publish_raw_update(update.update_id, payload)
        log.info(
            "node %s: update %s from v%d sent: %s; train loss %.4f",
            self.settings.node_id,
            update.update_id[:8],
            job.manifest.version,
            describe_wire_size(len(payload), upload.raw_bytes),
            upload.result.loss,
        )

    def _queued_entry(self, update: Update, size: int) -> SentEntry:
        return SentEntry(
            event=SentEvent.QUEUED,
            at=self._clock(),
            update_id=update.update_id,
            run_id=update.run_id,
            base_version=update.base_version,
            bytes=size,
        )

    # -- outbound

    def _publish_raw_update(self, update_id: str, payload: bytes) -> None:
        assert self._client is not None  # noqa: S101
        self._client.publish(self.topics.update(self.settings.node_id), payload)
        self.session.sent(update_id, self._clock())

    def _resend(self) -> None:
        """Send what the session says is due; runs on every turn of the service loop."""
        for update_id in self.session.sends_due(self._clock()):
            payload = self.outbox.read(update_id)
            if payload is None:
                self.session.acked(update_id)  # gone from the outbox: nothing left to send
                continue
            log.info("node %s: resending update %s", self.settings.node_id, update_id[:8])
            for message in self._outgoing.shares(update_id, self.settings.node_id):
                self._publish(message)
            self._publish_raw_update(update_id, payload)

    def _status_bytes(self, *, offline: bool = False) -> bytes:
        dataset = self._dataset
        status = NodeStatus(
            state=NodeState.OFFLINE if offline else self.session.node_state(),
            version=self.session.version,
            failure="" if offline else self.session.failure[:500],
            software=_software_version(),
            device=str(self._device or ""),
            num_train=dataset.num_train if dataset else 0,
            num_test=dataset.num_test if dataset else 0,
            privacy=self._spend,
            secure_aggregation=None if self._secure is None else self._secure.status(),
        )
        return encode(envelope(status, sender=self.settings.node_id, sent_at=self._clock()))

    def _publish_status(self) -> None:
        current = (
            self.session.node_state(),
            self.session.version,
            self.session.failure,
            self._spend,
            None if self._secure is None else self._secure.status(),
        )
        if current == self._published_state or self._client is None:
            return
        self._client.publish(self.topics.node_status(self.settings.node_id), self._status_bytes())
        self._published_state = current

    def _send(self, topic: Topic, body: Body) -> None:
        assert self._client is not None  # noqa: S101
        env = envelope(body, sender=self.settings.node_id, sent_at=self._clock())
        self._client.publish(topic, encode(env))


def _charge(
    key: tuple[str, int], update_id: str, policy: PrivacyPolicy, plan: DpPlan, *, now: float
) -> Charge:
    return Charge(
        run_id=key[0],
        base_version=key[1],
        update_id=update_id,
        noise_multiplier=plan.noise_multiplier,
        sample_rate=plan.sample_rate,
        steps=plan.steps,
        max_grad_norm=plan.max_grad_norm,
        delta=policy.delta,
        epsilon_budget=policy.epsilon_budget,
        at=now,
    )


def _job_seed(seed: int, node_id: str, version: int) -> int:
    digest = hashlib.sha256(f"{seed}/{node_id}/{version}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF
