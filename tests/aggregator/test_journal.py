"""Specification of the aggregator's write order: a crash between any two writes loses nothing and
folds nothing twice (the process is "killed" by an exception at the chosen write)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator.core import AggregatorCore, Discard, Fold
from aggregator.journal import Journal
from aggregator.store import StateStore
from aggregator.update_log import UpdateEvent, read_update_log, update_fates
from common.broadcast_chain import ChainFollower
from common.codec import decode_tensors, encode, encode_tensors, envelope, sha256_hex
from common.compression import dense_tensor
from common.errors import ControlError, HealthNetError
from common.messages import (
    AggregatorState,
    Compression,
    Knobs,
    ModelDelta,
    ModelSpec,
    NormPolicy,
    RejectReason,
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


def fresh(knobs: Knobs | None = None) -> AggregatorCore:
    return AggregatorCore(
        run_id="run-1",
        params=PARAMS,
        knobs=knobs or Knobs(buffer_size=2),
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

    def __init__(
        self, directory: Path, checkpoint_every: int = 1, knobs: Knobs | None = None
    ) -> None:
        self.journal = Journal(
            directory, model=MODEL, checkpoint_every=checkpoint_every, clock=lambda: 5.0
        )
        self.core, _, self.refolded = self.journal.resume(lambda: fresh(knobs), max_bytes=MAX_BYTES)
        # Each version's delta, as the service would publish it (None: a snapshot only).
        self.deltas: list[ModelDelta | None] = []
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
            broadcast = self.core.broadcast(model=MODEL, chunk_size=1 << 20, now=2.0)
            self.deltas.append(broadcast.delta)
            self.journal.commit_fold(self.core, fold, broadcast.blob)

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
    "after-the-versions-log": lambda j: (j.update_log, "append"),
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
        # The update log is also written for the received update: let that line through.
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
    fates = update_fates(read_update_log(run))
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


@pytest.mark.parametrize("checkpoint_every", [1, 3], ids=["checkpointed-view", "refolded-view"])
def test_the_broadcast_chain_goes_on_from_the_same_view_after_a_crash(
    tmp_path: Path, checkpoint_every: int
) -> None:
    """With deltas on, a restart (from a checkpoint that keeps the view, or folding v4 and v5
    again from the WAL) continues the chain: v6's delta starts from the digest of v5 as it was
    broadcast before the crash, and a node that followed every delta takes it."""
    knobs = Knobs(buffer_size=2, broadcast_compression=Compression(top_k=0.5))
    first = Aggregator(tmp_path, checkpoint_every=checkpoint_every, knobs=knobs)
    v0 = first.core.broadcast(model=MODEL, chunk_size=1 << 20, now=0.0)
    follower = ChainFollower()
    follower.on_snapshot(v0.manifest, decode_tensors(v0.blob))
    for update_id in "abcdefghij":
        first.receive(update_id)
    for delta in first.deltas:
        assert delta is not None
        assert follower.on_delta(delta) is not None
    first.close()  # a kill at v5
    second = Aggregator(tmp_path, checkpoint_every=checkpoint_every, knobs=knobs)
    assert (second.core.version, second.refolded) == (5, 0 if checkpoint_every == 1 else 2)
    assert second.core.broadcast_view is not None
    for name, value in first.core.broadcast_view.items():  # type: ignore[union-attr]
        assert second.core.broadcast_view[name].tobytes() == value.tobytes()
    for update_id in ("k", "l"):
        body, payload = update(update_id, 5, 0.02)
        verdict = second.core.receive("n1", "n1", body, len(payload), 1.0)
        second.journal.record_update(second.core, "n1", body, verdict, payload)
        second.fold_due()
    (v6,) = second.deltas
    assert v6 is not None
    held = follower.on_delta(v6)
    assert held is not None
    assert held.manifest.version == 6
    assert follower.refused == 0
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


def test_every_verdict_is_in_the_update_log(tmp_path: Path) -> None:
    """Accepted, duplicate, rejected and folded updates each leave their line in the update log."""
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
    events = [(e.update_id, e.event, e.version) for e in read_update_log(tmp_path)]
    assert events == [
        ("a", UpdateEvent.ACCEPTED, 0),
        ("a", UpdateEvent.DUPLICATE, 0),
        ("s", UpdateEvent.REJECTED, 0),
        ("b", UpdateEvent.ACCEPTED, 0),
        ("a", UpdateEvent.FOLDED, 1),
        ("b", UpdateEvent.FOLDED, 1),
    ]
    fates = update_fates(read_update_log(tmp_path))
    assert fates["s"].rejections == ["future_version"]
    assert fates["a"].duplicates == 1


def test_the_norm_bound_judges_updates_the_same_after_a_restart(tmp_path: Path) -> None:
    """Norm history, warm-up reference and clip factors survive a restart: updates buffered at
    the checkpoint keep their clip, and those replayed from the WAL after it are clipped as
    they were on arrival."""
    knobs = Knobs(buffer_size=100, norm_multiplier=2.0, norm_policy=NormPolicy.CLIP)
    params = {"w": np.full((2, 3), 0.5, np.float32), "b": np.full(2, 0.5, np.float32)}

    def clipping() -> AggregatorCore:
        return AggregatorCore(
            run_id="run-1", params=params, knobs=knobs, state=AggregatorState.RUNNING
        )

    journal = Journal(tmp_path, model=MODEL, checkpoint_every=1, clock=lambda: 5.0)
    core, _, _ = journal.resume(clipping, max_bytes=MAX_BYTES)

    def receive(update_id: str, value: float) -> None:
        body, payload = update(update_id, core.version, value)
        verdict = core.receive("n1", "n1", body, len(payload), 1.0)
        assert verdict.accepted, verdict
        journal.record_update(core, "n1", body, verdict, payload)

    for update_id, value in (("a", 0.1), ("b", 50.0), ("c", 0.1)):  # b: clipped in warm-up
        receive(update_id, value)
    journal.checkpoint(core)
    for update_id, value in (("d", 5.0), ("e", 0.1), ("f", 100.0)):  # WAL only
        receive(update_id, value)
    journal.close()
    scales = [(u.update_id, u.scale) for u in core.buffer]
    assert sum(scale < 1 for _, scale in scales) == 3

    restarted = Journal(tmp_path, model=MODEL, checkpoint_every=1, clock=lambda: 5.0)
    again, _, _ = restarted.resume(clipping, max_bytes=MAX_BYTES)
    restarted.close()
    assert [(u.update_id, u.scale) for u in again.buffer] == scales
    assert again.norm_history == core.norm_history
    assert again.initial_norm == core.initial_norm
    assert again.norm_bound() == core.norm_bound()


# -- discarded batches and rollbacks


def huge_probe(params: Mapping[str, np.ndarray]) -> str | None:
    """Stands for the model on a probe batch: weights beyond 1e30 give infinite outputs."""
    worst = max(float(np.abs(p).max()) for p in params.values())
    return "outputs not finite" if worst > 1e30 else None


def die(*_: object) -> None:
    raise Crash


class Service:
    """Like :class:`Aggregator`, with the probe, discards and rollbacks the service handles."""

    def __init__(
        self,
        directory: Path,
        *,
        keep_checkpoints: int = 3,
        checkpoint_every: int = 1,
        knobs: Knobs | None = None,
    ) -> None:
        self.journal = Journal(
            directory,
            model=MODEL,
            keep_checkpoints=keep_checkpoints,
            checkpoint_every=checkpoint_every,
            clock=lambda: 5.0,
        )
        self.core, _, _ = self.journal.resume(
            lambda: AggregatorCore(
                run_id="run-1",
                params=PARAMS,
                knobs=knobs or Knobs(buffer_size=2),
                state=AggregatorState.RUNNING,
                probe=huge_probe,
            ),
            max_bytes=MAX_BYTES,
            probe=huge_probe,
        )
        self.discards: list[Discard] = []
        self.fold_due()

    def receive(self, update_id: str, value: float = 0.01) -> None:
        body, payload = update(update_id, self.core.version, value)
        verdict = self.core.receive("n1", "n1", body, len(payload), 1.0)
        self.journal.record_update(self.core, "n1", body, verdict, payload)
        self.fold_due()

    def fold_due(self) -> None:
        while self.core.fold_due(2.0):
            match self.core.fold(2.0):
                case Fold() as fold:
                    self.journal.commit_fold(self.core, fold, encode_tensors(fold.params))
                case Discard() as discard:
                    self.journal.commit_discard(self.core, discard)
                    self.discards.append(discard)

    def rollback(self, version: int) -> None:
        params, optimizer = self.journal.rollback_source(self.core, version)
        fold = self.core.rollback(version, params, optimizer, 3.0)
        self.journal.commit_rollback(self.core, fold, encode_tensors(fold.params))

    def close(self) -> None:
        self.journal.close()


@pytest.mark.parametrize(
    "crash", [pytest.param(False, id="clean"), pytest.param(True, id="crash-before-its-checkpoint")]
)
def test_a_discarded_batch_stays_discarded_after_a_restart(
    tmp_path: Path, crash: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch whose version fails the probe is discarded, in the update log and the counters;
    after a restart (or a crash before its checkpoint, which discards it again) it is neither
    buffered nor folded, and a resend of one of its ids is a replay."""
    first = Service(tmp_path)
    first.receive("a", 1e35)
    if crash:
        monkeypatch.setattr(first.journal.store, "save", die)
        with pytest.raises(Crash):
            first.receive("b", 0.01)
        monkeypatch.undo()
    else:
        first.receive("b", 0.01)
        assert [d.update_ids for d in first.discards] == [("a", "b")]
    first.close()

    second = Service(tmp_path)
    assert (second.core.version, second.core.buffer) == (0, ())
    counters = second.core.counters()
    assert (counters.accepted, counters.discarded, counters.rejected, counters.folded) == (
        2,
        2,
        0,
        0,
    )
    assert counters.probe_failures == 1
    assert StateStore(tmp_path).wal_entries() == []
    body, payload = update("a", 0, 1e35)
    assert second.core.receive("n1", "n1", body, len(payload), 4.0).reason is RejectReason.REPLAY
    second.close()
    fates = update_fates(read_update_log(tmp_path))
    assert {i: (f.discarded, f.folded, f.rejected) for i, f in fates.items()} == {
        "a": (True, False, False),
        "b": (True, False, False),
    }
    reasons = {e.reason for e in read_update_log(tmp_path) if e.event is UpdateEvent.DISCARDED}
    assert reasons == {RejectReason.DISCARDED.value}


