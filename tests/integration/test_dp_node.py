"""DP nodes with a real aggregator on Mosquitto: what is refused, charged, and what is learnt."""

from __future__ import annotations

import contextlib
import queue
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
    Knobs,
    ModelSpec,
    NodeStatus,
    PrivacyPolicy,
)
from common.mqtt import Message, MqttClient
from common.settings import ConnectionSettings
from common.topics import TopicTree
from edge_node.privacy_ledger import read_ledger
from edge_node.sentlog import SentEvent, read_sent_log
from edge_node.service import NodeService
from edge_node.settings import NodeSettings
from healthnet.broker import EmbeddedBroker
from healthnet.control import ControlClient
from tests.integration.test_federation import wait_for

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

    def until(self, predicate: Callable[[dict[str, NodeStatus]], bool], what: str) -> None:
        wait_for(lambda: predicate(self.poll()), WAIT, what)


@pytest.fixture
def federation() -> str:
    return f"dp-{uuid.uuid4().hex[:12]}"


@contextlib.contextmanager
def in_process(
    url: str, federation: str, tmp_path: Path, *, knobs: Knobs, node: NodeSettings, model: ModelSpec
) -> Iterator[ControlClient]:
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
    settings = ConnectionSettings(broker_url=url, federation=federation)  # type: ignore[arg-type]
    try:
        with ControlClient(settings) as client:
            yield client
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


def assert_never_trained(client: ControlClient, state_dir: Path) -> None:
    """No update was made: none in the sent log, none charged, none received."""
    assert client.status(timeout=WAIT).counters.received == 0
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
        ) as client:
            watch.until(lambda s: "is not below 1/n" in failure(s, "switzerland"), "a refusal")
            time.sleep(1.0)  # long enough for a node that (wrongly) trains to send its update
            assert_never_trained(client, node.state_dir)


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
        ) as client:
            watch.until(
                lambda s: (
                    "0 (Linear)" not in failure(s, "cleveland")
                    and "1 (BatchNorm1d)" in failure(s, "cleveland")
                ),
                "a refusal",
            )
            wait_for(
                lambda: client.status(timeout=WAIT).nodes[0].eval_version == 0,
                WAIT,
                "the node's evaluation of v0",
            )
            time.sleep(1.0)
            assert_never_trained(client, node.state_dir)
