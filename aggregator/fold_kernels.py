"""Compiled loops for the dense float32 fold: several deltas into one block in a single pass.

numpy has no fused multiply-add, so ``out += c * x`` is two passes over a block (the product into
scratch, then the sum), one delta after the other. Each loop here reads up to :data:`GROUP`
deltas side by side and writes the block once: the deltas stream from memory together, which
the 2-core EPYC reads faster than one stream at a time, and nothing goes through scratch.

Every loop computes exactly what numpy's float32 ufuncs compute, in the same order: ``c * x``
rounded to float32, then added, delta after delta (numba leaves floating-point contraction and
reassociation off unless asked), so a fold through these loops is the same, bit for bit, as
:func:`aggregator.fold.fold_block` one delta at a time. numba compiles each loop on its first
call (about a second in all, once per process); only models with blocks of at least
:data:`aggregator.fold.COMPILED_MIN` entries reach this module, so small models never import
numba.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numba
import numpy as np
from numpy.typing import NDArray

__all__ = ["GROUP", "step", "weighted_sum"]

# Deltas per loop: with the block and the old version, five streams at once; more made no
# difference on the 2-core EPYC, and every count up to it is a loop of its own.
GROUP = 4

Array = NDArray[np.float32]

_jit = numba.njit(nogil=True, boundscheck=False)


@_jit
def _put1(out: Array, x0: Array, c0: np.float32) -> None:
    for j in range(out.size):
        out[j] = c0 * x0[j]


@_jit
def _put2(out: Array, x0: Array, x1: Array, c0: np.float32, c1: np.float32) -> None:
    for j in range(out.size):
        out[j] = c0 * x0[j] + c1 * x1[j]


@_jit
def _put3(
    out: Array, x0: Array, x1: Array, x2: Array, c0: np.float32, c1: np.float32, c2: np.float32
) -> None:
    for j in range(out.size):
        out[j] = c0 * x0[j] + c1 * x1[j] + c2 * x2[j]


@_jit
def _put4(
    out: Array,
    x0: Array,
    x1: Array,
    x2: Array,
    x3: Array,
    c0: np.float32,
    c1: np.float32,
    c2: np.float32,
    c3: np.float32,
) -> None:
    for j in range(out.size):
        out[j] = c0 * x0[j] + c1 * x1[j] + c2 * x2[j] + c3 * x3[j]


@_jit
def _add1(out: Array, x0: Array, c0: np.float32) -> None:
    for j in range(out.size):
        out[j] = out[j] + c0 * x0[j]


@_jit
def _add2(out: Array, x0: Array, x1: Array, c0: np.float32, c1: np.float32) -> None:
    for j in range(out.size):
        out[j] = out[j] + c0 * x0[j] + c1 * x1[j]


@_jit
def _add3(
    out: Array, x0: Array, x1: Array, x2: Array, c0: np.float32, c1: np.float32, c2: np.float32
) -> None:
    for j in range(out.size):
        out[j] = out[j] + c0 * x0[j] + c1 * x1[j] + c2 * x2[j]


@_jit
def _add4(
    out: Array,
    x0: Array,
    x1: Array,
    x2: Array,
    x3: Array,
    c0: np.float32,
    c1: np.float32,
    c2: np.float32,
    c3: np.float32,
) -> None:
    for j in range(out.size):
        out[j] = out[j] + c0 * x0[j] + c1 * x1[j] + c2 * x2[j] + c3 * x3[j]


@_jit
def _step(block: Array, old: Array, lr: np.float32, scaled: bool) -> bool:
    # ``r - r`` is 0 for every finite r and NaN for an infinity or a NaN; counting the NaNs as
    # a sum keeps the loop free of branches, so that it vectorises.
    bad = 0
    if scaled:
        for j in range(block.size):
            r = block[j] * lr + old[j]
            block[j] = r
            bad += (r - r) != 0
    else:
        for j in range(block.size):
            r = block[j] + old[j]
            block[j] = r
            bad += (r - r) != 0
    return bad == 0


_PUT: tuple[Callable[..., None], ...] = (_put1, _put2, _put3, _put4)
_ADD: tuple[Callable[..., None], ...] = (_add1, _add2, _add3, _add4)


def weighted_sum(
    out: Array, values: Sequence[NDArray[Any]], factors: Sequence[float], *, replace: bool
) -> None:
    """``out (+)= sum(factors[i] * values[i])``, in float32, left to right.

    ``out`` is a writeable, contiguous float32 block; each of ``values`` is a contiguous float32
    array of its size. With ``replace`` the block is overwritten, not added to. Equal, bit for
    bit, to ``np.multiply(values[i], np.float32(factors[i]))`` added into ``out`` in turn.
    """
    if len(values) != len(factors):
        raise ValueError("need one factor per array of values")
    for start in range(0, len(values), GROUP):
        group = values[start : start + GROUP]
        scaled = [np.float32(f) for f in factors[start : start + GROUP]]
        loops = _PUT if replace and start == 0 else _ADD
        loops[len(group) - 1](out, *group, *scaled)


def step(block: Array, old: NDArray[np.float32], lr: float) -> bool:
    """``block = old + lr * block`` in float32 (``lr`` 1: no product), as numpy computes it;
    whether every new value is finite."""
    finite: bool = _step(block, old, np.float32(lr), lr != 1.0)
    return finite