@pytest.mark.parametrize(
    "every",
    [
        pytest.param(1, id="to-a-kept-checkpoint"),
        pytest.param(3, id="to-a-version-remade-from-the-wal"),
    ],
)
def test_a_crash_right_after_a_rollback_recovers_the_same_version_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, every: int
) -> None:
    """The rollback's record is logged, then the process dies before its checkpoint: the restart
    makes the same version from the same source, once, and the run goes on. The source is v4's
    checkpoint, or (a checkpoint every 3 versions) v3's checkpoint and v4 folded again."""
    reference = Service(tmp_path / "reference")
    for update_id in "abcdefghij":
        reference.receive(update_id)  # v1-v5
    reference.close()
    v4 = StateStore(tmp_path / "reference").load_checkpoint(4)
    assert v4 is not None
    run = tmp_path / "run"
    first = Service(run, checkpoint_every=every)
    for update_id in "abcdefghij":
        first.receive(update_id)
    monkeypatch.setattr(first.journal.store, "save", die)
    with pytest.raises(Crash):
        first.rollback(4)
    monkeypatch.undo()
    first.close()

    second = Service(run, checkpoint_every=every)
    assert second.core.version == 6
    for name, value in v4.params.items():
        assert np.array_equal(second.core.params[name], value), name
    assert second.core.counters().rollbacks == 1
    second.receive("k")
    second.receive("l")
    second.close()
    third = Service(run, checkpoint_every=every)  # and again: nothing is redone twice
    assert third.core.version == 7
    third.close()
    records = versions(run)
    assert [(r["version"], r["reason"], r["rollback_of"]) for r in records] == [
        *[(v, "buffer_full", None) for v in range(1, 6)],
        (6, "rollback", 4),
        (7, "buffer_full", None),
    ]
    assert folded_ids(run) == list("abcdefghijkl")


