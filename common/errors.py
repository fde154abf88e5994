"""The healthNET exception tree, shared by every role.

    HealthNetError
    ├── ProtocolError            a peer sent something we cannot accept
    │   ├── DecodeError          bytes are not a well-formed envelope or tensor
    │   │   └── CompressionError a compressed tensor does not fit the model or its own fields
    │   │       └── NonFiniteValues   it decodes to NaN or infinity
    │   ├── SchemaError          unknown schema version or message kind
    │   └── IntegrityError       a blob's sha256 does not match its manifest
    ├── TopicError               a topic string is not one of ours (or a bad identifier)
    ├── BrokerError              talking to the MQTT broker failed
    │   ├── BrokerUnavailable    could not connect within the deadline
    │   └── SubscriptionRefused  the broker's SUBACK refused a subscription
    ├── ControlError             an operator request was refused or timed out
    └── ConfigError              settings or a model/data reference are invalid

ProtocolError says the *peer* broke the protocol; the others are ours or the environment's.
"""

from __future__ import annotations

__all__ = [
    "BrokerError",
    "BrokerUnavailable",
    "CompressionError",
    "ConfigError",
    "ControlError",
    "DecodeError",
    "HealthNetError",
    "IntegrityError",
    "NonFiniteValues",
    "ProtocolError",
    "SchemaError",
    "SubscriptionRefused",
    "TopicError",
]


class HealthNetError(Exception):
    """Base of every error raised on purpose by healthNET."""


class ProtocolError(HealthNetError):
    """A peer sent bytes or a message that the protocol does not allow."""


class DecodeError(ProtocolError):
    """Bytes are not a well-formed envelope, body or tensor."""


class CompressionError(DecodeError):
    """A compressed tensor is malformed: wrong shape, inconsistent counts, bad indices or scale."""


class NonFiniteValues(CompressionError):
    """A compressed tensor is well formed but carries NaN or infinity."""


class SchemaError(ProtocolError):
    """The envelope names a schema version or message kind we do not speak."""


class IntegrityError(ProtocolError):
    """A blob does not match the sha256 or size its manifest announced."""


class TopicError(HealthNetError):
    """A topic string or identifier is not valid in the healthNET topic tree."""


class BrokerError(HealthNetError):
    """An operation against the MQTT broker failed."""


class BrokerUnavailable(BrokerError):
    """The broker could not be reached within the deadline."""


class SubscriptionRefused(BrokerError):
    """The broker answered a SUBSCRIBE with a failure code (0x80 on 3.1.1, >= 0x80 on v5)."""


class ControlError(HealthNetError):
    """An operator request was rejected by the aggregator or got no reply in time."""


class ConfigError(HealthNetError):
    """Settings, a model reference or a data reference are invalid."""
