"""The limit benchmark's arithmetic: where a run crosses a target, and what a version cost."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks.limit import Point, crossings, federated_points, summarise
from common.messages import Contribution, TrainingConfig, VersionRecord


def points(accuracies: list[float]) -> list[Point]:
    return [Point(10 * i, i, i, float(i), a) for i, a in enumerate(accuracies)]


def test_first_crossing_is_the_first_evaluation_at_the_target() -> None:
    """The first crossing is the first point at or above the target, however it dips after."""
    found = crossings(points([0.5, 0.84, 0.85, 0.6, 0.9]), 0.85)
    assert found["first"] is not None
    assert found["first"]["versions"] == 2


def test_steady_crossing_needs_the_mean_of_the_last_five() -> None:
    """The steady crossing is where the mean of the last five evaluations first reaches it."""
    accuracies = [0.5, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9]
    found = crossings(points(accuracies), 0.85)
    # Means of five: v4 (0.5, 0.9 x4) = 0.82; v5 (0.9 x5) = 0.9.
    assert found["steady"] is not None
    assert found["steady"]["versions"] == 5
    assert found["first"] is not None
    assert found["first"]["versions"] == 1


@pytest.mark.parametrize("accuracies", [[0.5, 0.6], [0.9, 0.9, 0.9, 0.9]], ids=["low", "short"])
def test_a_target_never_reached_steadily_is_none(accuracies: list[float]) -> None:
    """No steady crossing below the target, nor before five evaluations exist."""
    assert crossings(points(accuracies), 0.85)["steady"] is None


def record(version: int, samples: list[int]) -> VersionRecord:
    return VersionRecord(
        run_id="run",
        version=version,
        created_at=0.0,
        contributions=tuple(
            Contribution(
                node=f"n{i}",
                update_id=f"u{version}-{i}",
                base_version=version - 1,
                staleness=0,
                num_samples=n,
                staleness_factor=1.0,
                weight=0.5,
                bytes=1,
                train_loss=0.0,
            )
            for i, n in enumerate(samples)
        ),
        update_norm=0.0,
        train_loss=0.0,
        fold_seconds=0.0,
        reason="buffer_full",
    )


def test_federated_examples_sum_the_folded_updates_epochs() -> None:
    """A version's examples are every folded update's rows times its epochs, up to it; seconds
    count from every hospital ready."""
    timeline = [
        {"version": 0, "seconds": 1.0, "accuracy": 0.6},
        {"version": 2, "seconds": 5.0, "accuracy": 0.86},
    ]
    records = [record(1, [100, 50]), record(2, [30, 20])]
    found = federated_points(timeline, records, TrainingConfig(epochs=2), ready_seconds=2.0)
    assert found == [Point(0, 0, 0, 0.0, 0.6), Point(400, 4, 2, 3.0, 0.86)]


def run(setting: str, seed: int, accuracies: list[float]) -> dict[str, object]:
    found = points(accuracies)
    return {"setting": setting, "seed": seed, "to_85": crossings(found, 0.85),
            "to_88": crossings(found, 0.88)}  # fmt: skip


def test_summary_ratios_are_federated_over_pooled_medians() -> None:
    """The summary's ratio is the median of a setting over the median of pooled training."""
    runs = [run("pooled", s, [0.5, 0.9]) for s in (0, 1, 2)]
    runs += [run("fed", s, [0.5, 0.6, 0.7, 0.9]) for s in (0, 1, 2)]
    summary: dict[object, Any] = {e["setting"]: e for e in summarise(runs)}
    assert summary["fed"]["to_85_first"]["examples"] == 30
    assert summary["fed"]["to_85_first_ratio"] == {"examples": 3.0, "seconds": 3.0}
    assert summary["fed"]["to_85_steady"]["reached"] == "0/3"
    assert summary["fed"]["to_85_steady_ratio"]["examples"] is None
