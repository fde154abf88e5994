"""Specification of the aggregator service on a real Mosquitto: fake nodes drive it over MQTT."""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

from aggregator.service import AggregatorService
from aggregator.settings import AggregatorSettings
from aggregator.update_log import read_update_log, update_fates
from common.blobs import ModelDownload
from common.broker_url import BrokerEndpoint
from common.codec import decode, decode_tensors, encode, envelope, new_id
from common.compression import dense_tensor
from common.messages import (
    Ack,
    AggregatorState,
    AggregatorStatus,
    Body,
    CompressedTensor,
    ControlCommand,
    ControlReply,
    ControlRequest,
    Evaluation,
    Knobs,
    Manifest,
    ModelSpec,
    NodeState,
    NodeStatus,
    RejectReason,
    TrainMetrics,
    Update,
    VersionRecord,
)
from common.mqtt import Message, MqttClient
from common.topics import Route, TopicTree
from edge_node.service import NodeService
from edge_node.settings import NodeSettings
from tests.brokers import BrokerConfig, EmbeddedBroker

pytestmark = [pytest.mark.broker, pytest.mark.timeout(60)]

WAIT = 15.0  # seconds; every wait in this module is bounded by it, or by TRAINING_WAIT
TRAINING_WAIT = 90.0  # seconds; a real node's training, on a busy machine
MODEL = ModelSpec(name="logreg", kwargs={"in_features": 3, "num_classes": 2})
SHAPES = {"1.weight": (2, 3), "1.bias": (2,)}

T = TypeVar("T")
Params = dict[str, np.ndarray]


