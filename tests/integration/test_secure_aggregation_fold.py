"""The aggregator service folds masked updates over a real Mosquitto with `healthnet deploy init
--auth mtls`'s files. Four hospitals, driven here as their services would drive them (signed
key records, masks shared and sealed with ``mask_for_upload``, ``ShareHolder`` files, receipts,
answers), send masked updates to the real :class:`AggregatorService`: its version is the
plaintext staleness-weighted fold within quantization error, a contributor that drops out after
sending does not block it, a plaintext update is refused, and an aggregator stopped between its
fold plan and the answers asks the same plan again after its restart and folds it once.

Waits are bounded (a message that has not arrived within WAIT never will); nothing asserts on
how long anything took.
"""

from __future__ import annotations

import json
import queue
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from aggregator.aggregation import StalenessPolicy, buffer_weights
from aggregator.core import AggregatorCore
from aggregator.journal import Journal
from aggregator.settings import AggregatorSettings
from common.codec import encode, envelope
from common.compression import dense_tensor
from common.inbound import Inbound, receive
from common.messages import (
    Ack,
    AggregatorStatus,
    ControlCommand,
    ControlRequest,
    Knobs,
    Manifest,
    MaskedDelta,
    RejectReason,
    SecureAggregation,
    TrainMetrics,
    Update,
    VersionRecord,
)
from common.mqtt import Message, MqttClient
from common.secure_aggregation.directory import KeyDirectory
from common.secure_aggregation.events import Receipt, UnmaskRequest
from common.secure_aggregation.wire import WireRefusal, to_answer, unmask_of
from common.topics import Role, Route, TopicTree
from edge_node.secure_holder import ShareHolder, load_agreement_key, mask_for_upload
from edge_node.secure_shares import ShareInbox, publish_receipts, publish_shares
from healthnet.deploy import AuthMode
from tests.aggregator.test_service import MODEL, Aggregator
from tests.integration.test_secure_aggregation_keys import directory_of, publish_own_records
from tests.secure import HOSPITALS, SecureBroker, secure_broker

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]

WAIT = 15.0  # seconds
LIMIT = 1 << 20
SECURE = SecureAggregation(holders=HOSPITALS)  # T = 1, U = 3: sums of at least 3 hospitals
POLICY = SECURE.policy()
KNOBS = Knobs(buffer_size=3, secure_aggregation=SECURE)
# One quantization level: each term of an unmasked sum is within one of its exact value.
LEVEL = POLICY.plan.clip / POLICY.plan.levels

T = TypeVar("T")
# MODEL's tensors (a 3-feature logistic regression), in the model's order.
PARAMS = {"1.weight": np.zeros((2, 3), np.float32), "1.bias": np.zeros(2, np.float32)}


@dataclass
class Hospital:
    """One hospital's secure aggregation, as its service would run it: its key directory, its
    share files, receipts and answers out; what the aggregator says to it, kept."""

    identity: str
    root: Path
    client: MqttClient
    tree: TopicTree
    keys: KeyDirectory
    inbox: ShareInbox
    aggregator: str
    answering: bool = True
    requests: list[UnmaskRequest] = field(default_factory=list)
    acks: dict[str, Ack] = field(default_factory=dict)
    manifests: list[Manifest] = field(default_factory=list)

    def take(self, inbound: Inbound) -> None:
        receipts: tuple[Receipt, ...] = ()
        body = inbound.body
        match inbound.topic.route:
            case Route.SECAGG_KEY:
                proven = isinstance(self.keys.offer(inbound), X25519PublicKey)
                if proven and inbound.topic.node:
                    receipts = self.inbox.key_proven(inbound.topic.node)
            case Route.SECAGG_SHARE:
                receipts = self.inbox.take(inbound)
            case Route.SECAGG_UNMASK:
                request = unmask_of(inbound, self.aggregator)
                assert not isinstance(request, WireRefusal), request
                self.requests.append(request)
                if self.answering:
                    self.answer(request)
            case Route.ACK if isinstance(body, Ack):
                self.acks[body.update_id] = body
            case Route.MANIFEST if isinstance(body, Manifest):
                self.manifests.append(body)
            case _:
                pass
        publish_receipts(self.client, self.tree, POLICY.digest(), receipts, sent_at=time.time())

    def answer(self, request: UnmaskRequest) -> None:
        answer = self.inbox.holder.answer(request)
        self.client.publish(
            self.tree.secagg_answer(self.identity),
            encode(envelope(to_answer(answer), sender=self.identity, sent_at=time.time())),
        )

    def send(
        self, update_id: str, delta: np.ndarray, *, base_version: int, num_samples: int, seed: int
    ) -> None:
        """Mask ``delta``, keep the own share, send the others, then the masked update."""
        others = [h for h in HOSPITALS if h != self.identity]
        holder_keys = {h: k for h in others if (k := self.keys.key(h)) is not None}
        secure = mask_for_upload(
            delta,
            policy=POLICY,
            federation=self.tree.federation,
            identity=self.identity,
            own_key=load_agreement_key(self.root),
            holder_keys=holder_keys,
            update_id=update_id,
            base_version=base_version,
            num_samples=num_samples,
            rng=np.random.default_rng(seed),
            random_bytes=np.random.default_rng(seed + 1).bytes,
        )
        own = self.inbox.holder.keep_own(update_id, secure.own_share)
        publish_receipts(self.client, self.tree, POLICY.digest(), (own,), sent_at=time.time())
        publish_shares(self.client, self.tree, secure.shares, sent_at=time.time())
        update = Update(
            update_id=update_id,
            run_id=self.manifests[-1].run_id,
            base_version=base_version,
            num_samples=num_samples,
            metrics=TrainMetrics(loss=0.5, accuracy=0.5, seconds=0.1),
            delta=(),
            masked=MaskedDelta(policy_digest=POLICY.digest(), elements=secure.upload.masked),
        )
        self.publish_update(update)

    def publish_update(self, update: Update) -> None:
        payload = encode(envelope(update, sender=self.identity, sent_at=time.time()))
        self.client.publish(self.tree.update(self.identity), payload)


