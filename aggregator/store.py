"""The aggregator's durable state: atomic checkpoints, a write-ahead log of accepted updates, and
the append-only provenance log of versions.

Durability rule: an update is acknowledged only after its raw message is in the write-ahead log
(written to a temp file, fsynced, renamed, directory fsynced). A fold writes the new checkpoint
atomically, and only then removes the folded updates from the log. After a crash, the latest
checkpoint plus the log replayed through the core rebuild exactly the state before it: updates in
the checkpoint's ``seen`` set are recognised as duplicates and never folded twice. The order of
the writes, and recovery from a crash between any two of them, is :mod:`aggregator.journal`'s.

Checkpoint file format (``checkpoints/v{version:08d}.ckpt``): the magic ``HNCKPT01``, the length of
the header as 8 little-endian bytes, the header (a msgpack record: everything but the arrays, plus
an index of the arrays with their offsets), then the float32 arrays raw, each at a 64-byte aligned
offset. The arrays are written straight from numpy's memory, with no copy and no serialisation,
so a checkpoint of a 10 M parameter model costs about what writing 40 MB costs.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field

from aggregator.aggregation import ServerOptimizerState
from common.codec import decode_record, encode_record
from common.errors import DecodeError
from common.files import atomic_write, fsync_dir
from common.jsonlog import append_json_lines, cut_torn_tail, read_json_lines_backwards
from common.messages import (
    AggregatorState,
    Counters,
    Evaluation,
    Knobs,
    ModelSpec,
    NodeTally,
    VersionRecord,
)

__all__ = ["Checkpoint", "EvaluationLogEntry", "StateStore", "WalEntry"]

log = logging.getLogger(__name__)

_CHECKPOINT = re.compile(r"^v(\d{8,})\.ckpt$")
# "+" separates the fields because identifiers cannot contain it (they may contain "-").
_WAL = re.compile(
    r"^(\d{12})\+([A-Za-z0-9][A-Za-z0-9_.-]{0,63})\+([A-Za-z0-9][A-Za-z0-9_.-]{0,63})\.msg$"
)
_MAGIC = b"HNCKPT01"
_LENGTH_BYTES = 8
_ALIGN = 64
_MAX_HEADER = 1 << 32

Arrays = Mapping[str, NDArray[np.float32]]
Group = Literal["params", "m", "v", "view"]


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """Everything needed to resume a run at a version (the buffer's bodies live in the WAL)."""

    run_id: str
    version: int
    state: AggregatorState
    model: ModelSpec
    knobs: Knobs
    params: Arrays
    seen: Mapping[str, str]
    counters: Counters
    nodes: tuple[NodeTally, ...]
    created_at: float
    # Accepted update id -> its node (another node's replay of the id is told apart).
    seen_by: Mapping[str, str] = field(default_factory=dict)
    optimizer_step: int = 0
    optimizer_m: Arrays = field(default_factory=dict)
    optimizer_v: Arrays = field(default_factory=dict)
    # Accepted but not yet folded when this checkpoint was written, oldest first. Their bodies
    # are in the WAL; ``seen`` and ``counters`` already include them.
    buffered: tuple[str, ...] = ()
    # The provenance of ``version`` when a fold made it: lets recovery finish the versions log
    # and the update log if the process died between this checkpoint and those appends.
    record: VersionRecord | None = None
    # The norm bound's memory (aggregator.core): the clipped norms of the last accepted updates,
    # the initial weights' norm, and the clip factor of each clipped buffered update. None where
    # a checkpoint written before them has none.
    norms: tuple[float, ...] = ()
    initial_norm: float | None = None
    buffered_scales: Mapping[str, float] | None = None
    # The broadcast chain (common.broadcast_chain): the dtype the version travelled as, and its
    # broadcast view where a delta chain made it differ from ``params`` rounded to that dtype.
    broadcast_dtype: Literal["float32", "float16"] | None = None
    broadcast_view: Arrays | None = None

    def optimizer_state(self) -> ServerOptimizerState:
        return ServerOptimizerState(
            step=self.optimizer_step, m=dict(self.optimizer_m), v=dict(self.optimizer_v)
        )


class _ArrayIndex(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    group: Group
    name: Annotated[str, Field(min_length=1, max_length=256)]
    shape: tuple[Annotated[int, Field(ge=0)], ...]
    offset: Annotated[int, Field(ge=0)]


class _Header(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    run_id: str
    version: int
    state: AggregatorState
    model: ModelSpec
    knobs: Knobs
    optimizer_step: int
    seen: dict[str, str]
    # Accepted update id -> its node (another node's replay of the id is told apart).
    seen_by: dict[str, str] = {}
    buffered: tuple[str, ...]
    counters: Counters
    nodes: tuple[NodeTally, ...]
    created_at: float
    record: VersionRecord | None
    arrays: tuple[_ArrayIndex, ...]
    norms: tuple[float, ...] = ()
    initial_norm: float | None = None
    buffered_scales: dict[str, float] | None = None
    broadcast_dtype: Literal["float32", "float16"] | None = None
    broadcast_view: bool = False


def encode_checkpoint(checkpoint: Checkpoint) -> list[bytes | memoryview]:
    """The checkpoint as buffers to write one after the other (the arrays are not copied)."""
    groups: list[tuple[Group, Arrays]] = [
        ("params", checkpoint.params),
        ("m", checkpoint.optimizer_m),
        ("v", checkpoint.optimizer_v),
        ("view", checkpoint.broadcast_view or {}),
    ]
    contiguous = [
        (group, name, np.ascontiguousarray(array, dtype="<f4"))
        for group, arrays in groups
        for name, array in arrays.items()
    ]
    offset = 0
    index = []
    for group, name, array in contiguous:
        index.append(_ArrayIndex(group=group, name=name, shape=array.shape, offset=offset))
        offset = _aligned(offset + array.nbytes)
    header = encode_record(
        _Header(
            run_id=checkpoint.run_id,
            version=checkpoint.version,
            state=checkpoint.state,
            model=checkpoint.model,
            knobs=checkpoint.knobs,
            optimizer_step=checkpoint.optimizer_step,
            seen=dict(checkpoint.seen),
            seen_by=dict(checkpoint.seen_by),
            buffered=checkpoint.buffered,
            counters=checkpoint.counters,
            nodes=checkpoint.nodes,
            created_at=checkpoint.created_at,
            record=checkpoint.record,
            arrays=tuple(index),
            norms=checkpoint.norms,
            initial_norm=checkpoint.initial_norm,
            buffered_scales=(
                None if checkpoint.buffered_scales is None else dict(checkpoint.buffered_scales)
            ),
            broadcast_dtype=checkpoint.broadcast_dtype,
            broadcast_view=checkpoint.broadcast_view is not None,
        )
    )
    prefix = _MAGIC + len(header).to_bytes(_LENGTH_BYTES, "little") + header
    buffers: list[bytes | memoryview] = [prefix, bytes(_aligned(len(prefix)) - len(prefix))]
    for _, _, array in contiguous:
        data = array.reshape(-1).view(np.uint8).data
        buffers += [data, bytes(_aligned(len(data)) - len(data))]
    return buffers


def decode_checkpoint(data: bytes) -> Checkpoint:
    """Parse a checkpoint file; raises DecodeError on anything short of a complete one."""
    if not data.startswith(_MAGIC):
        raise DecodeError("not a healthNET checkpoint (bad magic)")
    start = len(_MAGIC) + _LENGTH_BYTES
    length = int.from_bytes(data[len(_MAGIC) : start], "little")
    if length > min(_MAX_HEADER, len(data) - start):
        raise DecodeError(f"checkpoint header of {length} bytes does not fit the file")
    header = decode_record(_Header, data[start : start + length])
    base = _aligned(start + length)
    arrays: dict[Group, dict[str, NDArray[np.float32]]] = {
        "params": {},
        "m": {},
        "v": {},
        "view": {},
    }
    for entry in header.arrays:
        count = math.prod(entry.shape)
        begin = base + entry.offset
        if begin + 4 * count > len(data):
            raise DecodeError(f"checkpoint array {entry.name} runs past the end of the file")
        # A writable copy: the core keeps these arrays and the file's bytes are dropped.
        array = np.frombuffer(data, dtype="<f4", count=count, offset=begin).reshape(entry.shape)
        arrays[entry.group][entry.name] = array.astype(np.float32, copy=True)
    return Checkpoint(
        run_id=header.run_id,
        version=header.version,
        state=header.state,
        model=header.model,
        knobs=header.knobs,
        params=arrays["params"],
        seen=header.seen,
        seen_by=header.seen_by,
        counters=header.counters,
        nodes=header.nodes,
        created_at=header.created_at,
        optimizer_step=header.optimizer_step,
        optimizer_m=arrays["m"],
        optimizer_v=arrays["v"],
        buffered=header.buffered,
        record=header.record,
        norms=header.norms,
        initial_norm=header.initial_norm,
        buffered_scales=header.buffered_scales,
        broadcast_dtype=header.broadcast_dtype,
        broadcast_view=arrays["view"] if header.broadcast_view else None,
    )


def _aligned(offset: int) -> int:
    return -(-offset // _ALIGN) * _ALIGN


class EvaluationLogEntry(BaseModel):
    """One line of ``evaluations.jsonl``: a node's evaluation of a version, as it arrived."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    node: str
    received_at: float
    evaluation: Evaluation


@dataclass(frozen=True, slots=True)
class WalEntry:
    sequence: int
    node: str
    update_id: str
    path: Path

    @property
    def payload(self) -> bytes:
        """The raw message, read when asked for (entries of a large model are large)."""
        return self.path.read_bytes()


class StateStore:
    """Files under one state directory; one aggregator process owns it at a time."""

    def __init__(
        self, directory: Path, keep_checkpoints: int = 3, *, archive_models: bool = True
    ) -> None:
        self.directory = directory
        self.keep_checkpoints = keep_checkpoints
        self.archive_models = archive_models
        self._checkpoints = directory / "checkpoints"
        self.models = directory / "models"
        self._wal = directory / "wal"
        self.versions_log = directory / "versions.jsonl"
        self.evaluations_log = directory / "evaluations.jsonl"
        self._sequence = 0

    def open(self) -> None:
        """Create the layout and remove temp files left by a crash mid-write."""
        for folder in (self.directory, self._checkpoints, self._wal, self.models):
            folder.mkdir(parents=True, exist_ok=True)
        for stale in [
            *self._checkpoints.glob("*.tmp"),
            *self._wal.glob("*.tmp"),
            *self.models.glob("*.tmp"),
        ]:
            stale.unlink()
        entries = list(self._scan_wal())
        self._sequence = max((e.sequence for e in entries), default=0)
        cut_torn_tail(self.versions_log)

    # -- checkpoints

    def save(self, checkpoint: Checkpoint) -> Path:
        path = self._checkpoints / f"v{checkpoint.version:08d}.ckpt"
        atomic_write(path, encode_checkpoint(checkpoint))
        for old in self._checkpoint_paths()[: -self.keep_checkpoints]:
            old.unlink(missing_ok=True)
        return path

    def load_latest(self) -> Checkpoint | None:
        """The newest checkpoint that decodes; a corrupt newest one falls back to the previous."""
        for path in reversed(self._checkpoint_paths()):
            try:
                return decode_checkpoint(path.read_bytes())
            except DecodeError as exc:
                log.warning("checkpoint %s is unreadable, trying an older one: %s", path, exc)
        return None

    def checkpoint_versions(self) -> list[int]:
        """The versions of the retained checkpoints, oldest first."""
        return [int(_CHECKPOINT.match(p.name).group(1)) for p in self._checkpoint_paths()]  # type: ignore[union-attr]

    def load_checkpoint(self, version: int) -> Checkpoint:
        """The retained checkpoint of ``version``; FileNotFoundError when none is kept,
        DecodeError when it is damaged."""
        return decode_checkpoint((self._checkpoints / f"v{version:08d}.ckpt").read_bytes())

    def _checkpoint_paths(self) -> list[Path]:
        found = [p for p in self._checkpoints.iterdir() if _CHECKPOINT.match(p.name)]
        return sorted(found, key=lambda p: int(_CHECKPOINT.match(p.name).group(1)))  # type: ignore[union-attr]

    # -- model archive

    def archive_model(self, version: int, blob: bytes) -> None:
        """Keep a version's model blob as broadcast (``models/v{version:08d}.blob``), so that any
        version can be pulled after the run; off (``archive_models=False``) for runs whose
        models are too large to keep one per version."""
        if self.archive_models:
            atomic_write(self.models / f"v{version:08d}.blob", blob)

    def archived_model(self, version: int) -> Path | None:
        """The archived blob of ``version``, if it was kept."""
        path = self.models / f"v{version:08d}.blob"
        return path if path.is_file() else None

    # -- write-ahead log

    def append_wal(self, node: str, update_id: str, payload: bytes) -> None:
        """Durably record an accepted update's raw message before it is acknowledged."""
        self._sequence += 1
        atomic_write(self._wal / f"{self._sequence:012d}+{node}+{update_id}.msg", payload)

    def wal_entries(self) -> list[WalEntry]:
        """Recorded updates in the order they were accepted."""
        return sorted(self._scan_wal(), key=lambda e: e.sequence)

    def drop_wal(self, update_ids: set[str]) -> None:
        for entry in self._scan_wal():
            if entry.update_id in update_ids:
                entry.path.unlink(missing_ok=True)
        fsync_dir(self._wal)

    def _scan_wal(self) -> Iterator[WalEntry]:
        for path in self._wal.iterdir():
            match = _WAL.match(path.name)
            if match is None:
                continue
            yield WalEntry(
                sequence=int(match.group(1)),
                node=match.group(2),
                update_id=match.group(3),
                path=path,
            )

    # -- provenance

    def append_version(self, record: VersionRecord) -> None:
        """One JSON line per version (fsynced): the run's audit trail."""
        append_json_lines(self.versions_log, [record])

    def last_logged_version(self) -> int:
        """The newest version in ``versions.jsonl`` (0 when none)."""
        for record in self.versions_backwards():
            return record.version
        return 0

    def versions_backwards(self) -> Iterator[VersionRecord]:
        """The records of ``versions.jsonl``, newest first."""
        return read_json_lines_backwards(self.versions_log, VersionRecord)

    def append_evaluation(self, node: str, evaluation: Evaluation, received_at: float) -> None:
        """One JSON line per evaluation, for reports; not fsynced (metrics, not model state)."""
        entry = EvaluationLogEntry(node=node, received_at=received_at, evaluation=evaluation)
        with self.evaluations_log.open("a", encoding="utf-8") as handle:
            handle.write(entry.model_dump_json() + "\n")
