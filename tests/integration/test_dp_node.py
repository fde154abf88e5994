"""DP nodes with a real aggregator on Mosquitto: what is refused, charged, and what is learnt."""

from __future__ import annotations

import contextlib
import json
import queue
import signal
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from aggregator.service import AggregatorService
from aggregator.settings import AggregatorSettings
from common.broker_url import BrokerEndpoint
from common.codec import decode
from common.messages import (
    AggregatorStatus,
    Knobs,
    ModelSpec,
    NodeState,
    NodeStatus,
    PrivacyPolicy,
    Update,
)
from common.mqtt import Message, MqttClient
from common.outbox import Outbox
from common.settings import ConnectionSettings
from common.topics import TopicTree
from edge_node.privacy_ledger import Charge, history_epsilon, read_ledger
from edge_node.sentlog import SentEvent, read_sent_log
from edge_node.service import NodeService
from edge_node.settings import NodeSettings
from healthnet.broker import EmbeddedBroker
from healthnet.control import ControlClient
from healthnet.demo import aggregator_settings, node_settings
from healthnet.federations import HEART_DISEASE
from healthnet.feed import FederationFeed
from healthnet.processes import ProcessGroup
from tests.integration.test_federation import cli, wait_for
from tests.integration.test_observability import free_port, scrape

pytestmark = [pytest.mark.broker]

WAIT = 60.0
LOGREG = ModelSpec(name="logreg", kwargs={"in_features": 13, "num_classes": 2})

# A model with BatchNorm: its statistics mix the examples of a batch, Opacus refuses it.
BATCHNORM_MODEL = textwrap.dedent(
    """
    from torch import nn

    def batchnorm_net(in_features=13, num_classes=2):
        return nn.Sequential(
            nn.Linear(in_features, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, num_classes)
        )
    """
)


class StatusWatch:
    """The statuses a set of nodes publish, as they arrive."""

    def __init__(self, url: str, federation: str, nodes: tuple[str, ...]) -> None:
        self.topics = TopicTree(federation)
        self.client = MqttClient(BrokerEndpoint.parse(url), f"watch-{uuid.uuid4().hex[:8]}")
        for node in nodes:
            self.client.subscribe(self.topics.node_status(node))
        self.latest: dict[str, NodeStatus] = {}

    def poll(self) -> dict[str, NodeStatus]:
        while True:
            try:
                item = self.client.inbox.get(timeout=0.05)
            except queue.Empty:
                return self.latest
            if isinstance(item, Message) and item.payload:
                envelope = decode(item.payload)
                if isinstance(envelope.body, NodeStatus):
                    self.latest[envelope.sender] = envelope.body

    def until(
        self, predicate: Callable[[dict[str, NodeStatus]], bool], what: str, timeout: float = WAIT
    ) -> None:
        wait_for(lambda: predicate(self.poll()), timeout, what)


@pytest.fixture
def federation() -> str:
    return f"dp-{uuid.uuid4().hex[:12]}"


@contextlib.contextmanager
def in_process(
    url: str, federation: str, tmp_path: Path, *, knobs: Knobs, node: NodeSettings, model: ModelSpec
) -> Iterator[ConnectionSettings]:
    aggregator = AggregatorService(
        AggregatorSettings(
            broker_url=url,  # type: ignore[arg-type]
            federation=federation,
            state_dir=tmp_path / "aggregator",
            model=model,
            knobs=knobs,
            status_interval=0.2,
        )
    )
    stop = threading.Event()
    threads = [
        threading.Thread(target=aggregator.run, args=(stop,), name="aggregator"),
        threading.Thread(target=NodeService(node).run, args=(stop,), name="node"),
    ]
    for thread in threads:
        thread.start()
    try:
        yield ConnectionSettings(broker_url=url, federation=federation)  # type: ignore[arg-type]
    finally:
        stop.set()
        for thread in threads:
            thread.join(WAIT)


def failure(statuses: dict[str, NodeStatus], node: str) -> str:
    status = statuses.get(node)
    return "" if status is None else status.failure


def a_node(url: str, federation: str, site: str, tmp_path: Path) -> NodeSettings:
    return NodeSettings(
        broker_url=url,  # type: ignore[arg-type]
        federation=federation,
        node_id=site,
        data=f"heart-disease:{site}",
        state_dir=tmp_path / site,
        torch_threads=1,
    )


def assert_never_trained(settings: ConnectionSettings, state_dir: Path) -> None:
    """No update was made: none in the sent log, none charged, none received."""
    assert retained_status(settings).counters.received == 0
    assert [e for e in read_sent_log(state_dir) if e.event is SentEvent.QUEUED] == []
    assert read_ledger(state_dir / "privacy") == ()


