"""What a compression policy asks of a node's delta, and what the aggregator admits (DESIGN §5).

:class:`~common.messages.Compression` is the wire schema of a policy (the run's, in the manifest,
or a node's own); this module holds the rules that read it. Policies are ordered by how much they
send: a node may compress more than asked (a smaller kept fraction, a stronger quantization),
never less, and the aggregator admits a tensor compressed at least as much as the run asks.
Error feedback changes what a node sends over time, not how many bytes, so it is not part of the
order. Pure functions of their arguments: no I/O, no numpy.
"""

from __future__ import annotations

import math

from common.messages import CompressedTensor, Compression, Quantization

__all__ = ["admits", "at_least_as_strict_as", "effective_policy", "keep_count", "strength"]

# Weakest first: each step sends fewer bits per value.
_QUANTIZATION_ORDER = (Quantization.NONE, Quantization.FP16, Quantization.INT8)


def strength(quantization: Quantization) -> int:
    """0 for NONE, 1 for FP16, 2 for INT8: a higher number sends fewer bits per value."""
    return _QUANTIZATION_ORDER.index(quantization)


def keep_count(policy: Compression, size: int) -> int:
    """How many of a tensor's ``size`` entries are sent: ``max(1, ceil(top_k * size))``."""
    if size <= 0:
        return 0
    if policy.top_k is None:
        return size
    return min(size, max(1, math.ceil(policy.top_k * size)))


def at_least_as_strict_as(policy: Compression, asked: Compression) -> bool:
    """True when ``policy`` keeps no more entries and quantizes no weaker than ``asked``."""
    return policy.kept_fraction <= asked.kept_fraction and strength(
        policy.quantization
    ) >= strength(asked.quantization)


def admits(policy: Compression, tensor: CompressedTensor) -> bool:
    """True when ``tensor`` is compressed at least as much as ``policy`` asks."""
    try:
        quantization = Quantization.of_dtype(tensor.values_dtype)
    except ValueError:
        return False
    return tensor.count <= keep_count(policy, tensor.size) and strength(quantization) >= strength(
        policy.quantization
    )


def effective_policy(asked: Compression, own: Compression | None) -> Compression:
    """What a node sends under: the run's policy, tightened wherever the node asks for more.

    The smaller kept fraction and the narrower quantization win; error feedback follows the
    node's own choice when it states one.
    """
    if own is None:
        return asked
    top_k = min(asked.kept_fraction, own.kept_fraction)
    return Compression(
        top_k=None if top_k >= 1.0 else top_k,
        quantization=max(asked.quantization, own.quantization, key=strength),
        error_feedback=own.error_feedback,
    )
