"""Shared fixtures: real brokers on 127.0.0.1 (Mosquitto and the embedded amqtt), one a session."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.brokers import BrokerConfig, EmbeddedBroker, find_mosquitto


def pytest_sessionstart(session: pytest.Session) -> None:
    # CI sets this so that a missing Mosquitto fails the run instead of skipping its tests.
    if os.environ.get("HEALTHNET_REQUIRE_MOSQUITTO") == "1" and find_mosquitto() is None:
        pytest.exit("HEALTHNET_REQUIRE_MOSQUITTO=1 but no mosquitto binary was found", returncode=3)


@pytest.fixture(scope="session")
def mosquitto() -> Iterator[EmbeddedBroker]:
    """A real Mosquitto on a free port of 127.0.0.1."""
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed")
    with EmbeddedBroker(BrokerConfig(implementation="mosquitto")) as broker:
        yield broker


@pytest.fixture(scope="session")
def amqtt() -> Iterator[EmbeddedBroker]:
    """The embedded pure-Python broker (MQTT 3.1.1 only) on a free port of 127.0.0.1."""
    with EmbeddedBroker(BrokerConfig(implementation="amqtt")) as broker:
        yield broker


@pytest.fixture(params=["mosquitto", "amqtt"])
def broker_url(request: pytest.FixtureRequest) -> str:
    """Each broker in turn: the protocol must work on both."""
    broker: EmbeddedBroker = request.getfixturevalue(request.param)
    return broker.url
