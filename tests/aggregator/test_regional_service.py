"""Specification of the regional aggregator's shell: its pure decisions (resends, knobs, settings),
and the service on a real Mosquitto, driven by fake hospitals and a fake core."""

from __future__ import annotations

import queue
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from aggregator.core import AggregatorCore
from aggregator.regional_service import RegionalService, Resends
from aggregator.regional_settings import RegionalSettings, core_conflicts, regional_knobs
from aggregator.update_log import read_update_log, update_fates
from common.codec import decode, encode, envelope
from common.compression import dense_tensor
from common.messages import (
    Ack,
    AggregatorState,
    Body,
    Knobs,
    ModelSpec,
    PrivacyPolicy,
    TrainMetrics,
    Update,
)
from common.models import build_model, model_params
from common.mqtt import Message, MqttClient
from common.outbox import Outbox
from common.topics import Topic, TopicTree
from healthnet.deploy.regions import Region, regional_aggregator_topics
from tests.brokers import EmbeddedBroker

WAIT = 15.0  # seconds; every wait on the broker is bounded by it
QUIET = 1.5  # seconds to watch for a message that must not come
MODEL = ModelSpec(name="logreg", kwargs={"in_features": 3, "num_classes": 2})
RUN = "run-regional"


# -- pure decisions


def test_a_combined_update_is_due_at_once_then_after_each_ack_timeout() -> None:
    resends = Resends(ack_timeout=10.0)
    resends.queued("c1")
    assert resends.due(now=0.0) == ["c1"]
    assert resends.next_due() == 0.0
    resends.sent("c1", now=0.0)
    assert resends.due(now=9.9) == []
    assert resends.next_due() == 10.0
    assert resends.due(now=10.0) == ["c1"]


def test_a_reconnect_makes_every_unanswered_update_due_and_an_ack_ends_it() -> None:
    resends = Resends(ack_timeout=60.0)
    for uid in ("c1", "c2"):
        resends.queued(uid)
        resends.sent(uid, now=0.0)
    resends.reconnected()
    assert resends.due(now=1.0) == ["c1", "c2"]
    resends.acked("c1")
    resends.acked("unknown")  # an ack for a resend's twin, or an old one: nothing to do
    assert resends.due(now=1.0) == ["c2"]
    assert len(resends) == 1


def settings(tmp_path: Path, **overrides: object) -> RegionalSettings:
    fields: dict[str, object] = {"region": "eu", "state_dir": tmp_path / "eu"}
    fields.update(overrides)
    return RegionalSettings(**fields)  # type: ignore[arg-type]


def test_the_region_validates_with_the_cores_knobs_and_its_own_buffer_and_defences(
    tmp_path: Path,
) -> None:
    """Everything but the buffer and the per-hospital defences is the core's."""
    core = Knobs(buffer_size=7, max_staleness=3, staleness_a=0.9, one_update_per_version=False)
    region = regional_knobs(
        core,
        settings(
            tmp_path, buffer_size=2, buffer_timeout=5.0, one_update_per_version=True,
            max_num_samples=500,
        ),
    )  # fmt: skip
    assert (region.buffer_size, region.buffer_timeout) == (2, 5.0)
    assert (region.one_update_per_version, region.max_num_samples) == (True, 500)
    assert (region.max_staleness, region.staleness_a) == (3, 0.9)


@pytest.mark.parametrize(
    ("knobs", "word"),
    [
        pytest.param({"one_update_per_version": True}, "one_update_per_version", id="rate"),
        pytest.param({"max_num_samples": 1000}, "max_num_samples", id="samples"),
        pytest.param(
            {"privacy": PrivacyPolicy(epsilon_budget=5.0, noise_multiplier=1.0)},
            "privacy",
            id="privacy",
        ),
    ],
)
def test_the_core_knobs_that_refuse_every_combined_update_are_named(
    knobs: dict[str, object], word: str
) -> None:
    assert core_conflicts(Knobs()) == []
    (problem,) = core_conflicts(Knobs.model_validate(knobs))
    assert word in problem


def test_its_identity_is_region_and_name_unless_given(tmp_path: Path) -> None:
    assert settings(tmp_path).identity() == "region-eu"
    assert settings(tmp_path, node_id="eu-combiner").identity() == "eu-combiner"