class Clock:
    """A wall clock that stands still until the test moves it: the service's only time source."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


class Aggregator:
    """An AggregatorService running in a thread of this test, stopped through its event."""

    def __init__(
        self, settings: AggregatorSettings, clock: Callable[[], float] = time.time
    ) -> None:
        self.settings = settings
        self.service = AggregatorService(settings, clock=clock)
        self.stop_event = threading.Event()
        self.result: AggregatorState | None = None
        self.error: BaseException | None = None
        self.started_at = time.time()
        self.thread = threading.Thread(target=self._run, name="aggregator-under-test")
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result = self.service.run(self.stop_event)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread, which fails on it
            self.error = exc

    def check_alive(self) -> None:
        if self.error is not None:
            raise AssertionError(f"the aggregator died: {self.error!r}") from self.error
        if not self.thread.is_alive():
            raise AssertionError(f"the aggregator returned {self.result}")

    def stop(self) -> AggregatorState | None:
        self.stop_event.set()
        self.thread.join(WAIT)
        assert not self.thread.is_alive(), "the aggregator did not stop within WAIT"
        if self.error is not None:
            raise AssertionError(f"the aggregator died: {self.error!r}") from self.error
        return self.result


class Peer:
    """A fake node (and operator) on the real broker: sends updates and reads what comes back."""

    def __init__(
        self, url: str, tree: TopicTree, name: str, *, client: MqttClient | None = None
    ) -> None:
        self.tree = tree
        self.name = name
        self.aggregator: Aggregator | None = None
        # ``client``: an unstarted one with other credentials (a generated deployment's).
        self.client = client or MqttClient(
            BrokerEndpoint.parse(url), f"{name}-{uuid.uuid4().hex[:8]}"
        )
        for topic_filter in (
            tree.manifest(),
            tree.all_chunks(),
            tree.ack(name),
            tree.versions(),
            tree.aggregator_status(),
            tree.route_filter(Route.CONTROL_REPLY),
        ):
            self.client.subscribe(topic_filter)
        self.bodies: list[tuple[Route, Body]] = []
        self.models: dict[int, tuple[Manifest, Params]] = {}
        self._download = ModelDownload(max_blob_bytes=1 << 20)

    # -- receiving

    def pump(self, timeout: float) -> None:
        try:
            item = self.client.inbox.get(timeout=timeout)
        except queue.Empty:
            return
        while True:
            if isinstance(item, Message):
                self._take(item)
            try:
                item = self.client.inbox.get_nowait()
            except queue.Empty:
                return

    def _take(self, message: Message) -> None:
        if not message.payload:
            return  # a cleared retained chunk
        topic = self.tree.parse(message.topic)
        if topic.route is Route.CHUNK:
            assert topic.version is not None
            assert topic.chunk is not None
            self._download.on_chunk(topic.version, topic.chunk, message.payload)
        else:
            body = decode(message.payload).body
            self.bodies.append((topic.route, body))
            if isinstance(body, Manifest):
                self._download.on_manifest(body)
        done = self._download.take()
        if done is not None:
            manifest, blob = done
            self.models[manifest.version] = (manifest, decode_tensors(blob))

    def wait_for(self, probe: Callable[[], T | None], what: str, timeout: float = WAIT) -> T:
        """Pump the inbox until ``probe`` returns something, at most ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            found = probe()
            if found is not None:
                return found
            if self.aggregator is not None and not self.aggregator.thread.is_alive():
                # It may have returned (e.g. at max_versions) just after publishing what we wait
                # for: take what is still on its way before calling that a failure.
                self.pump(0.5)
                found = probe()
                if found is not None:
                    return found
                self.aggregator.check_alive()
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: no {what} within {timeout}s")
            self.pump(0.05)

    def of(self, route: Route, kind: type[T]) -> list[T]:
        return [body for r, body in self.bodies if r is route and isinstance(body, kind)]

    def acks(self, update_id: str) -> list[Ack]:
        return [ack for ack in self.of(Route.ACK, Ack) if ack.update_id == update_id]

    def ack(self, update_id: str, count: int = 1) -> Ack:
        """The ``count``-th ack of an update."""
        return self.wait_for(
            lambda: a[count - 1] if len(a := self.acks(update_id)) >= count else None,
            f"ack #{count} of {update_id}",
        )

    def model(self, version: int) -> tuple[Manifest, Params]:
        return self.wait_for(lambda: self.models.get(version), f"model v{version}")

    def status(self, check: Callable[[AggregatorStatus], bool], what: str) -> AggregatorStatus:
        def probe() -> AggregatorStatus | None:
            matching = [s for s in self.of(Route.AGGREGATOR_STATUS, AggregatorStatus) if check(s)]
            return matching[-1] if matching else None

        return self.wait_for(probe, f"status with {what}")

    def record(self, version: int, timeout: float = WAIT) -> VersionRecord:
        return self.wait_for(
            lambda: next(
                (r for r in self.of(Route.VERSIONS, VersionRecord) if r.version == version), None
            ),
            f"versions record of v{version}",
            timeout,
        )

    def reply(self, request_id: str) -> ControlReply:
        return self.wait_for(
            lambda: next(
                (
                    r
                    for r in self.of(Route.CONTROL_REPLY, ControlReply)
                    if r.request_id == request_id
                ),
                None,
            ),
            f"reply to {request_id}",
        )

    # -- sending

    def publish_raw(self, payload: bytes) -> None:
        self.client.publish(self.tree.update(self.name), payload, wait=WAIT)

    def publish(self, body: Body, *, sender: str | None = None) -> None:
        env = envelope(body, sender=sender or self.name, sent_at=time.time())
        self.publish_raw(encode(env))

    def update(
        self,
        base_version: int,
        *,
        update_id: str | None = None,
        value: float = 0.01,
        delta: Params | None = None,
        tensors: tuple[CompressedTensor, ...] | None = None,
    ) -> Update:
        """An update against the run of the latest manifest; a constant delta unless given."""
        run_id = self.model(0)[0].run_id
        if tensors is None:
            delta = delta or {n: np.full(s, value, np.float32) for n, s in SHAPES.items()}
            tensors = tuple(dense_tensor(n, a) for n, a in delta.items())
        return Update(
            update_id=update_id or new_id(),
            run_id=run_id,
            base_version=base_version,
            num_samples=10,
            metrics=TrainMetrics(loss=0.5, accuracy=0.5, seconds=0.1),
            delta=tensors,
        )

    def send(self, update: Update) -> Ack:
        """Publish a valid update and return its ack, asserting it was accepted."""
        self.publish(update)
        ack = self.ack(update.update_id, count=len(self.acks(update.update_id)) + 1)
        assert ack.accepted, ack
        return ack

    def control(self, command: ControlCommand, **knobs: Any) -> ControlReply:
        request = ControlRequest(request_id=new_id(), command=command, knobs=knobs)
        env = envelope(request, sender="operator", sent_at=time.time())
        self.client.publish(self.tree.control_requests(), encode(env), wait=WAIT)
        return self.reply(request.request_id)

    def fold_next(self, version: int) -> VersionRecord:
        """Two valid updates from ``version`` make version + 1 (buffer_size 2)."""
        self.send(self.update(version))
        self.send(self.update(version))
        self.model(version + 1)
        return self.record(version + 1)


