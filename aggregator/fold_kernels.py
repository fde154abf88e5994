"""Compiled loops for the dense fold: several deltas into one block in a single pass.

numpy has no fused multiply-add, so ``out += c * x`` is two passes over a block (the product into
scratch, then the sum), one delta after the other. Each loop here reads up to :data:`GROUP`
deltas side by side and writes the block once: the deltas stream from memory together, which
the 2-core EPYC reads faster than one stream at a time, and nothing goes through scratch.

Every loop computes exactly what numpy's float32 ufuncs compute, in the same order: ``c * x``
rounded to float32, then added, delta after delta (numba leaves floating-point contraction and
reassociation off unless asked), so a fold through these loops is the same, bit for bit, as
:func:`aggregator.fold.fold_block` one delta at a time. The whole-tensor loops
(:func:`fold_step`, :func:`mix`) also read float16 values as sent, widening each as it is read
by the bit trick of :func:`common.compression.half_to_biased_float32`, with the factors numpy's
path uses. numba compiles each loop on its first call (a few seconds in all) and keeps the
machine code in ``__pycache__`` beside this module (``cache=True``; or ``NUMBA_CACHE_DIR``, or
not at all where nothing is writable), so later processes on the same machine load it
instead; only models with blocks of at least :data:`aggregator.fold.COMPILED_MIN` entries reach
this module, so small models never import numba.

Sums of squares (the norms) are the one place where the order is left to the compiler: each
square of a float32 value is exact in float64, and only their sum is reassociated, so that it
vectorises (as BLAS's dot does). The result is fixed for a machine and this code, and one
loop computes it: the fold's own (:func:`fold_step`) and :func:`aggregator.fold.sum_of_squares`
run it on the same blocks, so they agree bit for bit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numba
import numpy as np
from numba import types
from numba.extending import intrinsic, overload
from numpy.typing import NDArray

from common.compression import HALF_BIAS

__all__ = ["GROUP", "fold_step", "mix", "squares", "step", "weighted_sum"]

log = logging.getLogger(__name__)

# Deltas per loop: with the block and the old version, five streams at once; more made no
# difference on the 2-core EPYC, and every count up to it is a loop of its own.
GROUP = 4

Array = NDArray[np.float32]
# Dense values as the whole-tensor loops take them: float32, or float16 as int16 bit patterns.
Values = NDArray[np.float32] | NDArray[np.int16]
# float16 -> float32 by bit arithmetic, as common.compression.half_to_biased_float32 does it.
_HALF_MASK = np.int32(-0x70000001)  # 0x8FFFFFFF
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _disk_cache_available() -> bool:
    """Whether numba can keep compiled code here: beside this module, or in NUMBA_CACHE_DIR or
    the user's cache directory.

    A hardened install has none of them (a read-only package tree, no home: the systemd units'
    ProtectSystem=strict and ProtectHome=yes), and there numba refuses ``cache=True`` outright,
    at decoration; the loops are then compiled in each process instead.
    """

    def probe() -> None:
        return None

    try:
        numba.njit(cache=True)(probe)
    except RuntimeError as exc:
        log.info("compiled fold loops are not cached on disk (%s); set NUMBA_CACHE_DIR", exc)
        return False
    return True


# cache=True: compiling every loop cost seconds at each aggregator start and in each test
# process; the cached machine code is keyed by the source and the CPU, so it is never stale.
_CACHE = _disk_cache_available()
_jit = numba.njit(nogil=True, boundscheck=False, cache=_CACHE)
# Reassociation lets a sum vectorise; nothing else about the arithmetic changes.
_sum_jit = numba.njit(nogil=True, boundscheck=False, fastmath={"reassoc"}, cache=_CACHE)


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


def _load(x: Any, j: Any, p: Any) -> np.float32:
    """Entry ``j`` of dense values as float32: ``x[j]``, or for float16 bit patterns (int16)
    the value times 2**-112 (:func:`common.compression.half_to_biased_float32`) times ``p``.
    Compiled only (:func:`_load_overload`)."""
    raise NotImplementedError("compiled code only")


@overload(_load, inline="always")
def _load_overload(x: Any, j: Any, p: Any) -> Callable[..., np.float32]:
    if isinstance(x, types.Array) and x.dtype == types.int16:

        def half(x: Any, j: Any, p: Any) -> np.float32:
            bits = np.int32((np.int32(x[j]) << 13) & _HALF_MASK)
            value: np.float32 = _float32_from_bits(bits) * p
            return value

        return half

    def single(x: Any, j: Any, p: Any) -> np.float32:
        value: np.float32 = x[j]
        return value

    return single


def _float32_from_bits_typer(typingctx: Any, bits: Any) -> Any:
    if bits != types.int32:
        return None

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.bitcast(args[0], context.get_value_type(types.float32))

    return types.float32(types.int32), codegen


# The float32 whose bit pattern is an int32 (a no-op in machine code): compiled code only.
_float32_from_bits: Any = intrinsic(_float32_from_bits_typer)


@_jit
def _mix1(
    out: Array,
    x0: Values,
    p0: np.float32,
    c0: np.float32,
) -> None:
    for j in range(out.size):
        out[j] = c0 * _load(x0, j, p0)


@_jit
def _fold_tensor1(
    out: Array,
    old: Array,
    x0: Values,
    p0: np.float32,
    c0: np.float32,
    lr: np.float32,
    scaled: bool,
    block: int,
) -> tuple[float, bool]:
    total, finite = 0.0, True
    for start in range(0, out.size, block):
        stop = min(start + block, out.size)
        part = out[start:stop]
        _mix1(part, x0[start:stop], p0, c0)
        total += _squares(part)
        finite = _step(part, old[start:stop], lr, scaled) and finite
    return total, finite


@_jit
def _mix2(
    out: Array,
    x0: Values,
    x1: Values,
    p0: np.float32,
    p1: np.float32,
    c0: np.float32,
    c1: np.float32,
) -> None:
    for j in range(out.size):
        out[j] = c0 * _load(x0, j, p0) + c1 * _load(x1, j, p1)


@_jit
def _fold_tensor2(
    out: Array,
    old: Array,
    x0: Values,
    x1: Values,
    p0: np.float32,
    p1: np.float32,
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
        _mix2(part, x0[start:stop], x1[start:stop], p0, p1, c0, c1)
        total += _squares(part)
        finite = _step(part, old[start:stop], lr, scaled) and finite
    return total, finite


@_jit
def _mix3(
    out: Array,
    x0: Values,
    x1: Values,
    x2: Values,
    p0: np.float32,
    p1: np.float32,
    p2: np.float32,
    c0: np.float32,
    c1: np.float32,
    c2: np.float32,
) -> None:
    for j in range(out.size):
        out[j] = c0 * _load(x0, j, p0) + c1 * _load(x1, j, p1) + c2 * _load(x2, j, p2)


@_jit
def _fold_tensor3(
    out: Array,
    old: Array,
    x0: Values,
    x1: Values,
    x2: Values,
    p0: np.float32,
    p1: np.float32,
    p2: np.float32,
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
        _mix3(part, x0[start:stop], x1[start:stop], x2[start:stop], p0, p1, p2, c0, c1, c2)
        total += _squares(part)
        finite = _step(part, old[start:stop], lr, scaled) and finite
    return total, finite


@_jit
def _mix4(
    out: Array,
    x0: Values,
    x1: Values,
    x2: Values,
    x3: Values,
    p0: np.float32,
    p1: np.float32,
    p2: np.float32,
    p3: np.float32,
    c0: np.float32,
    c1: np.float32,
    c2: np.float32,
    c3: np.float32,
) -> None:
    for j in range(out.size):
        out[j] = (
            c0 * _load(x0, j, p0)
            + c1 * _load(x1, j, p1)
            + c2 * _load(x2, j, p2)
            + c3 * _load(x3, j, p3)
        )


@_jit
def _fold_tensor4(
    out: Array,
    old: Array,
    x0: Values,
    x1: Values,
    x2: Values,
    x3: Values,
    p0: np.float32,
    p1: np.float32,
    p2: np.float32,
    p3: np.float32,
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
        _mix4(
            part,
            x0[start:stop],
            x1[start:stop],
            x2[start:stop],
            x3[start:stop],
            p0,
            p1,
            p2,
            p3,
            c0,
            c1,
            c2,
            c3,
        )
        total += _squares(part)
        finite = _step(part, old[start:stop], lr, scaled) and finite
    return total, finite


_PUT: tuple[Callable[..., None], ...] = (_put1, _put2, _put3, _put4)
_ADD: tuple[Callable[..., None], ...] = (_add1, _add2, _add3, _add4)
_MIX: tuple[Callable[..., None], ...] = (_mix1, _mix2, _mix3, _mix4)
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
    ``out``, the weighted sum of at most :data:`GROUP` dense float32 or float16 arrays (as
    :func:`mix` writes it), then :func:`squares` of the block, then :func:`step` from
    ``old``'s block, while the block is in cache. Returns the blocks' squares, added in order,
    and whether every new value is finite: what those calls compute, bit for bit, in one call
    for the tensor."""
    if block < 1:
        raise ValueError(f"blocks need at least one entry, got {block}")
    arrays, pre, scaled = _loop_arguments(values, factors)
    loop = _FOLD_TENSOR[len(arrays) - 1]
    total, finite = loop(out, old, *arrays, *pre, *scaled, np.float32(lr), lr != 1.0, block)
    return float(total), bool(finite)


