"""The shipped Mosquitto config: Mosquitto accepts it, and it keeps a persistent session's queue
across a restart (the durability contract relies on both)."""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.broker_url import BrokerEndpoint
from common.mqtt import Message, MqttClient
from common.topics import TopicTree
from healthnet.broker import find_mosquitto, free_port

pytestmark = [
    pytest.mark.broker,
    pytest.mark.timeout(60),
    pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed"),
]

CONF = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto.conf"
WAIT = 15.0


def settings() -> dict[str, str]:
    pairs = (line.split(None, 1) for line in CONF.read_text(encoding="utf-8").splitlines())
    return {p[0]: p[1] if len(p) > 1 else "" for p in pairs if p and not p[0].startswith("#")}


def test_the_queue_limits_follow_the_documented_sizing_rule() -> None:
    """Persistence is on and the limits hold 100 nodes x 2 updates x 11 sends (+1 eval)."""
    conf = settings()
    assert conf["persistence"] == "true"
    assert int(conf["max_queued_messages"]) >= 100 * (2 * (1 + 600 // 60) + 1)
    assert int(conf["max_queued_bytes"]) > 0, "unlimited bytes would let a queue eat the host"
    assert int(conf["autosave_interval"]) <= 300
    assert re.fullmatch(r"\d+[hdwmy]", conf["persistent_client_expiration"])
    assert "M >= N * (D * (1 + T / A) + 1)" in CONF.read_text(encoding="utf-8")


class Mosquitto:
    """deploy/mosquitto.conf on a free port with its store in a temp folder."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        text = CONF.read_text(encoding="utf-8")
        text = text.replace("listener 1883 127.0.0.1", f"listener {self.port} 127.0.0.1")
        text = text.replace("/var/lib/mosquitto/", f"{workdir}/")
        if os.geteuid() == 0:
            text += "user root\n"  # as the embedded broker does, to write its store as root
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(text, encoding="utf-8")
        self.log = workdir / "broker.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [str(find_mosquitto()), "-c", str(self.conf)], stdout=log, stderr=log
            )

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()  # a clean stop saves the store
            self.process.wait(WAIT)
            self.process = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    running = Mosquitto(tmp_path)
    running.start()
    try:
        yield running
    finally:
        running.stop()


def test_mosquitto_runs_the_config_and_keeps_a_session_queue_across_a_restart(
    broker: Mosquitto,
) -> None:
    """A persistent session's queued update survives a clean broker restart under this config."""
    tree = TopicTree(f"conf{uuid.uuid4().hex[:8]}")
    topic = tree.update("n1")
    endpoint = BrokerEndpoint.parse(broker.url)
    away = MqttClient(endpoint, "aggregator.conf", persistent_session=True, manual_ack=True)
    away.subscribe(topic)
    away.start(timeout=WAIT)
    away.close()
    with MqttClient(endpoint, "n1.conf") as sender:
        sender.publish(topic, b"update while the aggregator is away", wait=WAIT)
    broker.stop()
    broker.start()
    back = MqttClient(endpoint, "aggregator.conf", persistent_session=True, manual_ack=True)
    back.subscribe(topic)
    back.start(timeout=WAIT)
    try:
        item = back.inbox.get(timeout=WAIT)
        while not isinstance(item, Message):
            item = back.inbox.get(timeout=WAIT)
    finally:
        back.close()
    assert item.payload == b"update while the aggregator is away"
    log = broker.log.read_text(encoding="utf-8", errors="replace")
    assert "Error" not in log, log
