"""Every benchmark's quick mode runs to the end and writes the JSON keys its docs tables use."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.privacy_policy import EPSILON_SLACK

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.broker]


def run_quick(name: str, tmp_path: Path, timeout: float = 300) -> dict[str, object]:
    out = tmp_path / f"{name}.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{name}", "--quick", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report: dict[str, object] = json.loads(out.read_text())
    machine = report["machine"]
    assert isinstance(machine, dict)
    assert {"cores", "cpu", "git_revision"} <= machine.keys()
    assert report["quick"] is True
    return report


def test_stragglers_quick_reports_every_run(tmp_path: Path) -> None:
    """stragglers --quick writes one run per mode with the time-to-accuracy keys."""
    report = run_quick("stragglers", tmp_path)
    runs = report["runs"]
    assert isinstance(runs, list)
    assert {r["mode"] for r in runs} == {"sync", "fedbuff"}
    for run in runs:
        assert {"mode", "k", "seed", "seconds_to_85", "seconds_to_88", "final_accuracy",
                "bytes_moved", "timeline"} <= run.keys()  # fmt: skip
        assert 0.0 <= run["final_accuracy"] <= 1.0


def test_fold_quick_measures_every_setting(tmp_path: Path) -> None:
    """fold --quick reports updates per second and the ratio to numpy's add per setting."""
    report = run_quick("fold", tmp_path)
    results = report["results"]
    assert isinstance(results, list)
    assert {r["setting"] for r in results} == {"dense-fp32", "fp16", "top10%-int8"}
    for row in results:
        assert row["updates_per_second"] > 0
        assert row["ratio_to_numpy_add"] > 0


def test_startup_quick_measures_every_role(tmp_path: Path) -> None:
    """startup --quick times each role's imports in a fresh interpreter and says what it
    loaded: torch for a node, never opacus; no torch for the aggregator, even to its first
    publish of a built-in model."""
    report = run_quick("startup", tmp_path)
    rows = {row["role"]: row for row in report["imports"]}  # type: ignore[attr-defined]
    publish = ("aggregator to first publish", "aggregator to first publish, cnn")
    assert set(rows) == {"cli", "aggregator", *publish, "node"}
    for row in rows.values():
        assert row["cpu_seconds"] > 0
    for role in ("aggregator", *publish):
        assert "torch" not in rows[role]["loaded"], role
    assert "opacus" not in rows["node"]["loaded"]
    assert "torch" in rows["node"]["loaded"]


def test_broadcast_quick_times_every_node(tmp_path: Path) -> None:
    """broadcast --quick times each version from creation to the median and the worst node."""
    report = run_quick("broadcast", tmp_path)
    results = report["results"]
    assert isinstance(results, list)
    row = results[0]
    assert 0 < row["first_node_seconds"] <= row["median_node_seconds"] <= row["worst_node_seconds"]


def test_swarm_quick_loses_no_update(tmp_path: Path) -> None:
    """swarm --quick folds updates from its simulated hospitals and loses or rejects none."""
    report = run_quick("swarm", tmp_path)
    result = report["result"]
    assert isinstance(result, dict)
    assert result["sent"] > 0
    assert result["accepted"] == result["sent"]
    assert result["rejected"] == 0
    assert result["lost"] == 0
    assert result["aggregator_peak_rss_bytes"] > 0


def test_compression_quick_reports_bytes_accuracy_and_fold_cost(tmp_path: Path) -> None:
    """compression --quick runs dense and top-1 % float16 with error feedback, and reports for
    each the bytes on the wire, the ratio to dense, the accuracy and the fold cost."""
    report = run_quick("compression", tmp_path)
    assert report["versions"] == 2
    knobs = report["knobs"]
    assert isinstance(knobs, dict)
    assert {"buffer_size", "server_lr", "optimizer", "learning_rate"} <= knobs.keys()
    settings = report["settings"]
    assert isinstance(settings, list)
    rows = {row["name"]: row for row in settings}
    assert rows.keys() == {"dense-fp32", "top1%-fp16-ef"}
    for row in rows.values():
        assert row["versions"] == 2
        assert row["updates_folded"] >= 2
        assert 0.0 <= row["accuracy"] <= 1.0
        assert row["fold_ratio"] > 0
        assert row["fold_ratio_11m"] > 0
    assert rows["dense-fp32"]["ratio"] == 1.0
    assert rows["top1%-fp16-ef"]["error_feedback"] is True
    # Top 1 % of the values as float16 with their indices: far fewer bytes than dense float32.
    assert rows["top1%-fp16-ef"]["ratio"] > 20