def mix(out: Array, values: Sequence[NDArray[Any]], factors: Sequence[float]) -> None:
    """``out = sum(factors[i] * values[i])`` for at most :data:`GROUP` dense float32 or float16
    arrays, in float32, left to right: bit for bit what :func:`aggregator.fold.fold_block`
    writes for the first and adds for each of the others (a float16 array's values scaled as
    its numpy path scales them, through the float32 bit trick and a factor times 2**112)."""
    arrays, pre, scaled = _loop_arguments(values, factors)
    _MIX[len(arrays) - 1](out, *arrays, *pre, *scaled)


def _loop_arguments(
    values: Sequence[NDArray[Any]], factors: Sequence[float]
) -> tuple[list[NDArray[Any]], list[np.float32], list[np.float32]]:
    """Each array as the loops read it (float16 as its bit patterns), and the two float32
    factors each entry is multiplied by: 1 and ``factor`` for float32; for float16, whose
    entries come out 2**-112 times their value, 1 and ``factor * 2**112`` where that fits
    float32, else ``2**112`` and ``factor``, in that order, as numpy's path does."""
    if len(values) != len(factors) or not 0 < len(values) <= GROUP:
        raise ValueError(f"need one factor per array of values, and 1 to {GROUP} arrays")
    arrays, pre, scaled = [], [], []
    one = np.float32(1.0)
    for x, factor in zip(values, factors, strict=True):
        if x.dtype == np.float16:
            arrays.append(x.view(np.int16))
            if abs(factor) * HALF_BIAS > _FLOAT32_MAX:
                pre.append(np.float32(HALF_BIAS))
                scaled.append(np.float32(factor))
            else:
                pre.append(one)
                scaled.append(np.float32(factor * HALF_BIAS))
        elif x.dtype == np.float32:
            arrays.append(x)
            pre.append(one)
            scaled.append(np.float32(factor))
        else:
            raise ValueError(f"the loops take float32 or float16 values, got {x.dtype}")
    return arrays, pre, scaled
