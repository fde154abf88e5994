"""The node's error-feedback residual on disk, kept consistent with the outbox across crashes.

Theory of operation. With error feedback, each update sends ``C(delta + residual)`` and keeps
``residual' = delta + residual - sent`` for the next one (DESIGN §5). The residual and the update
that carries the rest of that sum must change together: keeping the new residual without its
update loses what the update held, and keeping the old residual once the update is queued sends
that part twice. Two atomic files and one rule make the pair crash-safe:

1. :meth:`ResidualStore.stage` writes the new residual as ``residual-{update id}.next``;
2. the shell then puts the update in the outbox;
3. :meth:`ResidualStore.commit` renames the staged file over ``residual.tensors``.

On start, :meth:`ResidualStore.open` finishes or undoes a step cut short: a staged residual whose
update reached the outbox is committed (the crash fell between 2 and 3); one whose update did not
is dropped, and the old residual stays, as if that training had never happened.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection, Mapping
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from common.codec import array_to_tensor, decode_record, encode_record, tensor_to_array
from common.errors import ProtocolError
from common.files import atomic_write, fsync_dir
from common.messages import Frozen, Identifier, TensorPayload

__all__ = ["ResidualStore"]

log = logging.getLogger(__name__)

_CURRENT = "residual.tensors"
_STAGED = re.compile(r"^residual-([A-Za-z0-9][A-Za-z0-9_.-]{0,63})\.next$")


class _ResidualRecord(Frozen):
    """The file's content: a residual belongs to one run (a new run starts from zero)."""

    run_id: Identifier
    tensors: tuple[TensorPayload, ...]


class ResidualStore:
    def __init__(self, directory: Path, *, max_bytes: int) -> None:
        self.directory = directory
        self._max_bytes = max_bytes

    def open(self, queued_ids: Collection[str]) -> None:
        """Create the directory and settle a stage/commit that a crash interrupted."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.directory.iterdir()):
            match = _STAGED.match(path.name)
            if path.name.endswith(".tmp"):
                path.unlink()
            elif match is not None and match.group(1) in queued_ids:
                self._promote(path)
            elif match is not None:
                log.warning(
                    "dropping residual staged for update %s, which was never queued",
                    match.group(1)[:8],
                )
                path.unlink()

    def load(self, run_id: str) -> dict[str, NDArray[np.float32]]:
        """The committed residual of ``run_id``; empty if there is none, or only another run's."""
        path = self.directory / _CURRENT
        if not path.exists():
            return {}
        try:
            record = decode_record(_ResidualRecord, path.read_bytes(), max_bytes=self._max_bytes)
            arrays = {t.name: tensor_to_array(t) for t in record.tensors}
        except ProtocolError:
            # A residual is an optimisation of what is sent, not data: losing it costs a little
            # accuracy, refusing to start would cost the hospital's whole contribution.
            log.exception("residual file %s is unreadable; starting from zero", path)
            return {}
        if record.run_id != run_id:
            return {}
        return {name: np.asarray(a, dtype=np.float32) for name, a in arrays.items()}

    def stage(
        self, update_id: str, run_id: str, residual: Mapping[str, NDArray[np.float32]]
    ) -> None:
        tensors = tuple(array_to_tensor(name, array) for name, array in residual.items())
        record = _ResidualRecord(run_id=run_id, tensors=tensors)
        atomic_write(self._staged(update_id), encode_record(record))

    def commit(self, update_id: str) -> None:
        self._promote(self._staged(update_id))

    def _staged(self, update_id: str) -> Path:
        path = self.directory / f"residual-{update_id}.next"
        if not _STAGED.match(path.name):
            raise ValueError(f"invalid update id {update_id!r}")
        return path

    def _promote(self, staged: Path) -> None:
        staged.replace(self.directory / _CURRENT)
        fsync_dir(self.directory)