@pytest.fixture
def tree() -> TopicTree:
    return TopicTree(f"agg{uuid.uuid4().hex[:12]}")


@pytest.fixture
def start(
    mosquitto: EmbeddedBroker, tree: TopicTree, tmp_path: Path
) -> Iterator[Callable[..., Aggregator]]:
    """Starts an aggregator of this test's federation and state dir; all are stopped at the end."""
    running: list[Aggregator] = []

    def _start(clock: Callable[[], float] = time.time, **overrides: Any) -> Aggregator:
        fields: dict[str, Any] = {
            "broker_url": mosquitto.url,
            "federation": tree.federation,
            "state_dir": tmp_path / "aggregator",
            "run_id": f"run-{tree.federation}",
            "model": MODEL,
            "knobs": Knobs(buffer_size=2),
            "autostart": True,
            "status_interval": 0.2,
            "connect_timeout": WAIT,
        }
        fields.update(overrides)
        aggregator = Aggregator(AggregatorSettings(**fields), clock)
        running.append(aggregator)
        return aggregator

    yield _start
    for aggregator in running:
        aggregator.stop_event.set()
    for aggregator in running:
        aggregator.thread.join(WAIT)


@pytest.fixture
def node(mosquitto: EmbeddedBroker, tree: TopicTree) -> Iterator[Peer]:
    peer = Peer(mosquitto.url, tree, "n1")
    with peer.client:
        yield peer


@pytest.fixture
def running(start: Callable[..., Aggregator], node: Peer) -> Aggregator:
    """A running aggregator whose v0 model the node has downloaded."""
    aggregator = start()
    node.aggregator = aggregator
    node.model(0)
    return aggregator


# -- the happy path


def test_initial_model_is_published_as_manifest_and_chunks(running: Aggregator, node: Peer) -> None:
    """v0's retained manifest names the run and model; its chunks decode to the model's tensors."""
    manifest, params = node.model(0)
    assert manifest.run_id == running.settings.run_id
    assert manifest.model == MODEL
    assert {name: p.shape for name, p in params.items()} == SHAPES
    status = node.status(lambda s: True, "anything")
    assert (status.state, status.version, status.buffer_fill) == (AggregatorState.RUNNING, 0, 0)


def test_valid_updates_are_acked_and_fold_into_a_new_version(
    running: Aggregator, node: Peer
) -> None:
    """K accepted updates publish v1 = v0 + their mean delta, with a versions record."""
    _, v0 = node.model(0)
    first, second = node.update(0, value=0.1), node.update(0, value=0.3)
    ack = node.send(first)
    assert (ack.reason, ack.current_version) == (None, 0)
    node.send(second)
    manifest, v1 = node.model(1)
    assert manifest.run_id == running.settings.run_id
    for name in SHAPES:
        np.testing.assert_allclose(v1[name], v0[name] + 0.2, rtol=1e-6)
    record = node.record(1)
    assert [c.update_id for c in record.contributions] == [first.update_id, second.update_id]
    assert all(c.node == "n1" and c.staleness == 0 for c in record.contributions)
    status = node.status(lambda s: s.version == 1, "v1")
    assert (status.counters.accepted, status.counters.folded, status.buffer_fill) == (2, 2, 0)


HEART = ModelSpec(name="logreg", kwargs={"in_features": 13, "num_classes": 2})


