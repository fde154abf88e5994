"""Specification of the aggregator's durable state: checkpoints, write-ahead log, provenance."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator.store import Checkpoint, EvaluationLogEntry, StateStore
from common.messages import (
    AggregatorState,
    Contribution,
    Counters,
    Evaluation,
    Knobs,
    ModelSpec,
    NodeTally,
    VersionRecord,
)

PARAMS = {
    "w": np.arange(6, dtype=np.float32).reshape(2, 3) / 7,
    "b": np.array([0.5, -0.25], dtype=np.float32),
}


def checkpoint(version: int = 3, **changes: Any) -> Checkpoint:
    fields: dict[str, Any] = {
        "run_id": "run-1",
        "version": version,
        "state": AggregatorState.PAUSED,
        "model": ModelSpec(name="logreg", kwargs={"in_features": 3, "num_classes": 2}),
        "knobs": Knobs(buffer_size=4, max_staleness=7),
        "params": {k: v + version for k, v in PARAMS.items()},
        "optimizer_step": 5,
        "optimizer_m": {k: v * 2 for k, v in PARAMS.items()},
        "optimizer_v": {k: v * v for k, v in PARAMS.items()},
        "seen": {"u1": "accepted", "u2": "stale", "u3": "accepted"},
        "buffered": ("u3",),
        "counters": Counters(
            received=4, accepted=2, rejected=1, duplicates=1, folded=1, rejections={"stale": 1}
        ),
        "nodes": (
            NodeTally(node="a", accepted=2, folded=1, last_seen=1.5, eval_accuracy=0.75),
            NodeTally(node="b", rejected=1, rejections={"stale": 1}),
        ),
        "created_at": 123.0,
    }
    fields.update(changes)
    if "record" not in fields:
        fields["record"] = record(version)
    return Checkpoint(**fields)


@pytest.fixture
def store(tmp_path: Path) -> StateStore:
    opened = StateStore(tmp_path / "state", keep_checkpoints=3)
    opened.open()
    return opened


def checkpoint_files(store: StateStore) -> list[str]:
    return sorted(p.name for p in (store.directory / "checkpoints").iterdir())


def test_open_creates_the_layout(tmp_path: Path) -> None:
    """open() creates the state directory with its checkpoint and WAL folders; nothing to load."""
    store = StateStore(tmp_path / "a" / "b")
    store.open()
    assert (tmp_path / "a" / "b" / "checkpoints").is_dir()
    assert (tmp_path / "a" / "b" / "wal").is_dir()
    assert store.load_latest() is None
    assert store.wal_entries() == []


def test_checkpoint_round_trips(store: StateStore) -> None:
    """save then load_latest gives back params, optimizer state, seen, counters and node tallies."""
    saved = checkpoint()
    store.save(saved)
    loaded = store.load_latest()
    assert loaded is not None
    params = loaded.params
    assert list(params) == list(PARAMS)
    for name, value in PARAMS.items():
        np.testing.assert_array_equal(params[name], value + 3)
        assert params[name].dtype == np.float32
    state = loaded.optimizer_state()
    assert state.step == 5
    for name, value in PARAMS.items():
        np.testing.assert_array_equal(state.m[name], value * 2)
        np.testing.assert_array_equal(state.v[name], value * value)
    assert loaded.seen == saved.seen
    assert loaded.buffered == ("u3",)
    assert loaded.counters == saved.counters
    assert loaded.nodes == saved.nodes
    assert (loaded.state, loaded.knobs) == (AggregatorState.PAUSED, saved.knobs)
    assert (loaded.run_id, loaded.version, loaded.model) == ("run-1", 3, saved.model)
    assert (loaded.created_at, loaded.record) == (123.0, record(3))


def test_a_checkpoint_without_optimizer_state_or_record_round_trips(store: StateStore) -> None:
    """Plain SGD has no optimizer arrays and v0 has no version record; both load back empty."""
    store.save(checkpoint(0, optimizer_m={}, optimizer_v={}, optimizer_step=0, record=None))
    loaded = store.load_latest()
    assert loaded is not None
    assert (loaded.optimizer_m, loaded.optimizer_v, loaded.record) == ({}, {}, None)
    np.testing.assert_array_equal(loaded.params["w"], PARAMS["w"])


def test_checkpoint_arrays_are_stored_raw(store: StateStore) -> None:
    """The arrays are written as raw little-endian float32, so the file is about their size."""
    big = {"w": np.arange(250_000, dtype=np.float32)}
    path = store.save(checkpoint(1, params=big, optimizer_m={}, optimizer_v={}))
    assert big["w"].tobytes() in path.read_bytes()
    assert path.stat().st_size < big["w"].nbytes + 8192


def test_loaded_arrays_are_writable_copies(store: StateStore) -> None:
    """Arrays from a checkpoint own their memory, so the core may keep and replace them."""
    store.save(checkpoint())
    loaded = store.load_latest()
    assert loaded is not None
    for array in [*loaded.params.values(), *loaded.optimizer_m.values()]:
        assert array.flags.writeable


def test_load_latest_returns_the_newest_version(store: StateStore) -> None:
    """Of several checkpoints, the one with the highest version is loaded (numerically)."""
    for version in (9, 10, 2):
        store.save(checkpoint(version))
    loaded = store.load_latest()
    assert loaded is not None
    assert loaded.version == 10


def test_only_keep_checkpoints_newest_are_kept(tmp_path: Path) -> None:
    """After each save, only the keep_checkpoints newest checkpoint files remain."""
    store = StateStore(tmp_path, keep_checkpoints=2)
    store.open()
    for version in range(1, 6):
        store.save(checkpoint(version))
    assert checkpoint_files(store) == ["v00000004.ckpt", "v00000005.ckpt"]


def test_saving_the_same_version_again_replaces_it(store: StateStore) -> None:
    """A second checkpoint of one version (after a control command) overwrites the first."""
    store.save(checkpoint(3))
    store.save(checkpoint(3, state=AggregatorState.RUNNING))
    loaded = store.load_latest()
    assert loaded is not None
    assert loaded.state is AggregatorState.RUNNING
    assert checkpoint_files(store) == ["v00000003.ckpt"]


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\xc1\xc1\xc1garbage", id="garbage"),
        pytest.param(None, id="truncated"),
        pytest.param(b"\x81\xa3foo\x01", id="wrong-record"),
        pytest.param(b"HNCKPT01" + (10**6).to_bytes(8, "little"), id="header-past-the-end"),
    ],
)
def test_corrupt_newest_checkpoint_falls_back_to_the_previous(
    store: StateStore, damage: bytes | None
) -> None:
    """When the newest checkpoint does not decode, the one before it is loaded."""
    store.save(checkpoint(1))
    newest = store.save(checkpoint(2))
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2] if damage is None else damage)
    loaded = store.load_latest()
    assert loaded is not None
    assert loaded.version == 1


def test_no_readable_checkpoint_loads_none(store: StateStore) -> None:
    """If every checkpoint is corrupt, load_latest returns None."""
    store.save(checkpoint(1)).write_bytes(b"nope")
    assert store.load_latest() is None


def test_open_removes_temp_leftovers(tmp_path: Path) -> None:
    """.tmp files left by a crash mid-write are removed on open and never loaded."""
    first = StateStore(tmp_path)
    first.open()
    first.save(checkpoint(1))
    first.append_wal("n1", "u1", b"kept")
    leftovers = [
        tmp_path / "checkpoints" / "v00000002.ckpt.tmp",
        tmp_path / "wal" / "000000000002-n1-u2.msg.tmp",
    ]
    for path in leftovers:
        path.write_bytes(b"half written")
    second = StateStore(tmp_path)
    second.open()
    assert not any(path.exists() for path in leftovers)
    loaded = second.load_latest()
    assert loaded is not None
    assert loaded.version == 1
    assert [e.update_id for e in second.wal_entries()] == ["u1"]


def test_wal_entries_come_back_in_append_order(store: StateStore) -> None:
    """wal_entries lists node, update id and raw payload in the order they were appended."""
    appended = [("n2", "zz", b"one"), ("n1", "aa", b"two"), ("n3", "mm", b"\x00three")]
    for node, update_id, payload in appended:
        store.append_wal(node, update_id, payload)
    entries = store.wal_entries()
    assert [(e.node, e.update_id, e.payload) for e in entries] == appended
    assert [e.sequence for e in entries] == [1, 2, 3]


def test_drop_wal_removes_only_the_named_updates(store: StateStore) -> None:
    """drop_wal deletes the entries of the given update ids and keeps the rest in order."""
    for i in range(4):
        store.append_wal("n1", f"u{i}", b"x")
    store.drop_wal({"u1", "u3", "never-logged"})
    assert [e.update_id for e in store.wal_entries()] == ["u0", "u2"]


def test_reopened_store_appends_after_existing_entries(tmp_path: Path) -> None:
    """After a restart, new WAL entries sort after the ones already on disk."""
    first = StateStore(tmp_path)
    first.open()
    for i in range(11):
        first.append_wal("n1", f"old{i}", b"x")
    first.drop_wal({f"old{i}" for i in range(10)})
    second = StateStore(tmp_path)
    second.open()
    second.append_wal("n1", "new", b"y")
    assert [e.update_id for e in second.wal_entries()] == ["old10", "new"]


@pytest.mark.parametrize(
    ("node", "update_id"),
    [
        pytest.param("n1", "0123456789abcdef0123456789abcdef", id="hex-id"),
        pytest.param("st-marys", "0123456789abcdef", id="dashed-node"),
        pytest.param("node.a_b", "u.1_2", id="dots-and-underscores"),
        pytest.param("n1", "u-1", id="dashed-update-id"),
        pytest.param("st-marys", "update-7-b", id="dashes-in-both"),
        pytest.param("a" * 64, "b" * 64, id="longest"),
    ],
)
def test_wal_entry_names_parse_back_node_and_update_id(
    store: StateStore, node: str, update_id: str
) -> None:
    """Any valid node and update id come back exactly from the WAL entry."""
    store.append_wal(node, update_id, b"payload")
    (entry,) = store.wal_entries()
    assert (entry.node, entry.update_id, entry.payload) == (node, update_id, b"payload")
    store.drop_wal({update_id})
    assert store.wal_entries() == []


def record(version: int) -> VersionRecord:
    return VersionRecord(
        run_id="run-1",
        version=version,
        created_at=100.0 + version,
        contributions=(
            Contribution(
                node="a",
                update_id=f"u{version}",
                base_version=version - 1,
                staleness=1,
                num_samples=10,
                staleness_factor=0.7071067811865476,
                weight=0.7071067811865476,
                bytes=1234,
                train_loss=0.25,
            ),
        ),
        update_norm=0.125,
        train_loss=0.25,
        fold_seconds=0.001,
        reason="buffer_full",
    )


def test_append_version_writes_one_json_line_per_version(store: StateStore) -> None:
    """Each version adds one line to versions.jsonl that parses back as its VersionRecord."""
    records = [record(v) for v in (1, 2, 3)]
    for r in records:
        store.append_version(r)
    lines = store.versions_log.read_text(encoding="utf-8").splitlines()
    assert [VersionRecord.model_validate_json(line) for line in lines] == records
    assert store.last_logged_version() == 3


def test_a_version_line_torn_by_a_crash_is_cut_off_on_open(tmp_path: Path) -> None:
    """Half a line at the end of versions.jsonl is dropped on open; the next record starts clean."""
    first = StateStore(tmp_path)
    first.open()
    first.append_version(record(1))
    with (tmp_path / "versions.jsonl").open("ab") as handle:
        handle.write(record(2).model_dump_json().encode()[:40])
    second = StateStore(tmp_path)
    second.open()
    assert second.last_logged_version() == 1
    second.append_version(record(2))
    lines = second.versions_log.read_text(encoding="utf-8").splitlines()
    assert [VersionRecord.model_validate_json(line).version for line in lines] == [1, 2]


def test_wal_payloads_are_read_only_when_asked_for(store: StateStore) -> None:
    """Listing the WAL does not read payloads; an entry's payload is read from its file."""
    store.append_wal("n1", "u1", b"first")
    (entry,) = store.wal_entries()
    entry.path.write_bytes(b"changed on disk")
    assert entry.payload == b"changed on disk"


def test_append_evaluation_keeps_who_evaluated_what_and_when(store: StateStore) -> None:
    """Each evaluation adds one line naming its node and arrival time, with the evaluation."""
    evaluations = [
        Evaluation(run_id="run-1", version=v, loss=0.4, accuracy=0.5 + v / 10, correct=5,
                   num_examples=10)
        for v in (0, 1)
    ]  # fmt: skip
    for at, evaluation in enumerate(evaluations):
        store.append_evaluation("cleveland", evaluation, received_at=float(at))
    lines = store.evaluations_log.read_text(encoding="utf-8").splitlines()
    assert [EvaluationLogEntry.model_validate_json(line) for line in lines] == [
        EvaluationLogEntry(node="cleveland", received_at=float(at), evaluation=evaluation)
        for at, evaluation in enumerate(evaluations)
    ]
