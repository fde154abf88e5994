"""Real node services under the secure aggregation policy on a real Mosquitto with `healthnet
deploy init --auth mtls`'s files. The test plays the aggregator (its identity, its ACL): it
publishes a version whose manifest carries the policy and reads what the four hospitals send.

Each node publishes its signed key record, waits for its peers', trains, masks its update and
sends the shares, then the masked update; every holder stores and receipts every share. The test
asks three holders for a weighted sum of the masks' shares and unmasks the four updates' weighted
sum, which equals the weighted sum of the deltas the same training makes in this process, within
quantization. A node stopped and started again over its state dir, or a node process killed
(SIGKILL) after sending, resends its update and shares byte for byte.

Waits are bounded (what has not arrived within WAIT never will); nothing asserts on how long
anything took.
"""

from __future__ import annotations

import datetime as dt
import queue
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest

from aggregator.secure_unmask import PendingMasked, plan_fold, unmask
from common.blobs import split_blob
from common.codec import encode, encode_tensors, envelope, sha256_hex
from common.inbound import Inbound, receive
from common.messages import (
    Ack,
    AggregatorState,
    AggregatorStatus,
    Counters,
    Evaluation,
    Knobs,
    Manifest,
    ModelSpec,
    NodeState,
    NodeStatus,
    SecAggAnswer,
    SecAggKey,
    SecAggReceipt,
    SecureAggregation,
    TrainingConfig,
    Update,
)
from common.models import build_model, model_params
from common.mqtt import Message, MqttClient
from common.secure_aggregation import from_bytes
from common.secure_aggregation.events import UnmaskAnswer
from common.secure_aggregation.wire import to_unmask
from common.settings import ConnectionSettings
from common.topics import Role, TopicTree
from edge_node.datasets import load_dataset
from edge_node.secure_holder import load_agreement_key
from edge_node.secure_keys import own_key_record, publish_key_record
from edge_node.service import NodeService, _job_seed
from edge_node.settings import NodeSettings
from edge_node.training import train
from healthnet.broker import EmbeddedBroker
from healthnet.deploy import AuthMode
from healthnet.processes import ProcessGroup
from tests.secure import HOSPITALS, SecureBroker, secure_broker

pytestmark = [pytest.mark.broker, pytest.mark.timeout(180)]

WAIT = 60.0  # seconds: four hospitals train on two loaded cores
LIMIT = 1 << 20
RUN = "run-1"
MODEL = ModelSpec(name="logreg", kwargs={"in_features": 13, "num_classes": 2})
WIRE_POLICY = SecureAggregation(holders=HOSPITALS)
POLICY = WIRE_POLICY.policy()
TRAINING = TrainingConfig()
SIZE = 28


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[SecureBroker]:
    federation = f"secnode{uuid.uuid4().hex[:8]}"
    with secure_broker(tmp_path, auth=AuthMode.MTLS, federation=federation) as b:
        yield b


def node_settings(broker: SecureBroker, hospital: str, root: Path) -> NodeSettings:
    return NodeSettings(
        _env_file=broker.deployment.env_files[hospital],
        node_id=hospital,
        data=f"heart-disease:{hospital}",
        state_dir=root / hospital,
        torch_threads=1,
        device="cpu",
        ack_timeout=3600.0,  # the test acks nothing; a resend comes from a restart only
    )


