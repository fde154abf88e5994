"""Whole federations as real processes on a real broker: the product's end-to-end promises."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from common.codec import decode, encode, envelope, new_id
from common.compression import dense_tensor
from common.errors import BrokerUnavailable
from common.messages import (
    Ack,
    AggregatorState,
    AggregatorStatus,
    Compression,
    Quantization,
    TrainMetrics,
    Update,
    VersionRecord,
)
from common.mqtt import Message, MqttClient
from common.settings import ConnectionSettings
from common.topics import Topic, TopicTree
from healthnet.broker import EmbeddedBroker
from healthnet.control import ControlClient
from healthnet.demo import DemoConfig, aggregator_settings, node_settings, run_demo
from healthnet.federations import HEART_DISEASE
from healthnet.processes import ProcessGroup

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(240)]

ACCURACY_BAR = 0.75
# Always answering "pneumonia" scores 0.625 on the official test split; 12 versions reach 0.78-0.86.
PNEUMONIA_BAR = 0.70


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # No retained status yet (an aggregator still importing torch on a busy machine) is
        # "not yet", not a failure: the deadline decides.
        with contextlib.suppress(BrokerUnavailable):
            if predicate():
                return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def cli(
    *args: str, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "healthnet", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, **(env or {})},
    )


class Federation:
    """The heart-disease federation as child processes, observed through the control client."""

    def __init__(self, url: str, workdir: Path, name: str) -> None:
        self.url = url
        self.workdir = workdir
        self.name = name
        self.group = ProcessGroup(workdir / "logs")
        self.settings = ConnectionSettings(broker_url=url, federation=name)  # type: ignore[arg-type]

    def start_aggregator(self, **fields: Any) -> None:
        """Start the aggregator; ``fields`` sets other settings (``autostart=False``, ...)."""
        self.group.start_service(
            "aggregator",
            aggregator_settings(
                broker_url=self.url,
                federation_id=self.name,
                state_dir=self.workdir / "aggregator",
                federation=HEART_DISEASE,
                buffer_size=2,
                max_staleness=20,
                **fields,
            ),
        )

    def start_nodes(self, delays: dict[str, float] | None = None) -> None:
        for site in HEART_DISEASE.sites:
            self.group.start_service(
                site.node_id,
                node_settings(
                    broker_url=self.url,
                    federation_id=self.name,
                    node_id=site.node_id,
                    data=site.data,
                    state_dir=self.workdir / site.node_id,
                    delay=(delays or {}).get(site.node_id, 0.0),
                    exit_when_stopped=False,
                ),
            )

    def status(self) -> AggregatorStatus:
        with ControlClient(self.settings) as client:
            return client.status(timeout=10)

    def control(self, command: str, *args: str) -> subprocess.CompletedProcess[str]:
        return cli(command, *args, "--broker-url", self.url, "--federation", self.name)


@pytest.fixture
def federation(mosquitto: EmbeddedBroker, tmp_path: Path) -> Iterator[Federation]:
    """A fresh federation id per test, so that no retained message of another test is seen."""
    fed = Federation(mosquitto.url, tmp_path, f"it-{uuid.uuid4().hex[:12]}")
    with fed.group:
        yield fed


def test_four_hospitals_reach_the_accuracy_bar(broker_url: str, tmp_path: Path) -> None:
    """The heart-disease federation reaches a mean test accuracy of at least 0.75 on each broker."""
    result = run_demo(DemoConfig(broker_url=broker_url, workdir=tmp_path, timeout=180))
    assert result.versions == 60
    assert result.updates_folded == result.buffer_size * result.versions
    assert set(result.per_node) == {"cleveland", "hungarian", "switzerland", "va"}
    assert result.mean_accuracy >= ACCURACY_BAR, result.per_node


def test_demo_command_writes_the_summary(tmp_path: Path) -> None:
    """`healthnet demo` runs on its own embedded broker and writes the documented summary keys."""
    summary = tmp_path / "summary.json"
    done = cli("demo", "--versions", "12", "--summary", str(summary), timeout=180)
    assert done.returncode == 0, done.stderr
    data = json.loads(summary.read_text())
    for key in (
        "mean_accuracy",
        "pooled_accuracy",
        "per_node",
        "versions",
        "updates_folded",
        "wall_seconds",
        "bytes_per_update",
        "compression_ratio",
    ):
        assert key in data
    assert data["versions"] == 12
    assert set(data["per_node"]) == {"cleveland", "hungarian", "switzerland", "va"}
    assert "mean" in done.stdout


def test_pneumonia_demo_learns_above_the_majority_baseline(tmp_path: Path) -> None:
    """`healthnet demo --dataset pneumonia --nodes 3` beats always answering pneumonia (0.625)."""
    summary = tmp_path / "summary.json"
    done = cli(
        "demo", "--dataset", "pneumonia", "--nodes", "3", "--buffer-size", "2",
        "--versions", "12", "--summary", str(summary), timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    data = json.loads(summary.read_text())
    assert data["federation"] == "pneumonia"
    assert data["versions"] == 12
    assert set(data["per_node"]) == {"hospital-1", "hospital-2", "hospital-3"}
    # Every hospital tests the same global model on the same official test split.
    assert len(set(data["per_node"].values())) == 1
    assert data["pooled_accuracy"] == pytest.approx(data["mean_accuracy"])
    assert data["mean_accuracy"] >= PNEUMONIA_BAR, data


def test_a_federation_of_top_k_updates_sends_50x_fewer_bytes_and_still_learns(
    mosquitto: EmbeddedBroker, tmp_path: Path
) -> None:
    """Top-k 1 % + float16 with error feedback: over 50x below dense float32 on the wire, the
    pneumonia bar still met, and every hospital keeps its residual on disk."""
    result = run_demo(
        DemoConfig(
            federation="pneumonia",
            nodes=3,
            buffer_size=2,
            versions=30,
            broker_url=mosquitto.url,
            workdir=tmp_path,
            timeout=180,
            compression=Compression(top_k=0.01, quantization=Quantization.FP16),
        )
    )
    assert result.compression_ratio > 50, result
    assert result.bytes_per_update < 422_000 / 50
    assert result.mean_accuracy >= PNEUMONIA_BAR, result
    for node in result.per_node:
        assert (tmp_path / "nodes" / node / "residual" / "residual.tensors").is_file()


def test_a_slow_hospital_does_not_block_the_others(
    mosquitto: EmbeddedBroker, tmp_path: Path
) -> None:
    """Versions advance while a slow node trains; its late update is folded with weight below 1."""
    result = run_demo(
        DemoConfig(
            broker_url=mosquitto.url,
            versions=30,
            mode="fedbuff",
            buffer_size=2,
            # The others a little slow too: versions must not race more than max_staleness (20)
            # past switzerland's base while it sleeps, or its update is refused as stale.
            delays={"switzerland": 1.0, "cleveland": 0.2, "hungarian": 0.2, "va": 0.2},
            workdir=tmp_path,
            timeout=180,
        )
    )
    slow = result.updates_per_node.get("switzerland", 0)
    fast = min(result.updates_per_node[n] for n in ("cleveland", "hungarian", "va"))
    assert slow >= 1, "the slow hospital's update was never folded"
    assert fast > 2 * slow, result.updates_per_node
    assert result.min_staleness_factor["switzerland"] < 1.0


def zero_update(status: AggregatorStatus) -> Update:
    """A valid update of the heart-disease model that changes nothing, from the current version."""
    return Update(
        update_id=new_id(),
        run_id=status.run_id,
        base_version=status.version,
        num_samples=10,
        metrics=TrainMetrics(loss=0.5, accuracy=0.5, seconds=0.1),
        delta=tuple(
            dense_tensor(name, np.zeros(shape, np.float32))
            for name, shape in (("1.weight", (2, 13)), ("1.bias", (2,)))
        ),
    )


def versions_logged(federation: Federation) -> list[VersionRecord]:
    """The aggregator's versions.jsonl: a version exists once its line is there."""
    path = federation.workdir / "aggregator" / "versions.jsonl"
    return [VersionRecord.model_validate_json(line) for line in path.read_text().splitlines()]


