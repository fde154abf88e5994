"""Fold decoded update tensors into the aggregator's accumulators: pure numpy, no I/O (DESIGN §5).

The nodes' tensors arrive checked and decoded by :func:`common.compression.decode_tensor`; this
module adds ``weight * values`` into a dense float32 or float64 accumulator in place, without
densifying a sparse tensor, and measures update norms. Only the aggregator folds, so this lives
with it; the encoder and the decoder stay in :mod:`common.compression`, shared with the nodes.
Folding is vectorised; loops run over cache-sized blocks, never over entries, except in the
compiled loops of :mod:`aggregator.fold_kernels`, which :func:`fold_blocks`,
:func:`step_block` and :func:`fold_step_tensor` hand dense float32 work to.
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import numpy as np
from numpy.typing import NDArray

from common.compression import (
    HALF_BIAS,
    DecodedTensor,
    all_finite,
    decode_tensor,
    float32_values,
    half_to_biased_float32,
)
from common.messages import CompressedTensor

__all__ = [
    "BLOCK",
    "COMPILED_MIN",
    "accumulate",
    "fold",
    "fold_block",
    "fold_blocks",
    "fold_step_tensor",
    "squared_norm",
    "step_block",
    "sum_of_squares",
]

# Entries per block when folding: big enough that per-block overhead is small, small enough that
# a block and its scratch stay in cache. 1 MiB blocks folded an 11.7 M model's buffer 10 % faster
# than 512 KiB ones on the 2-core EPYC (1 MiB of L2 per core); 4 MiB ones were no faster.
BLOCK = 1 << 18
# From this many entries on, a float32 block takes its dense float32 deltas and the server step
# through the compiled loops of aggregator.fold_kernels: they read several deltas in one pass
# (numpy reads each twice, through scratch). Below it numpy's per-call cost is small, and a
# model whose blocks are all smaller (the demo's) never imports numba.
COMPILED_MIN = 1 << 16
# Below this many entries, a sparse fold gathers, adds and scatters instead of calling add.at.
_SMALL_SCATTER = 1024
_FLOAT32_MAX = float(np.finfo(np.float32).max)
# The largest factor each accumulator dtype can take.
_ACCUMULATOR_MAX = {
    np.dtype(np.float32): float(np.finfo(np.float32).max),
    np.dtype(np.float64): float(np.finfo(np.float64).max),
}


def fold(
    decoded: DecodedTensor, out: NDArray[np.floating[Any]], weight: float, *, replace: bool = False
) -> None:
    """``out += weight * decoded``, in place; a sparse tensor touches only its own entries.

    With ``replace``, ``out = weight * decoded`` instead (zeros where a sparse tensor sent
    nothing): the first update of a sum, written into an uninitialised array, saves zeroing it
    and reading the zeros back. ``out`` must be a writeable, C-contiguous float32 or float64 array
    of the decoded shape. It goes :data:`BLOCK` entries at a time through :func:`fold_block`:
    a temporary as large as the tensor would cost more in page faults than the arithmetic.
    """
    _checked_factor(decoded, out, weight)
    flat = out.reshape(-1)
    scratch = np.empty(min(flat.size, BLOCK), dtype=out.dtype)
    for start in range(0, flat.size, BLOCK):
        block = flat[start : start + BLOCK]
        fold_block(decoded, block, weight, start, replace=replace, scratch=scratch)


def fold_block(
    decoded: DecodedTensor,
    out: NDArray[np.floating[Any]],
    weight: float,
    start: int,
    *,
    replace: bool = False,
    scratch: NDArray[np.floating[Any]] | None = None,
) -> None:
    """:func:`fold` for entries ``start`` to ``start + out.size`` of the flattened tensor.

    ``out += weight * those entries`` (``=`` with ``replace``), where ``out`` is a writeable,
    C-contiguous, one-dimensional float32 or float64 block of an accumulator. Folding a whole
    buffer of updates into one cache-sized block before moving to the next reads each update
    once and writes the result once; folding them one after the other reads and writes the
    whole accumulator once per update. A sparse tensor's indices are increasing: the block's
    own are found by bisection. The scaled values go through ``scratch`` (``out``'s dtype, at
    least ``out.size`` entries) when given: a caller folding many blocks allocates it once,
    instead of a temporary per block whose pages the allocator may fault in every time.
    """
    if scratch is not None and (scratch.dtype != out.dtype or scratch.size < out.size):
        raise ValueError(f"scratch of {scratch.size} {scratch.dtype} for a {out.dtype} block")
    stop = _checked_block(decoded, out, start)
    factor = _checked_factor(decoded, out, weight, whole=False)
    values, positions = decoded.values, None
    if decoded.indices is None:
        values = values[start:stop]
    else:
        lo, hi = (int(i) for i in np.searchsorted(decoded.indices, (start, stop)))
        values = values[lo:hi]
        positions = decoded.indices[lo:hi] - start
        if replace:
            out.fill(0.0)
    target = out if replace and positions is None else None  # dense values are written
    if factor == 1.0 and positions is None and values.dtype != np.float16:
        # int8 or float32 values, cast on the fly: no temporary
        if target is None:
            np.add(out, values, out=out)
        else:
            np.copyto(out, values)
        return
    temporary = None if scratch is None else scratch[: values.size]
    part = _scaled(values, factor, out.dtype, target, temporary)
    if positions is not None:
        _scatter_add(out, positions, part)
    elif target is None:
        np.add(out, part, out=out)


def fold_blocks(
    decoded: Sequence[DecodedTensor],
    out: NDArray[np.floating[Any]],
    weights: Sequence[float],
    start: int,
    *,
    scratch: NDArray[np.floating[Any]] | None = None,
) -> None:
    """``out = sum(weights[i] * decoded[i])`` over one block: :func:`fold_block` with
    ``replace`` for the first tensor, then added for each of the others, in order.

    The same, bit for bit, as that chain of calls; but where ``out`` is a float32 block of at
    least :data:`COMPILED_MIN` entries, each run of consecutive dense float32 tensors is summed
    in one compiled pass (:func:`aggregator.fold_kernels.weighted_sum`), reading the tensors
    side by side instead of each one twice.
    """
    if len(decoded) != len(weights) or not decoded:
        raise ValueError("need one weight per tensor, and at least one tensor")
    compiled = out.dtype == np.float32 and out.size >= COMPILED_MIN
    i = 0
    while i < len(decoded):
        end = i
        while compiled and end < len(decoded) and _dense_float32(decoded[end]):
            end += 1
        if end == i:
            fold_block(decoded[i], out, weights[i], start, replace=i == 0, scratch=scratch)
            i += 1
            continue
        run = decoded[i:end]
        factors = []
        for d, w in zip(run, weights[i:end], strict=True):
            stop = _checked_block(d, out, start)
            factors.append(_checked_factor(d, out, w, whole=False))
        values = [d.values[start:stop] for d in run]
        _kernels().weighted_sum(out, values, factors, replace=i == 0)
        i = end


def fold_step_tensor(
    decoded: Sequence[DecodedTensor],
    out: NDArray[np.float32],
    weights: Sequence[float],
    old: NDArray[np.float32],
    lr: float,
    *,
    compiled: bool = False,
    scratch: NDArray[np.float32] | None = None,
) -> tuple[float, bool]:
    """One tensor of the plain server step: into each :data:`BLOCK` of ``out`` (the new
    version's flattened tensor), :func:`fold_blocks`, the block's squares, then
    :func:`step_block` from ``old``'s block. Returns the tensor's :func:`sum_of_squares` of
    the weighted sum, as that function sums it, and whether every new value is finite.

    The same, bit for bit, as those calls block after block. With ``compiled`` (the model has
    a tensor of :data:`COMPILED_MIN` entries, so its fold has imported numba anyway) and at
    most :data:`aggregator.fold_kernels.GROUP` dense float32 or float16 tensors (read as sent:
    a float16 value is widened as it is read), the whole tensor is one
    compiled call (:func:`aggregator.fold_kernels.fold_step`), or two for a small tensor, whose
    squares stay BLAS's: per-tensor Python costs more than the arithmetic of a small tensor.
    """
    if len(decoded) != len(weights) or not decoded:
        raise ValueError("need one weight per tensor, and at least one tensor")
    if out.ndim != 1 or old.shape != out.shape or out.dtype != np.float32:
        raise ValueError(f"a float32 tensor of {out.shape} entries steps from {old.shape}")
    whole = out.size >= COMPILED_MIN  # as _compiled_squares decides for a float32 array
    if compiled and len(decoded) <= _GROUP and all(_dense_loopable(d) for d in decoded):
        if not (out.flags.c_contiguous and out.flags.writeable):
            raise ValueError("accumulator must be writeable and C-contiguous")
        factors = []
        for d, w in zip(decoded, weights, strict=True):
            if d.values.size != out.size or math.prod(d.shape) != out.size:
                raise ValueError(f"a tensor of {out.size} entries folds {d.shape} values")
            factor = w * d.scale
            if not abs(factor) <= _FLOAT32_MAX:
                raise ValueError(f"weight {w!r} times scale {d.scale!r} overflows float32")
            factors.append(factor)
        values = [d.values for d in decoded]
        kernels = _kernels()
        if whole:
            squares, finite = kernels.fold_step(out, old, values, factors, lr, BLOCK)
            return squares, finite
        kernels.mix(out, values, factors)
        squares = _block_squares(out, compiled=False)
        return squares, bool(kernels.step(out, old, lr))
    squares, finite = 0.0, True
    for start in range(0, out.size, BLOCK):
        block = out[start : start + BLOCK]
        fold_blocks(decoded, block, weights, start, scratch=scratch)
        squares += _block_squares(block, compiled=whole)
        finite = step_block(block, old[start : start + BLOCK], lr) and finite
    return squares, finite


def step_block(block: NDArray[np.float32], old: NDArray[np.float32], lr: float) -> bool:
    """``block = old + lr * block`` (the plain server step on one block of the model) in place,
    as numpy's float32 ``multiply`` (skipped for ``lr`` 1) and ``add`` compute it; whether every
    new value is finite. Compiled into one pass from :data:`COMPILED_MIN` entries on."""
    if block.size != old.size:
        raise ValueError(f"a block of {block.size} entries steps from {old.size}")
    if block.dtype == np.float32 and block.size >= COMPILED_MIN:
        return bool(_kernels().step(block, old, lr))
    if lr != 1.0:
        np.multiply(block, np.float32(lr), out=block)
    np.add(block, old, out=block)
    return all_finite(block)


@functools.cache
def _kernels() -> ModuleType:
    """:mod:`aggregator.fold_kernels`, imported on first use: numba only for large models."""
    return importlib.import_module("aggregator.fold_kernels")


# Dense float32 tensors a compiled loop sums in one pass (aggregator.fold_kernels.GROUP, which
# this module does not import: numba only for large models).
_GROUP = 4


def _dense_float32(decoded: DecodedTensor) -> bool:
    return decoded.indices is None and decoded.values.dtype == np.float32


def _dense_loopable(decoded: DecodedTensor) -> bool:
    """Dense float32 or float16: what the whole-tensor loops of the fold take."""
    return decoded.indices is None and decoded.values.dtype in _LOOPABLE


_LOOPABLE = (np.dtype(np.float32), np.dtype(np.float16))


def _checked_block(decoded: DecodedTensor, out: NDArray[np.floating[Any]], start: int) -> int:
    """Where the block ``out`` that starts at entry ``start`` of ``decoded`` stops."""
    if out.ndim != 1:
        raise ValueError(f"a block is one-dimensional, got shape {out.shape}")
    stop = start + out.size
    if not 0 <= start <= stop <= math.prod(decoded.shape):
        raise ValueError(f"block [{start}, {stop}) is outside tensor {decoded.shape}")
    return stop


def _scaled(
    values: NDArray[Any],
    factor: float,
    dtype: np.dtype[Any],
    into: NDArray[np.floating[Any]] | None,
    temporary: NDArray[np.floating[Any]] | None,
) -> NDArray[np.floating[Any]]:
    """``factor * values`` in ``dtype``, written into ``into``, else ``temporary``, else new."""
    if values.dtype != np.float16:
        into = into if into is not None else temporary
        product: NDArray[np.floating[Any]] = np.multiply(values, dtype.type(factor), out=into)
        return product
    if temporary is not None and dtype == np.float32:
        bits = temporary.view(np.int32)  # the float32 results overwrite their own bit patterns
    else:
        bits = np.empty(values.size, dtype=np.int32)
        temporary = None
    return _scale_half(
        values.view(np.int16), bits, factor, dtype, into if into is not None else temporary
    )


def _scatter_add(
    flat: NDArray[np.floating[Any]], indices: NDArray[np.intp], part: NDArray[Any]
) -> None:
    if indices.size < _SMALL_SCATTER:
        # Indices are unique, so gather, add and scatter is exact; for a few entries it costs
        # less than add.at, whose fast path pays off for many.
        flat[indices] += part
    else:
        np.add.at(flat, indices, part)


def _checked_factor(
    decoded: DecodedTensor, out: NDArray[np.floating[Any]], weight: float, *, whole: bool = True
) -> float:
    largest = _ACCUMULATOR_MAX.get(out.dtype)
    if largest is None:
        raise ValueError(f"accumulator must be float32 or float64, got {out.dtype}")
    if whole and out.shape != decoded.shape:
        raise ValueError(f"accumulator {out.shape} does not fit tensor {decoded.shape}")
    if not (out.flags.c_contiguous and out.flags.writeable):
        raise ValueError("accumulator must be writeable and C-contiguous")
    factor = weight * decoded.scale
    if not abs(factor) <= largest:
        raise ValueError(f"weight {weight!r} times scale {decoded.scale!r} overflows {out.dtype}")
    return factor


def _scale_half(
    bits: NDArray[np.int16],
    scratch: NDArray[np.int32],
    factor: float,
    dtype: np.dtype[Any],
    out: NDArray[np.floating[Any]] | None,
) -> NDArray[np.floating[Any]]:
    """``factor *`` the float16 values whose bit patterns are ``bits``, in ``dtype``."""
    biased = half_to_biased_float32(bits, scratch)
    # The bit trick yields value * 2**-112: fold the bias into the factor if that fits.
    if dtype == np.float32 and abs(factor) * HALF_BIAS > _ACCUMULATOR_MAX[dtype]:
        np.multiply(biased, np.float32(HALF_BIAS), out=biased)
        a = dtype.type(factor)
    else:
        a = dtype.type(factor * HALF_BIAS)
    result: NDArray[np.floating[Any]] = np.multiply(biased, a, out=out)
    return result


def accumulate(tensor: CompressedTensor, out: NDArray[np.floating[Any]], weight: float) -> None:
    """Check ``tensor`` against ``out``'s shape and add ``weight *`` its values into ``out``.

    ``out`` is untouched if the tensor is refused.
    """
    fold(decode_tensor(tensor, out.shape), out, weight)


def squared_norm(decoded: DecodedTensor) -> float:
    """The squared L2 norm of the decoded tensor, accumulated in float64."""
    if decoded.values.dtype == np.float32 and decoded.scale == 1.0:
        # The values as sent are float32_values' own: no copy of a dense update to square it.
        return sum_of_squares(decoded.values)
    return sum_of_squares(float32_values(decoded))


def sum_of_squares(array: NDArray[np.floating[Any]]) -> float:
    """``sum(array ** 2)``, one cache-sized block at a time, the blocks' sums added in float64.

    A float32 array of at least :data:`COMPILED_MIN` entries is summed block by block by the
    compiled loop :func:`aggregator.fold_kernels.squares`, each square exact in float64 (the
    loop :func:`fold_step_tensor` runs on the same blocks, so a fold's norm is this function's,
    bit for bit). Any other block is one BLAS dot product in the array's own precision
    (float32: a relative error near 1e-7, against 1e-16 for float64 squares, at a seventh of
    numpy's cost for those); a block whose float32 sum overflows, as the squares of finite
    values beyond 1.8e19 do, is summed again in float64, so any finite array has a finite sum.
    """
    flat = np.asarray(array).reshape(-1)
    if flat.dtype not in _ACCUMULATOR_MAX:  # float16 or integers: BLAS has no dot for them
        flat = flat.astype(np.float64)
    compiled = _compiled_squares(flat)
    total = 0.0
    for start in range(0, flat.size, BLOCK):
        total += _block_squares(flat[start : start + BLOCK], compiled=compiled)
    return total


def _compiled_squares(flat: NDArray[Any]) -> bool:
    """Whether :func:`sum_of_squares` takes the compiled loop for this flattened array."""
    return bool(flat.dtype == np.float32 and flat.size >= COMPILED_MIN)


def _block_squares(part: NDArray[np.floating[Any]], *, compiled: bool) -> float:
    """One block's sum of squares, compiled or by BLAS (see :func:`sum_of_squares`)."""
    if compiled:
        return float(_kernels().squares(part))
    with np.errstate(over="ignore", invalid="ignore"):
        block = float(np.dot(part, part))
    if not math.isfinite(block) and part.dtype != np.float64:
        wide = part.astype(np.float64)
        block = float(np.dot(wide, wide))
    return block
