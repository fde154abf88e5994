"""A hospital's key record for secure aggregation: signed with its client certificate, published.

Theory of operation (docs/secure-aggregation.md#sharing-the-mask). The node's X25519 key lives
beside its state (``edge_node.secure_holder.load_agreement_key``, mode 0600). Its key record is
signed with the private key of the node's client certificate, so only a federation that issued
client certificates can run secure aggregation: ``healthnet deploy init --auth password`` issues
none, and :func:`own_key_record` refuses such a node with :class:`SecureAggregationUnavailable`
rather than publish a key that no peer could tell from one the broker made up. Before it
publishes, the node verifies its own record against the CA, exactly as its peers will, so a
certificate of another identity or federation fails here, at start, with the reason.
:func:`publish_key_record` puts the record, retained, on the node's own ``secagg/keys/{node}``.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from common.codec import encode, envelope
from common.errors import ConfigError
from common.mqtt import MqttClient
from common.secure_aggregation.keys import KeyRecord, KeyRefused, sign_key_record, verify_key_record
from common.secure_aggregation.wire import to_key_record
from common.topics import TopicTree

__all__ = ["SecureAggregationUnavailable", "own_key_record", "publish_key_record"]


class SecureAggregationUnavailable(ConfigError):
    """This node cannot take part in secure aggregation, and why."""


def own_key_record(
    *,
    federation: str,
    identity: str,
    agreement_key: X25519PrivateKey,
    cert_file: str | Path | None,
    key_file: str | Path | None,
    ca_file: str | Path | None,
    now: dt.datetime,
) -> KeyRecord:
    """The node's key record, signed with its client certificate's key and verified against the
    federation's CA; :class:`SecureAggregationUnavailable` when it has none of these."""
    if cert_file is None or key_file is None:
        raise SecureAggregationUnavailable(
            f"{identity}: secure aggregation signs each hospital's key-agreement key with its "
            "client certificate, and this node has none (a password-mode deployment): "
            "generate the federation with `healthnet deploy init --auth mtls`"
        )
    if ca_file is None:
        raise SecureAggregationUnavailable(
            f"{identity}: secure aggregation verifies every hospital's key record against the "
            "federation's CA, and this node has no ca_file"
        )
    record = sign_key_record(
        federation=federation,
        identity=identity,
        public_key=agreement_key.public_key(),
        certificate_pem=Path(cert_file).read_bytes(),
        signing_key_pem=Path(key_file).read_bytes(),
    )
    try:
        verify_key_record(
            record,
            ca_certificate_pem=Path(ca_file).read_bytes(),
            federation=federation,
            identity=identity,
            now=now,
        )
    except KeyRefused as exc:
        raise SecureAggregationUnavailable(
            f"{identity}: its own key record would be refused by its peers: {exc}"
        ) from exc
    return record


def publish_key_record(
    client: MqttClient, topics: TopicTree, record: KeyRecord, *, sent_at: float
) -> None:
    """Publish ``record`` (retained, QoS 1) on the node's own key topic."""
    body = to_key_record(record)
    client.publish(
        topics.secagg_key(record.identity),
        encode(envelope(body, sender=record.identity, sent_at=sent_at)),
    )