class Aggregator:
    """The test in the aggregator's identity: publishes v0 and collects what the nodes send."""

    def __init__(
        self, broker: SecureBroker | None, stack: ExitStack, plain: tuple[str, str] | None = None
    ) -> None:
        """In ``broker``'s aggregator identity, or on a broker without identities (``plain``:
        its URL and the federation)."""
        if broker is not None:
            self.tree = TopicTree(broker.federation)
            client = broker.client("aggregator", "aggregator.test")
        else:
            assert plain is not None
            self.tree = TopicTree(plain[1])
            client = MqttClient.from_settings(
                ConnectionSettings(broker_url=plain[0], federation=plain[1]),
                "aggregator.test",
            )
        self.client = stack.enter_context(client)
        for topic_filter in self.tree.subscriptions(Role.AGGREGATOR, secure_aggregation=True):
            self.client.subscribe(topic_filter)
        self.updates: dict[str, list[bytes]] = {}  # node -> each payload received
        self.receipts: dict[str, set[str]] = {}
        self.answers: dict[str, SecAggAnswer] = {}
        self.statuses: dict[str, NodeStatus] = {}
        self.keys: list[str] = []  # the nodes whose key records arrived
        self.evaluated = False

    def publish_version(self, params: dict[str, np.ndarray]) -> Manifest:
        blob = encode_tensors(params)
        chunks = split_blob(blob, 1 << 20)
        manifest = Manifest(
            run_id=RUN,
            version=0,
            sha256=sha256_hex(blob),
            blob_bytes=len(blob),
            chunk_size=1 << 20,
            chunk_count=len(chunks),
            model=MODEL,
            training=TRAINING,
            created_at=time.time(),
            secure_aggregation=WIRE_POLICY,
        )
        status = AggregatorStatus(
            run_id=RUN,
            state=AggregatorState.RUNNING,
            version=0,
            buffer_fill=0,
            knobs=Knobs(buffer_size=4, secure_aggregation=WIRE_POLICY),
            counters=Counters(),
            updated_at=time.time(),
        )
        for index, chunk in enumerate(chunks):
            self.client.publish(self.tree.chunk(0, index), chunk, wait=5)
        self.client.publish(self.tree.aggregator_status(), self._encode(status), wait=5)
        self.client.publish(self.tree.manifest(), self._encode(manifest), wait=5)
        return manifest

    def _encode(self, body: object) -> bytes:
        return encode(envelope(body, sender="aggregator", sent_at=time.time()))  # type: ignore[arg-type]

    def drain(self, done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + WAIT
        while not done() and (left := deadline - time.monotonic()) > 0:
            try:
                item = self.client.inbox.get(timeout=min(left, 0.2))
            except queue.Empty:
                continue
            if not isinstance(item, Message):
                continue
            received = receive(item.topic, item.payload, topics=self.tree, max_bytes=LIMIT)
            if not isinstance(received, Inbound):
                continue
            self._take(received, item.payload)

    def _take(self, received: Inbound, payload: bytes) -> None:
        body = received.body
        node = received.topic.node or ""
        match body:
            case Update():
                self.updates.setdefault(node, []).append(payload)
            case SecAggReceipt():
                for update_id in body.update_ids:
                    self.receipts.setdefault(update_id, set()).add(node)
            case SecAggAnswer():
                self.answers[node] = body
            case NodeStatus():
                self.statuses[node] = body
            case Evaluation():
                self.evaluated = True
            case SecAggKey():
                self.keys.append(node)
            case _:
                pass

    def update_of(self, node: str, index: int = 0) -> Update:
        got = receive(
            str(self.tree.update(node)),
            self.updates[node][index],
            topics=self.tree,
            max_bytes=LIMIT,
        )
        assert isinstance(got, Inbound)
        assert isinstance(got.body, Update)
        return got.body


def start(
    broker: SecureBroker, root: Path, hospitals: tuple[str, ...]
) -> tuple[threading.Event, list[threading.Thread]]:
    stop = threading.Event()
    threads = [
        threading.Thread(
            target=NodeService(node_settings(broker, h, root)).run, args=(stop,), name=h
        )
        for h in hospitals
    ]
    for thread in threads:
        thread.start()
    return stop, threads


def halt(stop: threading.Event, threads: list[threading.Thread]) -> None:
    stop.set()
    for thread in threads:
        thread.join(WAIT)
        assert not thread.is_alive()


def plaintext_delta(hospital: str, params: dict[str, np.ndarray]) -> np.ndarray:
    """The delta the node's training makes, made again here with its seed."""
    import torch

    data = load_dataset(f"heart-disease:{hospital}")
    result = train(
        build_model(MODEL),
        params,
        data.train_x,
        data.train_y,
        TRAINING,
        seed=_job_seed(0, hospital, 0),
        device=torch.device("cpu"),
    )
    return np.concatenate(
        [(result.params[n].astype(np.float64) - params[n]).reshape(-1) for n in params]
    )


def test_node_services_mask_share_hold_and_answer_and_the_weighted_sum_unmasks(
    broker: SecureBroker, tmp_path: Path
) -> None:
    """Four real nodes under the policy: each masked update carries no plaintext, every holder
    receipts every update, three answers unmask the weighted sum of the four deltas; a node
    started again over its state dir resends its update and shares byte for byte."""
    root = tmp_path / "nodes"
    params = model_params(build_model(MODEL, seed=1))
    with ExitStack() as stack:
        aggregator = Aggregator(broker, stack)
        stop, threads = start(broker, root, HOSPITALS)
        try:
            aggregator.publish_version(params)
            aggregator.drain(
                lambda: (
                    len(aggregator.updates) == len(HOSPITALS)
                    and len(aggregator.receipts) == len(HOSPITALS)
                    and all(r == set(HOSPITALS) for r in aggregator.receipts.values())
                )
            )
        finally:
            halt(stop, threads)
        assert sorted(aggregator.updates) == sorted(HOSPITALS)
        updates = {h: aggregator.update_of(h) for h in HOSPITALS}
        for update in updates.values():
            assert update.delta == ()
            assert update.masked is not None
            assert update.masked.policy_digest == POLICY.digest()
        assert {u.update_id: set(HOSPITALS) for u in updates.values()} == aggregator.receipts
        status = aggregator.statuses["va"].secure_aggregation
        assert status is not None
        assert (status.policy_digest, status.waiting_for_keys) == (POLICY.digest(), ())

        unmask_from_restarted_holders(broker, root, aggregator, updates, params)
        a_restarted_node_resends_the_same_bytes(broker, root, aggregator, updates)


def unmask_from_restarted_holders(
    broker: SecureBroker,
    root: Path,
    aggregator: Aggregator,
    updates: dict[str, Update],
    params: dict[str, np.ndarray],
) -> None:
    """The aggregator's fold with staleness-like weights; three holders, started again over
    their state dirs, answer; the sum unmasks to the weighted sum of the plaintext deltas."""
    coefficients = dict(zip(HOSPITALS, (1.0, 0.5, 0.8, 0.25), strict=True))
    masked = {h: from_bytes(bytes(u.masked.elements), SIZE) for h, u in updates.items() if u.masked}
    fold = plan_fold(
        POLICY,
        "fold-1",
        [
            PendingMasked(
                u.update_id,
                h,
                coefficients[h],
                masked[h],
                frozenset(aggregator.receipts[u.update_id]),
            )
            for h, u in updates.items()
        ],
    )
    assert not isinstance(fold, str), fold
    request = encode(envelope(to_unmask(fold.request()), sender="aggregator", sent_at=1.0))
    asked = ("hungarian", "switzerland", "va")
    aggregator.statuses.clear()
    stop, threads = start(broker, root, asked)
    try:
        # Their sessions are not persistent: a request before they listen would be lost.
        aggregator.drain(lambda: all(_listening(aggregator.statuses.get(h)) for h in asked))
        for holder in asked:
            aggregator.client.publish(aggregator.tree.secagg_unmask(holder), request)
        aggregator.drain(lambda: set(aggregator.answers) == set(asked))
    finally:
        halt(stop, threads)
    answers = []
    for holder in asked:
        answer = aggregator.answers[holder]
        assert answer.share_sum is not None, answer.refusal
        answers.append(UnmaskAnswer(fold.fold_id, holder, bytes(answer.share_sum)))
    total = unmask(POLICY, fold, {updates[h].update_id: m for h, m in masked.items()}, answers)
    expected = sum(w * plaintext_delta(h, params) for h, w in coefficients.items())
    # Integer weights round each coefficient by at most max / (2W); quantization adds at most
    # one level per update.
    rounding = max(coefficients.values()) / (2 * POLICY.weight_levels)
    bound = sum(coefficients.values()) * POLICY.plan.resolution + rounding * 4 * POLICY.clip
    assert np.abs(total - expected).max() <= bound


def a_restarted_node_resends_the_same_bytes(
    broker: SecureBroker, root: Path, aggregator: Aggregator, updates: dict[str, Update]
) -> None:
    """cleveland, started again over its state dir, resends its update byte for byte, and its
    shares as first sealed: hungarian, which holds the first share, receipts the resent one
    again (a different share of the same update id would be refused, never receipted)."""
    first = aggregator.updates["cleveland"][0]
    update_id = updates["cleveland"].update_id
    aggregator.updates.clear()
    aggregator.receipts.clear()
    aggregator.statuses.clear()
    stop, threads = start(broker, root, ("hungarian",))
    try:
        aggregator.drain(lambda: _listening(aggregator.statuses.get("hungarian")))
        assert _listening(aggregator.statuses.get("hungarian"))
        more_stop, more = start(broker, root, ("cleveland",))
        threads += more
        try:
            aggregator.drain(
                lambda: (
                    bool(aggregator.updates.get("cleveland"))
                    and "hungarian" in aggregator.receipts.get(update_id, set())
                )
            )
        finally:
            more_stop.set()
    finally:
        halt(stop, threads)
    assert aggregator.updates["cleveland"][0] == first
    assert aggregator.receipts[update_id] == {"hungarian"}


def _listening(status: NodeStatus | None) -> bool:
    """The node holds the version and is under the policy: subscribed to its shares."""
    return (
        status is not None
        and status.state is not NodeState.OFFLINE
        and status.secure_aggregation is not None
    )


def publish_records(broker: SecureBroker, root: Path, hospitals: tuple[str, ...]) -> None:
    """``hospitals`` publish their signed key records, as their nodes would, and go."""
    tree = TopicTree(broker.federation)
    for hospital in hospitals:
        settings = broker.settings(hospital)
        record = own_key_record(
            federation=broker.federation,
            identity=hospital,
            agreement_key=load_agreement_key(root / hospital),
            cert_file=settings.cert_file,
            key_file=settings.key_file,
            ca_file=settings.ca_file,
            now=dt.datetime.now(dt.UTC),
        )
        with broker.client(hospital) as client:
            publish_key_record(client, tree, record, sent_at=time.time())
            assert client.flush(WAIT)


def next_payload(client: MqttClient) -> bytes:
    deadline = time.monotonic() + WAIT
    while (left := deadline - time.monotonic()) > 0:
        try:
            item = client.inbox.get(timeout=min(left, 0.2))
        except queue.Empty:
            continue
        if isinstance(item, Message):
            return item.payload
    raise AssertionError(f"nothing arrived within {WAIT}s")


def test_a_node_killed_after_sending_resends_the_same_bytes(
    broker: SecureBroker, tmp_path: Path
) -> None:
    """cleveland's node process masks and sends its update, unacknowledged, and is killed
    (SIGKILL); started again it resends the update and its share to hungarian, byte for byte."""
    root = tmp_path / "nodes"
    publish_records(broker, tmp_path / "peers", ("hungarian", "switzerland", "va"))
    params = model_params(build_model(MODEL, seed=1))
    with ExitStack() as stack, ProcessGroup(tmp_path / "logs") as group:
        aggregator = Aggregator(broker, stack)
        # hungarian's node is not running: its identity reads what cleveland shares with it.
        hungarian = stack.enter_context(broker.client("hungarian"))
        hungarian.subscribe(aggregator.tree.secagg_share("hungarian", "cleveland"))
        aggregator.publish_version(params)
        node = group.start_service("cleveland", node_settings(broker, "cleveland", root))
        aggregator.drain(lambda: bool(aggregator.updates.get("cleveland")))
        first_share = next_payload(hungarian)
        node.signal(signal.SIGKILL)
        assert node.wait(WAIT) is not None
        (first,) = aggregator.updates.pop("cleveland")

        group.start_service("cleveland", node_settings(broker, "cleveland", root))
        aggregator.drain(lambda: bool(aggregator.updates.get("cleveland")))
        again_share = next_payload(hungarian)
    assert aggregator.updates["cleveland"][0] == first
    assert again_share == first_share
    update = aggregator.update_of("cleveland")
    assert update.masked is not None
    assert update.delta == ()


def test_a_node_without_a_client_certificate_trains_nothing_under_the_policy_and_says_why(
    mosquitto: EmbeddedBroker, tmp_path: Path
) -> None:
    """A password-mode node (no client certificate to sign its key with) gets a version under
    the policy: its status names the reason and `--auth mtls`, it publishes no key record, and
    it still evaluates the version."""
    federation = f"nocert{uuid.uuid4().hex[:8]}"
    settings = NodeSettings(
        broker_url=mosquitto.url,
        federation=federation,
        node_id="va",
        data="heart-disease:va",
        state_dir=tmp_path / "va",
        torch_threads=1,
        device="cpu",
    )
    with ExitStack() as stack:
        aggregator = Aggregator(None, stack, plain=(mosquitto.url, federation))
        aggregator.client.subscribe(aggregator.tree.all_node_evals())
        stop = threading.Event()
        thread = threading.Thread(target=NodeService(settings).run, args=(stop,), name="va")
        thread.start()
        try:
            aggregator.publish_version(model_params(build_model(MODEL, seed=1)))
            aggregator.drain(lambda: "--auth mtls" in _failure(aggregator.statuses.get("va")))
            aggregator.drain(lambda: aggregator.evaluated)
        finally:
            halt(stop, [thread])
    failure = _failure(aggregator.statuses.get("va"))
    assert "cannot join secure aggregation" in failure
    assert "--auth mtls" in failure
    assert aggregator.evaluated
    assert not aggregator.keys
    assert "va" not in aggregator.updates


def _failure(status: NodeStatus | None) -> str:
    return "" if status is None else status.failure


def test_a_holder_down_when_a_share_was_sent_gets_it_when_it_comes_back(
    broker: SecureBroker, tmp_path: Path
) -> None:
    """va is down while cleveland sends its update, which is acked: the share for va is lost
    (va's session is not persistent). When va's node starts and publishes its key record,
    cleveland sends it that share again, and va stores and receipts it."""
    root = tmp_path / "nodes"
    publish_records(broker, tmp_path / "peers", ("hungarian", "switzerland"))
    # va's record from the key its node will use, as a va that ran before would have left it.
    va = broker.settings("va")
    record = own_key_record(
        federation=broker.federation,
        identity="va",
        agreement_key=load_agreement_key(root / "va" / "secagg"),
        cert_file=va.cert_file,
        key_file=va.key_file,
        ca_file=va.ca_file,
        now=dt.datetime.now(dt.UTC),
    )
    with broker.client("va") as client:
        publish_key_record(client, TopicTree(broker.federation), record, sent_at=time.time())
        assert client.flush(WAIT)
    params = model_params(build_model(MODEL, seed=1))
    with ExitStack() as stack:
        aggregator = Aggregator(broker, stack)
        aggregator.publish_version(params)
        stop, threads = start(broker, root, ("cleveland",))
        try:
            aggregator.drain(lambda: bool(aggregator.updates.get("cleveland")))
            update_id = aggregator.update_of("cleveland").update_id
            ack = Ack(update_id=update_id, accepted=True, current_version=0)
            aggregator.client.publish(aggregator.tree.ack("cleveland"), aggregator._encode(ack))
            bundle = root / "cleveland" / "secagg" / "outgoing" / f"{update_id}.outgoing"
            deadline = time.monotonic() + WAIT
            while b'"acked":true' not in bundle.read_bytes() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert b'"acked":true' in bundle.read_bytes()  # settled: no resend of the update
            assert "va" not in aggregator.receipts.get(update_id, set())

            more_stop, more = start(broker, root, ("va",))
            threads += more
            try:
                aggregator.drain(lambda: "va" in aggregator.receipts.get(update_id, set()))
            finally:
                more_stop.set()
        finally:
            halt(stop, threads)
    assert aggregator.receipts[update_id] == {"cleveland", "va"}
    assert len(aggregator.updates["cleveland"]) == 1  # the update itself was not sent again