@dataclass
class Federation:
    broker: SecureBroker
    tree: TopicTree
    hospitals: dict[str, Hospital]
    operator: MqttClient
    records: list[VersionRecord] = field(default_factory=list)
    statuses: list[AggregatorStatus] = field(default_factory=list)
    aggregator: Aggregator | None = None

    def pump(self, probe: Callable[[], T | None], what: str) -> T:
        """Hand every message each party receives to it until ``probe`` gives something."""
        deadline = time.monotonic() + WAIT
        while (found := probe()) is None:
            if self.aggregator is not None:
                self.aggregator.check_alive()
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {WAIT}s")
            idle = True
            for hospital in self.hospitals.values():
                for inbound in _drain(hospital.client, self.tree):
                    hospital.take(inbound)
                    idle = False
            for inbound in _drain(self.operator, self.tree):
                idle = False
                if isinstance(inbound.body, VersionRecord):
                    self.records.append(inbound.body)
                elif isinstance(inbound.body, AggregatorStatus):
                    self.statuses.append(inbound.body)
            if idle:
                time.sleep(0.02)
        return found

    def record(self, version: int) -> VersionRecord:
        return self.pump(
            lambda: next((r for r in self.records if r.version == version), None),
            f"record of v{version}",
        )

    def start_aggregator(self, state_dir: Path) -> Aggregator:
        settings = AggregatorSettings(
            _env_file=self.broker.deployment.env_files["aggregator"],
            state_dir=state_dir,
            run_id=f"run-{self.broker.federation}",
            model=MODEL,
            knobs=KNOBS,
            status_interval=0.2,
            connect_timeout=WAIT,
        )
        self.aggregator = Aggregator(settings)
        for hospital in self.hospitals.values():
            hospital.aggregator = settings.mqtt_client_id()
        return self.aggregator


