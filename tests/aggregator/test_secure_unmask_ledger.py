"""The aggregator's durable secure aggregation records: the unmask ledger's answers and the
receipt log, across a restart (a new object over the same directory)."""

from __future__ import annotations

from pathlib import Path

import pytest

from aggregator.secure_unmask import LEDGER_FILE, FoldPlan, ReceiptLog, UnmaskLedger
from common.secure_aggregation.events import UnmaskAnswer


def plan(fold_id: str, *update_ids: str) -> FoldPlan:
    return FoldPlan(
        fold_id=fold_id,
        policy_digest="0" * 64,
        update_ids=update_ids,
        senders=tuple(f"n{i}" for i in range(len(update_ids))),
        weights=tuple(1024 for _ in update_ids),
        scale=0.001,
        holders=("a", "b", "c"),
        reason="buffer_timeout",
    )


def answer(fold_id: str, holder: str) -> UnmaskAnswer:
    return UnmaskAnswer(fold_id=fold_id, holder=holder, share_sum=bytes(range(8)) + b"\n\0")


def test_an_open_plans_answers_survive_a_restart_and_a_closed_plans_are_dropped(
    tmp_path: Path,
) -> None:
    with UnmaskLedger(tmp_path) as ledger:
        ledger.record(plan("f1", "u1", "u2"))
        ledger.answered("f1", [answer("f1", "a"), answer("f1", "b")])
        ledger.close("f1", 1)
        ledger.record(plan("f2", "u3", "u4"))
        ledger.answered("f2", [answer("f2", "c")])
    size = (tmp_path / LEDGER_FILE).stat().st_size
    with UnmaskLedger(tmp_path) as ledger:
        assert ledger.open_plans() == [plan("f2", "u3", "u4")]
        assert ledger.answers("f2") == (answer("f2", "c"),)
        assert ledger.answers("f1") == ()
        assert ledger.planned("u1") == "f1"
        with pytest.raises(ValueError, match="already planned: u1"):
            ledger.record(plan("f3", "u1", "u5"))
    assert (tmp_path / LEDGER_FILE).stat().st_size < size  # f1's answers are gone from disk
    with UnmaskLedger(tmp_path) as ledger:
        assert ledger.answers("f2") == (answer("f2", "c"),)
        assert ledger.planned("u2") == "f1"


def test_answers_are_recorded_for_open_plans_only(tmp_path: Path) -> None:
    with UnmaskLedger(tmp_path) as ledger, pytest.raises(ValueError, match="not an open plan"):
        ledger.answered("f9", [answer("f9", "a")])


def test_receipts_survive_a_restart_in_order(tmp_path: Path) -> None:
    with ReceiptLog(tmp_path) as receipts:
        receipts.write("a", ["u1", "u2"])
        receipts.write("b", ["u1"])
    with ReceiptLog(tmp_path) as receipts:
        assert receipts.read() == [("a", ("u1", "u2")), ("b", ("u1",))]
