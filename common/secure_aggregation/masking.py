"""One update's way through secure aggregation, end to end, as two pure functions.

:func:`mask_update` is the node's side: quantize the delta, draw a fresh mask, share it, mask the
update. :func:`unmask_sum` is the aggregator's: from the buffer's masked updates, their integer
weights and ``U`` holders' answers (each the same weighted sum of its shares), the weighted sum
of the deltas. Between the two, the holders' weighted share sums are
:func:`~common.secure_aggregation.field.weighted_sum` of the shares they hold.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from common.errors import ProtocolError
from common.secure_aggregation.field import (
    PRIME,
    FieldVector,
    QuantizationPlan,
    RandomBytes,
    dequantize,
    mask,
    quantize,
    random_elements,
    subtract,
    weighted_sum,
)
from common.secure_aggregation.sharing import SharingScheme, reconstruct, share

__all__ = ["ClipViolation", "MaskedUpdate", "mask_update", "unmask_sum"]


class ClipViolation(ProtocolError):
    """An unmasked sum holds a coordinate beyond what clipped updates can add up to: at least
    one contributor sent values outside ``[-clip, clip]`` (a dishonest or broken node)."""


@dataclass(frozen=True, slots=True)
class MaskedUpdate:
    """What a node sends: the masked vector to the aggregator, share ``j`` to holder ``j``."""

    masked: FieldVector = field(repr=False)
    shares: list[FieldVector] = field(repr=False)


def mask_update(
    delta: NDArray[np.floating],
    plan: QuantizationPlan,
    scheme: SharingScheme,
    *,
    rng: np.random.Generator,
    random_bytes: RandomBytes,
) -> MaskedUpdate:
    """``delta`` (flattened) quantized and masked, and the shares of its mask.

    ``rng`` only rounds; the mask and the sharing's random chunks come from ``random_bytes``.
    """
    quantized = quantize(delta, plan, rng)
    mask_vector = random_elements(quantized.size, random_bytes)
    return MaskedUpdate(
        masked=mask(quantized, mask_vector),
        shares=share(mask_vector, scheme, random_bytes),
    )


def unmask_sum(
    masked: Sequence[FieldVector],
    weights: Sequence[int],
    answers: Mapping[int, FieldVector],
    *,
    plan: QuantizationPlan,
    scheme: SharingScheme,
    scale: float = 1.0,
) -> NDArray[np.float64]:
    """``scale · Σ ω_i Δ_i`` up to quantization, from the masked updates and holders' answers.

    ``answers[j]`` is holder ``j``'s ``Σ ω_i [r_i]_j`` for the same ``weights``; the sum must
    keep within the plan (``len(masked) <= max_terms``, every weight ``<= weight_levels``).
    """
    if len(masked) > plan.max_terms or any(not 1 <= w <= plan.weight_levels for w in weights):
        raise ValueError("the sum leaves the quantization plan: it could wrap around the field")
    masked_total = weighted_sum(masked, weights)
    mask_total = reconstruct(answers, scheme, masked_total.size)
    total = subtract(masked_total, mask_total)
    # Clipped updates sum to at most Σ ω_i · levels per coordinate. A node that masked values
    # beyond its clip shows here unless its excess wrapped around into range: caught where
    # possible, and the fold is refused rather than applied.
    bound = sum(weights) * plan.levels
    outside = int(((total > bound) & (total < PRIME - bound)).sum())
    if outside:
        raise ClipViolation(
            f"the unmasked sum leaves ±{bound} on {outside} coordinates: a contributor did not "
            f"clip to ±{plan.clip}"
        )
    return dequantize(total, plan, scale)