@pytest.mark.timeout(TRAINING_WAIT + 60)
def test_a_float16_broadcast_is_float16_on_the_wire_and_a_real_node_trains_on_it(
    start: Callable[..., Aggregator], node: Peer, mosquitto: EmbeddedBroker, tmp_path: Path
) -> None:
    """With broadcast_dtype float16 the manifest says so, the blob holds the float32 weights
    rounded to float16, and a real node decodes it, trains and gets its update folded."""
    aggregator = start(model=HEART, knobs=Knobs(buffer_size=1, broadcast_dtype="float16"))
    node.aggregator = aggregator
    manifest, v0 = node.model(0)
    assert manifest.broadcast_dtype == "float16"
    assert {name: p.dtype for name, p in v0.items()} == {
        "1.weight": np.float16,
        "1.bias": np.float16,
    }
    master = aggregator.service.core.params
    for name, weights in v0.items():
        np.testing.assert_array_equal(weights, master[name].astype(np.float16))
    hospital = NodeService(
        NodeSettings(
            broker_url=mosquitto.url,  # type: ignore[arg-type]
            federation=node.tree.federation,
            node_id="va",
            data="heart-disease:va",
            state_dir=tmp_path / "va",
            torch_threads=1,
        )
    )
    stop = threading.Event()
    thread = threading.Thread(target=hospital.run, args=(stop,), name="va")
    thread.start()
    try:
        # A real node: it loads its data and trains, which a busy machine makes slow.
        record = node.record(1, timeout=TRAINING_WAIT)
    finally:
        stop.set()
        thread.join(WAIT)
    assert [(c.node, c.base_version) for c in record.contributions] == [("va", 0)]
    manifest, v1 = node.model(1)
    assert manifest.broadcast_dtype == "float16"
    assert all(p.dtype == np.float16 for p in v1.values())
    assert any(not np.array_equal(v1[name], v0[name]) for name in v0), "the update moved nothing"


def test_a_partial_buffer_folds_once_its_oldest_update_waited_buffer_timeout(
    start: Callable[..., Aggregator], node: Peer
) -> None:
    """With K = 3 and buffer_timeout 30 s, one buffered update is still waiting at 29 s on the
    service's clock and is folded alone, for reason buffer_timeout, once the clock passes 30 s."""
    clock = Clock()
    began = clock.now
    node.aggregator = start(clock=clock, knobs=Knobs(buffer_size=3, buffer_timeout=30.0))
    node.model(0)
    lonely = node.update(0)
    node.send(lonely)

    def status_at(moment: float) -> AggregatorStatus:
        """A status published at ``moment`` on the service's clock, asked for by a control
        request (the service checks for a due fold after each, then publishes its status)."""
        clock.now = moment
        assert node.control(ControlCommand.STATUS).ok
        return node.status(lambda s: s.updated_at >= moment, f"a status at +{moment - began}s")

    waiting = status_at(began + 29.0)
    assert (waiting.version, waiting.buffer_fill) == (0, 1)
    assert node.of(Route.VERSIONS, VersionRecord) == []
    folded = status_at(began + 30.5)
    assert (folded.version, folded.buffer_fill, folded.counters.folded) == (1, 0, 1)
    record = node.record(1)
    assert record.reason == "buffer_timeout"
    assert [c.update_id for c in record.contributions] == [lonely.update_id]
    node.model(1)


# -- hostile input: each is refused, and the aggregator goes on folding


def assert_rejected(node: Peer, update: Update, reason: RejectReason) -> None:
    ack = node.ack(update.update_id)
    assert (ack.accepted, ack.reason) == (False, reason), ack
    node.status(lambda s: s.counters.rejections.get(reason.value) == 1, f"{reason.value} counted")


def test_garbage_bytes_are_counted_as_malformed(running: Aggregator, node: Peer) -> None:
    """Bytes that are no envelope are counted as malformed; the next valid updates still fold."""
    node.publish_raw(b"\x00\xffnot msgpack at all")
    node.status(lambda s: s.counters.rejections.get("malformed") == 1, "a malformed count")
    node.fold_next(0)


def test_wrong_kind_on_the_update_topic_is_malformed(running: Aggregator, node: Peer) -> None:
    """A valid envelope of another kind on updates/{node} is counted as malformed."""
    node.publish(NodeStatus(state=NodeState.IDLE))
    node.status(lambda s: s.counters.rejections.get("malformed") == 1, "a malformed count")
    node.fold_next(0)


def test_wrong_sender_is_rejected(running: Aggregator, node: Peer) -> None:
    """An envelope whose sender is not the topic's node is rejected as wrong_sender."""
    update = node.update(0)
    node.publish(update, sender="n2")
    assert_rejected(node, update, RejectReason.WRONG_SENDER)
    node.fold_next(0)


