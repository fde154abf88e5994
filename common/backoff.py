"""Capped exponential backoff with full jitter: hundreds of nodes must not reconnect in step."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

__all__ = ["Backoff"]


@dataclass(frozen=True, slots=True)
class Backoff:
    """``delay(n)`` is uniform in ``[0, min(cap, initial * 2**n)]`` (the "full jitter" scheme)."""

    initial: float = 0.5
    cap: float = 30.0
    rng: random.Random = field(default_factory=random.Random, compare=False)

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.cap:
            raise ValueError(f"backoff needs 0 < initial <= cap, got {self.initial}, {self.cap}")

    def ceiling(self, attempt: int) -> float:
        # Clamp the exponent: 2**64 is already far past any cap.
        return min(self.cap, self.initial * 2.0 ** min(max(attempt, 0), 64))

    def delay(self, attempt: int) -> float:
        return self.rng.uniform(0.0, self.ceiling(attempt))
