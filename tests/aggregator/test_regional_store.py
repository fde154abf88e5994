"""Specification of a regional aggregator's durable state: nothing acked is lost, nothing
combined twice, whichever step a crash interrupts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from aggregator.regional_store import (
    COMBINED_LOG_FILE,
    CombinedEvent,
    CombinedLogEntry,
    Recovery,
    RegionalStore,
)
from common.jsonlog import append_json_lines, read_json_lines
from common.outbox import Outbox


def opened(directory: Path) -> RegionalStore:
    store = RegionalStore(directory)
    store.open()
    return store


def recovered(directory: Path) -> Recovery:
    """What a restart finds in ``directory``."""
    with RegionalStore(directory) as store:
        return store.open()


def line(event: CombinedEvent, uid: str, *constituents: str) -> CombinedLogEntry:
    return CombinedLogEntry(event=event, update_id=uid, constituents=constituents)


def wal_ids(directory: Path) -> set[str]:
    return {p.name.split("+")[2].removesuffix(".msg") for p in (directory / "wal").glob("*.msg")}


def test_an_accepted_update_survives_a_restart_in_order(tmp_path: Path) -> None:
    """What was accepted and not combined is buffered again, oldest first, with its bytes."""
    with opened(tmp_path) as store:
        store.accept("cleveland", "c1", b"one")
        store.accept("va", "v1", b"two")
    recovery = recovered(tmp_path)
    assert [(e.node, e.update_id, e.payload) for e in recovery.pending] == [
        ("cleveland", "c1", b"one"),
        ("va", "v1", b"two"),
    ]
    assert recovery.rebuild == ()
    assert recovery.outbox == ()


def test_an_update_is_accepted_once(tmp_path: Path) -> None:
    """A resent id is known, before and after it is combined, and before and after a restart."""
    with opened(tmp_path) as store:
        store.accept("cleveland", "c1", b"one")
        with pytest.raises(ValueError, match="accepted before"):
            store.accept("cleveland", "c1", b"one")
        store.commit("eu.x", ["c1"], b"combined")
        assert store.known("c1")
    with opened(tmp_path) as store:
        assert store.known("c1")
        assert not store.known("c2")


def test_a_commit_moves_its_constituents_from_the_log_to_the_outbox(tmp_path: Path) -> None:
    """After a commit the combined message waits for the core, and its constituents are gone."""
    with opened(tmp_path) as store:
        for uid in ("c1", "h1", "v1"):
            store.accept("node", uid, uid.encode())
        store.commit("eu.x", ["c1", "h1"], b"combined")
        assert store.unacked() == [("eu.x", b"combined")]
        assert store.constituents("eu.x") == ("c1", "h1")
    assert wal_ids(tmp_path) == {"v1"}
    recovery = recovered(tmp_path)
    assert [e.update_id for e in recovery.pending] == ["v1"]
    assert recovery.outbox == (("eu.x", b"combined"),)


def test_the_cores_ack_clears_the_outbox_for_good(tmp_path: Path) -> None:
    """An acked combined update is not resent after a restart; a second ack changes nothing."""
    with opened(tmp_path) as store:
        store.accept("node", "c1", b"one")
        store.commit("eu.x", ["c1"], b"combined")
        assert store.acked("eu.x")
        assert not store.acked("eu.x")
        assert not store.acked("eu.unknown")
    recovery = recovered(tmp_path)
    assert recovery.outbox == ()
    assert recovery.pending == ()


@pytest.mark.parametrize(
    ("constituents", "match"),
    [
        pytest.param(["c1", "v9"], "never accepted", id="unknown"),
        pytest.param(["h1"], "combined before", id="taken"),
    ],
)
def test_a_commit_takes_only_accepted_uncombined_updates(
    tmp_path: Path, constituents: list[str], match: str
) -> None:
    """Combining an update twice, or one never logged, is refused and writes nothing."""
    with opened(tmp_path) as store:
        store.accept("node", "c1", b"one")
        store.accept("node", "h1", b"two")
        store.commit("eu.first", ["h1"], b"first")
        with pytest.raises(ValueError, match=match):
            store.commit("eu.second", constituents, b"second")
        assert store.unacked() == [("eu.first", b"first")]
    assert [
        e.update_id for e in read_json_lines(tmp_path / COMBINED_LOG_FILE, CombinedLogEntry)
    ] == ["eu.first"]


def test_killed_after_the_commit_line_the_same_combination_is_rebuilt(tmp_path: Path) -> None:
    """The line is the commit point: its constituents come back to be combined exactly so again,
    not buffered with others."""
    with opened(tmp_path) as store:
        for uid in ("c1", "h1", "v1"):
            store.accept("node", uid, uid.encode())
    append_json_lines(
        tmp_path / COMBINED_LOG_FILE, [line(CombinedEvent.COMBINED, "eu.x", "h1", "c1")]
    )
    store = RegionalStore(tmp_path)
    recovery = store.open()
    assert [(uid, [e.update_id for e in entries]) for uid, entries in recovery.rebuild] == [
        ("eu.x", ["h1", "c1"])
    ]
    assert [e.update_id for e in recovery.pending] == ["v1"]
    with pytest.raises(ValueError, match="other constituents"):
        store.commit("eu.x", ["c1", "h1"], b"combined")
    store.commit("eu.x", ["h1", "c1"], b"combined")
    store.close()
    assert wal_ids(tmp_path) == {"v1"}
    assert recovered(tmp_path).outbox == (("eu.x", b"combined"),)


def test_killed_after_the_outbox_write_the_constituents_are_dropped(tmp_path: Path) -> None:
    """The outbox holds the combination: the WAL entries it combined are not buffered again."""
    with opened(tmp_path) as store:
        for uid in ("c1", "h1"):
            store.accept("node", uid, uid.encode())
    append_json_lines(
        tmp_path / COMBINED_LOG_FILE, [line(CombinedEvent.COMBINED, "eu.x", "c1", "h1")]
    )
    outbox = Outbox(tmp_path / "outbox")
    outbox.open()
    outbox.put("eu.x", b"combined")
    recovery = recovered(tmp_path)
    assert recovery.pending == ()
    assert recovery.rebuild == ()
    assert recovery.outbox == (("eu.x", b"combined"),)
    assert wal_ids(tmp_path) == set()


def test_killed_after_the_ack_line_the_outbox_entry_goes(tmp_path: Path) -> None:
    """An ack on disk is final: the message is not resent."""
    with opened(tmp_path) as store:
        store.accept("node", "c1", b"one")
        store.commit("eu.x", ["c1"], b"combined")
    append_json_lines(tmp_path / COMBINED_LOG_FILE, [line(CombinedEvent.ACKED, "eu.x")])
    recovery = recovered(tmp_path)
    assert recovery.outbox == ()
    assert list(Outbox(tmp_path / "outbox").directory.iterdir()) == []


def test_a_combination_with_no_message_and_no_constituents_is_an_error(tmp_path: Path) -> None:
    """A state that no crash can leave is reported, not silently taken as empty."""
    opened(tmp_path).close()
    append_json_lines(tmp_path / COMBINED_LOG_FILE, [line(CombinedEvent.COMBINED, "eu.x", "c1")])
    with pytest.raises(RuntimeError, match="c1"):
        recovered(tmp_path)


# A process that accepts, combines and acks as a regional aggregator does, reporting each
# hospital ack on stdout only once the update is logged, until it is killed.
_WORKER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from aggregator.regional_store import RegionalStore

    store = RegionalStore(Path(sys.argv[1]))
    recovery = store.open()
    for uid, entries in recovery.rebuild:
        store.commit(uid, [e.update_id for e in entries], b"|".join(e.payload for e in entries))
    buffer = [e.update_id for e in recovery.pending]
    for uid, _ in recovery.outbox:
        store.acked(uid)
    start = int(sys.argv[2])
    for i in range(start, start + 100_000):
        uid = f"u{i}"
        store.accept("node", uid, uid.encode())
        print(uid, flush=True)  # the hospital's ack
        buffer.append(uid)
        if len(buffer) == 3:
            store.commit(f"eu.{buffer[0]}", buffer, "|".join(buffer).encode())
            if i % 2:
                store.acked(f"eu.{buffer[0]}")
            buffer = []
    """
)


