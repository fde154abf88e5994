"""The compressed broadcast chain: each version also travels as a delta from its predecessor.

Theory of operation. Every version has one **broadcast view**: the weights every node holds for
it, bit for bit, and that the version's snapshot (manifest and chunks) carries. Without a chain
the view is the aggregator's model rounded to the broadcast dtype. With one (the ``broadcast_
compression`` knob), the aggregator keeps the view of the last version beside its true model and
makes the next view as a node will:

1. ``diff = true - view`` (float32). This *is* the error-feedback residual: whatever earlier
   deltas left out is still in it, so nothing is lost for good, only delayed.
2. ``compress(diff)`` with the broadcast policy (top-k, quantization; :mod:`common.compression`).
3. ``view' = round(view + decompress(sent))``: float32 addition, then rounding to the version's
   broadcast dtype (float16 when every weight fits it, else float32, as the manifest says).

Step 3 is :func:`apply_delta`, the one function both roles run, so a node that adds every delta
to the view it holds has exactly the aggregator's view; it checks this against the manifest's
sha256 of the view's blob. A delta names its base version and the sha256 of the base's blob: a
node whose view is not that base (it missed a delta, joined late, or restarted) has a **gap** and
takes the version's retained snapshot instead (:class:`ChainFollower`). A rollback, a change of
knobs that turns the chain off, and a fresh run are **reset** steps: the view becomes the true
model rounded, with no delta, and every node takes the snapshot.

Pure numpy on arguments: no I/O, no clock. The peer's tensors are checked as any compressed
tensor is (:func:`common.compression.decode_tensor`) before a value is used.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from common.codec import encode_tensors, sha256_hex
from common.compression import all_finite, compress, decompress
from common.errors import CompressionError
from common.messages import CompressedTensor, Compression, Manifest, ModelDelta

__all__ = [
    "BroadcastDtype",
    "ChainFollower",
    "Held",
    "Step",
    "View",
    "advance",
    "apply_delta",
    "reset",
    "view_blob",
]

BroadcastDtype = Literal["float32", "float16"]
View = Mapping[str, NDArray[np.float32]]
_FLOAT16_MAX = float(np.finfo(np.float16).max)
# Deltas a node keeps while it waits for the version they start from (a late joiner's snapshot,
# a missed delta): the newest ones, since older ones are superseded by any snapshot.
_MAX_PENDING = 16


@dataclass(frozen=True, slots=True, eq=False)
class Step:
    """A version's broadcast view, its dtype, and the delta that made it (None: a reset)."""

    view: dict[str, NDArray[np.float32]]
    dtype: BroadcastDtype
    tensors: tuple[CompressedTensor, ...] | None
    # The run asked for float16, but a weight lies beyond its range: this version is float32.
    widened: bool = False


def _fits(arrays: View, dtype: BroadcastDtype) -> bool:
    if dtype == "float32":
        return True
    return all(float(np.abs(a).max(initial=0.0)) <= _FLOAT16_MAX for a in arrays.values())


def _rounded(
    arrays: Mapping[str, NDArray[np.float32]], dtype: BroadcastDtype
) -> dict[str, NDArray[np.float32]]:
    """``arrays`` rounded to ``dtype`` and held as read-only float32 (a dtype they fit)."""
    out = {}
    for name, array in arrays.items():
        value = np.asarray(array, dtype=np.float32)
        if dtype == "float16":
            value = value.astype(np.float16).astype(np.float32)
        elif value is array and value.flags.writeable:
            value = value.copy()  # the caller's own array: a read-only one can be shared
        value.flags.writeable = False
        out[name] = value
    return out


def view_blob(view: View, dtype: BroadcastDtype) -> bytes:
    """The snapshot blob of ``view``: its tensors as ``dtype``; its sha256 names the version."""
    if dtype == "float16":
        return encode_tensors({name: array.astype(np.float16) for name, array in view.items()})
    return encode_tensors(view)


def reset(target: View, dtype: BroadcastDtype) -> Step:
    """The view of a version that travels only as a snapshot: ``target`` rounded to ``dtype``
    (float32 instead where a weight lies beyond float16's range)."""
    widened = not _fits(target, dtype)
    used: BroadcastDtype = "float32" if widened else dtype
    return Step(_rounded(target, used), used, None, widened)


