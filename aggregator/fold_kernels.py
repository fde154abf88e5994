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

Sums of squares (the norms) are the one place where the order is left to the compiler: each
square of a float32 value is exact in float64, and only their sum is reassociated, so that it
vectorises (as BLAS's dot does). The result is fixed for a machine and this code, and one
loop computes it: the fold's own (:func:`fold_step`) and :func:`aggregator.fold.sum_of_squares`
run it on the same blocks, so they agree bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numba
import numpy as np
from numpy.typing import NDArray

__all__ = ["GROUP", "fold_step", "squares", "step", "weighted_sum"]

# Deltas per loop: with the block and the old version, five streams at once; more made no
# difference on the 2-core EPYC, and every count up to it is a loop of its own.
GROUP = 4

Array = NDArray[np.float32]

_jit = numba.njit(nogil=True, boundscheck=False)
# Reassociation lets a sum vectorise; nothing else about the arithmetic changes.
_sum_jit = numba.njit(nogil=True, boundscheck=False, fastmath={"reassoc"})


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


@_sum_jit
def _squares(block: Array) -> float:
    total = 0.0
    for j in range(block.size):
        w = np.float64(block[j])  # a float32's square is exact in float64
        total += w * w
    return total


@_jit
def _fold_tensor1(
    out: Array,
    old: Array,
    x0: Array,
    c0: np.float32,
    lr: np.float32,
    scaled: bool,
    block: int,
) -> tuple[float, bool]:
    total, finite = 0.0, True
    for start in range(0, out.size, block):
        stop = min(start + block, out.size)
        part = out[start:stop]
        _put1(part, x0[start:stop], c0)
        total += _squares(part)
        finite = _step(part, old[start:stop], lr, scaled) and finite
    return total, finite


@_jit
def _fold_tensor2(
    out: Array,
    old: Array,
    x0: Array,
    x1: Array,
    c0: np.float32,
    c1: np.float32,
    lr: np.float32,
    scaled: bool,
    block: int,
) -> tuple[float, bool]:
    total, finite = 0.0, True
    for start in range(0, out.size, block):
        stop = min(start + block, out.size)
        part = out[start:stop]
        _put2(part, x0[start:stop], x1[start:stop], c0, c1)
        total += _squares(part)
        finite = _step(part, old[start:stop], lr, scaled) and finite
    return total, finite


@_jit
def _fold_tensor3(
    out: Array,
    old: Array,
    x0: Array,
    x1: Array,
    x2: Array,
    c0: np.float32,
    c1: np.float32,
    c2: np.float32,
    lr: np.float32,
    scaled: bool,
    block: int,
) -> tuple[float, bool]:
    total, finite = 0.0, True
    for start in range(0, out.size, block):
        stop = min(start + block, out.size)
        part = out[start:stop]
        _put3(part, x0[start:stop], x1[start:stop], x2[start:stop], c0, c1, c2)
        total += _squares(part)
        finite = _step(part, old[start:stop], lr, scaled) and finite
    return total, finite


@_jit
def _fold_tensor4(
    out: Array,
    old: Array,
    x0: Array,
    x1: Array,
    x2: Array,
    x3: Array,
    c0: np.float32,
    c1: np.float32,
    c2: np.float32,
    c3: np.float32,
    lr: np.float32,
    scaled: bool,
    block: int,
) -> tuple[float, bool]:
    total, finite = 0.0, True
    for start in range(0, out.size, block):
        stop = min(start + block, out.size)
        part = out[start:stop]
        _put4(part, x0[start:stop], x1[start:stop], x2[start:stop], x3[start:stop], c0, c1, c2, c3)
        total += _squares(part)
        finite = _step(part, old[start:stop], lr, scaled) and finite
    return total, finite


_PUT: tuple[Callable[..., None], ...] = (_put1, _put2, _put3, _put4)
_ADD: tuple[Callable[..., None], ...] = (_add1, _add2, _add3, _add4)
_FOLD_TENSOR: tuple[Callable[..., tuple[float, bool]], ...] = (
    _fold_tensor1,
    _fold_tensor2,
    _fold_tensor3,
    _fold_tensor4,
)


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


def squares(block: Array) -> float:
    """The sum of the squares of a contiguous float32 block, each square exact in float64."""
    total: float = _squares(block)
    return total


def fold_step(
    out: Array,
    old: NDArray[np.float32],
    values: Sequence[NDArray[Any]],
    factors: Sequence[float],
    lr: float,
    block: int,
) -> tuple[float, bool]:
    """A whole tensor's fold and step, one ``block`` of entries at a time: into each block of
    ``out``, :func:`weighted_sum` of at most :data:`GROUP` arrays, then :func:`squares` of the
    block, then :func:`step` from ``old``'s block, while the block is in cache. Returns the
    blocks' squares, added in order, and whether every new value is finite: what those calls
    compute, bit for bit, in one call for the tensor."""
    if len(values) != len(factors) or not 0 < len(values) <= GROUP:
        raise ValueError(f"need one factor per array of values, and 1 to {GROUP} arrays")
    if block < 1:
        raise ValueError(f"blocks need at least one entry, got {block}")
    scaled = [np.float32(f) for f in factors]
    loop = _FOLD_TENSOR[len(values) - 1]
    total, finite = loop(out, old, *values, *scaled, np.float32(lr), lr != 1.0, block)
    return float(total), bool(finite)
