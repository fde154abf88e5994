"""The aggregator's durable state: atomic checkpoints, a write-ahead log of accepted updates, and
the append-only provenance log of versions.

Durability rule: an update is acknowledged only after its raw message is in the write-ahead log
(written to a temp file, fsynced, renamed, directory fsynced). A fold writes the new checkpoint
atomically, and only then removes the folded updates from the log. After a crash, the latest
checkpoint plus the log replayed through the core rebuild exactly the state before it: updates in
the checkpoint's ``seen`` set are recognised as duplicates and never folded twice.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict

from aggregator.aggregation import ServerOptimizerState
from common.codec import array_to_tensor, decode_record, encode_record, tensor_to_array
from common.errors import DecodeError
from common.files import atomic_write, fsync_dir
from common.messages import (
    AggregatorState,
    Counters,
    Evaluation,
    Knobs,
    ModelSpec,
    NodeLedgerEntry,
    TensorPayload,
    VersionRecord,
)

__all__ = ["Checkpoint", "EvaluationLogEntry", "StateStore", "WalEntry"]

log = logging.getLogger(__name__)

_CHECKPOINT = re.compile(r"^v(\d{8,})\.ckpt$")
# "+" separates the fields because identifiers cannot contain it (they may contain "-").
_WAL = re.compile(
    r"^(\d{12})\+([A-Za-z0-9][A-Za-z0-9_.-]{0,63})\+([A-Za-z0-9][A-Za-z0-9_.-]{0,63})\.msg$"
)


class Checkpoint(BaseModel):
    """Everything needed to resume a run at a version (the buffer lives in the WAL)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    run_id: str
    version: int
    state: AggregatorState
    model: ModelSpec
    knobs: Knobs
    params: tuple[TensorPayload, ...]
    optimizer_step: int = 0
    optimizer_m: tuple[TensorPayload, ...] = ()
    optimizer_v: tuple[TensorPayload, ...] = ()
    seen: dict[str, str]
    # Accepted update id -> its node; older checkpoints lack it (a replay then counts as a resend).
    seen_by: dict[str, str] = {}
    # Accepted but not yet folded when this checkpoint was written, oldest first. Their bodies
    # are in the WAL; ``seen`` and ``counters`` already include them.
    buffered: tuple[str, ...] = ()
    counters: Counters
    nodes: tuple[NodeLedgerEntry, ...]
    created_at: float

    @staticmethod
    def tensors(arrays: Mapping[str, NDArray[np.float32]]) -> tuple[TensorPayload, ...]:
        return tuple(array_to_tensor(name, array) for name, array in arrays.items())

    @staticmethod
    def arrays(tensors: tuple[TensorPayload, ...]) -> dict[str, NDArray[np.float32]]:
        return {t.name: tensor_to_array(t).copy() for t in tensors}

    def optimizer_state(self) -> ServerOptimizerState:
        return ServerOptimizerState(
            step=self.optimizer_step,
            m=self.arrays(self.optimizer_m),
            v=self.arrays(self.optimizer_v),
        )


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
    payload: bytes
    path: Path


class StateStore:
    """Files under one state directory; one aggregator process owns it at a time."""

    def __init__(self, directory: Path, keep_checkpoints: int = 3) -> None:
        self.directory = directory
        self.keep_checkpoints = keep_checkpoints
        self._checkpoints = directory / "checkpoints"
        self._wal = directory / "wal"
        self.versions_log = directory / "versions.jsonl"
        self.evaluations_log = directory / "evaluations.jsonl"
        self._sequence = 0

    def open(self) -> None:
        """Create the layout and remove temp files left by a crash mid-write."""
        for folder in (self.directory, self._checkpoints, self._wal):
            folder.mkdir(parents=True, exist_ok=True)
        for stale in [*self._checkpoints.glob("*.tmp"), *self._wal.glob("*.tmp")]:
            stale.unlink()
        entries = list(self._scan_wal())
        self._sequence = max((e.sequence for e in entries), default=0)

    # -- checkpoints

    def save(self, checkpoint: Checkpoint) -> Path:
        path = self._checkpoints / f"v{checkpoint.version:08d}.ckpt"
        atomic_write(path, encode_record(checkpoint))
        for old in self._checkpoint_paths()[: -self.keep_checkpoints]:
            old.unlink(missing_ok=True)
        return path

    def load_latest(self) -> Checkpoint | None:
        """The newest checkpoint that decodes; a corrupt newest one falls back to the previous."""
        for path in reversed(self._checkpoint_paths()):
            try:
                return decode_record(Checkpoint, path.read_bytes())
            except DecodeError as exc:
                log.warning("checkpoint %s is unreadable, trying an older one: %s", path, exc)
        return None

    def _checkpoint_paths(self) -> list[Path]:
        found = [p for p in self._checkpoints.iterdir() if _CHECKPOINT.match(p.name)]
        return sorted(found, key=lambda p: int(_CHECKPOINT.match(p.name).group(1)))  # type: ignore[union-attr]

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
                payload=path.read_bytes(),
                path=path,
            )

    # -- provenance

    def append_version(self, record: VersionRecord) -> None:
        """One JSON line per version: the run's audit trail."""
        with self.versions_log.open("a", encoding="utf-8") as handle:
            handle.write(record.model_dump_json() + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def append_evaluation(self, node: str, evaluation: Evaluation, received_at: float) -> None:
        """One JSON line per evaluation, for reports; not fsynced (metrics, not model state)."""
        entry = EvaluationLogEntry(node=node, received_at=received_at, evaluation=evaluation)
        with self.evaluations_log.open("a", encoding="utf-8") as handle:
            handle.write(entry.model_dump_json() + "\n")