def test_what_it_subscribes_to_covers_what_its_acl_lets_it_read(tmp_path: Path) -> None:
    """Each topic the generated ACL lets region-eu read matches one of its subscriptions, and
    each subscription but updates/+ (which the ACL narrows to the region's hospitals) is one."""
    tree = TopicTree("heart")
    service = RegionalService(settings(tmp_path, federation="heart"))
    filters = [str(s) for s in service.subscriptions()]
    region = Region("eu", ("cleveland", "hungarian"), aggregator="region-eu")
    reads, _ = regional_aggregator_topics(tree, region)
    for topic in reads:
        assert any(_matches(f, topic) for f in filters), topic
    assert set(filters) - set(reads) == {str(tree.all_updates())}


def _matches(topic_filter: str, topic: str) -> bool:
    pattern, levels = topic_filter.split("/"), topic.split("/")
    return len(pattern) == len(levels) and all(
        p in ("+", t) for p, t in zip(pattern, levels, strict=True)
    )


# -- the service on a real broker


class Running:
    """A RegionalService in a thread of this test, stopped through its event."""

    def __init__(self, regional: RegionalSettings) -> None:
        self.service = RegionalService(regional)
        self.stop_event = threading.Event()
        self.result: bool | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="regional-under-test")
        self.thread.start()
        # Its session and subscriptions exist from here: what hospitals publish now waits for it.
        assert self.service.connected.wait(WAIT), "the regional aggregator did not connect"

    def _run(self) -> None:
        try:
            self.result = self.service.run(self.stop_event)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread, which fails on it
            self.error = exc

    def join(self) -> bool | None:
        self.thread.join(WAIT)
        assert not self.thread.is_alive(), "the regional aggregator did not stop within WAIT"
        if self.error is not None:
            raise AssertionError(f"it died: {self.error!r}") from self.error
        return self.result

    def stop(self) -> bool | None:
        self.stop_event.set()
        return self.join()


class Peer:
    """A client of the broker that reads ``reads`` and publishes envelopes as ``name``."""

    def __init__(self, url: str, name: str, reads: list[Topic]) -> None:
        from common.broker_url import BrokerEndpoint

        self.name = name
        self.client = MqttClient(BrokerEndpoint.parse(url), f"{name}-{uuid.uuid4().hex[:6]}")
        for topic in reads:
            self.client.subscribe(topic)
        self.client.start()

    def send(self, topic: Topic, body: Body) -> None:
        payload = encode(envelope(body, sender=self.name, sent_at=time.time()))
        self.client.publish(topic, payload, wait=WAIT)

    def next(self, topic: Topic, timeout: float = WAIT) -> Body | None:
        """The body of the next message on ``topic`` within ``timeout``, else None."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                item = self.client.inbox.get(timeout=left)
            except queue.Empty:
                return None
            if isinstance(item, Message) and item.topic == str(topic) and item.payload:
                return decode(item.payload, max_bytes=1 << 20).body
        return None


@pytest.fixture
def federation(mosquitto: EmbeddedBroker) -> tuple[str, TopicTree]:
    return mosquitto.url, TopicTree(f"rs{uuid.uuid4().hex[:8]}")


def core_at(version: int, state: AggregatorState = AggregatorState.RUNNING) -> AggregatorCore:
    params = model_params(build_model(MODEL, seed=0))
    return AggregatorCore(
        run_id=RUN, params=params, knobs=Knobs(buffer_size=2), version=version, state=state
    )


def publish_core(core_peer: Peer, tree: TopicTree, core: AggregatorCore) -> None:
    """The core's retained status and manifest, as the core aggregator publishes them."""
    now = time.time()
    broadcast = core.broadcast(model=MODEL, chunk_size=1 << 20, now=now)
    core_peer.send(tree.manifest(), broadcast.manifest)
    core_peer.send(tree.aggregator_status(), core.status(now))


def hospital_update(uid: str, base: int, samples: int) -> Update:
    params = model_params(build_model(MODEL, seed=0))
    rng = np.random.default_rng(len(uid))
    return Update(
        update_id=uid,
        run_id=RUN,
        base_version=base,
        num_samples=samples,
        metrics=TrainMetrics(loss=0.5, accuracy=0.7, seconds=1.0),
        delta=tuple(
            dense_tensor(n, rng.normal(0, 0.01, p.shape).astype(np.float32))
            for n, p in params.items()
        ),
    )


