"""Real MQTT brokers for the tests of every layer: the one place tests start a broker from.

Tests of the lower layers (tests/common, tests/aggregator) need a broker to talk to, not the
``healthnet`` package under test: they take the launcher's names from here, and so do the session
fixtures in tests/conftest.py. The launcher itself is ``healthnet.broker``, which the ``healthnet
broker`` command ships to users.
"""

from __future__ import annotations

from healthnet.broker import BrokerConfig, EmbeddedBroker, find_mosquitto, free_port

__all__ = ["BrokerConfig", "EmbeddedBroker", "find_mosquitto", "free_port"]
