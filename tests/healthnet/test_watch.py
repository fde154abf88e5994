"""Specification of the terminal view: what `healthnet watch` draws from a snapshot."""

from __future__ import annotations

import pytest
from rich.console import Console

from common.messages import Counters, NodeState, NodeStatus, NodeTally
from common.topics import TopicTree
from healthnet.observe import Observer
from healthnet.watch import render, sparkline
from tests.healthnet.test_observe import evaluation, record, status


def _text(observer: Observer) -> str:
    console = Console(record=True, width=160, color_system=None)
    console.print(render(observer.snapshot(now=101.0)))
    return console.export_text()


def test_watch_shows_headline_hospitals_accuracy_and_staleness() -> None:
    """Version, buffer, every hospital with state, counts and accuracy, and the staleness bars."""
    observer = Observer("fed")
    tree = TopicTree("fed")
    ledger = (NodeTally(node="cleveland", accepted=12, rejected=3, bytes_received=4096),)
    observer.on_status(status(9, nodes=ledger, buffer_fill=2), now=100.0)
    observer.observe(
        tree.node_status("cleveland"), NodeStatus(state=NodeState.TRAINING, version=8), 100.0
    )
    observer.observe(tree.node_eval("cleveland"), evaluation(8, 0.812), 100.0)
    observer.observe(tree.versions(), record(9, 0, 2), 100.0)
    text = _text(observer)
    assert "run-1" in text
    assert "v9" in text
    assert "buffer 2/3" in text
    row = next(line for line in text.splitlines() if line.startswith("cleveland"))
    assert row.split()[:8] == ["cleveland", "training", "v8", "1", "-", "12", "3", "4.0"]
    assert "0.812" in row
    assert "0:1 1:0 2:1" in text


def test_watch_before_any_status_says_so() -> None:
    """With no status yet the view still renders and says what it is waiting for."""
    assert "no status yet" in _text(Observer("fed"))


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        pytest.param([0.0, 0.5, 1.0], "▁▅█", id="scaled"),
        pytest.param([None, 1.0], " █", id="gap"),
        pytest.param([2.0, -1.0], "█▁", id="clipped"),
    ],
)
def test_sparkline_scales_values_into_bars(values: list[float | None], expected: str) -> None:
    """One bar per value between low and high; None is a gap and outliers are clipped."""
    assert sparkline(values) == expected


def test_watch_shows_the_status_age_and_the_update_size() -> None:
    """The headline says how old the status is; a line gives wire and dense bytes per update."""
    observer = Observer("fed")
    counters = Counters(accepted=2, bytes_accepted=2 * 30_000, raw_bytes_accepted=2 * 420_000)
    observer.on_status(status(3).model_copy(update={"counters": counters}), now=41.0)
    text = _text(observer)
    assert "status 60s old" in text
    assert "30,000 bytes on the wire, 420,000 as dense float32 (14.0x smaller than dense)" in text


def test_watch_shows_each_hospitals_epsilon_under_dp() -> None:
    """Under DP an epsilon column shows what each hospital spent of its budget."""
    observer = Observer("fed")
    ledger = (
        NodeTally(node="cleveland", accepted=2, epsilon=1.5, epsilon_budget=3.0),
        NodeTally(node="va", accepted=1),
    )
    observer.on_status(status(4, nodes=ledger), now=100.0)
    text = _text(observer)
    assert "bytes sent  epsilon  accuracy" in text
    row = next(line for line in text.splitlines() if line.startswith("cleveland"))
    assert row.split()[-2:] == ["1.50/3", "-"]  # epsilon spent of the budget, no accuracy yet
    row = next(line for line in text.splitlines() if line.startswith("va"))
    assert row.split()[-2:] == ["-", "-"]


def test_watch_without_dp_has_no_epsilon_column() -> None:
    observer = Observer("fed")
    observer.on_status(status(4, nodes=(NodeTally(node="va", accepted=1),)), now=100.0)
    assert "epsilon" not in _text(observer)


def test_watch_shows_each_hospitals_personal_accuracy_beside_the_global_one() -> None:
    """Under personalisation a personal column follows the accuracy, and the mean row too."""
    observer = Observer("fed")
    tallies = (
        NodeTally(node="cleveland", eval_version=4, eval_accuracy=0.75, eval_personal_accuracy=0.8),
        NodeTally(node="va", eval_version=4, eval_accuracy=0.7, eval_personal_accuracy=0.9),
    )
    observer.on_status(status(4, nodes=tallies), now=100.0)
    text = _text(observer)
    assert "accuracy  personal  by version" in text
    row = next(line for line in text.splitlines() if line.startswith("cleveland"))
    assert row.split()[-3:-1] == ["0.750", "0.800"]
    mean = next(line for line in text.splitlines() if line.startswith("mean"))
    assert mean.split()[1:3] == ["0.725", "0.850"]


def test_watch_without_personalisation_has_no_personal_column() -> None:
    observer = Observer("fed")
    observer.on_status(status(4, nodes=(NodeTally(node="va", accepted=1),)), now=100.0)
    assert "personal" not in _text(observer)