def test_pause_holds_a_full_buffer_and_resume_folds_it(federation: Federation) -> None:
    """While paused, updates are acked and held in the buffer, a full one included, and no version
    is made; after resume the held updates are folded into the next version."""
    federation.start_aggregator()
    federation.start_nodes()
    wait_for(lambda: federation.status().version >= 3, 60, "three versions")

    paused = federation.control("pause")
    assert paused.returncode == 0, paused.stderr
    assert "paused" in paused.stdout
    frozen = federation.status()  # forced out after the pause was applied
    assert frozen.state is AggregatorState.PAUSED

    # Two updates of our own (K = 2), so the buffer is full whatever the nodes had in flight.
    held = [zero_update(frozen), zero_update(frozen)]
    topics = TopicTree(federation.name)
    with MqttClient.from_settings(federation.settings, f"probe-{new_id()[:8]}") as probe:
        probe.subscribe(topics.ack("probe"))
        for update in held:
            body = envelope(update, sender="probe", sent_at=time.time())
            probe.publish(topics.update("probe"), encode(body), wait=30)
        acks: dict[str, Ack] = {}
        deadline = time.monotonic() + 30
        while len(acks) < len(held):
            assert time.monotonic() < deadline, f"acks of {len(acks)} of {len(held)} updates"
            with contextlib.suppress(queue.Empty):
                item = probe.inbox.get(timeout=1.0)
                if isinstance(item, Message):
                    ack = decode(item.payload).body
                    assert isinstance(ack, Ack)
                    acks[ack.update_id] = ack
    assert all(ack.accepted for ack in acks.values()), acks

    def holding() -> bool:
        status = federation.status()
        assert (status.state, status.version) == (AggregatorState.PAUSED, frozen.version), status
        return status.buffer_fill >= 2 and status.counters.accepted >= frozen.counters.accepted + 2

    # Every status is published after the service checked for a due fold: a full buffer at the
    # frozen version is a fold that a paused run did not make.
    wait_for(holding, 30, "a full buffer held at the frozen version")
    assert [r.version for r in versions_logged(federation)][-1] == frozen.version

    resumed = federation.control("resume")
    assert resumed.returncode == 0, resumed.stderr

    def held_folded() -> bool:
        folded = {c.update_id for r in versions_logged(federation) for c in r.contributions}
        return {u.update_id for u in held} <= folded

    # The buffer may also hold a node's update from before the pause: with K = 2 the held
    # updates can take two versions after resume, not one.
    wait_for(held_folded, 60, "the held updates folded after resume")
    wait_for(lambda: federation.status().version > frozen.version + 1, 60, "versions after resume")

    status = cli(
        "status", "--json", "--broker-url", federation.url, "--federation", federation.name
    )
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["state"] == "running"
    assert federation.control("stop").returncode == 0
    assert federation.group["aggregator"].wait(30) == 0


