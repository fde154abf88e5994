"""A federation's secure aggregation policy: who holds shares, the thresholds, the field plan.

The policy fixes the roster of holders (each hospital's index is its evaluation point, so every
update of one policy is shared alike and sums of shares line up), ``privacy`` (T), ``recovery``
(U, by default the least above ``(N + T) / 2``), the fewest distinct contributors a sum may
hold, and the quantization plan. Its :meth:`~SecureAggregationPolicy.digest` travels with every
masked update, share and unmask request, so updates of different policies are never summed
together.
:func:`knobs_refusal` says which aggregation settings secure aggregation cannot serve
(docs/secure-aggregation.md#the-policy). Pure: no I/O.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from common.secure_aggregation.field import QuantizationPlan
from common.secure_aggregation.release import minimum_contributors
from common.secure_aggregation.sharing import SharingScheme
from common.topics import validate_identifier

__all__ = ["SecureAggregationPolicy", "knobs_refusal"]


@dataclass(frozen=True, slots=True)
class SecureAggregationPolicy:
    """The settings every party of one secure aggregation must agree on."""

    holders: tuple[str, ...]
    privacy: int = 1
    recovery: int | None = None
    min_contributors: int | None = None
    clip: float = 4.0
    weight_levels: int = 1024
    max_terms: int = 16

    def __post_init__(self) -> None:
        for holder in self.holders:
            validate_identifier(holder, "holder")
        if len(set(self.holders)) != len(self.holders):
            raise ValueError(f"a holder appears twice in {list(self.holders)}")
        self.scheme  # noqa: B018 - constructing the scheme and plan validates them
        self.plan  # noqa: B018
        least = minimum_contributors(self.privacy)
        if self.contributors < least:
            raise ValueError(
                f"min_contributors {self.contributors} is below {least}: with {self.privacy} "
                f"colluding hospitals a sum needs {least} to hold two honest ones"
            )
        if self.contributors > min(len(self.holders), self.max_terms):
            raise ValueError(
                f"min_contributors {self.contributors} exceeds the {len(self.holders)} holders "
                f"or max_terms {self.max_terms}: no sum could ever be unmasked"
            )

    @property
    def scheme(self) -> SharingScheme:
        return SharingScheme(len(self.holders), self.privacy, self.recovery)

    @property
    def plan(self) -> QuantizationPlan:
        return QuantizationPlan(self.clip, self.max_terms, self.weight_levels)

    @property
    def contributors(self) -> int:
        """The fewest distinct hospitals an unmasked sum may hold."""
        return self.min_contributors or minimum_contributors(self.privacy)

    def holder_index(self, identity: str) -> int:
        """The holder's index (its evaluation point's rank); ValueError for a non-holder."""
        try:
            return self.holders.index(identity)
        except ValueError:
            raise ValueError(f"{identity!r} is not a holder of this policy") from None

    def digest(self) -> str:
        """The sha256 of every field, in a framing no two policies share."""
        fields = [
            *self.holders,
            "",
            str(self.privacy),
            str(self.scheme.threshold),
            str(self.contributors),
            repr(float(self.clip)),
            str(self.weight_levels),
            str(self.max_terms),
        ]
        digest = hashlib.sha256(b"healthnet secure aggregation policy v1")
        for part in fields:
            digest.update(len(part).to_bytes(4, "big") + part.encode())
        return digest.hexdigest()


def knobs_refusal(
    policy: SecureAggregationPolicy,
    *,
    buffer_size: int,
    dense_updates: bool,
    mean_aggregation: bool,
) -> str | None:
    """Why the aggregation settings cannot run under ``policy``, or None when they can."""
    if not dense_updates:
        return "secure aggregation masks dense updates: top-k and value quantization do not compose"
    if not mean_aggregation:
        return "secure aggregation folds the weighted mean only: robust rules need each update"
    if buffer_size > policy.max_terms:
        return f"buffer_size {buffer_size} is above the policy's max_terms {policy.max_terms}"
    if buffer_size < policy.contributors:
        return (
            f"buffer_size {buffer_size} is below the {policy.contributors} distinct hospitals "
            f"a sum must hold"
        )
    return None
