"""The field of secure aggregation: integers modulo ``PRIME``, fixed-point quantization, masks.

Theory of operation (docs/secure-aggregation.md#the-field). Values live in Z_p with
``p = 2**31 - 1``: every product of two elements is below 2**62, so numpy's int64 computes the
protocol with one reduction per product and sum. A real vector is clipped to ``[-clip, clip]``
and mapped with stochastic rounding to integers in ``[-levels, levels]``, negatives stored as
``p - |q|``. ``levels`` is chosen so that a weighted sum of ``max_terms`` such vectors with
integer weights up to ``weight_levels`` never wraps around, so the centred representative of the
sum is the integer sum itself. Masks are uniform field elements drawn from a caller-supplied
source of secret bytes (``os.urandom`` in production), never from numpy's generators.

Field vectors are ``int64`` arrays with every element in ``[0, p)``; they travel as 4
little-endian bytes per element (:func:`to_bytes`, :func:`from_bytes`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from common.errors import DecodeError

__all__ = [
    "ELEMENT_BYTES",
    "PRIME",
    "FieldVector",
    "QuantizationPlan",
    "RandomBytes",
    "add",
    "dequantize",
    "from_bytes",
    "integer_weights",
    "mask",
    "quantize",
    "random_elements",
    "subtract",
    "to_bytes",
    "weighted_sum",
]

PRIME = 2**31 - 1
ELEMENT_BYTES = 4
_HALF = (PRIME - 1) // 2
# Random 31-bit draws equal to PRIME are redrawn; this many tries fail with probability 2**-310.
_MAX_DRAWS = 10

FieldVector = NDArray[np.int64]
RandomBytes = Callable[[int], bytes]
"""A source of secret random bytes: ``os.urandom`` in production, a seeded one in tests."""


@dataclass(frozen=True, slots=True)
class QuantizationPlan:
    """How a real delta becomes field elements, and how a weighted sum of them comes back.

    ``clip``: each coordinate is clipped to ``[-clip, clip]``. ``max_terms``: the most updates
    one sum may hold. ``weight_levels``: the largest integer weight. ``levels`` (derived): the
    integer that stands for ``clip``, the largest that keeps every such sum from wrapping.
    """

    clip: float = 4.0
    max_terms: int = 16
    weight_levels: int = 1024

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"clip must be a positive number, got {self.clip}")
        if self.max_terms < 1 or self.weight_levels < 1:
            raise ValueError("max_terms and weight_levels must be at least 1")
        if self.levels < 1:
            raise ValueError(
                f"max_terms {self.max_terms} x weight_levels {self.weight_levels} leave no "
                f"room in a field of 31 bits"
            )

    @property
    def levels(self) -> int:
        return _HALF // (self.max_terms * self.weight_levels)

    @property
    def resolution(self) -> float:
        """The real value of one quantization level."""
        return self.clip / self.levels


def quantize(
    values: NDArray[np.floating], plan: QuantizationPlan, rng: np.random.Generator
) -> FieldVector:
    """``values`` (flattened) clipped, scaled and stochastically rounded into the field.

    Stochastic rounding makes the quantized value an unbiased estimate of the clipped one.
    Non-finite values are refused: a node quantizes only its own, finite delta.
    """
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(flat)):
        raise ValueError("cannot quantize non-finite values")
    scaled = np.clip(flat, -plan.clip, plan.clip) * (plan.levels / plan.clip)
    floor = np.floor(scaled)
    rounded = floor + (rng.random(flat.shape) < (scaled - floor))
    integers = np.clip(rounded, -plan.levels, plan.levels).astype(np.int64)
    return _reduce(integers)


def dequantize(
    total: FieldVector, plan: QuantizationPlan, scale: float = 1.0
) -> NDArray[np.float64]:
    """The real vector a (weighted) sum of quantized vectors stands for, times ``scale``.

    Elements above ``(p - 1) / 2`` are negative integers. The caller kept the sum within
    ``max_terms`` terms and ``weight_levels``, so no element has wrapped around.
    """
    _check_field(total)
    centred = np.where(total > _HALF, total - PRIME, total)
    return centred.astype(np.float64) * (plan.resolution * scale)


def integer_weights(coefficients: Sequence[float], weight_levels: int) -> tuple[list[int], float]:
    """Integer weights ``ω_i`` in ``[1, weight_levels]`` and the ``scale`` such that
    ``ω_i * scale`` approximates ``coefficients[i]`` within ``scale / 2``.

    ``scale = max(coefficients) / weight_levels``; the largest coefficient is exact. A positive
    coefficient never rounds to 0, so no update in a sum loses its mask's cancellation.
    """
    if not coefficients:
        raise ValueError("need at least one coefficient")
    if any(not (math.isfinite(c) and c > 0) for c in coefficients):
        raise ValueError(f"coefficients must be positive and finite, got {list(coefficients)}")
    largest = max(coefficients)
    scale = largest / weight_levels
    weights = [max(1, min(weight_levels, round(c / scale))) for c in coefficients]
    return weights, scale


def random_elements(size: int, random_bytes: RandomBytes) -> FieldVector:
    """``size`` independent uniform elements of Z_p from ``random_bytes``.

    Each element is 31 random bits; the one value equal to ``p`` is redrawn, so the result is
    exactly uniform.
    """
    if size < 0:
        raise ValueError(f"size must be non-negative, got {size}")
    out = _draw(size, random_bytes)
    for _ in range(_MAX_DRAWS):
        bad = out == PRIME
        if not bad.any():
            return out
        out[bad] = _draw(int(bad.sum()), random_bytes)
    raise RuntimeError("the random source keeps returning the same value")


def _draw(size: int, random_bytes: RandomBytes) -> FieldVector:
    raw = random_bytes(ELEMENT_BYTES * size)
    if len(raw) != ELEMENT_BYTES * size:
        raise RuntimeError("the random source returned too few bytes")
    words = np.frombuffer(raw, dtype="<u4").astype(np.int64)
    return np.bitwise_and(words, PRIME)


def add(a: FieldVector, b: FieldVector) -> FieldVector:
    return _reduce(a + b)


def subtract(a: FieldVector, b: FieldVector) -> FieldVector:
    return _reduce(a - b)


def mask(quantized: FieldVector, mask_vector: FieldVector) -> FieldVector:
    """The masked update ``q + r mod p``: uniform whatever ``q`` is, when ``r`` is uniform."""
    if quantized.shape != mask_vector.shape:
        raise ValueError(f"mask of {mask_vector.shape} for an update of {quantized.shape}")
    return add(quantized, mask_vector)


def weighted_sum(vectors: Sequence[FieldVector], weights: Sequence[int]) -> FieldVector:
    """``Σ ω_i v_i mod p`` for integer weights (reduced into the field first)."""
    if not vectors or len(vectors) != len(weights):
        raise ValueError("need one weight per vector, and at least one vector")
    total = np.zeros_like(vectors[0])
    for vector, weight in zip(vectors, weights, strict=True):
        if vector.shape != total.shape:
            raise ValueError(f"vectors of shapes {total.shape} and {vector.shape}")
        total = _reduce(total + vector * (weight % PRIME))
    return total


def to_bytes(vector: FieldVector) -> bytes:
    _check_field(vector)
    return vector.astype("<u4").tobytes()


def from_bytes(data: bytes, size: int) -> FieldVector:
    """``size`` field elements from the wire; a wrong length or an element ``>= p`` is refused."""
    if len(data) != ELEMENT_BYTES * size:
        raise DecodeError(
            f"{len(data)} bytes where {size} field elements take {ELEMENT_BYTES * size}"
        )
    vector = np.frombuffer(data, dtype="<u4").astype(np.int64)
    if vector.size and int(vector.max()) >= PRIME:
        raise DecodeError("a field element is not below the prime")
    return vector


def _reduce(values: FieldVector) -> FieldVector:
    reduced: FieldVector = np.mod(values, PRIME)
    return reduced


def _check_field(vector: FieldVector) -> None:
    if vector.dtype != np.int64:
        raise ValueError(f"field vectors are int64, got {vector.dtype}")
    if vector.size and (int(vector.min()) < 0 or int(vector.max()) >= PRIME):
        raise ValueError("a value is outside the field")