def test_durability_quick_times_every_configuration(tmp_path: Path) -> None:
    """durability --quick times each configuration once on the CNN, with its ratio to the
    write-ahead log alone and the time spent in the durable writes."""
    report = run_quick("durability", tmp_path)
    assert report["rounds"] == 1
    models = report["models"]
    assert isinstance(models, dict)
    assert models.keys() == {"cnn"}
    cnn = models["cnn"]
    assert cnn["parameters"] > 0
    assert cnn["baseline_ms_per_version"] > 0
    for mode in ("checkpoint-every-version", "checkpoint-every-version-ledger-fsync-per-line",
                 "checkpoint-every-10"):  # fmt: skip
        figures = cnn[mode]
        assert figures["ms_per_version"] > 0
        assert figures["ratio"] > 0
        assert 0 < figures["checkpoint_and_ledger_ms_per_version"] < figures["ms_per_version"]
        assert figures["instrumented_ratio"] >= 1
    assert {mode: len(runs) for mode, runs in cnn["runs"].items()} == {
        "baseline": 1,
        "checkpoint-every-version": 1,
        "checkpoint-every-version-ledger-fsync-per-line": 1,
        "checkpoint-every-10": 1,
    }


def test_privacy_quick_reports_accuracy_against_epsilon(tmp_path: Path) -> None:
    """privacy --quick runs heart disease without DP and at an epsilon budget of 3, and reports
    for each the keys the docs' table reads; the DP run's hospitals reached at most the budget."""
    report = run_quick("privacy", tmp_path)
    federations = report["federations"]
    assert isinstance(federations, dict)
    assert federations.keys() == {"heart-disease"}
    settings = report["settings"]
    assert isinstance(settings, list)
    rows = {row["name"]: row for row in settings}
    assert rows.keys() == {"heart-disease/no-dp", "heart-disease/eps-3"}
    for row in rows.values():
        assert {"name", "federation", "epsilon_budget", "epsilon", "delta",
                "noise_multiplier_per_hospital", "mean_accuracy", "pooled_accuracy",
                "mean_accuracy_last5", "versions", "seconds", "train_seconds",
                "train_seconds_ratio"} <= row.keys()  # fmt: skip
        assert row["versions"] == 3
        assert 0.0 <= row["mean_accuracy"] <= 1.0
        assert 0.0 <= row["pooled_accuracy"] <= 1.0
        assert row["seconds"] > 0
        assert row["train_seconds"] > 0
    plain, private = rows["heart-disease/no-dp"], rows["heart-disease/eps-3"]
    assert plain["epsilon"] is None
    assert plain["delta"] is None
    assert plain["train_seconds_ratio"] == 1.0
    assert private["delta"] == 1e-3
    assert private["train_seconds_ratio"] > 0
    # Both hospitals trained under DP and charged their ledgers, within the budget of 3.
    assert private["epsilon_per_hospital"].keys() == {"cleveland", "hungarian"}
    assert 0 < private["epsilon"] <= 3.0 * (1 + EPSILON_SLACK)
    assert 0 < private["epsilon_folded"] <= private["epsilon"]
    assert all(sigma > 0 for sigma in private["noise_multiplier_per_hospital"].values())


def test_scale_quick_sends_each_version_once_per_region_through_the_tree(tmp_path: Path) -> None:
    """scale --quick: the flat broker sends a version once per hospital (8), the tree's core once
    per region (2), every hospital held every version in both, and every update of the update
    path and of the knee was acknowledged."""
    report = run_quick("scale", tmp_path, timeout=600)
    results = report["results"]
    assert isinstance(results, list)
    flat, tree = results
    assert (flat["topology"], tree["topology"]) == ("flat", "tree")
    assert round(flat["core_copies_per_version"]) == 8
    assert round(tree["core_copies_per_version"]) == 2
    for row in results:
        assert len(row["per_version"]) == row["versions"]
        assert all(len(held) == row["hospitals"] for held in row["per_version"])
    summary = report["summary"]
    assert isinstance(summary, dict)
    assert summary["core_bytes_ratio_tree_to_flat"] < 0.5
    # The update path: every update sent was acknowledged, flat and through the tree, and every
    # hospital held the version that K of them made.
    updates = report["updates"]
    assert isinstance(updates, dict)
    for row in updates["results"]:
        assert row["sent"] > 0
        assert row["lost"] == 0
        assert row["acknowledged"] == row["sent"]
        assert row["one_version"]["core_bytes_sent"] > 0
        assert row["connections"][-1]["hospitals"] == row["hospitals"]
    assert updates["summary"]["lost"] == 0
    knee = report["knee"]
    assert isinstance(knee, dict)
    assert len(knee["knee"]) == len(knee["settings"]["rates"])
    assert all(step["offered_per_second"] > 0 for step in knee["knee"])


