"""Staleness-weighted FedAvg and server optimizers: pure numpy, no I/O (DESIGN §4).

An update from a node with ``n`` samples, trained from version ``b`` and folded at version ``t``,
has staleness ``s = t - b``, sample weight ``a = n**beta`` and weight ``w = a * f(s)``. A buffer of
K updates becomes one pseudo-gradient ``delta = sum(w_i * delta_i) / sum(a_i)``.

The denominator is the sum of *sample* weights, not of ``w``: normalising by ``sum(w)`` would cancel
the staleness discount whenever every update in a buffer is equally stale, and always at K = 1,
where FedAsync needs ``x + eta * f(s) * delta``. With fresh updates (``f(0) = 1``) this is FedAvg;
with ``beta = 0`` it is FedBuff's ``sum(f(s_i) * delta_i) / K``. A server optimizer applies it:
plain ``x + lr * delta`` (FedAvg, FedBuff, FedAsync), FedAvgM, FedAdam or FedYogi (Reddi et al.,
"Adaptive Federated Optimization", 2021). Model states are ``name -> float32 array`` mappings;
nothing here mutates its arguments.

Poisoning defences. :func:`norm_bound` is the largest L2 norm an update may have: an absolute
ceiling, and an adaptive bound, a multiple of the median norm of the last accepted updates (FLAME
clips to the median norm: Nguyen et al., "FLAME: Taming Backdoors in Federated Learning", 2022),
which follows the honest updates' scale as training goes on and needs no tuning per model.
Before there is history, the first updates are held to a multiple of the norm of the run's
initial weights: an attacker's update may well be the first one. :func:`clip_to_norm` scales an
update down to a norm bound. The robust rules replace the mean by a coordinate-wise statistic of
the staleness-discounted deltas ``f(s_i) * delta_i``: the median (Yin et al., "Byzantine-Robust
Distributed Learning", 2018) or the trimmed mean, which drops the ``max(1, floor(trim * K))``
largest and smallest values of each coordinate. Both ignore sample counts, which a malicious
node could inflate, and both leave the aggregate inside the range of the honest values as long
as fewer than half (median) or fewer than the trimmed count are poisoned.

Compressed deltas are folded as they came (:func:`decoded_sum`): a sparse update touches only
the entries it sent, so folding a top-k update costs what it weighs, not what the model weighs.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from aggregator.fold import BLOCK, COMPILED_MIN, fold, fold_step_tensor, sum_of_squares
from common.compression import DecodedTensor
from common.messages import AggregationRule, ServerOptimizerKind, StalenessKind

__all__ = [
    "NORM_WARMUP",
    "NormBound",
    "Params",
    "ServerOptimizer",
    "ServerOptimizerState",
    "StalenessPolicy",
    "buffer_aggregate",
    "buffer_weights",
    "clip_to_norm",
    "coordinate_median",
    "decoded_sum",
    "densify",
    "fold_step",
    "global_norm",
    "norm_bound",
    "robust_buffer_aggregate",
    "sample_weight",
    "server_step",
    "trimmed_mean",
    "weighted_average",
]

Array = NDArray[np.float32]
Params = Mapping[str, Array]
# The robust statistics also take the float64 intermediates of the staleness discount.
AnyParams = Mapping[str, NDArray[np.floating[Any]]]


@dataclass(frozen=True, slots=True)
class StalenessPolicy:
    """``f(s)``: constant 1; polynomial ``(1+s)**-a``; hinge 1 to ``b``, then ``1/(a(s-b)+1)``."""

    kind: StalenessKind = StalenessKind.POLYNOMIAL
    a: float = 0.5
    b: int = 4

    def factor(self, staleness: int) -> float:
        if staleness < 0:
            raise ValueError(f"staleness must be non-negative, got {staleness}")
        match self.kind:
            case StalenessKind.CONSTANT:
                return 1.0
            case StalenessKind.POLYNOMIAL:
                return float((1.0 + staleness) ** -self.a)
            case StalenessKind.HINGE:
                if staleness <= self.b:
                    return 1.0
                return 1.0 / (self.a * (staleness - self.b) + 1.0)


def sample_weight(num_samples: int, sample_exponent: float) -> float:
    """``n**beta``: how much a fresh update counts against the others in its buffer."""
    if num_samples < 1:
        raise ValueError(f"an update needs at least one sample, got {num_samples}")
    return float(num_samples**sample_exponent)


def buffer_aggregate(
    deltas: Sequence[Params],
    num_samples: Sequence[int],
    stalenesses: Sequence[int],
    policy: StalenessPolicy,
    sample_exponent: float,
) -> tuple[dict[str, Array], list[float]]:
    """The buffer's pseudo-gradient and each update's effective weight ``w_i / sum(a_i)``."""
    if not (len(deltas) == len(num_samples) == len(stalenesses)):
        raise ValueError("need one sample count and one staleness per delta")
    coefficients = buffer_weights(num_samples, stalenesses, policy, sample_exponent)
    return weighted_average(deltas, coefficients, 1.0), coefficients


def buffer_weights(
    num_samples: Sequence[int],
    stalenesses: Sequence[int],
    policy: StalenessPolicy,
    sample_exponent: float,
) -> list[float]:
    """Each update's coefficient ``w_i / sum(a_i)`` in the buffer's pseudo-gradient."""
    if len(num_samples) != len(stalenesses) or not num_samples:
        raise ValueError("need one sample count per staleness, and at least one")
    a = [sample_weight(n, sample_exponent) for n in num_samples]
    total = math.fsum(a)
    return [ai * policy.factor(s) / total for ai, s in zip(a, stalenesses, strict=True)]


def decoded_sum(
    deltas: Sequence[Mapping[str, DecodedTensor]],
    coefficients: Sequence[float],
    shapes: Mapping[str, tuple[int, ...]],
    *,
    out: Mapping[str, Array] | None = None,
) -> dict[str, Array]:
    """``sum(c_i * delta_i)`` of decoded (possibly sparse, quantized) deltas, as float32.

    Accumulates in float32: a buffer sums a handful of small deltas, and float64 would double the
    memory traffic of the one step whose speed grows with the model. The first delta is written,
    not added to zeros: one pass over the model fewer. The sum goes into ``out`` when given
    (see :func:`fold_step`), else into new arrays.
    """
    _check_buffer(deltas, coefficients, shapes)
    out = _output(shapes, out)
    for i, (delta, coefficient) in enumerate(zip(deltas, coefficients, strict=True)):
        for name, acc in out.items():
            fold(delta[name], acc, coefficient, replace=i == 0)
    return out


def fold_step(
    params: Params,
    deltas: Sequence[Mapping[str, DecodedTensor]],
    coefficients: Sequence[float],
    lr: float,
    *,
    out: Mapping[str, Array] | None = None,
) -> tuple[dict[str, Array], float, bool]:
    """The next version under the plain server step, ``params + lr * sum(c_i * delta_i)``.

    Returns it with the L2 norm of the pseudo-gradient ``sum(c_i * delta_i)`` and whether every
    new weight is finite. This is :func:`decoded_sum` followed by :func:`server_step` with
    :class:`ServerOptimizerKind.SGD <common.messages.ServerOptimizerKind>` and
    :func:`global_norm` of the sum, equal to them bit for bit, but computed one cache-sized block
    at a time: every delta is folded into the block, its norm taken, the step applied and its
    finiteness checked while the block is in cache. Memory sees each delta read once, the old
    version read once and the new one written once: K + 2 passes over a model's worth of memory
    for K updates, against 3K + 4 for the sum, the norm, the step and the check one after the
    other. It is the aggregator's hot path (FedAvg, FedBuff and FedAsync all take it), the one
    whose cost grows with the model: in a model with a tensor of
    :data:`~aggregator.fold.COMPILED_MIN` entries, a buffer of up to four dense float32 deltas
    folds and steps each tensor in one compiled call (:func:`~aggregator.fold.fold_step_tensor`).

    The new version is written into ``out`` when given: writeable, C-contiguous float32 arrays of
    the model's shapes, sharing no memory with ``params`` (the aggregator passes memory of a
    version nobody holds any more, see :mod:`aggregator.memory`); else into new arrays.
    """
    _check_buffer(deltas, coefficients, params)
    shapes = {name: x.shape for name, x in params.items()}
    new_version = _output(shapes, out)
    if any(np.may_share_memory(new_version[name], x) for name, x in params.items()):
        raise ValueError("out shares memory with params: a fold never writes over a version")
    largest = max((math.prod(x.shape) for x in params.values()), default=0)
    scratch = np.empty(min(largest, BLOCK), dtype=np.float32)
    squares: list[float] = []
    finite = True
    # Overflow is not an error here: it is reported, and the caller refuses the batch.
    with np.errstate(over="ignore", invalid="ignore"):
        for name, x in params.items():
            tensor_squares, tensor_finite = fold_step_tensor(
                [delta[name] for delta in deltas],
                new_version[name].reshape(-1),
                coefficients,
                np.asarray(x, dtype=np.float32).reshape(-1),
                lr,
                compiled=largest >= COMPILED_MIN,
                scratch=scratch,
            )
            squares.append(tensor_squares)
            finite = tensor_finite and finite
    return new_version, math.sqrt(math.fsum(squares)), finite


def _output(
    shapes: Mapping[str, tuple[int, ...]], out: Mapping[str, Array] | None
) -> dict[str, Array]:
    """``out`` checked against the model's shapes, or new arrays of them."""
    if out is None:
        return {name: np.empty(shape, dtype=np.float32) for name, shape in shapes.items()}
    if out.keys() != shapes.keys():
        raise ValueError("out names other tensors than the model")
    for name, array in out.items():
        if array.shape != shapes[name] or array.dtype != np.float32:
            raise ValueError(
                f"out[{name!r}] is {array.dtype} {array.shape}, not float32 {shapes[name]}"
            )
        if not (array.flags.c_contiguous and array.flags.writeable):
            raise ValueError(f"out[{name!r}] must be writeable and C-contiguous")
    return dict(out)


