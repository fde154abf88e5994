"""The messages of secure aggregation between its parties, as typed events (no wire format).

The message flow of docs/secure-aggregation.md#message-flow, one frozen dataclass per message:
a node's :class:`SealedShare` to each holder and its :class:`MaskedUpload` to the aggregator, a
holder's :class:`Receipt`, the aggregator's :class:`UnmaskRequest`, and a holder's
:class:`UnmaskAnswer` or :class:`UnmaskRefusal`. The parties (``edge_node.secure_holder``,
``aggregator.secure_unmask``) take and return these; the services that carry them over MQTT
translate them to and from envelope bodies.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.secure_aggregation.release import Term

__all__ = [
    "MaskedUpload",
    "Receipt",
    "SealedShare",
    "UnmaskAnswer",
    "UnmaskRefusal",
    "UnmaskRequest",
]


@dataclass(frozen=True, slots=True)
class SealedShare:
    """One holder's share of one update's mask, sealed for it by the update's sender."""

    update_id: str
    sender: str
    recipient: str
    policy_digest: str
    sealed: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class MaskedUpload:
    """A masked update as the aggregator sees it: cleartext metadata and field elements."""

    update_id: str
    sender: str
    base_version: int
    num_samples: int
    policy_digest: str
    masked: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Receipt:
    """A holder has durably stored its share of an update."""

    holder: str
    update_id: str


@dataclass(frozen=True, slots=True)
class UnmaskRequest:
    """The aggregator asks a holder for ``Σ ω_i [r_i]_holder`` over the terms of one fold."""

    fold_id: str
    policy_digest: str
    terms: tuple[Term, ...]


@dataclass(frozen=True, slots=True)
class UnmaskAnswer:
    """A holder's weighted sum of its shares for one fold, as field-element bytes."""

    fold_id: str
    holder: str
    share_sum: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class UnmaskRefusal:
    """A holder will not answer a fold, and why (a rule of common.secure_aggregation.release)."""

    fold_id: str
    holder: str
    reason: str
