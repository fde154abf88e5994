"""Specification of the CLI's refusals: bad input is one line on stderr and a non-zero exit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from common.broker_url import BrokerEndpoint
from common.codec import encode, envelope
from common.messages import (
    AggregatorState,
    AggregatorStatus,
    Counters,
    Knobs,
    NodeTally,
    PrivacyPolicy,
)
from common.mqtt import MqttClient
from common.topics import TopicTree
from healthnet import cli
from healthnet.broker import EmbeddedBroker
from healthnet.cli import app

SECRET = "s3cr3t-Pa55"  # noqa: S105 - a made-up credential that must never be echoed


@pytest.fixture
def runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    """A runner in an empty directory (no .env) with no HEALTHNET_ variables set."""
    monkeypatch.chdir(tmp_path)
    for name in [n for n in os.environ if n.startswith("HEALTHNET_")]:
        monkeypatch.delenv(name)
    return CliRunner()


def assert_one_line_refusal(stderr: str, *expected: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    for text in expected:
        assert text in lines[0], stderr


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        pytest.param(
            ["--broadcast-dtype", "float64"], ["--broadcast-dtype", "float64"], id="broadcast-dtype"
        ),
        pytest.param(["--model-kwargs", "{bad"], ["--model-kwargs", "not JSON"], id="kwargs-json"),
        pytest.param(
            ["--model-kwargs", "[1]", "--model", "logreg"], ["--model-kwargs"], id="kwargs-list"
        ),
        pytest.param(
            ["--broker-url", f"http://hospital:{SECRET}@broker"],
            ["--broker-url", "mqtt://"],
            id="broker-url-scheme",
        ),
        pytest.param(["--broker-url", "mqtt://:1883"], ["--broker-url", "no host"], id="no-host"),
        pytest.param(["--broker-url", "mqtt://b:70000"], ["--broker-url"], id="port-range"),
        pytest.param(["--lr", "-1"], ["--lr", "-1"], id="learning-rate"),
        pytest.param(["--top-k", "2"], ["--top-k"], id="top-k"),
        pytest.param(["--federation", "a/b"], ["--federation", "a/b"], id="federation"),
    ],
)
def test_a_bad_aggregator_flag_is_one_line_exit_2_and_touches_no_state(
    runner: CliRunner, tmp_path: Path, flags: list[str], expected: list[str]
) -> None:
    """`aggregator run` with a bad flag says which, exits 2, and creates no lock or checkpoint."""
    state = tmp_path / "state"
    result = runner.invoke(app, ["aggregator", "run", "--state-dir", str(state), *flags])
    assert result.exit_code == 2, result.output
    assert_one_line_refusal(result.stderr, *expected)
    assert SECRET not in result.output
    assert not state.exists()


def test_a_bad_broker_url_is_refused_by_a_real_process_without_a_traceback(
    tmp_path: Path,
) -> None:
    """`python -m healthnet aggregator run --broker-url …` prints one line and exits 2."""
    state = tmp_path / "state"
    args = ["aggregator", "run", "--state-dir", str(state)]
    done = subprocess.run(
        [sys.executable, "-m", "healthnet", *args, "--broker-url", f"mqtt://h:{SECRET}@b:port"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert_one_line_refusal(done.stderr, "--broker-url")
    assert SECRET not in done.stderr + done.stdout
    assert not state.exists()


def test_a_bad_broker_url_in_the_environment_is_one_line_naming_its_flag(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HEALTHNET_BROKER_URL is parsed as the settings load: a bad one is one line and exit 2."""
    monkeypatch.setenv("HEALTHNET_BROKER_URL", f"mqtt://hospital:{SECRET}@broker:port")
    result = runner.invoke(app, ["status"])
    assert result.exit_code == 2, result.output
    assert_one_line_refusal(result.stderr, "--broker-url", "broker URL")
    assert SECRET not in result.output


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["status", "--broker-url", "tcp://b"], id="status"),
        pytest.param(["pause", "--broker-url", "mqtt://b?protocol=4"], id="pause"),
        pytest.param(["nodes", "--federation", "no spaces"], id="nodes"),
        pytest.param(["watch", "--broker-url", "mqtt://"], id="watch"),
        pytest.param(["dashboard", "--port", "70000"], id="dashboard"),
        pytest.param(["set", "buffer_size"], id="set-without-value"),
        pytest.param(["demo", "--delay", "va=soon"], id="demo-delay"),
        pytest.param(["demo", "--broker-url", "mqtt://"], id="demo-broker-url"),
        pytest.param(["demo", "--mode", "fast"], id="demo-mode"),
        pytest.param(["demo", "--dp-epsilon-budget", "3"], id="demo-dp-no-noise"),
        pytest.param(["demo", "--dp-noise-multiplier", "1"], id="demo-dp-no-budget"),
        pytest.param(
            ["demo", "--dp-epsilon-budget", "3", "--dp-calibrate-versions", "5", "--dp-delta", "1"],
            id="demo-dp-delta",
        ),
        pytest.param(["broker", "--implementation", "nats"], id="broker"),
        pytest.param(
            ["aggregator", "regional", "--region", "eu", "--buffer-size", "0"],
            id="regional-buffer",
        ),
        pytest.param(["aggregator", "regional", "--region", "e u"], id="regional-region"),
    ],
)
def test_every_command_refuses_bad_input_in_one_line_with_exit_2(
    runner: CliRunner, args: list[str]
) -> None:
    """Control, observing, demo and broker commands share the same refusal."""
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert_one_line_refusal(result.stderr)