@pytest.mark.broker
@pytest.mark.timeout(120)
def test_it_acks_combines_sends_upstream_and_resends_after_a_restart(
    federation: tuple[str, TopicTree], tmp_path: Path
) -> None:
    """An update that comes before the core's run is known waits, unacked; then each hospital is
    acked, two updates go up as one combined update of their summed samples, a restart before
    the core's ack sends the same update again, the core's ack empties the outbox, a resend of a
    combined hospital update is acked as a duplicate, and the core's stop ends the service."""
    url, tree = federation
    regional = settings(
        tmp_path, broker_url=url, federation=tree.federation, buffer_size=2, buffer_timeout=0.0
    )
    cleveland = Peer(url, "cleveland", [tree.ack("cleveland")])
    hungarian = Peer(url, "hungarian", [tree.ack("hungarian")])
    core = Peer(url, "aggregator", [tree.update("region-eu")])
    running = Running(regional)
    try:
        first = hospital_update("c-1", base=3, samples=10)
        cleveland.send(tree.update("cleveland"), first)
        assert cleveland.next(tree.ack("cleveland"), QUIET) is None  # the run is not known yet
        publish_core(core, tree, core_at(3))
        ack = cleveland.next(tree.ack("cleveland"))
        assert isinstance(ack, Ack)
        assert (ack.update_id, ack.accepted, ack.current_version) == ("c-1", True, 3)

        hungarian.send(tree.update("hungarian"), hospital_update("h-1", base=2, samples=30))
        ack = hungarian.next(tree.ack("hungarian"))
        assert isinstance(ack, Ack)
        assert ack.accepted
        combined = core.next(tree.update("region-eu"))
        assert isinstance(combined, Update)
        assert (combined.base_version, combined.num_samples) == (3, 40)
        assert running.stop() is False

        running = Running(regional)  # restarted before the core answered: the outbox resends
        again = core.next(tree.update("region-eu"))
        assert isinstance(again, Update)
        assert again.update_id == combined.update_id
        core.send(
            tree.ack("region-eu"),
            Ack(update_id=combined.update_id, accepted=True, current_version=4),
        )
        deadline = time.monotonic() + WAIT
        outbox = Outbox(regional.state_dir / "outbox")
        while len(outbox) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(outbox) == 0

        cleveland.send(tree.update("cleveland"), first)  # a hospital's resend of a combined one
        ack = cleveland.next(tree.ack("cleveland"))
        assert isinstance(ack, Ack)
        assert (ack.accepted, ack.current_version) == (True, 4)
        assert core.next(tree.update("region-eu"), QUIET) is None

        publish_core(core, tree, core_at(4, AggregatorState.STOPPED))
        assert running.join() is True
    finally:
        running.stop_event.set()
        running.thread.join(WAIT)
        for peer in (cleveland, hungarian, core):
            peer.client.close()
    fates = update_fates(read_update_log(regional.state_dir))
    assert fates["c-1"].accepted
    assert fates["c-1"].duplicates == 1
    assert fates["h-1"].accepted


@pytest.mark.broker
@pytest.mark.timeout(60)
def test_a_refused_hospital_update_is_acked_with_its_reason_and_logged(
    federation: tuple[str, TopicTree], tmp_path: Path
) -> None:
    """An update from a base staler than the core's max_staleness is refused with its reason,
    logged before the ack, and goes nowhere upstream."""
    url, tree = federation
    regional = settings(tmp_path, broker_url=url, federation=tree.federation)
    va = Peer(url, "va", [tree.ack("va")])
    core = Peer(url, "aggregator", [tree.update("region-eu")])
    running = Running(regional)
    try:
        publish_core(core, tree, core_at(30))  # max_staleness is 20 by default
        va.send(tree.update("va"), hospital_update("v-old", base=2, samples=10))
        ack = va.next(tree.ack("va"))
        assert isinstance(ack, Ack)
        assert not ack.accepted
        assert ack.reason is not None
        assert ack.reason.value == "stale"
        assert core.next(tree.update("region-eu"), QUIET) is None
    finally:
        running.stop()
        for peer in (va, core):
            peer.client.close()
    (entry,) = [e for e in read_update_log(regional.state_dir) if e.update_id == "v-old"]
    assert entry.reason == "stale"
