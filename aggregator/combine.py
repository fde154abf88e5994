"""A regional aggregator's combine rule: K hospitals' updates become one update: pure, no I/O.

Theory of operation. A regional aggregator does not make versions: the core's versions reach its
hospitals through the bridge as they do without it. It folds the updates its hospitals trained on
those versions into one :class:`~common.messages.Update` that the core receives like any node's,
from a node whose sample count is the sum of its constituents'.

Two-level staleness. A hospital's update trained from version ``b_i``. The regional aggregator
combines a buffer whose newest base is ``B = max(b_i)``; each constituent's *regional staleness*
is ``r_i = B - b_i``, and the combined update's base is ``B``. The core folds it at version ``t``
with its own staleness ``S = t - B``. The versions between a hospital's base and the fold are
``t - b_i = r_i + S``, split between the two levels, and each level discounts its part with the
run's staleness function ``f``: the constituent's weight in the global model is
``a_i / sum(a_j) * f(r_i)`` in the region, times what the core gives the region,
``A * f(S) / sum(A_k)`` with ``A = (sum n_j)**beta``. With the constant ``f`` this is the flat
rule; with the polynomial ``f(s) = (1 + s)**-a``, ``f(r) * f(S) <= f(r + S)`` because
``(1 + r)(1 + S) >= 1 + r + S``, so two levels discount a stale update at least as much as one
level would, never less. With ``beta = 1`` (the default) and fresh updates, ``A * D`` is the
sample-weighted sum of the constituents' deltas, so the global step is FedAvg over hospitals, as
if they had sent their updates to the core themselves.

The constituents' deltas are relative to their own bases, not to ``B``; a delta from an older base
is what the flat rule folds too, against a newer version, discounted by its staleness. What is
combined is decided here; what is durable (the write-ahead log of constituents, the combined
update's outbox) is :mod:`aggregator.regional_store`'s.

The combined update's id is derived from the region and its constituents' ids, so combining the
same constituents again after a crash gives the same id, which the core acks as a duplicate
instead of folding twice. Its delta is compressed as the run's policy asks (without error
feedback: a region keeps no residual), since the core refuses anything less compressed.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from aggregator.aggregation import StalenessPolicy, buffer_weights, decoded_sum
from aggregator.core import BufferedUpdate
from common.compression import compress, decompress
from common.messages import Compression, TrainMetrics, Update

__all__ = ["Combination", "combine", "combined_update_id", "regional_stalenesses"]


@dataclass(frozen=True, slots=True)
class Combination:
    """A combined update and how each constituent counts in it (in the order combined)."""

    update: Update
    constituents: tuple[str, ...]
    stalenesses: tuple[int, ...]
    coefficients: tuple[float, ...]

    @property
    def delta_arrays(self) -> dict[str, NDArray[np.float32]]:
        """The combined delta as dense float32 arrays, as the core decodes it."""
        return {t.name: decompress(t, t.shape) for t in self.update.delta}


def regional_stalenesses(base_versions: Sequence[int]) -> list[int]:
    """Each constituent's staleness within its buffer: the newest base minus its own."""
    if not base_versions:
        raise ValueError("a buffer to combine holds at least one update")
    newest = max(base_versions)
    return [newest - b for b in base_versions]


def combined_update_id(region: str, constituents: Sequence[str]) -> str:
    """A stable id for the update that combines ``constituents`` (in that order) for ``region``."""
    if not constituents:
        raise ValueError("a combined update has at least one constituent")
    digest = hashlib.sha256("\n".join([region, *constituents]).encode()).hexdigest()
    return f"{region[:30]}.{digest[:32]}"


def combine(
    batch: Sequence[BufferedUpdate],
    metrics: Sequence[TrainMetrics],
    *,
    region: str,
    run_id: str,
    shapes: Mapping[str, tuple[int, ...]],
    policy: StalenessPolicy,
    sample_exponent: float,
    compression: Compression,
) -> Combination:
    """One update for the core from ``batch`` (validated by an :class:`AggregatorCore`) and each
    constituent's reported training metrics.

    The combined delta is ``sum(a_i * f(r_i) * scale_i * delta_i) / sum(a_i)``, the core's buffer
    rule with the regional stalenesses ``r_i``, where ``scale_i`` is the norm clip the validation
    applied. Its base is the newest base of the batch and its sample count the batch's total.
    The coefficients sum to at most 1, so the combination of finite updates is finite.
    """
    if len(batch) != len(metrics):
        raise ValueError("need one training report per buffered update")
    stalenesses = regional_stalenesses([u.base_version for u in batch])
    weights = buffer_weights([u.num_samples for u in batch], stalenesses, policy, sample_exponent)
    coefficients = [w * u.scale for u, w in zip(batch, weights, strict=True)]
    delta = decoded_sum([u.delta for u in batch], coefficients, shapes)
    compressed = compress(delta, compression.model_copy(update={"error_feedback": False}))
    ids = tuple(u.update_id for u in batch)
    total = math.fsum(weights)
    share = [w / total for w in weights] if total > 0 else [1.0 / len(batch)] * len(batch)
    update = Update(
        update_id=combined_update_id(region, ids),
        run_id=run_id,
        base_version=max(u.base_version for u in batch),
        num_samples=sum(u.num_samples for u in batch),
        metrics=TrainMetrics(
            loss=math.fsum(s * m.loss for s, m in zip(share, metrics, strict=True)),
            accuracy=min(
                1.0, math.fsum(s * m.accuracy for s, m in zip(share, metrics, strict=True))
            ),
            seconds=max(m.seconds for m in metrics),
        ),
        delta=compressed.tensors,
    )
    return Combination(update, ids, tuple(stalenesses), tuple(coefficients))