def test_a_version_remade_for_a_rollback_clips_its_updates_as_they_were_clipped(
    tmp_path: Path,
) -> None:
    """With an adaptive norm bound that clips, a rollback to a version since the newest
    checkpoint folds the WAL's updates again against the norm history they met on arrival, so
    its weights are the version's own (v4: h, five times too large, was clipped to the median's
    bound; judged against no history it would be clipped differently)."""
    knobs = Knobs(buffer_size=2, norm_multiplier=2.0, norm_policy=NormPolicy.CLIP)
    sizes = [0.01, 0.02, 0.01, 0.5, 0.02, 0.01, 0.01, 0.05, 0.01, 0.02]
    values = dict(zip("abcdefghij", sizes, strict=True))
    reference = Service(tmp_path / "reference", knobs=knobs)
    for update_id, value in values.items():
        reference.receive(update_id, value)  # v1-v5, a checkpoint each
    reference.close()
    v4 = StateStore(tmp_path / "reference").load_checkpoint(4)
    run = Service(tmp_path / "run", knobs=knobs, checkpoint_every=3)
    for update_id, value in values.items():
        run.receive(update_id, value)  # checkpoints at v3 (and v0); v4 only in the WAL
    assert run.core.counters().clipped >= 2
    run.rollback(4)
    for name, value in v4.params.items():
        assert np.array_equal(run.core.params[name], value), name
    run.close()


def test_only_a_kept_version_or_one_since_the_newest_checkpoint_can_be_rolled_back_to(
    tmp_path: Path,
) -> None:
    """Two checkpoints kept, one every 2 versions: at v5, v1 is gone (never checkpointed, its
    WAL entries dropped), v2 and v4 are kept; the refusal names the versions there are."""
    service = Service(tmp_path, keep_checkpoints=2, checkpoint_every=2)
    for update_id in "abcdefghij":
        service.receive(update_id)  # v1-v5; checkpoints v2, v4 kept
    with pytest.raises(ControlError, match=r"v1 is neither kept .*: v2, v4 \("):
        service.rollback(1)
    assert service.core.version == 5
    service.rollback(2)
    assert service.core.version == 6
    service.close()