def advance(view: View, target: View, policy: Compression, dtype: BroadcastDtype) -> Step:
    """The next version's view as a compressed delta from ``view`` towards ``target``.

    Falls back to :func:`reset` when the difference cannot be compressed (it overflows float32).
    """
    if view.keys() != target.keys() or any(view[k].shape != target[k].shape for k in target):
        return reset(target, dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        diff = {name: np.subtract(target[name], view[name], dtype=np.float32) for name in target}
    try:
        # The residual is ``target - view`` itself: the policy's own feedback would double it.
        compressed = compress(diff, policy.model_copy(update={"error_feedback": False}))
    except ValueError:
        return reset(target, dtype)
    summed = _sum(view, compressed.tensors)
    if summed is None:
        return reset(target, dtype)
    widened = not _fits(summed, dtype)
    used: BroadcastDtype = "float32" if widened else dtype
    return Step(_rounded(summed, used), used, compressed.tensors, widened)


def _sum(
    view: View, tensors: tuple[CompressedTensor, ...]
) -> dict[str, NDArray[np.float32]] | None:
    """``view`` plus the decoded ``tensors`` in float32, or None where a sum is not finite."""
    names = [t.name for t in tensors]
    if sorted(names) != sorted(view) or len(set(names)) != len(names):
        raise CompressionError(
            f"a delta must name each tensor of the model once: got {sorted(names)}, "
            f"the model has {sorted(view)}"
        )
    out = {}
    with np.errstate(over="ignore", invalid="ignore"):
        for tensor in tensors:
            base = view[tensor.name]
            total = np.add(base, decompress(tensor, base.shape), dtype=np.float32)
            if not all_finite(total):
                return None
            out[tensor.name] = total
    return {name: out[name] for name in view}  # the model's own order: the blob depends on it


def apply_delta(
    view: View, tensors: tuple[CompressedTensor, ...], dtype: BroadcastDtype
) -> dict[str, NDArray[np.float32]]:
    """``view`` plus a delta's ``tensors``, rounded to ``dtype``: what :func:`advance` made.

    Raises :class:`~common.errors.CompressionError` for tensors that do not fit the model or
    hold non-finite values, and for a sum that is not finite or does not fit ``dtype``.
    """
    summed = _sum(view, tensors)
    if summed is None:
        raise CompressionError("the delta takes a weight beyond float32's range")
    if not _fits(summed, dtype):
        raise CompressionError("the delta takes a weight beyond float16's range")
    return _rounded(summed, dtype)


@dataclass(frozen=True, slots=True, eq=False)
class Held:
    """The version a node holds: its manifest and its broadcast view (read-only)."""

    manifest: Manifest
    view: dict[str, NDArray[np.float32]]


class ChainFollower:
    """A node's side of the chain: which version it holds, and whether it needs a snapshot.

    The shell feeds it every snapshot it assembled (:meth:`on_snapshot`), every delta
    (:meth:`on_delta`) and every manifest (:meth:`on_manifest`); each returns the version the
    node now holds when that changed, else None. :attr:`wants_snapshot` says whether the node
    should be subscribed to the snapshot chunks: before its first version, after a gap, and
    while the run sends no deltas.
    """

    def __init__(self) -> None:
        self._held: Held | None = None
        self._pending: dict[tuple[str, int], ModelDelta] = {}
        self._gap = False
        # Snapshots taken, deltas applied, and deltas refused (their base was not this node's
        # view, or they did not decode): what the chain saved this node, and what it cost.
        self.snapshots = 0
        self.applied = 0
        self.refused = 0

    @property
    def held(self) -> Held | None:
        return self._held

    @property
    def wants_snapshot(self) -> bool:
        held = self._held
        return held is None or self._gap or held.manifest.broadcast_compression is None

    def on_manifest(self, manifest: Manifest) -> None:
        """A version was announced: a node that holds an older one and has no delta to reach it
        has a gap (the aggregator publishes a version's delta before its manifest)."""
        held = self._held
        if (
            held is None
            or manifest.run_id != held.manifest.run_id
            or manifest.version > held.manifest.version
        ):
            self._gap = True

    def on_snapshot(self, manifest: Manifest, params: View) -> Held | None:
        """A verified snapshot: held unless the node already holds this version or a newer one
        of the same run."""
        held = self._held
        if (
            held is not None
            and held.manifest.run_id == manifest.run_id
            and held.manifest.version >= manifest.version
        ):
            return None
        dtype: BroadcastDtype = manifest.broadcast_dtype
        self._held = Held(manifest, _rounded(params, dtype))
        self._gap = False
        self.snapshots += 1
        self._drain()
        return self._held

    def on_delta(self, delta: ModelDelta) -> Held | None:
        """Apply ``delta`` if it starts from the version held (and any pending ones after it);
        keep it for later if it starts from a newer one; raise CompressionError, and mark a gap,
        if it claims the held version as base but does not reproduce the manifest's digest."""
        held = self._held
        key = (delta.manifest.run_id, delta.base_version)
        if held is not None and held.manifest.run_id == delta.manifest.run_id:
            if delta.manifest.version <= held.manifest.version:
                return None  # a retained or repeated delta the node is past
            if delta.base_version > held.manifest.version:
                self._keep(key, delta)
                self._gap = True
                return None
            before = held
            self._link(delta)
            self._drain()
            return self._held if self._held is not before else None
        self._keep(key, delta)
        return None

    def _keep(self, key: tuple[str, int], delta: ModelDelta) -> None:
        self._pending[key] = delta
        for stale in sorted(self._pending, key=lambda k: k[1])[:-_MAX_PENDING]:
            del self._pending[stale]

    def _drain(self) -> None:
        """Apply the pending deltas that continue from the version held, in order."""
        while (held := self._held) is not None:
            key = (held.manifest.run_id, held.manifest.version)
            delta = self._pending.pop(key, None)
            for old in [k for k in self._pending if k[0] != key[0] or k[1] < key[1]]:
                del self._pending[old]
            if delta is None:
                return
            try:
                self._link(delta)
            except CompressionError:
                return  # counted and marked by _link; the snapshot will mend it

    def _link(self, delta: ModelDelta) -> None:
        held = self._held
        assert held is not None  # noqa: S101 - both callers checked
        if delta.base_sha256 != held.manifest.sha256:
            self._refuse()
            raise CompressionError(
                f"delta to v{delta.manifest.version}: its base v{delta.base_version} has sha256 "
                f"{delta.base_sha256[:12]}…, the node's is {held.manifest.sha256[:12]}…"
            )
        try:
            view = apply_delta(held.view, delta.tensors, delta.manifest.broadcast_dtype)
        except CompressionError:
            self._refuse()
            raise
        if sha256_hex(view_blob(view, delta.manifest.broadcast_dtype)) != delta.manifest.sha256:
            self._refuse()
            raise CompressionError(
                f"delta to v{delta.manifest.version} does not reproduce the version's sha256"
            )
        self._held = Held(delta.manifest, view)
        self._gap = False
        self.applied += 1

    def _refuse(self) -> None:
        self.refused += 1
        self._gap = True
