"""Specification of the command line under personalisation: the flags that set the policy, and
each hospital's global and personal accuracy in `status`, `status --json` and `nodes`."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from common.messages import (
    AggregatorState,
    AggregatorStatus,
    Counters,
    Knobs,
    NodeTally,
    Personalisation,
    PersonalisationMethod,
)
from healthnet import cli
from healthnet.broker import EmbeddedBroker
from healthnet.cli import app
from tests.healthnet.test_cli import assert_one_line_refusal, retained_status, runner

__all__ = ["runner"]  # the fixture this module uses


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        pytest.param(["--ditto-lambda", "0.3"], ["need --personalise"], id="lambda-alone"),
        pytest.param(
            ["--personalise", "ditto", "--ditto-lambda", "-1"],
            ["--ditto-lambda", "greater than or equal to 0"],
            id="negative-lambda",
        ),
        pytest.param(
            ["--personalise", "finetune", "--personal-epochs", "0"],
            ["--personal-epochs"],
            id="no-epochs",
        ),
    ],
)
def test_aggregator_run_refuses_a_bad_personalisation_in_one_line(
    runner: CliRunner, tmp_path: Path, flags: list[str], expected: list[str]
) -> None:
    state = tmp_path / "state"
    result = runner.invoke(app, ["aggregator", "run", "--state-dir", str(state), *flags])
    assert result.exit_code == 2, result.output
    assert_one_line_refusal(result.stderr, *expected)
    assert not state.exists()


@pytest.mark.broker
def test_status_and_nodes_show_each_hospitals_global_and_personal_accuracy(
    runner: CliRunner, mosquitto: EmbeddedBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The policy and the two accuracies per hospital, from the aggregator's tallies."""
    monkeypatch.setattr(cli, "console", Console(width=160))
    federation = f"cli{uuid.uuid4().hex[:12]}"
    policy = Personalisation(method=PersonalisationMethod.DITTO, ditto_lambda=0.3)
    body = AggregatorStatus(
        run_id="run-1",
        state=AggregatorState.RUNNING,
        version=6,
        buffer_fill=0,
        knobs=Knobs(personalisation=policy),
        counters=Counters(),
        nodes=(
            NodeTally(
                node="cleveland", eval_version=6, eval_accuracy=0.78, eval_personal_accuracy=0.81
            ),
            NodeTally(node="va", eval_version=5, eval_accuracy=0.7),
        ),
        updated_at=time.time(),
    )
    retained_status(mosquitto.url, federation, body)
    flags = ["--broker-url", mosquitto.url, "--federation", federation]
    shown = runner.invoke(app, ["status", *flags])
    assert shown.exit_code == 0, shown.output
    text = " ".join(shown.stdout.split())
    assert "personalisation: ditto, 1 epoch(s) per version, lambda 0.3" in text
    assert "accuracy, global / personal: cleveland 0.780/0.810" in text
    data = json.loads(runner.invoke(app, ["status", "--json", *flags]).stdout)
    assert data["knobs"]["personalisation"]["method"] == "ditto"
    got = {n["node"]: (n["eval_accuracy"], n["eval_personal_accuracy"]) for n in data["nodes"]}
    assert got == {"cleveland": (0.78, 0.81), "va": (0.7, None)}
    table = runner.invoke(app, ["nodes", *flags])
    assert table.exit_code == 0, table.output
    assert "personal" in table.stdout
    rows = {line.split()[1]: line.split() for line in table.stdout.splitlines() if "│" in line}
    assert (rows["cleveland"][-4], rows["cleveland"][-2]) == ("0.780", "0.810")
    assert (rows["va"][-4], rows["va"][-2]) == ("0.700", "-")
