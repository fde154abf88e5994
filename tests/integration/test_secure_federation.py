"""The heart-disease federation as real processes over mutual TLS, configured only by the files
of `healthnet deploy init`: broker config, ACL, certificates and one env file per identity."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from common.errors import BrokerUnavailable
from common.messages import AggregatorState, AggregatorStatus
from healthnet.control import ControlClient
from healthnet.deploy import AuthMode
from healthnet.federations import HEART_DISEASE
from healthnet.processes import ProcessGroup
from tests.secure import SecureBroker, secure_broker

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(240)]

VERSIONS = 12


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def operator_cli(broker: SecureBroker, *args: str) -> subprocess.CompletedProcess[str]:
    """A `healthnet` command run as the operator: settings from its env file only."""
    return subprocess.run(
        [sys.executable, "-m", "healthnet", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**_base_env(), **broker.env("operator")},
    )


def _base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("HEALTHNET_")}


def state(broker: SecureBroker) -> AggregatorState | None:
    """The aggregator's state as the operator sees it, None before it first says."""
    with ControlClient(broker.settings("operator")) as client:
        try:
            return client.status(timeout=2).state
        except BrokerUnavailable:
            return None


def test_the_federation_trains_over_mutual_tls_with_the_generated_files(tmp_path: Path) -> None:
    """Aggregator and four hospitals train to the last version over TLS; the operator, with its own
    identity, quarantines a hospital and starts the run; every client was who it claimed."""
    federation = f"tls-{uuid.uuid4().hex[:8]}"
    with (
        secure_broker(tmp_path, auth=AuthMode.MTLS, federation=federation) as broker,
        ProcessGroup(tmp_path / "logs") as group,
    ):
        model = HEART_DISEASE.model
        aggregator_args = [
            "aggregator", "run",
            "--state-dir", str(tmp_path / "aggregator"),
            "--model", model.name,
            "--model-kwargs", json.dumps(model.kwargs),
            "--buffer-size", "3",
            "--max-versions", str(VERSIONS),
            "--status-interval", "1",
            "--no-autostart",
        ]  # fmt: skip
        group.start("aggregator", aggregator_args, env=broker.env("aggregator"))
        for site in HEART_DISEASE.sites:
            node_args = [
                "node", "run",
                "--data", site.data,
                "--state-dir", str(tmp_path / site.node_id),
                "--torch-threads", "1",
                "--ack-timeout", "10",
                "--exit-when-stopped",
            ]  # fmt: skip
            group.start(site.node_id, node_args, env=broker.env(site.node_id))
        wait_for(lambda: state(broker) is AggregatorState.IDLE, 90, "an idle aggregator")
        quarantined = operator_cli(broker, "quarantine", "va")
        assert quarantined.returncode == 0, quarantined.stderr
        assert "quarantined" in quarantined.stdout
        started = operator_cli(broker, "start")
        assert started.returncode == 0, started.stderr
        assert group.wait_all(timeout=150), [p.tail() for p in group.processes.values()]
        assert group.failed() == [], [p.tail() for p in group.failed()]

        final = operator_cli(broker, "status", "--json")
        assert final.returncode == 0, final.stderr
        shown = json.loads(final.stdout)
        assert shown.pop("status_age_seconds") >= 0  # beside the status, not in it
        snapshot = AggregatorStatus.model_validate(shown)
        assert (snapshot.state, snapshot.version) == (AggregatorState.STOPPED, VERSIONS)
        # The env file's secure defaults reached the aggregator alongside the flags, and
        # refused no honest hospital's update.
        assert snapshot.knobs.one_update_per_version
        assert snapshot.knobs.norm_multiplier is not None
        assert snapshot.knobs.max_num_samples is not None
        for defence in ("norm_bound", "sample_count"):
            assert defence not in snapshot.counters.rejections, snapshot.counters.rejections
        ledger = {entry.node: entry for entry in snapshot.nodes}
        assert set(ledger) == {site.node_id for site in HEART_DISEASE.sites}
        assert ledger["va"].quarantined
        assert ledger["va"].folded == 0
        assert ledger["va"].rejections.get("quarantined", 0) >= 1
        assert all(ledger[n].eval_accuracy is not None for n in ("cleveland", "hungarian"))
        versions = (tmp_path / "aggregator" / "versions.jsonl").read_text().splitlines()
        assert len(versions) == VERSIONS
        log = broker.log()
        for identity in ("aggregator", "operator", *(s.node_id for s in HEART_DISEASE.sites)):
            assert f"as {identity} (" in log, identity
            assert f"u'{identity}'" in log, identity
