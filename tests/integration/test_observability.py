"""A real federation observed from outside: /metrics, `healthnet watch` and `healthnet report`."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image
from prometheus_client.parser import text_string_to_metric_families

from common.broker_url import BrokerEndpoint
from common.errors import BrokerUnavailable
from common.messages import AggregatorStatus
from common.mqtt import MqttClient
from common.topics import TopicTree
from healthnet.broker import EmbeddedBroker
from healthnet.federations import HEART_DISEASE
from tests.integration.test_federation import Federation, cli, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(240)]

HOSPITALS = sorted(site.node_id for site in HEART_DISEASE.sites)
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - our loopback endpoint
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture
def federation(mosquitto: EmbeddedBroker, tmp_path: Path) -> Iterator[Federation]:
    fed = Federation(mosquitto.url, tmp_path, f"obs-{uuid.uuid4().hex[:12]}")
    with fed.group:
        yield fed


def version_at_least(federation: Federation, version: int) -> bool:
    try:
        return federation.status().version >= version
    except BrokerUnavailable:
        return False  # the aggregator is still importing torch on a busy machine


def settled_status(federation: Federation) -> AggregatorStatus:
    """The status once two readings a while apart agree (no update in flight any more)."""
    previous = federation.status()
    while True:
        time.sleep(1.5)
        current = federation.status()
        if current.model_dump(exclude={"updated_at"}) == previous.model_dump(
            exclude={"updated_at"}
        ):
            return current
        previous = current


def test_metrics_match_the_ledger_after_a_real_run(federation: Federation, tmp_path: Path) -> None:
    """Four hospitals trained and one sent garbage: each /metrics counter equals the ledger."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    federation.start_aggregator(metrics_port=port)
    federation.start_nodes()
    wait_for(lambda: version_at_least(federation, 8), 120, "version 8")
    wait_for(
        lambda: scrape(url).get(("healthnet_nodes_connected", ())) == len(HOSPITALS),
        30,
        "four connected nodes on /metrics",
    )
    # A malformed message on a hospital's topic: rejected, counted for that hospital.
    tree = TopicTree(federation.name)
    with MqttClient(BrokerEndpoint.parse(federation.url), "intruder") as intruder:
        intruder.publish(tree.update("va"), b"\x00not an envelope", wait=10)
    for site in HEART_DISEASE.sites:
        federation.group[site.node_id].stop()
    status = settled_status(federation)
    wait_for(lambda: scrape(url).get(("healthnet_nodes_connected", ())) == 0, 30, "nodes offline")
    got = scrape(url)

    c = status.counters
    assert got[("healthnet_model_version", ())] == status.version
    assert got[("healthnet_buffer_fill", ())] == status.buffer_fill
    assert got[("healthnet_updates_received_total", ())] == c.received
    assert got[("healthnet_updates_duplicate_total", ())] == c.duplicates
    assert got[("healthnet_received_bytes_total", ())] == c.bytes_received
    assert c.rejections == {"malformed": 1}
    ledger = {entry.node: entry for entry in status.nodes}
    assert sorted(ledger) == HOSPITALS
    for node, entry in ledger.items():
        label = (("node", node),)
        assert got[("healthnet_node_updates_accepted_total", label)] == entry.accepted
        assert got[("healthnet_node_updates_folded_total", label)] == entry.folded
        assert got[("healthnet_node_received_bytes_total", label)] == entry.bytes_received
        for reason, count in entry.rejections.items():
            key = ("healthnet_node_updates_rejected_total", (("node", node), ("reason", reason)))
            assert got[key] == count
    assert got[("healthnet_node_updates_rejected_total", (("node", "va"), ("reason", "malformed")))]
    assert sum(e.accepted for e in ledger.values()) == c.accepted
    # This aggregator made every version, so its histograms saw every folded update.
    assert got[("healthnet_update_staleness_count", ())] == c.folded
    assert got[("healthnet_fold_seconds_count", ())] == status.version
    assert got[("healthnet_versions_published_total", ())] == status.version

    # The same run, plotted from its logs.
    out = tmp_path / "report"
    done = cli("report", str(federation.workdir / "aggregator"), "--out", str(out))
    assert done.returncode == 0, done.stderr
    for name in ("accuracy.png", "staleness.png", "bytes.png"):
        pixels = np.asarray(image.imread(out / name))[..., :3]
        assert float(pixels.std()) > 0.05, f"{name} looks blank"


def test_watch_shows_every_hospital(federation: Federation) -> None:
    """`healthnet watch` draws the run with each hospital's row until interrupted."""
    federation.start_aggregator()
    federation.start_nodes()
    wait_for(lambda: version_at_least(federation, 3), 120, "version 3")
    proc = subprocess.Popen(
        [sys.executable, "-m", "healthnet", "watch", "--broker-url", federation.url,
         "--federation", federation.name],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={"COLUMNS": "160", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    time.sleep(4)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    for hospital in HOSPITALS:
        assert hospital in out
    assert "mean accuracy" in out
