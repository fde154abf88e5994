"""Memory for the model's new versions, reused once nothing holds the version it held.

A fold writes every weight of a new version. Memory fresh from the operating system costs a
page fault per page on first write, and the kernel zeroes each page first. glibc hands out fresh
pages for every array over 32 MB, and for smaller ones whenever it has given freed memory back:
then the faults cost a third of an 11.7 M parameter fold, more than the arithmetic of a whole
buffer of updates. A running aggregator needs only two versions' memory at a time, the current
one and the one being folded, so :class:`VersionMemory` keeps a few model-sized slabs and hands
out one whose previous version is gone.

"Gone" is decided by reference count, the test numpy's own ``ndarray.resize(refcheck=True)``
makes. Every tensor of a version is a view of its slab, and numpy points every view, and every
view of a view, at the array that owns the memory; a ``memoryview`` or ``np.frombuffer`` of one
holds that view in turn. So while any part of a version is reachable, from a :class:`Fold`, a
checkpoint being written, a publisher or a caller's variable, its slab has more references than
this class's own, and it is not reused. (Raw addresses, as ``ctypes`` hands them out, are not
counted; nothing in healthNET keeps one.)
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping

import numpy as np
from numpy.typing import NDArray

__all__ = ["VersionMemory"]

Array = NDArray[np.float32]
# Each tensor starts on a 64-byte boundary (a cache line, an AVX-512 vector) within its slab.
_ALIGN = 16


class VersionMemory:
    """Float32 arrays of the model's shapes for a new version, in recycled memory.

    Keeps at most ``keep`` slabs (two suffice for one aggregator: the current version and the
    next). When every kept slab is still in use, :meth:`take` allocates another and stops
    keeping the oldest, which is freed as usual once its holders let go.
    """

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], *, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self._offsets: dict[str, tuple[int, tuple[int, ...]]] = {}
        size = 0
        for name, shape in shapes.items():
            self._offsets[name] = (size, tuple(shape))
            size += -(-math.prod(shape) // _ALIGN) * _ALIGN
        self._size = size
        self._keep = keep
        self._slabs: list[Array] = []
        # The reference count of a kept slab that nothing else holds, measured, not assumed:
        # what sys.getrefcount reports for the same expression differs between interpreters.
        self._free_count = 0
        self._allocated = 0

    @property
    def allocated(self) -> int:
        """How many slabs :meth:`take` has allocated; every other take reused one."""
        return self._allocated

    @property
    def kept(self) -> int:
        """How many slabs this holds, in use or free."""
        return len(self._slabs)

    def take(self) -> dict[str, Array]:
        """Writeable, C-contiguous, uninitialised float32 arrays, one per tensor."""
        for index in range(len(self._slabs)):
            if _references(self._slabs, index) == self._free_count:
                return self._views(self._slabs[index])
        self._slabs.append(np.empty(self._size, dtype=np.float32))
        self._free_count = _references(self._slabs, len(self._slabs) - 1)
        self._allocated += 1
        if len(self._slabs) > self._keep:
            del self._slabs[0]
        return self._views(self._slabs[-1])

    def _views(self, slab: Array) -> dict[str, Array]:
        return {
            name: slab[start : start + math.prod(shape)].reshape(shape)
            for name, (start, shape) in self._offsets.items()
        }


def _references(slabs: list[Array], index: int) -> int:
    """The reference count of ``slabs[index]``, always taken through this same expression."""
    return sys.getrefcount(slabs[index])
