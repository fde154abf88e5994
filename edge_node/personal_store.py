"""A hospital's personal model on disk: one atomic file in the node's state directory.

The file ``personal/personal.model`` holds the personal weights with what they are: the run, the
global version they were last trained against, the method and the model spec, so that the
lifecycle commands can take the model home without the federation (``healthnet model pull
--personal --state-dir DIR``). It is written with :func:`common.files.atomic_write` after every
version the node personalises, in the codec's msgpack record format (tensors as raw little-endian
bytes; nothing is ever unpickled). A reader sees the previous personal model or the new one,
never a torn file; an unreadable file is logged and the node starts its personal model afresh
(a personal model is an improvement for this hospital, not data the federation needs).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from common.codec import array_to_tensor, decode_record, encode_record, tensor_to_array
from common.errors import ProtocolError
from common.files import atomic_write
from common.messages import (
    FiniteFloat,
    Frozen,
    Identifier,
    ModelSpec,
    NonNegative,
    PersonalisationMethod,
    TensorPayload,
)

__all__ = ["PERSONAL_DIR", "PERSONAL_FILE", "PersonalModel", "PersonalStore", "read_personal"]

log = logging.getLogger(__name__)

PERSONAL_DIR = "personal"
PERSONAL_FILE = "personal.model"


class _PersonalRecord(Frozen):
    run_id: Identifier
    version: NonNegative
    method: PersonalisationMethod
    model: ModelSpec
    saved_at: FiniteFloat
    tensors: tuple[TensorPayload, ...]
    kept_global: tuple[TensorPayload, ...] | None = None


@dataclass(frozen=True, slots=True)
class PersonalModel:
    """Personal weights trained against global ``version`` of ``run_id`` by ``method``.

    ``kept_global``: under a holdout, the global version itself, when it beat the personal
    weights on the held-out records; the hospital then keeps it (``served``), and Ditto still
    continues from ``params``.
    """

    run_id: str
    version: int
    method: PersonalisationMethod
    model: ModelSpec
    saved_at: float
    params: dict[str, NDArray[np.float32]]
    kept_global: dict[str, NDArray[np.float32]] | None = None

    @property
    def served(self) -> dict[str, NDArray[np.float32]]:
        """The model the hospital keeps: its personal weights, or the global version."""
        return self.params if self.kept_global is None else self.kept_global


class PersonalStore:
    """The node's personal model under ``state_dir/personal``."""

    def __init__(self, state_dir: Path, *, max_bytes: int) -> None:
        self.directory = state_dir / PERSONAL_DIR
        self._max_bytes = max_bytes

    @property
    def path(self) -> Path:
        return self.directory / PERSONAL_FILE

    def open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.directory.joinpath(PERSONAL_FILE + ".tmp").unlink(missing_ok=True)

    def load(self) -> PersonalModel | None:
        """The last personal model saved, or None (none yet, or the file is unreadable)."""
        try:
            return read_personal(self.path, max_bytes=self._max_bytes)
        except FileNotFoundError:
            return None
        except ProtocolError:
            log.exception("personal model %s is unreadable; starting a new one", self.path)
            return None

    def save(self, personal: PersonalModel) -> None:
        record = _PersonalRecord(
            run_id=personal.run_id,
            version=personal.version,
            method=personal.method,
            model=personal.model,
            saved_at=personal.saved_at,
            tensors=tuple(array_to_tensor(n, a) for n, a in personal.params.items()),
            kept_global=None
            if personal.kept_global is None
            else tuple(array_to_tensor(n, a) for n, a in personal.kept_global.items()),
        )
        atomic_write(self.path, encode_record(record))


def read_personal(path: Path, *, max_bytes: int = 4 << 30) -> PersonalModel:
    """The personal model in ``path``; raises FileNotFoundError, or ProtocolError if unreadable."""
    record = decode_record(_PersonalRecord, path.read_bytes(), max_bytes=max_bytes)
    return PersonalModel(
        run_id=record.run_id,
        version=record.version,
        method=record.method,
        model=record.model,
        saved_at=record.saved_at,
        params=_arrays(record.tensors),
        kept_global=None if record.kept_global is None else _arrays(record.kept_global),
    )


def _arrays(tensors: tuple[TensorPayload, ...]) -> dict[str, NDArray[np.float32]]:
    return {t.name: np.asarray(tensor_to_array(t), dtype=np.float32).copy() for t in tensors}
