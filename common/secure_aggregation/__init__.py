"""Secure aggregation's pure core: the field, masks, mask sharing, keys and the holder's rules.

docs/secure-aggregation.md is the protocol. No I/O here: randomness and time are arguments.

The keys' names (:mod:`common.secure_aggregation.keys`) load on first use: they bring in
``cryptography``, which an aggregator that only folds and unmasks never needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from common.secure_aggregation.field import (
    ELEMENT_BYTES,
    PRIME,
    FieldVector,
    QuantizationPlan,
    RandomBytes,
    add,
    dequantize,
    from_bytes,
    integer_weights,
    mask,
    quantize,
    random_elements,
    subtract,
    to_bytes,
    weighted_sum,
)
from common.secure_aggregation.masking import ClipViolation, MaskedUpdate, mask_update, unmask_sum
from common.secure_aggregation.release import (
    Term,
    minimum_contributors,
    release_refusal,
    sum_digest,
)
from common.secure_aggregation.sharing import (
    InconsistentAnswers,
    SharingScheme,
    reconstruct,
    share,
)

if TYPE_CHECKING:
    from common.secure_aggregation.keys import (
        PUBLIC_KEY_BYTES,
        KeyRecord,
        KeyRefused,
        ShareContext,
        ShareRefused,
        open_share,
        seal_share,
        sign_key_record,
        verify_key_record,
    )

_FROM_KEYS = frozenset(
    {
        "PUBLIC_KEY_BYTES",
        "KeyRecord",
        "KeyRefused",
        "ShareContext",
        "ShareRefused",
        "open_share",
        "seal_share",
        "sign_key_record",
        "verify_key_record",
    }
)


def __getattr__(name: str) -> object:
    if name in _FROM_KEYS:
        return getattr(importlib.import_module("common.secure_aggregation.keys"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ELEMENT_BYTES",
    "PRIME",
    "PUBLIC_KEY_BYTES",
    "ClipViolation",
    "FieldVector",
    "InconsistentAnswers",
    "KeyRecord",
    "KeyRefused",
    "MaskedUpdate",
    "QuantizationPlan",
    "RandomBytes",
    "ShareContext",
    "ShareRefused",
    "SharingScheme",
    "Term",
    "add",
    "dequantize",
    "from_bytes",
    "integer_weights",
    "mask",
    "mask_update",
    "minimum_contributors",
    "open_share",
    "quantize",
    "random_elements",
    "reconstruct",
    "release_refusal",
    "seal_share",
    "share",
    "sign_key_record",
    "subtract",
    "sum_digest",
    "to_bytes",
    "unmask_sum",
    "verify_key_record",
    "weighted_sum",
]