def test_nan_delta_is_rejected(running: Aggregator, node: Peer) -> None:
    """A delta holding NaN is rejected as non_finite and never reaches the model."""
    delta = {n: np.full(s, np.nan, np.float32) for n, s in SHAPES.items()}
    update = node.update(0, delta=delta)
    node.publish(update)
    assert_rejected(node, update, RejectReason.NON_FINITE)
    record = node.fold_next(0)
    assert update.update_id not in {c.update_id for c in record.contributions}
    assert all(np.isfinite(p).all() for p in node.model(1)[1].values())


def test_wrong_shape_is_rejected(running: Aggregator, node: Peer) -> None:
    """A delta whose tensor shapes differ from the model's is rejected as shape_mismatch."""
    update = node.update(
        0, delta={"1.weight": np.zeros((3, 2), np.float32), "1.bias": np.zeros(2, np.float32)}
    )
    node.publish(update)
    assert_rejected(node, update, RejectReason.SHAPE_MISMATCH)
    node.fold_next(0)


def test_stale_update_is_rejected(running: Aggregator, node: Peer) -> None:
    """With max_staleness 0, an update from v0 arriving at v1 is rejected as stale."""
    assert node.control(ControlCommand.SET, max_staleness=0).ok
    node.fold_next(0)
    update = node.update(0)
    node.publish(update)
    assert_rejected(node, update, RejectReason.STALE)
    assert node.ack(update.update_id).current_version == 1
    node.fold_next(1)


def test_future_version_is_rejected(running: Aggregator, node: Peer) -> None:
    """An update claiming a base version the aggregator never published is rejected."""
    update = node.update(5)
    node.publish(update)
    assert_rejected(node, update, RejectReason.FUTURE_VERSION)
    node.fold_next(0)


def test_oversized_message_is_dropped_and_counted(
    start: Callable[..., Aggregator], node: Peer
) -> None:
    """A message over max_update_bytes is counted as too_large and never decoded."""
    node.aggregator = start(max_update_bytes=4096)
    node.model(0)
    tensors = (
        *node.update(0).delta,
        dense_tensor("padding", np.zeros(2000, np.float32)),
    )
    update = node.update(0, tensors=tensors)
    payload = encode(envelope(update, sender="n1", sent_at=time.time()))
    assert len(payload) > 4096
    node.publish_raw(payload)
    node.status(lambda s: s.counters.rejections.get("too_large") == 1, "a too_large count")
    assert node.acks(update.update_id) == []
    node.fold_next(0)


def test_replayed_update_is_acked_again_and_folded_once(running: Aggregator, node: Peer) -> None:
    """Resending an accepted update id is acked as accepted, counted as duplicate, folded once."""
    first = node.update(0)
    node.send(first)
    node.send(first)
    node.status(lambda s: s.counters.duplicates == 1, "one duplicate")
    second = node.update(0)
    node.send(second)
    record = node.record(1)
    assert [c.update_id for c in record.contributions] == [first.update_id, second.update_id]
    node.send(first)
    status = node.status(lambda s: s.counters.duplicates == 2, "two duplicates")
    assert (status.version, status.buffer_fill, status.counters.folded) == (1, 0, 2)
    node.fold_next(1)
    folded = [c.update_id for r in node.of(Route.VERSIONS, VersionRecord) for c in r.contributions]
    assert folded.count(first.update_id) == 1


def test_huge_finite_update_does_not_crash_the_aggregator(running: Aggregator, node: Peer) -> None:
    """An accepted update of huge but finite values folds; the aggregator keeps serving."""
    huge = {n: np.full(s, 1e20, np.float32) for n, s in SHAPES.items()}
    node.send(node.update(0, delta=huge))
    node.send(node.update(0))
    node.record(1)
    node.fold_next(1)


# -- control


def test_pause_buffers_updates_and_resume_folds_them(running: Aggregator, node: Peer) -> None:
    """While paused, updates are acked and buffered but not folded; resume folds them."""
    reply = node.control(ControlCommand.PAUSE)
    assert reply.ok
    assert reply.status is not None
    assert reply.status.state is AggregatorState.PAUSED
    node.send(node.update(0))
    node.send(node.update(0))
    status = node.status(lambda s: s.buffer_fill == 2, "a full buffer")
    assert (status.state, status.version) == (AggregatorState.PAUSED, 0)
    assert node.control(ControlCommand.RESUME).ok
    node.model(1)
    node.status(lambda s: s.state is AggregatorState.RUNNING and s.version == 1, "running v1")