def _check_buffer(
    deltas: Sequence[Mapping[str, DecodedTensor]],
    coefficients: Sequence[float],
    model: Mapping[str, object],
) -> None:
    """One finite coefficient per delta, at least one delta, each naming the model's tensors."""
    if len(deltas) != len(coefficients) or not deltas:
        raise ValueError("need one coefficient per delta, and at least one delta")
    if any(not math.isfinite(c) for c in coefficients):
        raise ValueError(f"coefficients must be finite: {list(coefficients)}")
    if any(delta.keys() != model.keys() for delta in deltas):
        raise ValueError("a delta names other tensors than the model")


def densify(delta: Mapping[str, DecodedTensor], scale: float = 1.0) -> dict[str, Array]:
    """A decoded delta as dense float32 arrays, times ``scale`` (for the robust statistics)."""
    out = {}
    for name, decoded in delta.items():
        acc = np.zeros(decoded.shape, dtype=np.float32)
        fold(decoded, acc, scale)
        out[name] = acc
    return out


def weighted_average(
    deltas: Sequence[Params], weights: Sequence[float], normalizer: float | None = None
) -> dict[str, Array]:
    """``sum(w_i * delta_i) / normalizer`` per tensor (default ``sum(w_i)``), shapes preserved."""
    if not deltas or len(deltas) != len(weights):
        raise ValueError(f"need one weight per delta, got {len(deltas)} deltas, {len(weights)}")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero: {weights}")
    total = math.fsum(weights) if normalizer is None else normalizer
    if not math.isfinite(total) or total <= 0:
        raise ValueError(f"normalizer must be finite and positive, got {total}")
    names = list(deltas[0])
    for delta in deltas[1:]:
        if delta.keys() != deltas[0].keys():
            raise ValueError("deltas name different tensors")
    out: dict[str, Array] = {}
    for name in names:
        shape = deltas[0][name].shape
        acc = np.zeros(shape, dtype=np.float64)
        for delta, weight in zip(deltas, weights, strict=True):
            tensor = delta[name]
            if tensor.shape != shape:
                raise ValueError(f"tensor {name!r}: shape {tensor.shape} != {shape}")
            # Accumulate in float64: numpy 2 would otherwise multiply in float32 first.
            acc += (weight / total) * tensor.astype(np.float64)
        out[name] = acc.astype(np.float32)
    return out


