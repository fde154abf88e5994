"""Append-only JSON-lines logs that survive a crash at any byte: one typed record per line.

A crash in the middle of an append leaves at most one torn line at the end of the file, with no
newline after it. Readers skip such a tail; :meth:`JsonLog.open` cuts it off before the next
append, so that a new line never glues onto half an old one. Every complete line is a whole record,
and a record is durable once :meth:`JsonLog.sync` has returned (flush and fsync).

Lines are written with pydantic's JSON, so tools (``jq``, pandas) read the files directly; the
aggregator's update log and versions log and the node's sent log are such logs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Generic, Self, TypeVar

from pydantic import BaseModel, ValidationError

__all__ = [
    "JsonLog",
    "append_json_lines",
    "cut_torn_tail",
    "read_json_lines",
    "read_json_lines_backwards",
]

log = logging.getLogger(__name__)

R = TypeVar("R", bound=BaseModel)

_BLOCK = 64 * 1024


class JsonLog(Generic[R]):
    """The writer of one log file; one process appends to it at a time."""

    def __init__(self, path: Path, record_type: type[R]) -> None:
        self.path = path
        self.record_type = record_type
        self._handle: IO[bytes] | None = None
        self._dirty = False

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def open(self) -> None:
        """Create the file if needed and cut off a torn last line left by a crash."""
        if self._handle is not None:
            return
        cut_torn_tail(self.path)
        self._handle = self.path.open("ab")

    def close(self) -> None:
        if self._handle is not None:
            self.sync()
            self._handle.close()
            self._handle = None

    def append(self, records: Iterable[R]) -> None:
        """Write records at the end. They reach the kernel at once, so they survive the process
        being killed; they survive a power cut only after :meth:`sync`."""
        handle = self._require()
        data = b"".join(record.model_dump_json().encode() + b"\n" for record in records)
        if data:
            handle.write(data)
            handle.flush()
            self._dirty = True

    def sync(self) -> None:
        """Make every record appended so far durable (no-op when nothing is pending)."""
        if self._handle is None or not self._dirty:
            return
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._dirty = False

    def write(self, records: Iterable[R]) -> None:
        """Append and sync."""
        self.append(records)
        self.sync()

    def _require(self) -> IO[bytes]:
        if self._handle is None:
            raise RuntimeError(f"{self.path} is not open")
        return self._handle


def cut_torn_tail(path: Path) -> None:
    """Create ``path`` if needed and truncate it after its last newline (a crash's torn line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as handle:
        complete = _complete_length(path)
        if complete < handle.tell():
            log.warning(
                "%s: dropping %d bytes of a line torn by a crash", path, handle.tell() - complete
            )
            handle.truncate(complete)
            handle.flush()
            os.fsync(handle.fileno())


def append_json_lines(path: Path, records: Iterable[BaseModel]) -> None:
    """Append records and fsync, opening the file for this call only (for rare appends).

    The caller runs :func:`cut_torn_tail` once before the first append after a start.
    """
    with path.open("ab") as handle:
        handle.write(b"".join(record.model_dump_json().encode() + b"\n" for record in records))
        handle.flush()
        os.fsync(handle.fileno())


def read_json_lines(path: Path, record_type: type[R]) -> Iterator[R]:
    """Every complete record of a log, oldest first (a missing file has none).

    A torn last line is skipped; a complete line that does not parse raises ValueError naming the
    line, since that is damage no crash can cause.
    """
    if not path.exists():
        return
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.endswith(b"\n"):
                return  # torn by a crash mid-append
            yield _parse(path, number, line, record_type)


def read_json_lines_backwards(path: Path, record_type: type[R]) -> Iterator[R]:
    """Complete records newest first, reading the file from its end in blocks."""
    if not path.exists():
        return
    with path.open("rb") as handle:
        end = _complete_length(path)
        remainder = b""
        position = end
        while position > 0:
            start = max(0, position - _BLOCK)
            handle.seek(start)
            block = handle.read(position - start) + remainder
            position = start
            lines = block.split(b"\n")
            # The first piece may be the end of a line that starts in an earlier block.
            remainder = lines[0] if position > 0 else b""
            for line in reversed(lines[1:] if position > 0 else lines):
                if line:
                    yield _parse(path, 0, line, record_type)


def _parse(path: Path, number: int, line: bytes, record_type: type[R]) -> R:
    try:
        return record_type.model_validate_json(line)
    except ValidationError as exc:
        where = f"line {number}" if number else "a line"
        raise ValueError(f"{path}: {where} is not a {record_type.__name__}: {exc}") from exc


def _complete_length(path: Path) -> int:
    """The length of the file up to and including its last newline."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        position = size
        while position > 0:
            start = max(0, position - _BLOCK)
            handle.seek(start)
            block = handle.read(position - start)
            newline = block.rfind(b"\n")
            if newline >= 0:
                return start + newline + 1
            position = start
    return 0