def test_sigkilled_mid_run_nothing_acked_is_lost_and_nothing_combined_twice(
    tmp_path: Path,
) -> None:
    """Killed at arbitrary moments and restarted, every update acked to a hospital is either
    waiting to be combined or in exactly one combined update."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    acked: list[str] = []
    start = 0
    for round_, stop_after in enumerate((7, 13, 5, 11)):
        worker = subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(tmp_path), str(start)],
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        assert worker.stdout is not None
        acked.extend(worker.stdout.readline().strip() for _ in range(stop_after))
        worker.send_signal(signal.SIGKILL)
        rest, _ = worker.communicate(timeout=30)
        acked.extend(rest.split())  # printed before the kill landed
        assert worker.returncode == -signal.SIGKILL, f"round {round_}"
        start += 1000
    store = RegionalStore(tmp_path)
    recovery = store.open()
    for uid, entries in recovery.rebuild:
        store.commit(uid, [e.update_id for e in entries], b"|".join(e.payload for e in entries))
    store.close()
    lines = list(read_json_lines(tmp_path / COMBINED_LOG_FILE, CombinedLogEntry))
    combined = [
        c for entry in lines if entry.event is CombinedEvent.COMBINED for c in entry.constituents
    ]
    pending = [e.update_id for e in recovery.pending]
    assert len(combined) == len(set(combined)), "an update combined twice"
    assert not set(combined) & set(pending)
    assert set(acked) <= set(combined) | set(pending), "an acked update lost"