def test_secure_aggregation_quick_measures_costs_and_both_folds(tmp_path: Path) -> None:
    """secure_aggregation --quick reports the bytes and CPU of both federations, an unmasked
    sum within quantization error, and the heart FedBuff folded in plaintext and securely."""
    report = run_quick("secure_aggregation", tmp_path)
    costs = report["costs"]
    assert isinstance(costs, list)
    assert [row["federation"] for row in costs] == ["heart-disease", "pneumonia"]
    for row in costs:
        assert row["update_bytes"] == row["masked_bytes"] + row["share_bytes_sent"]
        assert row["masked_bytes"] == row["dense_float32_bytes"]
        assert row["max_abs_error"] < 1e-3
        assert row["aggregator_cpu_ratio"] > 0
    runs = report["accuracy"]
    assert isinstance(runs, list)
    assert {run["mode"] for run in runs} == {"plain", "secure"}
    for run in runs:
        assert {"seed", "versions_to_78", "updates_to_78", "final_accuracy",
                "last5_mean_accuracy", "curve"} <= run.keys()  # fmt: skip
        assert len(run["curve"]) == run["versions"]


def test_secure_aggregation_mqtt_quick_runs_plain_and_secure_federations(tmp_path: Path) -> None:
    """secure_aggregation --mqtt --quick runs the heart federation over MQTT plain, then
    secure, and reports for each the keys its docs table reads; every version of the secure
    run is securely aggregated and none of the plain one."""
    out = tmp_path / "secagg-mqtt.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.secure_aggregation", "--mqtt", "--quick",
         "--json", str(out)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["quick"] is True
    runs = report["runs"]
    assert [(run["federation"], run["mode"]) for run in runs] == [
        ("heart-disease", "plain"),
        ("heart-disease", "secure"),
    ]
    plain, secure = runs
    assert plain["secure_versions"] == 0
    assert secure["secure_versions"] == secure["versions"]
    for run in runs:
        assert {"seconds_to_75", "updates_to_78", "final_accuracy", "bytes_per_update",
                "aggregator_cpu_seconds_per_version", "timeline"} <= run.keys()  # fmt: skip
    (summary,) = report["summary"]
    assert {"time_ratio", "accuracy_gap", "time_met", "accuracy_met"} <= summary.keys()


def test_limit_quick_compares_pooled_with_the_federation(tmp_path: Path) -> None:
    """limit --quick trains pooled and runs a federation, and reports for each the crossings of
    85 % and 88 % (first and steady), its trajectory and the summary's ratios to pooled."""
    report = run_quick("limit", tmp_path)
    runs = report["runs"]
    assert isinstance(runs, list)
    assert [r["setting"] for r in runs] == ["pooled", "default/no-delays"]
    for run in runs:
        assert {"to_85", "to_88", "trajectory"} <= run.keys()
        assert set(run["to_85"]) == {"first", "steady"}
        trajectory = run["trajectory"]
        assert trajectory[0][:3] == [0, 0, 0]
        examples = [point[0] for point in trajectory]
        assert examples == sorted(examples)
        assert all(0.0 <= point[4] <= 1.0 for point in trajectory)
    pooled, federated = runs
    assert pooled["trajectory"][-1][:2] == [20 * 32, 20]
    assert federated["versions"] >= 1
    summary = {entry["setting"]: entry for entry in report["summary"]}
    assert summary.keys() == {"pooled", "default/no-delays"}
    assert {"examples", "seconds"} == summary["default/no-delays"]["to_85_first_ratio"].keys()


def test_limit_sim_quick_screens_levers_against_pooled(tmp_path: Path) -> None:
    """limit_sim --quick simulates the federation under two levers and trains pooled, and
    summarises each setting's crossings of 85 % and 88 %."""
    report = run_quick("limit_sim", tmp_path)
    runs = report["runs"]
    assert isinstance(runs, list)
    assert [r["setting"] for r in runs] == ["pooled/adam-1e-3", "default", "scaffold"]
    for run in runs[1:]:
        examples = [point[0] for point in run["trajectory"]]
        assert examples == sorted(examples)
        assert examples[-1] >= 2_000
    summary = {entry["setting"]: entry for entry in report["summary"]}
    assert {"to_85_first", "to_85_steady", "to_88_first", "best"} <= summary["default"].keys()


def test_personalisation_quick_reports_every_model_per_hospital(tmp_path: Path) -> None:
    """personalisation --quick writes, per federation, each model's per-hospital medians, mean
    and worst drop below the global model: the keys the docs' table reads."""
    report = run_quick("personalisation", tmp_path)
    federations = report["federations"]
    assert isinstance(federations, dict)
    assert set(federations) == {"heart-disease", "pneumonia-shift"}
    for entry in federations.values():
        hospitals = entry["hospitals"]
        assert set(entry["models"]) == {"global", "local", "finetune", "ditto", "ditto-0.1",
                                        "ditto-1", "ditto-holdout"}  # fmt: skip
        for row in entry["models"].values():
            assert set(row["per_hospital_median"]) == set(hospitals)
            assert all(0.0 <= a <= 1.0 for a in row["per_hospital_median"].values())
            assert len(row["per_seed_mean"]) == report["seeds"]
            assert set(row["worst_drop_below_global"]) == set(hospitals)
        assert all(v == 0 for v in entry["models"]["global"]["worst_drop_below_global"].values())
