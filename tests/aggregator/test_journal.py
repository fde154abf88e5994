"""Specification of the aggregator's write order: a crash between any two writes loses nothing and
folds nothing twice (the process is "killed" by an exception at the chosen write)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator.core import AggregatorCore, Fold
from aggregator.journal import Journal
from aggregator.ledger import LedgerEvent, read_ledger, update_fates
from aggregator.store import StateStore
from common.codec import array_to_tensor, encode, envelope
from common.messages import AggregatorState, Knobs, ModelSpec, TrainMetrics, Update

MODEL = ModelSpec(name="logreg", kwargs={"in_features": 3, "num_classes": 2})
PARAMS = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(2, np.float32)}
MAX_BYTES = 1 << 20


class Crash(Exception):
    """Stands for the process dying at this point: nothing after it runs."""


def fresh() -> AggregatorCore:
    return AggregatorCore(
        run_id="run-1",
        params=PARAMS,
        knobs=Knobs(buffer_size=2),
        state=AggregatorState.RUNNING,
    )


def update(update_id: str, base_version: int, value: float) -> tuple[Update, bytes]:
    body = Update(
        update_id=update_id,
        run_id="run-1",
        base_version=base_version,
        num_samples=10,
        metrics=TrainMetrics(loss=0.5, accuracy=0.5, seconds=0.1),
        delta=tuple(
            array_to_tensor(n, np.full(a.shape, value, np.float32)) for n, a in PARAMS.items()
        ),
    )
    return body, encode(envelope(body, sender="n1", sent_at=1.0))


class Aggregator:
    """What the service does with the journal, without MQTT: receive, record, fold, commit."""

    def __init__(self, directory: Path) -> None:
        self.journal = Journal(directory, model=MODEL, clock=lambda: 5.0)
        self.core, _, self.restored = self.journal.resume(fresh, max_bytes=MAX_BYTES)

    def receive(self, update_id: str, value: float = 0.1) -> None:
        body, payload = update(update_id, self.core.version, value)
        verdict = self.core.receive("n1", "n1", body, len(payload), 1.0)
        self.journal.record_update(self.core, "n1", body, verdict, payload)
        while self.core.fold_due(2.0):
            fold = self.core.fold(2.0)
            assert isinstance(fold, Fold)
            self.journal.commit_fold(self.core, fold)

    def close(self) -> None:
        self.journal.close()


def versions(directory: Path) -> list[dict[str, Any]]:
    lines = (directory / "versions.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def folded_ids(directory: Path) -> list[str]:
    return [c["update_id"] for record in versions(directory) for c in record["contributions"]]


CRASH_POINTS: dict[str, Callable[[Journal], tuple[object, str]]] = {
    "before-the-checkpoint": lambda j: (j.store, "save"),
    "after-the-checkpoint": lambda j: (j.store, "append_version"),
    "after-the-versions-log": lambda j: (j.ledger, "write"),
    "after-the-ledger": lambda j: (j.store, "drop_wal"),
}


@pytest.mark.parametrize("point", [pytest.param(p, id=p) for p in CRASH_POINTS])
def test_a_crash_anywhere_in_a_fold_loses_nothing_and_folds_nothing_twice(
    tmp_path: Path, point: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a crash at any write of v2's fold, recovery ends with every update folded once."""
    first = Aggregator(tmp_path)
    for update_id in ("a", "b", "c"):
        first.receive(update_id)
    target, method = CRASH_POINTS[point](first.journal)
    original = getattr(target, method)
    calls = 0

    def crash_on_fold(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        # The ledger is also written for each received update: let those through.
        if method == "write" and calls == 1:
            return original(*args, **kwargs)
        raise Crash

    monkeypatch.setattr(target, method, crash_on_fold)
    with pytest.raises(Crash):
        first.receive("d")  # the second update of v2: folds it
    monkeypatch.undo()
    first.close()  # what the dead process leaves is on disk: every write so far was synced

    second = Aggregator(tmp_path)  # the restarted process
    committed = second.core.version == 2
    assert second.core.version == (1 if point == "before-the-checkpoint" else 2)
    assert len(second.core.buffer) == (2 if not committed else 0)
    for update_id in ("e", "f", "g", "h"):
        second.receive(update_id)
    second.close()

    assert [r["version"] for r in versions(tmp_path)] == list(range(1, second.core.version + 1))
    ids = folded_ids(tmp_path)
    assert sorted(ids) == sorted(set(ids)), "an update was folded twice"
    assert set(ids) == set("abcdefgh")
    fates = update_fates(read_ledger(tmp_path))
    assert {i: f.folded_into for i, f in fates.items()} == {
        c["update_id"]: [r["version"]] for r in versions(tmp_path) for c in r["contributions"]
    }
    assert StateStore(tmp_path).wal_entries() == []


def test_an_update_logged_but_never_acked_is_buffered_again_and_its_resend_is_a_duplicate(
    tmp_path: Path,
) -> None:
    """A crash after the WAL write but before the ack: replay buffers it; the resend is a dup."""
    first = Aggregator(tmp_path)
    body, payload = update("a", 0, 0.1)
    verdict = first.core.receive("n1", "n1", body, len(payload), 1.0)
    first.journal.store.append_wal("n1", "a", payload)  # then the process dies
    first.close()
    assert verdict.accepted

    second = Aggregator(tmp_path)
    assert second.restored == 1
    assert [u.update_id for u in second.core.buffer] == ["a"]
    resend = second.core.receive("n1", "n1", body, len(payload), 3.0)
    assert (resend.accepted, resend.duplicate) == (True, True)
    second.receive("b")
    second.close()
    assert folded_ids(tmp_path) == ["a", "b"]


def test_updates_folded_before_a_restart_are_not_buffered_again(tmp_path: Path) -> None:
    """WAL entries that a checkpoint has folded are dropped on replay, not counted again."""
    first = Aggregator(tmp_path)
    for update_id in ("a", "b", "c"):
        first.receive(update_id)
    first.close()
    second = Aggregator(tmp_path)
    assert (second.core.version, [u.update_id for u in second.core.buffer]) == (1, ["c"])
    counters = second.core.counters()
    assert (counters.accepted, counters.duplicates, counters.received) == (3, 0, 3)
    second.close()


def test_every_verdict_is_in_the_ledger(tmp_path: Path) -> None:
    """Accepted, duplicate, rejected and folded updates each leave their line in the ledger."""
    agg = Aggregator(tmp_path)
    agg.receive("a")
    body, payload = update("a", 0, 0.1)
    agg.journal.record_update(
        agg.core, "n1", body, agg.core.receive("n1", "n1", body, len(payload), 1.0), payload
    )
    stale, stale_payload = update("s", 7, 0.1)
    agg.journal.record_update(
        agg.core,
        "n1",
        stale,
        agg.core.receive("n1", "n1", stale, len(stale_payload), 1.0),
        stale_payload,
    )
    agg.receive("b")
    agg.close()
    events = [(e.update_id, e.event, e.version) for e in read_ledger(tmp_path)]
    assert events == [
        ("a", LedgerEvent.ACCEPTED, 0),
        ("a", LedgerEvent.DUPLICATE, 0),
        ("s", LedgerEvent.REJECTED, 0),
        ("b", LedgerEvent.ACCEPTED, 0),
        ("a", LedgerEvent.FOLDED, 1),
        ("b", LedgerEvent.FOLDED, 1),
    ]
    fates = update_fates(read_ledger(tmp_path))
    assert fates["s"].rejections == ["future_version"]
    assert fates["a"].duplicates == 1