def _drain(client: MqttClient, tree: TopicTree) -> list[Inbound]:
    taken: list[Inbound] = []
    while True:
        try:
            item = client.inbox.get_nowait()
        except queue.Empty:
            return taken
        if isinstance(item, Message) and item.payload:
            received = receive(item.topic, item.payload, topics=tree, max_bytes=LIMIT)
            if isinstance(received, Inbound):
                taken.append(received)


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Federation]:
    """The deployment's broker, the four hospitals' records published and proven by each
    other, their clients subscribed as their services would be, and an operator watching."""
    name = f"fold{uuid.uuid4().hex[:8]}"
    with (
        secure_broker(tmp_path, auth=AuthMode.MTLS, federation=name) as broker,
        ExitStack() as stack,
    ):
        nodes = tmp_path / "nodes"
        publish_own_records(broker, nodes)
        tree = TopicTree(broker.federation)
        hospitals = {}
        for identity in HOSPITALS:
            holder = stack.enter_context(
                ShareHolder(
                    nodes / identity / "holder",
                    federation=broker.federation,
                    identity=identity,
                    policy=POLICY,
                    size=8,  # MODEL: a 3-feature logistic regression, weight (2, 3), bias (2,)
                    own_key=load_agreement_key(nodes / identity),
                )
            )
            keys = directory_of(broker, identity)
            client = broker.client(identity, f"{identity}.node")
            for topic_filter in tree.subscriptions(
                Role.HOSPITAL, identity, secure_aggregation=True
            ):
                client.subscribe(topic_filter)
            stack.enter_context(client)
            hospitals[identity] = Hospital(
                identity, nodes / identity, client, tree, keys, ShareInbox(holder, keys), ""
            )
        operator = broker.client("operator", "operator.watch")
        operator.subscribe(tree.versions())
        operator.subscribe(tree.aggregator_status())
        stack.enter_context(operator)
        running = Federation(broker, tree, hospitals, operator)
        running.pump(
            lambda: (
                True if all(not h.keys.missing(HOSPITALS) for h in hospitals.values()) else None
            ),
            "every hospital's key proven by every other",
        )
        yield running
        if running.aggregator is not None:
            running.aggregator.stop()


def deltas(seed: int, like: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1000 + seed)
    return {k: rng.uniform(-0.5, 0.5, v.shape).astype(np.float32) for k, v in like.items()}


def flat(delta: dict[str, np.ndarray]) -> np.ndarray:
    """The delta as a masked update carries it: the model's tensors in their order."""
    return np.concatenate([t.reshape(-1) for t in delta.values()])


def expected_step(
    sent: list[tuple[dict[str, np.ndarray], int, int]],
) -> dict[str, np.ndarray]:
    """Σ w_i Δ_i of the plaintext rule: (delta, samples, staleness) of each update, in order."""
    knobs = KNOBS
    weights = buffer_weights(
        [samples for _, samples, _ in sent],
        [staleness for _, _, staleness in sent],
        StalenessPolicy(knobs.staleness, knobs.staleness_a, knobs.staleness_b),
        knobs.sample_exponent,
    )
    names = sent[0][0].keys()
    return {
        name: np.sum(
            [
                w * delta[name].astype(np.float64)
                for (delta, _, _), w in zip(sent, weights, strict=True)
            ],
            axis=0,
        )
        for name in names
    }


def params_now(aggregator: Aggregator) -> dict[str, np.ndarray]:
    return {k: np.array(v, dtype=np.float64) for k, v in aggregator.service.core.params.items()}


def test_the_version_is_the_staleness_weighted_sum_and_a_contributor_may_drop_out(
    federation: Federation, tmp_path: Path
) -> None:
    """v1 from cleveland, hungarian and switzerland, which then drops out for good; v2 from
    cleveland and hungarian at v1 and va at v0 (staleness 1), with three holders answering.
    Each version is the plaintext staleness-weighted fold within quantization error, and
    says it was securely aggregated."""
    aggregator = federation.start_aggregator(tmp_path / "aggregator")
    hospitals = federation.hospitals
    federation.pump(
        lambda: True if all(h.manifests for h in hospitals.values()) else None, "v0's manifest"
    )
    assert hospitals["va"].manifests[-1].secure_aggregation == SECURE
    v0 = params_now(aggregator)

    first = [("cleveland", 100), ("hungarian", 140), ("switzerland", 60)]
    sent = []
    for seed, (name, samples) in enumerate(first):
        delta = deltas(seed, v0)
        hospitals[name].send(
            f"a-{name}", flat(delta), base_version=0, num_samples=samples, seed=seed
        )
        sent.append((delta, samples, 0))
    federation.pump(
        lambda: True if all(f"a-{n}" in hospitals[n].acks for n, _ in first) else None, "acks"
    )
    assert all(hospitals[n].acks[f"a-{n}"].accepted for n, _ in first)
    # switzerland drops out: it answers nothing from now on, and holds no later share.
    gone = hospitals.pop("switzerland")
    gone.client.__exit__(None, None, None)

    record = federation.record(1)
    assert record.secure_fold_id is not None
    # Folded in the order they arrived, which three clients do not fix.
    assert sorted(c.update_id for c in record.contributions) == sorted(f"a-{n}" for n, _ in first)
    v1 = params_now(aggregator)
    step = expected_step(sent)
    for name in v0:
        np.testing.assert_allclose(v1[name] - v0[name], step[name], atol=3 * LEVEL + 1e-6)

    federation.pump(
        lambda: True if all(h.manifests[-1].version == 1 for h in hospitals.values()) else None,
        "v1's manifest",
    )
    second = [("cleveland", 1, 80), ("hungarian", 1, 120), ("va", 0, 200)]
    sent = []
    for seed, (name, base, samples) in enumerate(second, start=10):
        delta = deltas(seed, v0)
        hospitals[name].send(
            f"b-{name}", flat(delta), base_version=base, num_samples=samples, seed=seed
        )
        sent.append((delta, samples, 1 - base))
    record = federation.record(2)
    assert record.secure_fold_id is not None
    assert {c.update_id: c.staleness for c in record.contributions} == {
        "b-cleveland": 0,
        "b-hungarian": 0,
        "b-va": 1,
    }
    v2 = params_now(aggregator)
    step = expected_step(sent)
    for name in v0:
        np.testing.assert_allclose(v2[name] - v1[name], step[name], atol=3 * LEVEL + 1e-6)
    status = federation.pump(
        lambda: next((s for s in federation.statuses[::-1] if s.version == 2), None),
        "status at v2",
    )
    assert status.counters.folded == 6
    assert status.secure_plan is None
    assert status.awaiting_receipts == 0


