"""Specification of `healthnet report`: PNGs from a run's logs that really show something."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib import image
from typer.testing import CliRunner

from aggregator.store import StateStore
from common.errors import ConfigError
from healthnet.cli import app
from healthnet.report import load_run, write_report
from tests.healthnet.test_observe import evaluation, record

PLOTS = ("accuracy.png", "staleness.png", "bytes.png")


def write_logs(directory: Path, versions: int = 12) -> StateStore:
    """A run's logs as the aggregator writes them: versions and two hospitals' evaluations."""
    store = StateStore(directory)
    store.open()
    for version in range(1, versions + 1):
        store.append_version(record(version, version % 3, 1))
        store.append_evaluation("a", evaluation(version, 0.5 + version / 40), float(version))
        if version % 2 == 0:
            store.append_evaluation("b", evaluation(version, 0.6), float(version))
    return store


def assert_drawn(path: Path) -> None:
    """A PNG that exists, is not empty, and whose pixels are not one flat colour."""
    assert path.stat().st_size > 1000
    pixels = np.asarray(image.imread(path))
    assert pixels.ndim == 3
    assert pixels.shape[0] > 200
    assert pixels.shape[1] > 200
    assert float(pixels[..., :3].std()) > 0.05, f"{path.name} looks blank"


def pixels_of(path: Path, colour: str) -> int:
    """How many pixels are (nearly) ``colour``, e.g. "#2f6fdb"."""
    rgb = np.array([int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5)])
    pixels = np.asarray(image.imread(path))[..., :3]
    return int((np.abs(pixels - rgb).max(axis=-1) < 0.05).sum())


def test_report_draws_three_non_blank_plots(tmp_path: Path) -> None:
    """accuracy.png, staleness.png and bytes.png are written and each shows its data."""
    write_logs(tmp_path / "state")
    written = write_report(tmp_path / "state", tmp_path / "out")
    assert [p.name for p in written] == list(PLOTS)
    for path in written:
        assert_drawn(path)
        # The first hospital's line and markers, the histogram's bars, its bytes points.
        assert pixels_of(path, "#2f6fdb") > 100, f"{path.name} does not show the data"


def test_report_reads_a_demo_workdir_and_skips_a_torn_last_line(tmp_path: Path) -> None:
    """A demo --workdir is found through its aggregator/ folder; a cut-off line is skipped."""
    store = write_logs(tmp_path / "demo" / "aggregator", versions=5)
    with store.versions_log.open("a", encoding="utf-8") as handle:
        handle.write('{"run_id": "run-1", "vers')  # a crash mid-write
    run = load_run(tmp_path / "demo")
    assert [r.version for r in run.records] == [1, 2, 3, 4, 5]
    assert run.skipped_lines == 1
    assert {e.node for e in run.evaluations} == {"a", "b"}
    assert run.snapshot().accuracy.versions == (1, 2, 3, 4, 5)


def test_report_of_a_folder_without_logs_says_what_it_needs(tmp_path: Path) -> None:
    """A folder with no versions.jsonl is a clear error naming both places it looked."""
    with pytest.raises(ConfigError, match=r"no versions\.jsonl"):
        load_run(tmp_path)


def test_report_command_writes_the_pngs_and_lists_them(tmp_path: Path) -> None:
    """`healthnet report RUN_DIR --out DIR` prints the path of every PNG it wrote."""
    write_logs(tmp_path / "state")
    result = CliRunner().invoke(app, ["report", str(tmp_path / "state"), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for name in PLOTS:
        assert str(tmp_path / name) in result.output
        assert_drawn(tmp_path / name)


def test_report_command_fails_cleanly_without_logs(tmp_path: Path) -> None:
    """Without logs the command exits 1 with the error, not a traceback."""
    result = CliRunner().invoke(app, ["report", str(tmp_path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "no versions.jsonl" in result.output


def test_report_draws_global_and_personal_accuracy_when_hospitals_report_both(
    tmp_path: Path,
) -> None:
    """Evaluations with a personal accuracy add personal.png: each hospital's two lines."""
    store = write_logs(tmp_path / "state", versions=6)
    for version in range(7, 13):
        personal = evaluation(version, 0.7).model_copy(
            update={"personal_loss": 0.4, "personal_accuracy": 0.85}
        )
        store.append_evaluation("a", personal, float(version))
    written = write_report(tmp_path / "state", tmp_path / "out")
    assert [p.name for p in written] == [*PLOTS, "personal.png"]
    assert_drawn(written[-1])
    assert pixels_of(written[-1], "#2f6fdb") > 100


def test_report_without_personal_models_draws_no_personal_plot(tmp_path: Path) -> None:
    write_logs(tmp_path / "state", versions=4)
    written = write_report(tmp_path / "state", tmp_path / "out")
    assert "personal.png" not in [p.name for p in written]
