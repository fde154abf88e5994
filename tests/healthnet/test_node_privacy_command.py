"""Specification of ``healthnet node privacy``: a node's ledger, read from its state dir alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edge_node.privacy_ledger import LEDGER_FILE, Charge, PrivacyLedger, history_epsilon
from healthnet.cli import app

DELTA = 1e-3


def charged(state_dir: Path, versions: int) -> tuple[Charge, ...]:
    ledger = PrivacyLedger(state_dir / "privacy")
    ledger.open()
    for version in range(versions):
        ledger.charge(
            Charge(
                run_id="run-a",
                base_version=version,
                update_id=f"update{version}",
                noise_multiplier=1.2,
                sample_rate=0.125,
                steps=8,
                max_grad_norm=1.0,
                delta=DELTA,
                epsilon_budget=8.0,
                at=float(version),
            )
        )
    return ledger.charges


def test_the_json_shows_every_charge_and_the_accountants_epsilon(tmp_path: Path) -> None:
    charges = charged(tmp_path, 3)
    result = CliRunner().invoke(app, ["node", "privacy", "--state-dir", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [c["base_version"] for c in report["charges"]] == [0, 1, 2]
    assert report["spend"]["epsilon"] == pytest.approx(history_epsilon(charges, DELTA))
    assert report["spend"]["epsilon_budget"] == 8.0
    after = [c["epsilon_after"] for c in report["charges"]]
    assert after == sorted(after)
    assert after[-1] == pytest.approx(report["spend"]["epsilon"])


def test_the_table_says_epsilon_against_the_budget(tmp_path: Path) -> None:
    charged(tmp_path, 2)
    result = CliRunner().invoke(app, ["node", "privacy", "--state-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "of budget 8 at delta 0.001" in result.stdout
    assert "2 version(s) charged" in result.stdout


def test_a_node_that_never_trained_under_dp_has_no_charges(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["node", "privacy", "--state-dir", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["charges"] == []


def test_a_damaged_ledger_is_an_error_not_an_empty_ledger(tmp_path: Path) -> None:
    (tmp_path / "privacy").mkdir()
    (tmp_path / "privacy" / LEDGER_FILE).write_text("{", encoding="utf-8")
    result = CliRunner().invoke(app, ["node", "privacy", "--state-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "unreadable" in result.stderr
