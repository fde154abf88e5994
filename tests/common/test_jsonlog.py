"""Specification of the append-only JSON-lines logs: complete records survive, torn ones do not."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from common.jsonlog import (
    JsonLog,
    append_json_lines,
    cut_torn_tail,
    read_json_lines,
    read_json_lines_backwards,
)


class Line(BaseModel):
    n: int
    text: str = ""


def test_records_come_back_in_order_both_ways(tmp_path: Path) -> None:
    """What was appended reads back oldest first, and newest first across many blocks."""
    path = tmp_path / "log.jsonl"
    records = [Line(n=i, text="x" * (i % 700)) for i in range(2000)]  # ~700 KB: many blocks
    with JsonLog(path, Line) as log:
        log.append(records[:1000])
        log.sync()
        log.write(records[1000:])
    assert list(read_json_lines(path, Line)) == records
    assert list(read_json_lines_backwards(path, Line)) == records[::-1]


def test_a_torn_last_line_is_skipped_and_cut_before_the_next_append(tmp_path: Path) -> None:
    """Half a line at the end is invisible to readers and removed when the log is opened."""
    path = tmp_path / "log.jsonl"
    append_json_lines(path, [Line(n=1), Line(n=2)])
    with path.open("ab") as handle:
        handle.write(b'{"n": 3, "te')
    assert [r.n for r in read_json_lines(path, Line)] == [1, 2]
    assert [r.n for r in read_json_lines_backwards(path, Line)] == [2, 1]
    with JsonLog(path, Line) as log:
        log.write([Line(n=4)])
    assert [r.n for r in read_json_lines(path, Line)] == [1, 2, 4]


def test_a_file_that_is_all_torn_line_becomes_empty(tmp_path: Path) -> None:
    """A crash during the very first append leaves an empty log after repair."""
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"n": 1')
    cut_torn_tail(path)
    assert path.read_bytes() == b""
    assert list(read_json_lines_backwards(path, Line)) == []


def test_a_missing_log_has_no_records(tmp_path: Path) -> None:
    """Reading a log that was never written yields nothing rather than failing."""
    assert list(read_json_lines(tmp_path / "none.jsonl", Line)) == []
    assert list(read_json_lines_backwards(tmp_path / "none.jsonl", Line)) == []


def test_a_damaged_complete_line_is_an_error_naming_the_line(tmp_path: Path) -> None:
    """A complete line that is not a record cannot come from a crash: reading it raises."""
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"n": 1}\n{"n": "one"}\n')
    with pytest.raises(ValueError, match="line 2"):
        list(read_json_lines(path, Line))