@pytest.mark.timeout(120)
def test_a_delta_not_below_one_over_n_is_refused_and_the_node_never_trains(
    mosquitto: EmbeddedBroker, tmp_path: Path, federation: str
) -> None:
    """Switzerland's few records and a delta of 0.05: the node says why and sends nothing."""
    policy = PrivacyPolicy(noise_multiplier=1.0, epsilon_budget=5.0, delta=0.05)
    node = a_node(mosquitto.url, federation, "switzerland", tmp_path)
    watch = StatusWatch(mosquitto.url, federation, ("switzerland",))
    with watch.client:
        knobs = Knobs(buffer_size=1, privacy=policy)
        with in_process(
            mosquitto.url, federation, tmp_path, knobs=knobs, node=node, model=LOGREG
        ) as settings:
            watch.until(lambda s: "is not below 1/n" in failure(s, "switzerland"), "a refusal")
            time.sleep(1.0)  # long enough for a node that (wrongly) trains to send its update
            assert_never_trained(settings, node.state_dir)


@pytest.mark.timeout(120)
def test_a_model_opacus_cannot_protect_is_refused_by_name_and_never_trained(
    mosquitto: EmbeddedBroker,
    tmp_path: Path,
    federation: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A BatchNorm model under DP: the node names the layer in its status, and only evaluates."""
    (tmp_path / "bn_site.py").write_text(BATCHNORM_MODEL, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "bn_site", raising=False)
    policy = PrivacyPolicy(noise_multiplier=1.0, epsilon_budget=5.0, delta=1e-3)
    node = a_node(mosquitto.url, federation, "cleveland", tmp_path)
    model = ModelSpec(name="bn_site:batchnorm_net", kwargs={})
    watch = StatusWatch(mosquitto.url, federation, ("cleveland",))
    with watch.client:
        knobs = Knobs(buffer_size=1, privacy=policy)
        with in_process(
            mosquitto.url, federation, tmp_path, knobs=knobs, node=node, model=model
        ) as settings:
            watch.until(
                lambda s: (
                    "0 (Linear)" not in failure(s, "cleveland")
                    and "1 (BatchNorm1d)" in failure(s, "cleveland")
                ),
                "a refusal",
            )
            wait_for(
                lambda: [t.eval_version for t in retained_status(settings).nodes] == [0],
                WAIT,
                "the node's evaluation of v0",
            )
            time.sleep(1.0)
            assert_never_trained(settings, node.state_dir)


def retained_status(settings: ConnectionSettings) -> AggregatorStatus:
    """The aggregator's latest status (a client of its own: no older one queued before it)."""
    with ControlClient(settings) as client:
        return client.status(timeout=WAIT)


def dp_aggregator(
    url: str, federation: str, tmp_path: Path, policy: PrivacyPolicy, *, buffer_size: int
) -> AggregatorSettings:
    """The heart-disease aggregator, its knobs carrying ``policy`` into every manifest."""
    settings = aggregator_settings(
        broker_url=url,
        federation_id=federation,
        state_dir=tmp_path / "aggregator",
        federation=HEART_DISEASE,
        buffer_size=buffer_size,
        max_staleness=20,
        status_interval=0.5,
    )
    return settings.model_copy(
        update={"knobs": settings.knobs.model_copy(update={"privacy": policy})}
    )


def dp_node(url: str, federation: str, site: str, tmp_path: Path) -> NodeSettings:
    return node_settings(
        broker_url=url,
        federation_id=federation,
        node_id=site,
        data=f"heart-disease:{site}",
        state_dir=tmp_path / site,
        exit_when_stopped=False,
    )


def assert_each_update_charged_once(
    state_dir: Path, charges: tuple[Charge, ...], kills: int
) -> None:
    """Every update that could leave (in the sent log or the outbox) has its version's charge;
    no version is charged twice; charges of versions with no update are at most one per crash
    (the safe side). A version retrained after a crash between its charge and the outbox keeps
    its first charge: charges are keyed by version, not by update id."""
    keys = [c.key for c in charges]
    assert len(keys) == len(set(keys)), keys
    queued = {
        (e.run_id or "", e.base_version or 0)
        for e in read_sent_log(state_dir)
        if e.event is SentEvent.QUEUED
    }
    outbox = Outbox(state_dir / "outbox")
    for update_id in outbox.ids():
        payload = outbox.read(update_id)
        if payload is not None:
            update = decode(payload).body
            assert isinstance(update, Update)
            queued.add((update.run_id, update.base_version))
    assert queued <= set(keys), queued - set(keys)
    assert len(set(keys) - queued) <= kills


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_killed_node_keeps_every_charge_once_across_restarts(
    mosquitto: EmbeddedBroker, tmp_path: Path, federation: str
) -> None:
    """SIGKILL of a DP node, twice, while it trains: no charge lost, none doubled, none missing
    for an update that may leave; the ledger reads the same through ``healthnet node privacy``."""
    policy = PrivacyPolicy(noise_multiplier=1.0, epsilon_budget=1000.0, delta=1e-3)
    state_dir = tmp_path / "cleveland"
    ledger_dir = state_dir / "privacy"
    with ProcessGroup(tmp_path / "logs") as group:
        group.start_service(
            "aggregator", dp_aggregator(mosquitto.url, federation, tmp_path, policy, buffer_size=1)
        )
        before: tuple[Charge, ...] = ()
        for kills in (1, 2):
            node = group.start_service(
                "cleveland", dp_node(mosquitto.url, federation, "cleveland", tmp_path)
            )
            wait_for(
                lambda: len(read_ledger(ledger_dir)) >= len(before) + 2,  # noqa: B023
                WAIT * 2,
                "two more charges",
            )
            node.signal(signal.SIGKILL)
            assert node.wait(30) is not None
            charges = read_ledger(ledger_dir)
            assert charges[: len(before)] == before  # committed charges are never lost
            assert_each_update_charged_once(state_dir, charges, kills)
            before = charges
    shown = cli("node", "privacy", "--state-dir", str(state_dir), "--json")
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    assert len(report["charges"]) == len(before)
    assert report["spend"]["epsilon"] == pytest.approx(history_epsilon(before, policy.delta))
    assert report["spend"]["versions"] == len(before)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_dp_federation_learns_heart_disease_and_stops_training_at_the_budget(
    mosquitto: EmbeddedBroker, tmp_path: Path, federation: str
) -> None:
    """Four DP hospitals at epsilon 3 learn; each stops training when its ledger reaches the
    budget, says BUDGET_SPENT, and evaluates the last version. The epsilon its own status, the
    aggregator's status, the dashboard's snapshot and /metrics show is its ledger's."""
    policy = PrivacyPolicy(calibrate_versions=8, epsilon_budget=3.0, delta=1e-3)
    sites = tuple(site.node_id for site in HEART_DISEASE.sites)
    watch = StatusWatch(mosquitto.url, federation, sites)
    port = free_port()
    aggregator = dp_aggregator(mosquitto.url, federation, tmp_path, policy, buffer_size=1)
    with ProcessGroup(tmp_path / "logs") as group, watch.client:
        group.start_service("aggregator", aggregator.model_copy(update={"metrics_port": port}))
        for site in sites:
            group.start_service(site, dp_node(mosquitto.url, federation, site, tmp_path))
        settings = ConnectionSettings(broker_url=mosquitto.url, federation=federation)  # type: ignore[arg-type]
        watch.until(
            lambda s: all(
                s.get(n) is not None and s[n].state is NodeState.BUDGET_SPENT for n in sites
            ),
            "every hospital's budget spent",
            timeout=WAIT * 3,
        )

        def evaluated_last() -> bool:
            status = retained_status(settings)
            return len(status.nodes) == len(sites) and all(
                t.eval_version == status.version for t in status.nodes
            )

        wait_for(evaluated_last, WAIT, "every hospital's evaluation of the last version")
        final = retained_status(settings)
        statuses = watch.poll()
        with FederationFeed(settings) as feed:
            wait_for(
                lambda: (
                    all(r.epsilon is not None for r in feed.snapshot().nodes)
                    and len(feed.snapshot().nodes) == len(sites)
                ),
                WAIT,
                "the dashboard's view of every hospital's epsilon",
            )
            dashboard = {r.node: r for r in feed.snapshot().nodes}
        metrics = scrape(f"http://127.0.0.1:{port}/metrics")
    tallies = {t.node: t for t in final.nodes}
    for site in sites:
        charges = read_ledger(tmp_path / site / "privacy")
        epsilon = history_epsilon(charges, policy.delta)
        assert len(charges) == policy.calibrate_versions
        assert epsilon <= policy.epsilon_budget
        spend = statuses[site].privacy
        assert spend is not None
        assert spend.epsilon == pytest.approx(epsilon)
        assert tallies[site].epsilon == pytest.approx(epsilon)
        assert tallies[site].epsilon_budget == policy.epsilon_budget
        assert dashboard[site].epsilon == pytest.approx(epsilon)
        assert dashboard[site].epsilon_budget == policy.epsilon_budget
        label = (("node", site),)
        assert metrics[("healthnet_node_epsilon", label)] == pytest.approx(epsilon)
        assert metrics[("healthnet_node_epsilon_budget", label)] == policy.epsilon_budget
    accuracies = [t.eval_accuracy for t in final.nodes]
    assert None not in accuracies
    assert final.version >= 24
    mean = sum(a for a in accuracies if a is not None) / len(accuracies)
    assert mean >= 0.70, (final.version, accuracies)