def test_a_regional_aggregator_without_a_region_is_refused(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`aggregator regional` names no default region: it must be told which one it serves."""
    monkeypatch.delenv("HEALTHNET_REGION", raising=False)
    state = tmp_path / "regional"
    result = runner.invoke(app, ["aggregator", "regional", "--state-dir", str(state)])
    assert result.exit_code == 2, result.output
    assert_one_line_refusal(result.stderr, "--region is required")
    assert not state.exists()


def test_a_node_without_data_is_refused(runner: CliRunner, tmp_path: Path) -> None:
    """`node run` without --data does not fall back to the bundled public heart data."""
    state = tmp_path / "node"
    result = runner.invoke(app, ["node", "run", "--state-dir", str(state)])
    assert result.exit_code == 2, result.output
    assert_one_line_refusal(result.stderr, "--data is required")
    assert not state.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_node_asked_for_cuda_without_cuda_fails_at_start(
    runner: CliRunner, tmp_path: Path
) -> None:
    """`node run --device cuda` on a CPU-only machine exits 1 at once, before broker or state."""
    state = tmp_path / "node"
    result = runner.invoke(
        app,
        [
            *("node", "run", "--device", "cuda", "--data", "heart-disease:cleveland"),
            *("--state-dir", str(state), "--broker-url", "mqtt://127.0.0.1:9"),
        ],
    )
    assert result.exit_code == 1, result.output
    assert_one_line_refusal(result.stderr, "'cuda'", "no CUDA device")
    assert not state.exists() or not any(state.iterdir())


def retained_status(url: str, federation: str, body: AggregatorStatus) -> None:
    tree = TopicTree(federation)
    with MqttClient(BrokerEndpoint.parse(url), f"agg-{uuid.uuid4().hex[:8]}") as client:
        payload = encode(envelope(body, sender="aggregator", sent_at=body.updated_at))
        client.publish(tree.aggregator_status(), payload, wait=15.0)


@pytest.mark.broker
def test_status_shows_its_age_and_an_update_size_that_is_right_way_round(
    runner: CliRunner, mosquitto: EmbeddedBroker
) -> None:
    """`healthnet status` of a two-hour-old offline status says so; wire bytes beside dense."""
    federation = f"cli{uuid.uuid4().hex[:12]}"
    body = AggregatorStatus(
        run_id="run-1",
        state=AggregatorState.OFFLINE,
        version=7,
        buffer_fill=0,
        knobs=Knobs(),
        counters=Counters(accepted=3, bytes_accepted=3 * 559, raw_bytes_accepted=3 * 112),
        updated_at=time.time() - 7200,
    )
    retained_status(mosquitto.url, federation, body)
    flags = ["--broker-url", mosquitto.url, "--federation", federation]
    shown = runner.invoke(app, ["status", *flags])
    assert shown.exit_code == 0, shown.output
    text = " ".join(shown.stdout.split())  # rich wraps at the terminal's width
    assert "offline, version 7" in text
    assert "status 2.0h old" in text
    assert "559 bytes on the wire, 112 as dense float32 (5.0x larger than dense)" in text
    assert "smaller" not in text
    as_json = runner.invoke(app, ["status", "--json", *flags])
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.stdout)
    assert data["state"] == "offline"
    assert 7200 <= data["status_age_seconds"] < 7200 + 60


# -- differential privacy


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        pytest.param(
            ["--dp-epsilon-budget", "3"],
            ["--dp-noise-multiplier/--dp-calibrate-versions", "exactly one"],
            id="neither-noise-nor-calibration",
        ),
        pytest.param(
            [
                "--dp-epsilon-budget",
                "3",
                "--dp-noise-multiplier",
                "1",
                "--dp-calibrate-versions",
                "9",
            ],
            ["--dp-noise-multiplier/--dp-calibrate-versions"],
            id="noise-and-calibration",
        ),
        pytest.param(
            ["--dp-noise-multiplier", "1"], ["--dp-epsilon-budget is required"], id="no-budget"
        ),
        pytest.param(
            ["--dp-epsilon-budget", "3", "--dp-noise-multiplier", "1", "--dp-delta", "1.5"],
            ["--dp-delta", "1.5"],
            id="delta",
        ),
        pytest.param(
            ["--dp-epsilon-budget", "-1", "--dp-noise-multiplier", "1"],
            ["--dp-epsilon-budget", "-1"],
            id="negative-budget",
        ),
        pytest.param(
            ["--dp-epsilon-budget", "3", "--dp-noise-multiplier", "1", "--dp-max-grad-norm", "0"],
            ["--dp-max-grad-norm"],
            id="clipping-norm",
        ),
    ],
)
def test_a_bad_privacy_flag_is_one_line_naming_the_flag(
    runner: CliRunner, tmp_path: Path, flags: list[str], expected: list[str]
) -> None:
    """`aggregator run`'s --dp-* flags build the run's privacy policy; a bad one says which."""
    state = tmp_path / "state"
    result = runner.invoke(app, ["aggregator", "run", "--state-dir", str(state), *flags])
    assert result.exit_code == 2, result.output
    assert_one_line_refusal(result.stderr, *expected)
    assert not state.exists()


@pytest.mark.broker
@pytest.mark.timeout(120)
def test_aggregator_run_with_dp_flags_announces_the_policy(
    runner: CliRunner, mosquitto: EmbeddedBroker, tmp_path: Path
) -> None:
    """The --dp-* flags become knobs.privacy: `status --json` and the status text show it."""
    federation = f"cli{uuid.uuid4().hex[:12]}"
    flags = ["--broker-url", mosquitto.url, "--federation", federation]
    dp = ["--dp-epsilon-budget", "2.5", "--dp-calibrate-versions", "40", "--dp-delta", "1e-6"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "healthnet", "aggregator", "run", *flags, *dp,
         "--state-dir", str(tmp_path / "state"), "--dp-metrics", "suppressed",
         "--model", "logreg", "--model-kwargs", '{"in_features": 3, "num_classes": 2}'],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            shown = runner.invoke(app, ["status", "--json", *flags])
            if shown.exit_code == 0:
                break
            assert proc.poll() is None, "the aggregator exited"
            assert time.monotonic() < deadline, shown.output
        privacy = json.loads(shown.stdout)["knobs"]["privacy"]
        assert privacy == {
            "noise_multiplier": None,
            "calibrate_versions": 40,
            "max_grad_norm": 1.0,
            "delta": 1e-6,
            "epsilon_budget": 2.5,
            "metrics": "suppressed",
        }
        text = " ".join(runner.invoke(app, ["status", *flags]).stdout.split())
        assert "privacy: DP-SGD, budget epsilon=2.5 per hospital at delta=1e-06" in text
        assert "calibrated to spend the budget in 40 versions" in text
        assert runner.invoke(app, ["stop", *flags]).exit_code == 0
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.broker
def test_status_and_nodes_show_each_hospitals_epsilon_as_reported(
    runner: CliRunner, mosquitto: EmbeddedBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The epsilon in `status`, `status --json` and `nodes` is the tallies' (the nodes' reports)."""
    # A terminal wide enough for the whole table: rich shortens cells to fit a narrow one.
    monkeypatch.setattr(cli, "console", Console(width=160))
    federation = f"cli{uuid.uuid4().hex[:12]}"
    body = AggregatorStatus(
        run_id="run-1",
        state=AggregatorState.RUNNING,
        version=4,
        buffer_fill=0,
        knobs=Knobs(privacy=PrivacyPolicy(noise_multiplier=1.2, epsilon_budget=3.0)),
        counters=Counters(),
        nodes=(
            NodeTally(node="cleveland", accepted=3, epsilon=1.234, epsilon_budget=3.0),
            NodeTally(node="va", accepted=1, epsilon=2.9, epsilon_budget=2.5),
            NodeTally(node="plain", accepted=1),
        ),
        updated_at=time.time(),
    )
    retained_status(mosquitto.url, federation, body)
    flags = ["--broker-url", mosquitto.url, "--federation", federation]
    shown = runner.invoke(app, ["status", *flags])
    assert shown.exit_code == 0, shown.output
    text = " ".join(shown.stdout.split())
    assert "privacy: DP-SGD, budget epsilon=3 per hospital at delta=1e-05, noise x1.2" in text
    assert "epsilon spent: cleveland 1.23/3, va 2.90/2.5" in text
    assert "has spent its budget" not in text
    data = json.loads(runner.invoke(app, ["status", "--json", *flags]).stdout)
    assert {n["node"]: (n["epsilon"], n["epsilon_budget"]) for n in data["nodes"]} == {
        "cleveland": (1.234, 3.0),
        "va": (2.9, 2.5),
        "plain": (None, None),
    }
    table = runner.invoke(app, ["nodes", *flags])
    assert table.exit_code == 0, table.output
    assert "epsilon" in table.stdout
    rows = {line.split()[1]: line.split() for line in table.stdout.splitlines() if "│" in line}
    assert rows["cleveland"][-2] == "1.23/3"
    assert rows["va"][-2] == "2.90/2.5"
    assert rows["plain"][-2] == "-"
    retained_status(mosquitto.url, federation, body.model_copy(update={"budgets_spent": True}))
    spent = " ".join(runner.invoke(app, ["status", *flags]).stdout.split())
    assert "every hospital that could still train has spent its budget" in spent


def test_status_text_shows_secure_aggregation_and_its_open_plan(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under the policy the status text names it, the updates short of receipts, and the open
    fold plan with its answers and refusals."""
    from common.messages import (
        AggregatorState,
        AggregatorStatus,
        Counters,
        Knobs,
        SecureAggregation,
        SecurePlanStatus,
    )

    monkeypatch.setattr(cli, "console", Console(width=200, record=True))
    holders = ("a", "b", "c", "d")
    snapshot = AggregatorStatus(
        run_id="run-1",
        state=AggregatorState.RUNNING,
        version=4,
        buffer_fill=3,
        knobs=Knobs(buffer_size=3, secure_aggregation=SecureAggregation(holders=holders)),
        counters=Counters(),
        updated_at=0.0,
        awaiting_receipts=1,
        secure_plan=SecurePlanStatus(
            fold_id="f1",
            update_ids=("u1", "u2", "u3"),
            holders=holders,
            needed=3,
            answered=("a", "c"),
            refusals={"b": "already released"},
        ),
    )
    cli._render_status(snapshot, 1.0)
    text = " ".join(cli.console.export_text().split())
    assert "secure aggregation: 4 holders, U=3, T=1" in text
    assert "1 updates wait for holders' receipts" in text
    assert (
        "open fold plan f1: 3 updates, 2/3 answers from a, b, c, d; b refused: already released"
        in text
    )
