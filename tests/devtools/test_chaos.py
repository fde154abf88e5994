"""Specification of the chaos run's verdict, shared by the benchmark's exit status and the
durability tests."""

from __future__ import annotations

import dataclasses

import pytest

from devtools.chaos import ChaosConfig, ChaosResult, problems
from devtools.reconcile import Reconciliation

CLEAN = Reconciliation(
    updates_sent=4,
    updates_folded=3,
    updates_rejected=1,
    updates_discarded=0,
    rejections={"stale": 1},
    duplicates=0,
    versions=2,
    versions_contiguous=True,
)


def result(
    reconciliation: Reconciliation,
    unexpected: list[str] | None = None,
    config: ChaosConfig | None = None,
) -> ChaosResult:
    return ChaosResult(
        counts={},
        reconciliation=reconciliation,
        final_version=2,
        final_accuracy=0.8,
        pooled_accuracy=0.8,
        per_node_accuracy={},
        fault_seconds=1.0,
        wall_seconds=1.0,
        unexpected_exits=unexpected or [],
        config=config or ChaosConfig(),
        events=[],
    )


def test_a_run_with_every_update_accounted_for_has_no_problems() -> None:
    """Folded plus rejected equals sent, nothing else: no problem."""
    assert problems(result(CLEAN)) == []


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        pytest.param({"lost": ["u9"], "updates_sent": 5}, "lost", id="lost"),
        pytest.param({"double_folded": ["u1"]}, "two versions", id="double-folded"),
        pytest.param({"still_in_outbox": ["u9"]}, "outbox", id="outbox-left-overs"),
        pytest.param({"same_base_twice": ["a@r/v1"]}, "trained on twice", id="same-base-twice"),
        pytest.param(
            {"updates_discarded": 1, "updates_folded": 2}, "1 updates discarded", id="discarded"
        ),
        pytest.param({"versions_contiguous": False}, "not contiguous", id="gap"),
        pytest.param({"updates_sent": 5}, "5 updates sent, 4", id="unaccounted"),
    ],
)
def test_each_broken_promise_is_a_problem(change: dict[str, object], expected: str) -> None:
    """Lost, folded twice, left in an outbox, a base trained twice, discarded, a gap in the
    versions, an update unaccounted for: each is reported."""
    found = problems(result(dataclasses.replace(CLEAN, **change)))
    assert any(expected in line for line in found), found


def test_a_process_that_exited_on_its_own_is_a_problem() -> None:
    """An unexpected exit fails the run even when the records are clean."""
    found = problems(result(CLEAN, ["n1 exited with 1"]))
    assert found == ["1 unexpected exits: ['n1 exited with 1']"]


HELD = dataclasses.replace(
    CLEAN, updates_sent=6, buffered_at_stop=["u5", "u6"], buffered_hospitals=2
)


def test_updates_buffered_at_stop_are_a_problem_in_a_plain_run() -> None:
    """The plain drain folds everything with K = 1: anything still buffered is a problem."""
    found = problems(result(HELD))
    assert any("still buffered at stop" in line for line in found), found


def test_a_secure_run_may_stop_with_updates_buffered_for_the_next_fold() -> None:
    """Under secure aggregation the drain cannot fold the rest: updates acknowledged and still
    buffered at stop are counted apart, not a problem, as long as every sent one is accounted."""
    assert problems(result(HELD, config=ChaosConfig(secure_aggregation=True))) == []


def test_a_secure_run_still_counts_an_update_never_accepted_as_lost() -> None:
    """Buffered updates do not cover for a lost one."""
    lost = dataclasses.replace(HELD, updates_sent=7, lost=["u7"])
    found = problems(result(lost, config=ChaosConfig(secure_aggregation=True)))
    assert any("lost" in line for line in found), found