def test_a_plaintext_update_under_the_policy_is_refused(
    federation: Federation, tmp_path: Path
) -> None:
    federation.start_aggregator(tmp_path / "aggregator")
    cleveland = federation.hospitals["cleveland"]
    federation.pump(lambda: True if cleveland.manifests else None, "v0's manifest")
    update = Update(
        update_id="plain-1",
        run_id=cleveland.manifests[-1].run_id,
        base_version=0,
        num_samples=10,
        metrics=TrainMetrics(loss=0.5, accuracy=0.5, seconds=0.1),
        delta=(
            dense_tensor("1.weight", np.zeros((2, 3), np.float32)),
            dense_tensor("1.bias", np.zeros(2, np.float32)),
        ),
    )
    cleveland.publish_update(update)
    ack = federation.pump(lambda: cleveland.acks.get("plain-1"), "the plaintext update's ack")
    assert not ack.accepted
    assert ack.reason is RejectReason.SECURE_AGGREGATION
    status = federation.pump(
        lambda: next((s for s in federation.statuses[::-1] if s.counters.rejected), None),
        "a status counting the refusal",
    )
    assert status.counters.rejections == {"secure_aggregation": 1}


def test_an_aggregator_stopped_between_plan_and_answers_asks_the_same_plan_and_folds_it_once(
    federation: Federation, tmp_path: Path
) -> None:
    """The holders hold their answers; the aggregator, asked for nothing more, is stopped and
    started again over the same state: it asks the same fold id with the same weights, folds
    it into v1 once, and never asks for another sum of those updates."""
    state = tmp_path / "aggregator"
    aggregator = federation.start_aggregator(state)
    hospitals = federation.hospitals
    for hospital in hospitals.values():
        hospital.answering = False
    federation.pump(
        lambda: True if all(h.manifests for h in hospitals.values()) else None, "v0's manifest"
    )
    v0 = params_now(aggregator)
    names = ["cleveland", "hungarian", "va"]
    for seed, name in enumerate(names):
        hospitals[name].send(
            f"r-{name}", flat(deltas(seed, v0)), base_version=0, num_samples=50, seed=seed
        )
    plan_status = federation.pump(
        lambda: next((s.secure_plan for s in federation.statuses[::-1] if s.secure_plan), None),
        "the open plan in the status",
    )
    # The plan asks the holders that had receipted all three updates when it was made.
    asked_holders = [hospitals[h] for h in plan_status.holders]
    assert len(asked_holders) >= POLICY.scheme.threshold
    federation.pump(
        lambda: True if all(h.requests for h in asked_holders) else None,
        "the fold plan's requests",
    )
    (first,) = {(r.fold_id, r.terms) for h in hospitals.values() for r in h.requests}
    assert plan_status.fold_id == first[0]
    aggregator.stop()

    for hospital in hospitals.values():
        hospital.requests.clear()
        hospital.answering = True
    restarted = federation.start_aggregator(state)
    record = federation.record(1)
    assert record.secure_fold_id == first[0]
    asked = {(r.fold_id, r.terms) for h in hospitals.values() for r in h.requests}
    assert asked == {first}
    assert restarted.service.core.counters().folded == 3
    assert restarted.service.core.open_plan is None
    assert [r.version for r in federation.records] == [1]


class Crash(Exception):
    """The aggregator dies here (the journal tests' way of killing it between two writes)."""