def first_status_after(client: MqttClient, topic: Topic, newer_than: float) -> AggregatorStatus:
    """The first aggregator status on ``client``'s inbox published after ``newer_than``."""
    deadline = time.monotonic() + 30
    while (left := deadline - time.monotonic()) > 0:
        with contextlib.suppress(queue.Empty):
            item = client.inbox.get(timeout=left)
            if isinstance(item, Message) and item.topic == str(topic) and item.payload:
                status = decode(item.payload).body
                if isinstance(status, AggregatorStatus) and status.updated_at > newer_than:
                    return status
    raise AssertionError("no status from the restarted aggregator within 30s")


@pytest.mark.parametrize(
    "signum",
    [pytest.param(signal.SIGTERM, id="sigterm"), pytest.param(signal.SIGKILL, id="sigkill")],
)
def test_a_restarted_aggregator_resumes_from_its_checkpoint(
    federation: Federation, signum: signal.Signals
) -> None:
    """Stopped or killed, the aggregator comes back at the last version in versions.jsonl (its
    commit point), in the same run; stopped, it had also checkpointed that version and announced
    it, going offline."""
    federation.start_aggregator()
    federation.start_nodes()
    wait_for(lambda: federation.status().version >= 4, 60, "four versions")
    federation.group["aggregator"].signal(signum)
    assert federation.group["aggregator"].wait(15) is not None
    committed = versions_logged(federation)[-1].version
    before = federation.status()  # retained: what the aggregator last said
    if signum == signal.SIGTERM:
        checkpoints = sorted((federation.workdir / "aggregator" / "checkpoints").glob("v*.ckpt"))
        assert int(checkpoints[-1].name[1:9]) == committed
        assert before.version == committed
        assert before.state is AggregatorState.OFFLINE  # its last word on a clean exit

    topic = TopicTree(federation.name).aggregator_status()
    with MqttClient.from_settings(federation.settings, f"watch-{new_id()[:8]}") as watcher:
        watcher.subscribe(topic)
        federation.start_aggregator()
        # Its first status comes before it serves anything: the version it resumed at.
        first = first_status_after(watcher, topic, before.updated_at)
    assert (first.run_id, first.version) == (before.run_id, committed)
    wait_for(lambda: federation.status().version > committed + 2, 60, "new versions after restart")
    versions = [record.version for record in versions_logged(federation)]
    assert versions == list(range(1, len(versions) + 1)), "versions must be contiguous, none twice"


def test_an_idle_run_starts_on_command_and_knobs_change_live(federation: Federation) -> None:
    """With --no-autostart nodes wait until `healthnet start`; `healthnet set` changes K live."""
    federation.start_aggregator(autostart=False)
    federation.start_nodes()
    wait_for(lambda: federation.status().state is AggregatorState.IDLE, 30, "an idle aggregator")
    with ControlClient(federation.settings) as client:
        wait_for(lambda: len(client.nodes(settle=0.5)) == 4, 60, "four idle hospitals")
    idle = federation.status()
    assert (idle.version, idle.buffer_fill, idle.counters.received) == (0, 0, 0)

    assert federation.control("start").returncode == 0
    wait_for(lambda: federation.status().version >= 2, 60, "versions after start")
    changed = federation.control("set", "buffer_size=3", "training.epochs=2")
    assert changed.returncode == 0, changed.stderr
    knobs = federation.status().knobs
    assert (knobs.buffer_size, knobs.training.epochs) == (3, 2)
    refused = federation.control("set", "buffer_size=0")
    assert refused.returncode == 1
    # The aggregator's reason, whitespace normalised: the console may wrap it.
    assert (
        "invalid knob value: 1 validation error for Knobs buffer_size "
        "Input should be greater than or equal to 1"
    ) in " ".join(refused.stderr.split()), refused.stderr

    # Settings come from the environment as well as from flags.
    env = {"HEALTHNET_BROKER_URL": federation.url, "HEALTHNET_FEDERATION": federation.name}
    nodes = cli("nodes", env=env)
    assert nodes.returncode == 0, nodes.stderr
    for hospital in ("cleveland", "hungarian", "switzerland", "va"):
        assert hospital in nodes.stdout