def test_set_changes_knobs_and_the_next_manifest(running: Aggregator, node: Peer) -> None:
    """A set request changes the knobs at once; training knobs travel in the next manifest."""
    reply = node.control(ControlCommand.SET, buffer_size=1, **{"training.epochs": 3})
    assert reply.ok, reply.message
    assert reply.status is not None
    assert reply.status.knobs.buffer_size == 1
    node.send(node.update(0))
    manifest, _ = node.model(1)
    assert manifest.training.epochs == 3


def test_invalid_set_is_refused_and_changes_nothing(running: Aggregator, node: Peer) -> None:
    """A set request with an unknown knob replies ok=False and leaves the knobs alone."""
    reply = node.control(ControlCommand.SET, no_such_knob=1)
    assert (reply.ok, reply.message) == (False, "unknown knob 'no_such_knob'")
    assert reply.status is not None
    assert reply.status.knobs == running.settings.knobs


def test_illegal_transition_replies_not_ok(running: Aggregator, node: Peer) -> None:
    """Resuming a running run replies ok=False naming the state, and the run keeps running."""
    reply = node.control(ControlCommand.RESUME)
    assert (reply.ok, reply.message) == (
        False,
        "cannot resume a run that is running (allowed: pause, stop)",
    )
    assert reply.status is not None
    assert reply.status.state is AggregatorState.RUNNING
    node.fold_next(0)


def test_stop_ends_the_run_and_the_service(running: Aggregator, node: Peer) -> None:
    """Stop replies ok, publishes a stopped status and makes run() return STOPPED."""
    reply = node.control(ControlCommand.STOP)
    assert reply.ok
    running.thread.join(WAIT)
    assert not running.thread.is_alive()
    assert running.result is AggregatorState.STOPPED
    node.aggregator = None
    node.status(lambda s: s.state is AggregatorState.STOPPED, "stopped")


def test_an_aggregator_leaving_before_the_run_stops_says_offline(
    running: Aggregator, node: Peer
) -> None:
    """A clean exit sends no Last Will, so the aggregator publishes the offline status itself."""
    node.fold_next(0)
    running.stop()
    node.aggregator = None
    offline = node.status(lambda s: s.state is AggregatorState.OFFLINE, "offline")
    assert offline.version == 1


# -- restart


def restart(node: Peer, start: Callable[..., Aggregator], old: Aggregator) -> AggregatorStatus:
    """Stop the aggregator, start another on the same state dir; return its first status."""
    old.stop()
    node.aggregator = start()
    since = node.aggregator.started_at
    return node.status(lambda s: s.updated_at >= since, "a status from the new aggregator")


def test_restart_resumes_the_run_at_its_version(
    start: Callable[..., Aggregator], running: Aggregator, node: Peer
) -> None:
    """A new service on the same state dir continues the same run at the same version."""
    node.fold_next(0)
    status = restart(node, start, running)
    assert (status.run_id, status.version) == (running.settings.run_id, 1)
    assert status.counters.folded == 2
    manifest = node.wait_for(
        lambda: next(
            (
                m
                for m in node.of(Route.MANIFEST, Manifest)
                if m.created_at >= node.aggregator.started_at  # type: ignore[union-attr]
            ),
            None,
        ),
        "the new aggregator's manifest",
    )
    assert (manifest.run_id, manifest.version) == (running.settings.run_id, 1)
    node.fold_next(1)


def test_buffered_update_survives_restart_and_folds_once(
    start: Callable[..., Aggregator], running: Aggregator, node: Peer
) -> None:
    """An update acked before a stop is still buffered after restart, folds once, and a resend is a
    duplicate."""
    pending = node.update(0)
    node.send(pending)
    status = restart(node, start, running)
    assert (status.version, status.buffer_fill) == (0, 1)
    again = node.send(pending)
    assert again.accepted
    node.status(lambda s: s.counters.duplicates == 1, "the resend counted as duplicate")
    later = node.update(0)
    node.send(later)
    record = node.record(1)
    assert [c.update_id for c in record.contributions] == [pending.update_id, later.update_id]
    status = node.status(lambda s: s.version == 1, "v1")
    assert (status.buffer_fill, status.counters.folded, status.counters.accepted) == (0, 2, 2)


