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
from common.codec import encode, encode_tensors, envelope, sha256_hex
from common.compression import dense_tensor
from common.errors import HealthNetError
from common.messages import (
    AggregatorState,
    Knobs,
    ModelSpec,
    TrainMetrics,
    Update,
    VersionRecord,
)
from common.provenance import verify_chain

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
            dense_tensor(n, np.full(a.shape, value, np.float32)) for n, a in PARAMS.items()
        ),
    )
    return body, encode(envelope(body, sender="n1", sent_at=1.0))


class Aggregator:
    """What the service does with the journal, without MQTT: receive, record, fold, commit."""

    def __init__(self, directory: Path, checkpoint_every: int = 1) -> None:
        self.journal = Journal(
            directory, model=MODEL, checkpoint_every=checkpoint_every, clock=lambda: 5.0
        )
        self.core, _, self.refolded = self.journal.resume(fresh, max_bytes=MAX_BYTES)
        self.fold_due()

    def receive(self, update_id: str) -> None:
        body, payload = update(update_id, self.core.version, VALUES[update_id])
        verdict = self.core.receive("n1", "n1", body, len(payload), 1.0)
        self.journal.record_update(self.core, "n1", body, verdict, payload)
        self.fold_due()

    def fold_due(self) -> None:
        while self.core.fold_due(2.0):
            fold = self.core.fold(2.0)
            assert isinstance(fold, Fold)
            self.journal.commit_fold(self.core, fold, encode_tensors(fold.params))

    def close(self) -> None:
        self.journal.close()


VALUES = {name: 0.01 * (i + 1) for i, name in enumerate("abcdefghij")}


def versions(directory: Path) -> list[dict[str, Any]]:
    lines = (directory / "versions.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def folded_ids(directory: Path) -> list[str]:
    return [c["update_id"] for record in versions(directory) for c in record["contributions"]]


# Where the process dies while v3 is being made: the object and method that never return.
CRASH_POINTS: dict[str, Callable[[Journal], tuple[object, str]]] = {
    "before-the-versions-log": lambda j: (j.store, "append_version"),
    "after-the-versions-log": lambda j: (j.ledger, "append"),
    "during-the-checkpoint": lambda j: (j.store, "save"),
    "after-the-checkpoint": lambda j: (j.store, "drop_wal"),
}


@pytest.mark.parametrize("every", [pytest.param(1, id="checkpoint-every-version"),
                                   pytest.param(3, id="checkpoint-every-3")])  # fmt: skip
@pytest.mark.parametrize("point", [pytest.param(p, id=p) for p in CRASH_POINTS])
def test_a_crash_anywhere_in_a_fold_loses_nothing_and_folds_nothing_twice(
    tmp_path: Path, point: str, every: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a crash at any write of v3, recovery folds every update once, into the very versions
    (and weights) a run without the crash makes."""
    reference = Aggregator(tmp_path / "reference", every)
    for update_id in "abcdefghij":
        reference.receive(update_id)
    reference.close()

    first = Aggregator(tmp_path / "run", every)
    for update_id in "abcde":  # v1 = (a, b), v2 = (c, d), e buffered
        first.receive(update_id)
    target, method = CRASH_POINTS[point](first.journal)
    original = getattr(target, method)
    calls = 0

    def crash_on_fold(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        # The ledger is also written for the received update: let that line through.
        if method == "append" and calls == 1:
            return original(*args, **kwargs)
        raise Crash

    monkeypatch.setattr(target, method, crash_on_fold)
    with pytest.raises(Crash):
        first.receive("f")  # the second update of v3: folds it
    monkeypatch.undo()
    first.close()  # what the dead process leaves is on disk

    second = Aggregator(tmp_path / "run", every)  # the restarted process: v3 again, or anew
    assert second.core.version == 3
    for update_id in "ghij":
        second.receive(update_id)
    second.close()

    run = tmp_path / "run"
    assert [r["version"] for r in versions(run)] == [1, 2, 3, 4, 5]
    assert folded_ids(run) == list("abcdefghij")
    for name, value in reference.core.params.items():
        assert np.array_equal(second.core.params[name], value), f"{name} differs"
    fates = update_fates(read_ledger(run))
    assert {i: f.folded_into for i, f in fates.items()} == {
        c["update_id"]: [r["version"]] for r in versions(run) for c in r["contributions"]
    }
    # The recovered run's records still form one hash chain, ending at v5's archived model.
    records = [VersionRecord.model_validate(r) for r in versions(run)]
    verify_chain(records, model_sha256=sha256_hex((run / "models" / "v00000005.blob").read_bytes()))

    if every == 1:
        assert StateStore(run).wal_entries() == []


def test_versions_between_checkpoints_are_made_again_after_a_crash(tmp_path: Path) -> None:
    """With a checkpoint every 3 versions, a crash at v5 refolds v4 and v5 from the WAL."""
    first = Aggregator(tmp_path, checkpoint_every=3)
    for update_id in "abcdefghij":
        first.receive(update_id)
    params = {n: a.copy() for n, a in first.core.params.items()}
    first.close()  # a kill: v5 is logged, the newest checkpoint is v3
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir())[-1] == "v00000003.ckpt"
    second = Aggregator(tmp_path, checkpoint_every=3)
    assert (second.refolded, second.core.version) == (2, 5)
    for name, value in params.items():
        assert np.array_equal(second.core.params[name], value)
    counters = second.core.counters()
    assert (counters.accepted, counters.folded) == (10, 10)
    assert StateStore(tmp_path).wal_entries() == []  # recovery checkpointed v5
    second.close()


def test_a_logged_version_that_cannot_be_made_again_stops_the_start(tmp_path: Path) -> None:
    """If the WAL lost updates that versions.jsonl names, the aggregator refuses to fork history."""
    first = Aggregator(tmp_path, checkpoint_every=3)
    for update_id in "abcd":
        first.receive(update_id)
    first.close()
    for entry in StateStore(tmp_path).wal_entries():
        entry.path.unlink()  # damage: the updates of v1 and v2 are gone
    with pytest.raises(HealthNetError, match="damaged"):
        Aggregator(tmp_path, checkpoint_every=3)


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
    assert [u.update_id for u in second.core.buffer] == ["a"]
    assert second.core.counters().accepted == 1
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