def clip_to_norm(params: Params, max_norm: float) -> tuple[dict[str, Array], float]:
    """``params`` scaled so that its global L2 norm is at most ``max_norm``, and its norm before."""
    if not math.isfinite(max_norm) or max_norm <= 0:
        raise ValueError(f"max_norm must be finite and positive, got {max_norm}")
    norm = global_norm(params)
    if norm <= max_norm:
        return {name: np.array(t, dtype=np.float32) for name, t in params.items()}, norm
    scale = max_norm / norm
    return {
        name: (t.astype(np.float64) * scale).astype(np.float32) for name, t in params.items()
    }, norm


def coordinate_median(deltas: Sequence[AnyParams]) -> dict[str, Array]:
    """The coordinate-wise median of the deltas (the mean of the middle two for an even count)."""
    return {name: np.median(stack, axis=0).astype(np.float32) for name, stack in _stacks(deltas)}


def trimmed_mean(deltas: Sequence[AnyParams], trim: float) -> dict[str, Array]:
    """Per coordinate, the mean after dropping the ``max(1, floor(trim * n))`` largest and
    smallest values (none when ``trim`` is 0).

    ``floor(trim * n)`` alone is 0 for every buffer below ``1 / trim`` (below 10 at the default
    0.1): the trimmed mean would be the mean exactly where buffers are small. So any ``trim``
    above 0 drops at least one value per end. At least one value always remains: with fewer
    than three values, or ``trim`` near 0.5, it is the median.
    """
    if not 0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim}")
    n = len(deltas)
    asked = max(1, math.floor(trim * n)) if trim > 0 else 0
    k = min(asked, (n - 1) // 2)
    out: dict[str, Array] = {}
    for name, stack in _stacks(deltas):
        ordered = np.sort(stack, axis=0)
        out[name] = ordered[k : n - k].mean(axis=0).astype(np.float32)
    return out


def robust_buffer_aggregate(
    deltas: Sequence[Params],
    stalenesses: Sequence[int],
    policy: StalenessPolicy,
    rule: AggregationRule,
    trim: float = 0.0,
) -> tuple[dict[str, Array], list[float]]:
    """A robust statistic of ``f(s_i) * delta_i`` and each update's nominal weight ``f(s_i) / K``.

    ``rule`` is MEDIAN or TRIMMED_MEAN; sample counts play no part (a node chooses its own).
    """
    if len(deltas) != len(stalenesses):
        raise ValueError("need one staleness per delta")
    factors = [policy.factor(s) for s in stalenesses]
    discounted = [
        {name: (t.astype(np.float64) * f) for name, t in delta.items()}
        for delta, f in zip(deltas, factors, strict=True)
    ]
    match rule:
        case AggregationRule.MEDIAN:
            aggregate = coordinate_median(discounted)
        case AggregationRule.TRIMMED_MEAN:
            aggregate = trimmed_mean(discounted, trim)
        case AggregationRule.MEAN:
            raise ValueError("the mean is buffer_aggregate's rule, not a robust one")
    return aggregate, [f / len(deltas) for f in factors]


def _stacks(deltas: Sequence[AnyParams]) -> list[tuple[str, NDArray[np.float64]]]:
    """Each tensor of all deltas stacked along a new first axis, in float64."""
    if not deltas:
        raise ValueError("need at least one delta")
    names = list(deltas[0])
    for delta in deltas[1:]:
        if delta.keys() != deltas[0].keys():
            raise ValueError("deltas name different tensors")
    stacks = []
    for name in names:
        shape = deltas[0][name].shape
        if any(delta[name].shape != shape for delta in deltas):
            raise ValueError(f"tensor {name!r}: deltas disagree on its shape")
        stacks.append((name, np.stack([np.asarray(d[name], dtype=np.float64) for d in deltas])))
    return stacks


# Accepted-update norms the adaptive bound needs before it trusts their median: with three, one
# poisoned norm among them is never the median.
NORM_WARMUP = 3


@dataclass(frozen=True, slots=True)
class NormBound:
    """The largest L2 norm an update may have now, and what set it (for the node's ack)."""

    value: float
    source: str


def norm_bound(
    *,
    ceiling: float | None,
    multiplier: float | None,
    history: Sequence[float],
    window: int,
    initial_norm: float,
) -> NormBound | None:
    """The tighter of the absolute ``ceiling`` and the adaptive bound; None when neither is set.

    The adaptive bound (``multiplier`` set) is ``multiplier * median(history[-window:])`` once
    ``min(NORM_WARMUP, window)`` accepted norms are known. Before that (the warm-up, when the
    first update may be an attacker's) it is ``multiplier * initial_norm``, the L2 norm of the
    run's initial weights: an honest first update moves a model by a fraction of its own size,
    not by many times it. A reference of 0 (a model initialised to zeros, or zero updates) gives
    no scale to go by, and only the ceiling applies. Pure: the same history gives the same bound,
    so recovery replaying accepted updates in order judges them as they were judged.
    """
    bounds: list[NormBound] = []
    if ceiling is not None:
        bounds.append(NormBound(ceiling, "max_update_norm"))
    if multiplier is not None:
        if window < 1:
            raise ValueError(f"norm window must be at least 1, got {window}")
        recent = history[-window:]
        if len(recent) >= min(NORM_WARMUP, window):
            reference = statistics.median(recent)
            source = f"median norm {reference:.4g} of the last {len(recent)} accepted updates"
        else:
            reference = initial_norm
            source = f"the initial weights' norm {reference:.4g} (warm-up)"
        if reference > 0 and math.isfinite(reference):
            bounds.append(NormBound(multiplier * reference, f"{multiplier:g} x {source}"))
    return min(bounds, key=lambda b: b.value, default=None)


def global_norm(params: Params) -> float:
    """The L2 norm of all tensors taken together (accumulated in float64)."""
    return math.sqrt(math.fsum(sum_of_squares(t) for t in params.values()))


@dataclass(frozen=True, slots=True)
class ServerOptimizer:
    kind: ServerOptimizerKind = ServerOptimizerKind.SGD
    lr: float = 1.0
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3


@dataclass(frozen=True, slots=True)
class ServerOptimizerState:
    """First and second moments, empty until the optimizer that needs them first runs."""

    step: int = 0
    m: Mapping[str, Array] = field(default_factory=dict)
    v: Mapping[str, Array] = field(default_factory=dict)


def server_step(
    params: Params,
    delta: Params,
    state: ServerOptimizerState,
    opt: ServerOptimizer,
    *,
    reuse_delta: bool = False,
) -> tuple[dict[str, Array], ServerOptimizerState]:
    """Apply one aggregated pseudo-gradient; returns new params and state, inputs untouched.

    With ``reuse_delta`` the new params are written into ``delta``'s arrays, which the caller
    gives up (they must be writeable float32): the aggregator's own fresh aggregate becomes the
    next version without allocating, and faulting in, another model-sized array.
    """
    if set(params) != set(delta):
        raise ValueError("delta and params name different tensors")
    new_params: dict[str, Array] = {}
    new_m: dict[str, Array] = {}
    new_v: dict[str, Array] = {}
    for name, x in params.items():
        d = delta[name]
        if d.shape != x.shape:
            raise ValueError(f"tensor {name!r}: delta shape {d.shape} != params {x.shape}")
        step, m, v = _optimizer_step(name, x, d, state, opt)
        if m is not None:
            new_m[name] = m
        if v is not None:
            new_v[name] = v
        new_params[name] = _stepped(name, x, d, step, opt.lr, reuse_delta=reuse_delta)
    return new_params, ServerOptimizerState(step=state.step + 1, m=new_m, v=new_v)


def _optimizer_step(
    name: str, x: Array, d: Array, state: ServerOptimizerState, opt: ServerOptimizer
) -> tuple[NDArray[Any], Array | None, Array | None]:
    """One tensor's step under ``opt`` and its new first and second moments (None: not kept)."""
    match opt.kind:
        case ServerOptimizerKind.SGD:
            return d, None, None
        case ServerOptimizerKind.FEDAVGM:
            m = opt.momentum * state.m.get(name, np.zeros_like(x)) + d
            return m, m.astype(np.float32), None
        case ServerOptimizerKind.FEDADAM | ServerOptimizerKind.FEDYOGI:
            m = opt.beta1 * state.m.get(name, np.zeros_like(x)) + (1 - opt.beta1) * d
            v0 = state.v.get(name, np.full_like(x, opt.tau**2))
            d2 = np.square(d)
            if opt.kind is ServerOptimizerKind.FEDADAM:
                v = opt.beta2 * v0 + (1 - opt.beta2) * d2
            else:
                v = v0 - (1 - opt.beta2) * d2 * np.sign(v0 - d2)
            return m / (np.sqrt(v) + opt.tau), m.astype(np.float32), v.astype(np.float32)


def _stepped(
    name: str, x: Array, d: Array, step: NDArray[Any], lr: float, *, reuse_delta: bool
) -> Array:
    """``x + lr * step`` as float32, written into ``d`` where ``reuse_delta`` gives it up."""
    # In place in one float32 array: this runs over the whole model every version.
    if reuse_delta:
        updated = np.asarray(d)
        if updated.dtype != np.float32 or not updated.flags.writeable:
            raise ValueError(f"tensor {name!r}: reuse_delta needs a writeable float32 delta")
        if lr != 1.0 or step is not d:
            np.multiply(step, lr, out=updated, dtype=np.float32)
    else:
        updated = np.multiply(step, lr, dtype=np.float32)
    np.add(updated, x, out=updated)
    return updated
