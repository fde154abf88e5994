"""How the size of an update is told to people: its bytes on the wire beside its dense float32 size.

One function, so that the demo, ``healthnet status``, ``watch``, the dashboard and the node's log
say the same thing, and say it the right way round: a small model's update is *larger* on the wire
than dense (the envelope outweighs a few hundred bytes of weights), a compressed one is smaller.
"""

from __future__ import annotations

__all__ = ["describe_wire_size", "wire_comparative"]


def wire_comparative(wire_bytes: float, dense_bytes: float) -> str:
    """``5.0x larger than dense``, ``12.3x smaller than dense`` or ``the same size as dense``."""
    if wire_bytes <= 0 or dense_bytes <= 0:
        return "no dense size to compare"
    if f"{max(wire_bytes, dense_bytes) / min(wire_bytes, dense_bytes):.1f}" == "1.0":
        return "the same size as dense"
    if wire_bytes > dense_bytes:
        return f"{wire_bytes / dense_bytes:.1f}x larger than dense"
    return f"{dense_bytes / wire_bytes:.1f}x smaller than dense"


def describe_wire_size(wire_bytes: float, dense_bytes: float) -> str:
    """``559 bytes on the wire, 112 as dense float32 (5.0x larger than dense)``."""
    return (
        f"{wire_bytes:,.0f} bytes on the wire, {dense_bytes:,.0f} as dense float32 "
        f"({wire_comparative(wire_bytes, dense_bytes)})"
    )
