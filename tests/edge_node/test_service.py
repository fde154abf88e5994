"""The node service against a real aggregator on Mosquitto: what it does when its own work fails."""

from __future__ import annotations

import logging
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

from aggregator.service import AggregatorService
from aggregator.settings import AggregatorSettings
from common.messages import Knobs, ModelSpec
from common.settings import ConnectionSettings
from edge_node.sentlog import SentEvent, read_sent_log
from edge_node.service import NodeService
from edge_node.settings import NodeSettings
from healthnet.broker import EmbeddedBroker
from healthnet.control import ControlClient

pytestmark = [pytest.mark.broker, pytest.mark.timeout(60)]

WAIT = 15.0

# Five features for a model that expects thirteen: every training and evaluation raises.
MISFIT_DATA = textwrap.dedent(
    """
    import numpy as np
    from edge_node.datasets import LocalDataset

    def misfit():
        rng = np.random.default_rng(0)
        x = rng.normal(size=(20, 5)).astype(np.float32)
        y = (x[:, 0] > 0).astype(np.int64)
        return LocalDataset("misfit", x, y, x, y, num_classes=2)
    """
)


def test_a_failing_job_is_logged_once_per_version_and_the_node_keeps_running(
    mosquitto: EmbeddedBroker,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Training that raises is logged and skipped for that version, not retried in a loop."""
    (tmp_path / "misfit_site.py").write_text(MISFIT_DATA, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "misfit_site", raising=False)
    federation = f"svc{uuid.uuid4().hex[:12]}"
    aggregator = AggregatorService(
        AggregatorSettings(
            broker_url=mosquitto.url,  # type: ignore[arg-type]
            federation=federation,
            state_dir=tmp_path / "aggregator",
            model=ModelSpec(name="logreg", kwargs={"in_features": 13, "num_classes": 2}),
            knobs=Knobs(buffer_size=1),
            status_interval=0.2,
        )
    )
    node = NodeService(
        NodeSettings(
            broker_url=mosquitto.url,  # type: ignore[arg-type]
            federation=federation,
            node_id="misfit",
            data="misfit_site:misfit",
            state_dir=tmp_path / "node",
            torch_threads=1,
        )
    )
    stop = threading.Event()
    threads = [
        threading.Thread(target=aggregator.run, args=(stop,), name="aggregator"),
        threading.Thread(target=node.run, args=(stop,), name="node"),
    ]
    caplog.set_level(logging.ERROR, logger="edge_node.service")
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline and len(caplog.records) < 2:
            time.sleep(0.1)
        time.sleep(1.0)  # long enough for a retry loop to show itself many times over
        assert all(thread.is_alive() for thread in threads)
        settings = ConnectionSettings(broker_url=mosquitto.url, federation=federation)  # type: ignore[arg-type]
        with ControlClient(settings) as client:
            status = client.status(timeout=WAIT)
    finally:
        stop.set()
        for thread in threads:
            thread.join(WAIT)
    failures = sorted(r.getMessage() for r in caplog.records)
    assert failures == ["node misfit: evaluate of v0 failed", "node misfit: train of v0 failed"]
    assert (status.version, status.counters.received) == (0, 0)


def test_a_restarted_node_does_not_train_again_on_the_version_it_sent_an_update_for(
    mosquitto: EmbeddedBroker, tmp_path: Path
) -> None:
    """The sent log carries progress across a restart: one update per base version, not two."""
    federation = f"svc{uuid.uuid4().hex[:12]}"
    aggregator = AggregatorService(
        AggregatorSettings(
            broker_url=mosquitto.url,  # type: ignore[arg-type]
            federation=federation,
            state_dir=tmp_path / "aggregator",
            model=ModelSpec(name="logreg", kwargs={"in_features": 13, "num_classes": 2}),
            knobs=Knobs(buffer_size=5),  # v0 stays current: a restarted node sees it again
            status_interval=0.2,
        )
    )
    node_settings = NodeSettings(
        broker_url=mosquitto.url,  # type: ignore[arg-type]
        federation=federation,
        node_id="cleveland",
        data="heart-disease:cleveland",
        state_dir=tmp_path / "node",
        torch_threads=1,
    )
    settings = ConnectionSettings(broker_url=mosquitto.url, federation=federation)  # type: ignore[arg-type]
    stop_aggregator = threading.Event()
    agg_thread = threading.Thread(target=aggregator.run, args=(stop_aggregator,), name="agg")
    agg_thread.start()
    try:
        with ControlClient(settings) as client:
            for _ in range(2):  # the node's first life, then its second
                stop_node = threading.Event()
                node = NodeService(node_settings)
                node_thread = threading.Thread(target=node.run, args=(stop_node,), name="node")
                node_thread.start()
                deadline = time.monotonic() + WAIT
                while time.monotonic() < deadline:
                    if client.status(timeout=WAIT).counters.received >= 1:
                        break
                    time.sleep(0.1)
                time.sleep(1.5)  # time enough to (wrongly) train v0 again and send it
                stop_node.set()
                node_thread.join(WAIT)
            status = client.status(timeout=WAIT)
    finally:
        stop_aggregator.set()
        agg_thread.join(WAIT)
    assert (status.version, status.counters.received, status.counters.accepted) == (0, 1, 1)
    lines = [e for e in read_sent_log(tmp_path / "node") if e.event is SentEvent.QUEUED]
    assert [(e.run_id, e.base_version) for e in lines] == [(status.run_id, 0)]
