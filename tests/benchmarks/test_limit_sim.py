"""The lever screen's summary: medians over seeds, a missed target counting as slowest."""

from __future__ import annotations

from benchmarks.limit_sim import LEVERS, summarise


def run(setting: str, seed: int, first: int | None, best: float) -> dict[str, object]:
    return {
        "setting": setting,
        "seed": seed,
        "to_85": {"first": first, "steady": None},
        "to_88": {"first": None, "steady": None},
        "best": best,
        "last10_mean": best - 0.01,
    }


def test_summary_takes_the_median_with_a_miss_as_slowest() -> None:
    """Two seeds of three reaching 85 % give the slower of the two as median; one of three
    gives no median, but says how many reached it."""
    runs = [
        run("a", 0, 1_000, 0.86),
        run("a", 1, None, 0.84),
        run("a", 2, 3_000, 0.87),
        run("b", 0, 500, 0.85),
        run("b", 1, None, 0.80),
        run("b", 2, None, 0.80),
    ]
    summary = {entry["setting"]: entry for entry in summarise(runs)}
    assert summary["a"]["to_85_first"] == {"examples": 3_000, "reached": "2/3"}
    assert summary["b"]["to_85_first"] == {"examples": None, "reached": "1/3"}
    assert summary["a"]["best"] == 0.86
    assert summary["a"]["seeds"] == [0, 1, 2]


def test_levers_stay_valid_knobs_of_the_pneumonia_federation() -> None:
    """Every lever's knobs keep the federation's model-facing training settings in range, and
    the default lever is the federation's own knobs."""
    from healthnet.federations import PNEUMONIA

    assert LEVERS["default"].knobs == PNEUMONIA.knobs
    assert all(lever.knobs.buffer_size >= 1 for lever in LEVERS.values())