def test_an_aggregator_killed_after_logging_a_secure_version_makes_it_again_without_asking(
    federation: Federation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """v1 is in versions.jsonl, then the aggregator dies before its checkpoint and before it
    announces anything. The restart makes v1 again from the answers it recorded, with the same
    model, asks no holder again and folds nothing twice."""
    state = tmp_path / "aggregator"
    original = Journal.checkpoint

    def dies_after_v1(journal: Journal, core: AggregatorCore) -> None:
        if core.version >= 1:
            raise Crash
        original(journal, core)

    monkeypatch.setattr(Journal, "checkpoint", dies_after_v1)
    aggregator = federation.start_aggregator(state)
    hospitals = federation.hospitals
    federation.pump(
        lambda: True if all(h.manifests for h in hospitals.values()) else None, "v0's manifest"
    )
    v0 = params_now(aggregator)
    for seed, name in enumerate(["cleveland", "hungarian", "va"]):
        hospitals[name].send(
            f"k-{name}", flat(deltas(seed, v0)), base_version=0, num_samples=50, seed=seed
        )
    federation.aggregator = None  # it is to die: pump the hospitals' side until it has
    federation.pump(
        lambda: True if not aggregator.thread.is_alive() else None, "the aggregator's death"
    )
    assert isinstance(aggregator.error, Crash)
    logged = [json.loads(line) for line in (state / "versions.jsonl").read_text().splitlines()]
    assert [r["version"] for r in logged] == [1]
    assert sum(len(h.requests) for h in hospitals.values()) >= POLICY.scheme.threshold

    monkeypatch.setattr(Journal, "checkpoint", original)
    restarted = federation.start_aggregator(state)
    manifest = federation.pump(
        lambda: next((m for m in hospitals["va"].manifests if m.version == 1), None),
        "v1's manifest after the restart",
    )
    assert manifest.sha256 == logged[0]["model_sha256"]
    # Each holder was asked once, before the kill (a request still on its way then may
    # arrive late, never a second one): the restart asked no one.
    assert all(len(h.requests) <= 1 for h in hospitals.values())
    assert {r.fold_id for h in hospitals.values() for r in h.requests} == {
        logged[0]["secure_fold_id"]
    }
    core = restarted.service.core
    assert core.version == 1
    assert core.counters().folded == 3
    assert core.open_plan is None
    assert core.buffer == ()


def test_the_operator_abandons_a_plan_that_cannot_complete(
    federation: Federation, tmp_path: Path
) -> None:
    """No holder answers: the plan stays open and shows in the status until the operator
    abandons it; its nodes hear that their updates were discarded, and the next updates are
    planned anew."""
    federation.start_aggregator(tmp_path / "aggregator")
    hospitals = federation.hospitals
    for hospital in hospitals.values():
        hospital.answering = False
    federation.pump(
        lambda: True if all(h.manifests for h in hospitals.values()) else None, "v0's manifest"
    )
    names = ["cleveland", "hungarian", "va"]
    for seed, name in enumerate(names):
        hospitals[name].send(
            f"x-{name}", flat(deltas(seed, PARAMS)), base_version=0, num_samples=50, seed=seed
        )
    stuck = federation.pump(
        lambda: next((s.secure_plan for s in federation.statuses[::-1] if s.secure_plan), None),
        "the open plan in the status",
    )
    request = ControlRequest(request_id="abandon-1", command=ControlCommand.ABANDON_PLAN)
    federation.operator.publish(
        federation.tree.control_requests(),
        encode(envelope(request, sender="operator", sent_at=time.time())),
    )
    federation.pump(
        lambda: (
            True
            if all(
                (a := hospitals[n].acks.get(f"x-{n}")) is not None and not a.accepted for n in names
            )
            else None
        ),
        "the discarded acks",
    )
    assert all(hospitals[n].acks[f"x-{n}"].reason is RejectReason.DISCARDED for n in names)
    status = federation.pump(
        lambda: next((s for s in federation.statuses[::-1] if s.counters.discarded), None),
        "a status counting the discarded updates",
    )
    assert status.secure_plan is None
    assert status.counters.discarded == 3

    for hospital in hospitals.values():
        hospital.answering = True
    for seed, name in enumerate(names, start=5):
        hospitals[name].send(
            f"y-{name}", flat(deltas(seed, PARAMS)), base_version=0, num_samples=50, seed=seed
        )
    record = federation.record(1)
    assert record.secure_fold_id not in (None, stuck.fold_id)
    assert sorted(c.update_id for c in record.contributions) == [f"y-{n}" for n in sorted(names)]
