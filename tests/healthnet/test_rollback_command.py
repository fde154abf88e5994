"""Specification of `healthnet rollback` against a running aggregator on a real Mosquitto."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from healthnet.cli import app
from tests.aggregator.test_service import Aggregator, Peer, node, running, start, tree
from tests.brokers import EmbeddedBroker

# The aggregator service harness's fixtures, as tests/aggregator/conftest.py shares them there.
__all__ = ["node", "running", "start", "tree"]

pytestmark = [pytest.mark.broker, pytest.mark.timeout(60)]


def test_the_rollback_command_says_what_it_published_or_why_not(
    running: Aggregator, node: Peer, mosquitto: EmbeddedBroker
) -> None:
    """`healthnet rollback 0` at v1 prints the new version; `rollback 5` fails with the reason."""
    node.fold_next(0)
    flags = ["--broker-url", mosquitto.url, "--federation", node.tree.federation]
    done = CliRunner().invoke(app, ["rollback", "0", *flags])
    assert done.exit_code == 0, done.output
    assert "rolled back to v0's weights as v2" in done.output
    refused = CliRunner().invoke(app, ["rollback", "5", *flags])
    assert refused.exit_code != 0
    assert "not an earlier version" in refused.output
