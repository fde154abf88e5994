"""LightSecAgg's one-shot mask sharing: Lagrange-coded shares and weighted reconstruction.

Theory of operation (docs/secure-aggregation.md#sharing-the-mask). A mask of ``d`` elements is
cut into ``m = U - T`` chunks of ``L = ceil(d / m)`` elements (zero-padded), joined by ``T``
chunks of uniform random elements. The polynomial of degree ``U - 1`` through these ``U`` chunks
at the points ``1 .. U`` is evaluated at holder ``j``'s point ``U + 1 + j``: that is its share.

- Any ``U`` shares determine the polynomial, so its values at ``1 .. m``: the mask.
- Any ``T`` shares, with the ``m`` secret chunks, determine the polynomial too, so for every
  candidate mask exactly one choice of the random chunks explains them: ``T`` shares are
  uniform and independent of the mask.
- Everything is linear, so a holder's weighted sum of its shares of several masks is its share
  of their weighted sum, and one reconstruction yields ``Σ ω_i r_i``.

``U`` must exceed ``(N + T) / 2``. An honest holder releases its share of a mask in one sum
only, but ``T`` colluding holders answer whatever they are asked; two sets of ``U`` answers
share ``2U - N`` holders, more than ``T``, so at least one honest holder would have to answer
both sums. So no mask can be unmasked in two different sums.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from common.errors import ProtocolError
from common.secure_aggregation.field import PRIME, FieldVector, RandomBytes, random_elements

__all__ = [
    "InconsistentAnswers",
    "SharingScheme",
    "reconstruct",
    "share",
]


class InconsistentAnswers(ProtocolError):
    """Holders' answers beyond the threshold do not lie on the polynomial the first ``U`` define:
    at least one holder answered wrongly."""


@dataclass(frozen=True)
class SharingScheme:
    """``holders`` (N) hold shares; any ``recovery`` (U) of them rebuild a sum; any ``privacy``
    (T) of them learn nothing about a mask."""

    holders: int
    privacy: int = 1
    recovery: int | None = None

    def __post_init__(self) -> None:
        if self.holders < 2:
            raise ValueError(f"secure aggregation needs at least 2 holders, got {self.holders}")
        if self.privacy < 1:
            raise ValueError(f"privacy must be at least 1, got {self.privacy}")
        if 2 * self.threshold - self.holders <= self.privacy:
            raise ValueError(
                f"recovery {self.threshold} of {self.holders} holders is too small for privacy "
                f"{self.privacy}: with the colluders' help a mask could be unmasked in two "
                f"different sums (need recovery > (holders + privacy) / 2)"
            )
        if not (self.privacy < self.threshold <= self.holders):
            raise ValueError(
                f"need privacy < recovery <= holders, got {self.privacy}, {self.threshold}, "
                f"{self.holders}"
            )

    @property
    def threshold(self) -> int:
        """U: ``recovery``, by default the least above ``(N + T) / 2``."""
        if self.recovery is not None:
            return self.recovery
        return (self.holders + self.privacy) // 2 + 1

    @property
    def chunks(self) -> int:
        """m = U - T: secret chunks per mask; each share is 1/m of the mask."""
        return self.threshold - self.privacy

    def share_length(self, size: int) -> int:
        return math.ceil(size / self.chunks) if size else 0

    def holder_point(self, holder: int) -> int:
        if not 0 <= holder < self.holders:
            raise ValueError(f"holder index {holder} is not in 0..{self.holders - 1}")
        return self.threshold + 1 + holder

    @cached_property
    def _encoding(self) -> list[list[int]]:
        """E[j][k] = L_k(alpha_j), the Lagrange basis over the points 1..U at holder j's point."""
        points = list(range(1, self.threshold + 1))
        return [_lagrange_row(points, self.holder_point(j)) for j in range(self.holders)]


def share(
    secret: FieldVector, scheme: SharingScheme, random_bytes: RandomBytes
) -> list[FieldVector]:
    """The ``N`` shares of ``secret``, holder ``j``'s at index ``j``."""
    length = scheme.share_length(secret.size)
    padded = np.zeros(length * scheme.chunks, dtype=np.int64)
    padded[: secret.size] = secret
    chunks = list(padded.reshape(scheme.chunks, length))
    chunks += [random_elements(length, random_bytes) for _ in range(scheme.privacy)]
    return [_combine(row, chunks) for row in scheme._encoding]


def reconstruct(
    answers: Mapping[int, FieldVector], scheme: SharingScheme, size: int
) -> FieldVector:
    """The secret of ``size`` elements whose shares (or linear combination of shares) the
    holders answered, keyed by holder index.

    The first ``U`` answers by holder index rebuild it; every further answer is checked against
    the rebuilt polynomial, and a mismatch raises :class:`InconsistentAnswers`.
    """
    if len(answers) < scheme.threshold:
        raise ValueError(f"{len(answers)} answers, {scheme.threshold} needed")
    length = scheme.share_length(size)
    holders = sorted(answers)
    for holder in holders:
        if answers[holder].shape != (length,):
            raise ValueError(f"holder {holder}'s answer has shape {answers[holder].shape}")
    used, extra = holders[: scheme.threshold], holders[scheme.threshold :]
    points = [scheme.holder_point(j) for j in used]
    vectors = [answers[j] for j in used]
    for j in extra:
        expected = _combine(_lagrange_row(points, scheme.holder_point(j)), vectors)
        if not np.array_equal(expected, answers[j]):
            raise InconsistentAnswers(f"holder {j}'s answer is not on the others' polynomial")
    secret_chunks = [
        _combine(_lagrange_row(points, beta), vectors) for beta in range(1, scheme.chunks + 1)
    ]
    return np.concatenate(secret_chunks)[:size]


def _lagrange_row(points: Sequence[int], at: int) -> list[int]:
    """L_k(at) mod p for the Lagrange basis over ``points``."""
    row = []
    for k, xk in enumerate(points):
        numerator, denominator = 1, 1
        for i, xi in enumerate(points):
            if i != k:
                numerator = numerator * (at - xi) % PRIME
                denominator = denominator * (xk - xi) % PRIME
        row.append(numerator * pow(denominator, -1, PRIME) % PRIME)
    return row


def _combine(coefficients: Sequence[int], vectors: Sequence[FieldVector]) -> FieldVector:
    total = np.zeros_like(vectors[0])
    for coefficient, vector in zip(coefficients, vectors, strict=True):
        total = np.mod(total + vector * coefficient, PRIME)
    result: FieldVector = total
    return result