def test_buffered_update_of_a_dashed_node_and_id_survives_restart(
    start: Callable[..., Aggregator], mosquitto: EmbeddedBroker, tree: TopicTree
) -> None:
    """Node and update ids may contain dashes; an acked update of such a node survives restart."""
    first = start()
    hospital = Peer(mosquitto.url, tree, "st-marys")
    hospital.aggregator = first
    with hospital.client:
        hospital.model(0)
        pending = hospital.update(0, update_id="update-1")
        hospital.send(pending)
        status = restart(hospital, start, first)
        assert (status.buffer_fill, status.counters.rejected) == (1, 0)
        assert hospital.send(pending).accepted
        hospital.send(hospital.update(0))
        record = hospital.record(1)
    assert [c.node for c in record.contributions] == ["st-marys", "st-marys"]
    assert record.contributions[0].update_id == "update-1"


def test_updates_buffered_when_a_checkpoint_is_written_survive_restart(
    start: Callable[..., Aggregator], running: Aggregator, node: Peer
) -> None:
    """A control command checkpoints while updates are buffered; a restart still folds them once."""
    pending = node.update(0)
    node.send(pending)
    assert node.control(ControlCommand.PAUSE).ok  # writes a checkpoint with the update buffered
    status = restart(node, start, running)
    assert (status.state, status.version, status.buffer_fill) == (AggregatorState.PAUSED, 0, 1)
    assert status.counters.accepted == 1  # counted once, not again by the replay
    assert node.control(ControlCommand.RESUME).ok
    later = node.update(0)
    node.send(later)
    record = node.record(1)
    assert [c.update_id for c in record.contributions] == [pending.update_id, later.update_id]


def test_evaluations_count_only_from_the_node_whose_topic_they_use(
    running: Aggregator, node: Peer
) -> None:
    """An evaluation is recorded for its node only when the envelope's sender owns the topic."""

    def evaluate(accuracy: float, sender: str) -> None:
        body = Evaluation(
            run_id=running.settings.run_id or "",
            version=0,
            loss=0.5,
            accuracy=accuracy,
            correct=int(accuracy * 10),
            num_examples=10,
        )
        env = envelope(body, sender=sender, sent_at=time.time())
        node.client.publish(node.tree.node_eval(node.name), encode(env), wait=WAIT)

    evaluate(0.9, sender="impostor")
    node.send(node.update(0))  # acked only after the evaluation before it was handled
    status = node.status(lambda s: s.counters.accepted == 1, "the update after the evaluation")
    assert all(e.eval_accuracy is None for e in status.nodes)
    evaluate(0.4, sender=node.name)
    status = node.status(
        lambda s: any(e.node == node.name and e.eval_accuracy is not None for e in s.nodes),
        "the evaluation in the node tallies",
    )
    (entry,) = [e for e in status.nodes if e.node == node.name]
    assert entry.eval_accuracy == pytest.approx(0.4)


# -- durability


def test_the_update_log_records_every_verdict_before_the_ack(
    running: Aggregator, node: Peer
) -> None:
    """By the time an ack arrives, its verdict is in ledger.jsonl; folds name their version."""
    first, stale = node.update(0), node.update(3)
    node.send(first)
    node.send(first)
    node.publish(stale)
    refusal = node.ack(stale.update_id)
    assert (refusal.accepted, refusal.reason) == (False, RejectReason.FUTURE_VERSION), refusal
    second = node.update(0)
    node.send(second)
    node.record(1)
    node.status(lambda s: s.version == 1, "v1")  # published after the update log's folded lines
    fates = update_fates(read_update_log(running.settings.state_dir))
    assert fates[first.update_id].folded_into == [1]
    assert fates[first.update_id].duplicates == 1
    assert fates[second.update_id].folded_into == [1]
    assert fates[stale.update_id].rejections == ["future_version"]


