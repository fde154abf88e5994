"""Specification of the node's sent log: progress across restarts, and what reconciliation reads."""

from __future__ import annotations

from pathlib import Path

from edge_node.sentlog import SentEntry, SentEvent, SentLog, read_sent_log


def queued(update_id: str, base_version: int, run_id: str = "run-1") -> SentEntry:
    return SentEntry(
        event=SentEvent.QUEUED,
        at=1.0,
        update_id=update_id,
        run_id=run_id,
        base_version=base_version,
        bytes=100,
    )


def acked(update_id: str) -> SentEntry:
    return SentEntry(event=SentEvent.ACKED, at=2.0, update_id=update_id, accepted=True)


def test_last_trained_is_the_newest_queued_update(tmp_path: Path) -> None:
    """The newest queued line gives (run, base version), whatever acks came after it."""
    with SentLog(tmp_path) as log:
        assert log.last_trained() is None
        log.write([queued("a", 0), acked("a"), queued("b", 3, "run-2"), acked("b")])
        assert log.last_trained() == ("run-2", 3)


def test_adopt_adds_only_the_outbox_entries_the_log_does_not_name(tmp_path: Path) -> None:
    """After a crash between outbox and log, the missing queued line is added once."""
    with SentLog(tmp_path) as log:
        log.write([queued("a", 0)])
        assert log.adopt([queued("a", 0), queued("b", 1)]) == 1
        assert log.adopt([queued("a", 0), queued("b", 1)]) == 0
    assert [(e.event, e.update_id) for e in read_sent_log(tmp_path)] == [
        (SentEvent.QUEUED, "a"),
        (SentEvent.QUEUED, "b"),
    ]


def test_the_log_survives_reopening(tmp_path: Path) -> None:
    """A restarted node reads the lines the previous process wrote."""
    with SentLog(tmp_path) as log:
        log.write([queued("a", 4)])
    with SentLog(tmp_path) as log:
        assert log.last_trained() == ("run-1", 4)
