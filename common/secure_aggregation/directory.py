"""The key directory: every hospital's key-agreement key, taken only from records the CA proves.

Theory of operation (docs/secure-aggregation.md#message-flow, step 1). Each hospital publishes its
signed key record, retained, on ``secagg/keys/{node}``; the broker's ACL lets only that identity
write there. A :class:`KeyDirectory` (one in each node and in the aggregator) takes each received
record through :meth:`KeyDirectory.offer`: the envelope's sender must be the topic's node, and
:func:`~common.secure_aggregation.keys.verify_key_record` must prove the record against the
federation's CA for exactly that node. A refused record is logged with its reason and counted
(:attr:`KeyDirectory.refusals`); it never replaces a key already verified. A verified record that
carries a different key from the one held replaces it (the hospital made a new key) and is logged.
A node masks nothing until :meth:`KeyDirectory.missing` is empty for its policy's roster.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import Counter
from collections.abc import Callable, Iterable

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from common.inbound import Inbound
from common.secure_aggregation.keys import KeyRefused, verify_key_record
from common.secure_aggregation.wire import WireRefusal, WireRefused, key_record_of

__all__ = ["KeyDirectory"]

log = logging.getLogger(__name__)


class KeyDirectory:
    """The verified X25519 keys of one federation's hospitals."""

    def __init__(
        self,
        *,
        federation: str,
        ca_certificate_pem: bytes,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.federation = federation
        self._ca = ca_certificate_pem
        self._clock = clock
        self._keys: dict[str, X25519PublicKey] = {}
        self.refusals: Counter[WireRefused] = Counter()
        self.last_refusal: str | None = None  # the latest refusal's detail, for status

    def offer(self, inbound: Inbound) -> X25519PublicKey | WireRefusal:
        """Take a key record received on ``secagg/keys/{node}``: its verified key, or why not."""
        record = key_record_of(inbound)
        if isinstance(record, WireRefusal):
            return self._refuse(str(inbound.topic), record)
        node = inbound.topic.node or ""
        try:
            key = verify_key_record(
                record,
                ca_certificate_pem=self._ca,
                federation=self.federation,
                identity=node,
                now=self._clock(),
            )
        except KeyRefused as exc:
            return self._refuse(
                str(inbound.topic), WireRefusal(WireRefused.KEY_NOT_PROVEN, str(exc))
            )
        held = self._keys.get(node)
        if held is not None and _raw(held) != _raw(key):
            log.warning("secure aggregation: %s published a new key-agreement key", node)
        self._keys[node] = key
        return key

    def key(self, identity: str) -> X25519PublicKey | None:
        """``identity``'s verified key, or None while none has been proven."""
        return self._keys.get(identity)

    def known(self) -> tuple[str, ...]:
        return tuple(sorted(self._keys))

    def missing(self, holders: Iterable[str]) -> tuple[str, ...]:
        """The holders of a roster whose key is not verified yet, in roster order."""
        return tuple(holder for holder in holders if holder not in self._keys)

    def _refuse(self, topic: str, refusal: WireRefusal) -> WireRefusal:
        self.refusals[refusal.reason] += 1
        self.last_refusal = refusal.detail
        log.warning(
            "secure aggregation: refused the key record on %s (%s): %s",
            topic,
            refusal.reason,
            refusal.detail,
        )
        return refusal


def _raw(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