def test_a_broker_that_lost_its_retained_messages_gets_the_model_again(
    tree: TopicTree, tmp_path: Path
) -> None:
    """After a broker restart without persistence, the aggregator republishes its manifest."""
    with EmbeddedBroker(BrokerConfig(implementation="mosquitto")) as broker:
        settings = AggregatorSettings(
            broker_url=broker.url,  # type: ignore[arg-type]
            federation=tree.federation,
            state_dir=tmp_path / "aggregator",
            run_id=f"run-{tree.federation}",
            model=MODEL,
            knobs=Knobs(buffer_size=2),
            status_interval=0.2,
            connect_timeout=WAIT,
        )
        aggregator = Aggregator(settings)
        try:
            peer = Peer(broker.url, tree, "n1")
            with peer.client:
                peer.aggregator = aggregator
                peer.model(0)
            broker.restart()  # no persistence: the retained manifest and chunks are gone
            late = Peer(broker.url, tree, "n2")
            with late.client:
                late.aggregator = aggregator
                manifest, _ = late.model(0)
            assert manifest.run_id == settings.run_id
        finally:
            aggregator.stop()


# -- versions that cannot be used, and rollback


@pytest.mark.parametrize(
    ("knobs", "attacker_samples", "detail"),
    [
        pytest.param(Knobs(buffer_size=2), 10**6, "fails the probe", id="outputs-not-finite"),
        pytest.param(
            Knobs(buffer_size=2, server_lr=2.0), 10, "is not finite", id="weights-not-finite"
        ),
    ],
)
def test_a_batch_that_cannot_become_a_version_is_acked_discarded_and_the_version_stays(
    start: Callable[..., Aggregator],
    node: Peer,
    knobs: Knobs,
    attacker_samples: int,
    detail: str,
) -> None:
    """An update of 3e38s folded into a version no node could use (infinite outputs on the probe
    batch, or infinite weights): each update of the batch gets a second ack, ``discarded`` with
    the reason; the counters say discarded, not rejected; v0 stays, and honest work goes on."""
    node.aggregator = start(knobs=knobs)
    node.model(0)
    huge = {n: np.full(s, 3e38, np.float32) for n, s in SHAPES.items()}
    attack = node.update(0, delta=huge).model_copy(update={"num_samples": attacker_samples})
    honest = node.update(0, delta=huge if attacker_samples == 10 else None)
    node.send(attack)
    node.send(honest)
    for update in (attack, honest):
        discarded = node.ack(update.update_id, count=2)
        assert (discarded.accepted, discarded.reason) == (False, RejectReason.DISCARDED)
        assert detail in discarded.detail
        assert discarded.current_version == 0
    status = node.status(lambda s: s.counters.discarded == 2, "two discarded updates")
    assert (status.version, status.counters.rejected, status.counters.folded) == (0, 0, 0)
    assert status.counters.probe_failures == (1 if attacker_samples > 10 else 0)
    (entry,) = status.nodes
    assert (entry.discarded, entry.rejected) == (2, 0)
    fates = update_fates(read_update_log(node.aggregator.settings.state_dir))
    assert fates[attack.update_id].discarded
    assert not fates[attack.update_id].rejected
    node.fold_next(0)
    _, params = node.model(1)
    assert all(np.isfinite(p).all() and np.abs(p).max() < 1e3 for p in params.values())


def rollback(node: Peer, version: int) -> ControlReply:
    request = ControlRequest(request_id=new_id(), command=ControlCommand.ROLLBACK, version=version)
    env = envelope(request, sender="operator", sent_at=time.time())
    node.client.publish(node.tree.control_requests(), encode(env), wait=WAIT)
    return node.reply(request.request_id)


def test_a_rollback_publishes_a_new_version_with_an_earlier_versions_weights(
    start: Callable[..., Aggregator], running: Aggregator, node: Peer
) -> None:
    """`rollback 1` at v2 publishes v3 with v1's weights, logged as a rollback of v1; a target that
    is not an earlier version is refused with the reason; a restart resumes at v3, once."""
    node.fold_next(0)
    node.fold_next(1)
    refused = rollback(node, 7)
    assert not refused.ok
    assert "not an earlier version" in refused.message
    reply = rollback(node, 1)
    assert reply.ok, reply.message
    assert "v3" in reply.message
    _, v1 = node.model(1)
    _, v3 = node.model(3)
    for name, value in v1.items():
        assert np.array_equal(v3[name], value), name
    record = node.record(3)
    assert (record.reason, record.rollback_of, record.contributions) == ("rollback", 1, ())
    status = restart(node, start, running)
    assert (status.version, status.counters.rollbacks) == (3, 1)
    node.fold_next(3)
    assert node.record(4).reason == "buffer_full"
