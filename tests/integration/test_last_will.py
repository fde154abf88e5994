"""A crashed aggregator's retained status: its Last Will says offline, and how old it is."""

from __future__ import annotations

import json
import queue
import signal
import time
import uuid
from pathlib import Path

import pytest

from common.broker_url import BrokerEndpoint
from common.codec import decode
from common.messages import AggregatorState, AggregatorStatus
from common.mqtt import Message, MqttClient
from common.topics import TopicTree
from healthnet.broker import EmbeddedBroker
from healthnet.demo import aggregator_settings
from healthnet.federations import HEART_DISEASE
from healthnet.processes import ProcessGroup
from tests.integration.test_federation import cli

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(180)]

WAIT = 90.0  # the aggregator imports torch first, on a machine that may be busy


def next_status(client: MqttClient, timeout: float) -> tuple[AggregatorStatus, bool]:
    """The next aggregator status on ``client``'s inbox, and whether it came as retained."""
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            item = client.inbox.get(timeout=remaining)
        except queue.Empty:
            break
        if isinstance(item, Message) and item.payload:
            body = decode(item.payload).body
            if isinstance(body, AggregatorStatus):
                return body, item.retain
    raise AssertionError(f"no aggregator status within {timeout:.0f}s")


def wait_for_state(client: MqttClient, state: AggregatorState, timeout: float) -> AggregatorStatus:
    deadline = time.monotonic() + timeout
    while True:
        status, _ = next_status(client, max(0.1, deadline - time.monotonic()))
        if status.state is state:
            return status


def test_a_killed_aggregator_leaves_an_offline_status_with_its_age(
    mosquitto: EmbeddedBroker, tmp_path: Path
) -> None:
    """kill -9 of a running aggregator: the retained status turns offline; status shows its age."""
    federation = f"will-{uuid.uuid4().hex[:12]}"
    tree = TopicTree(federation)
    watcher = MqttClient(BrokerEndpoint.parse(mosquitto.url), f"watch-{uuid.uuid4().hex[:8]}")
    watcher.subscribe(tree.aggregator_status())
    with ProcessGroup(tmp_path / "logs") as group, watcher:
        settings = aggregator_settings(
            broker_url=mosquitto.url,
            federation_id=federation,
            state_dir=tmp_path / "aggregator",
            federation=HEART_DISEASE,
            buffer_size=3,
            max_staleness=10,
            max_versions=100,
        )
        aggregator = group.start_service("aggregator", settings)
        try:
            running = wait_for_state(watcher, AggregatorState.RUNNING, WAIT)
        except AssertionError:
            raise AssertionError(aggregator.tail()) from None
        aggregator.signal(signal.SIGKILL)
        assert aggregator.wait(30) is not None
        offline = wait_for_state(watcher, AggregatorState.OFFLINE, 30)
    assert (offline.run_id, offline.version) == (running.run_id, running.version)
    # A newcomer is handed the offline status as the retained one, and told its age.
    shown = cli("status", "--json", "--broker-url", mosquitto.url, "--federation", federation)
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    assert data["state"] == "offline"
    assert data["status_age_seconds"] >= 0
    text = cli("status", "--broker-url", mosquitto.url, "--federation", federation)
    assert "offline, version" in text.stdout
    assert " old" in text.stdout
