"""Specification of the node's error-feedback residual on disk and its pairing with the outbox."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_node.residual import ResidualStore

RUN = "run-1"
OLD = {"w": np.full((2, 3), 0.5, np.float32), "b": np.zeros(2, np.float32)}
NEW = {"w": np.full((2, 3), -0.25, np.float32), "b": np.ones(2, np.float32)}


def store(tmp_path: Path, queued: set[str] | None = None) -> ResidualStore:
    residuals = ResidualStore(tmp_path / "residual", max_bytes=1 << 20)
    residuals.open(queued or set())
    return residuals


def assert_same(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_array_equal(actual[name], value)
        assert actual[name].dtype == np.float32


def committed(tmp_path: Path, residual: dict[str, np.ndarray], update_id: str = "u0") -> None:
    residuals = store(tmp_path)
    residuals.stage(update_id, RUN, residual)
    residuals.commit(update_id)


def test_a_fresh_node_has_no_residual(tmp_path: Path) -> None:
    """Before any update the residual is empty (error feedback starts from zero)."""
    assert store(tmp_path).load(RUN) == {}


def test_a_committed_residual_survives_a_restart(tmp_path: Path) -> None:
    """stage + commit, then a new store on the same directory loads the same arrays."""
    committed(tmp_path, OLD)
    assert_same(store(tmp_path).load(RUN), OLD)


def test_a_staged_residual_is_not_current_until_committed(tmp_path: Path) -> None:
    """Staging alone leaves the previous residual in force."""
    committed(tmp_path, OLD)
    residuals = store(tmp_path)
    residuals.stage("u1", RUN, NEW)
    assert_same(residuals.load(RUN), OLD)
    residuals.commit("u1")
    assert_same(residuals.load(RUN), NEW)


def test_a_crash_after_the_update_was_queued_commits_its_residual(tmp_path: Path) -> None:
    """Staged, update in the outbox, crash before commit: on start the staged residual wins."""
    committed(tmp_path, OLD)
    store(tmp_path).stage("u1", RUN, NEW)
    assert_same(store(tmp_path, queued={"u1"}).load(RUN), NEW)


def test_a_crash_before_the_update_was_queued_keeps_the_old_residual(tmp_path: Path) -> None:
    """Staged but the update never reached the outbox: the staged file is dropped, the old stays."""
    committed(tmp_path, OLD)
    store(tmp_path).stage("u1", RUN, NEW)
    residuals = store(tmp_path, queued={"another"})
    assert_same(residuals.load(RUN), OLD)
    assert sorted(p.name for p in (tmp_path / "residual").iterdir()) == ["residual.tensors"]


def test_another_runs_residual_is_not_carried_over(tmp_path: Path) -> None:
    """A residual belongs to its run: a new run starts from zero."""
    committed(tmp_path, OLD)
    assert store(tmp_path).load("run-2") == {}


def test_an_unreadable_residual_starts_from_zero(tmp_path: Path) -> None:
    """A corrupt residual file costs error feedback, not the node: load returns empty."""
    committed(tmp_path, OLD)
    (tmp_path / "residual" / "residual.tensors").write_bytes(b"\xc1 not msgpack")
    assert store(tmp_path).load(RUN) == {}
