"""Specification of what a node loads at start-up: torch to train, no opacus without privacy."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["edge_node.service", "edge_node.privacy_ledger"])
def test_a_node_without_a_privacy_policy_loads_no_opacus(module: str) -> None:
    """opacus and scipy cost a node about 2 s of CPU at start-up: they come in only where a node
    plans, trains or counts under a privacy policy (edge_node.privacy, the ledger's epsilon)."""
    code = f"import sys, {module}; print('opacus' in sys.modules, 'scipy' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert done.stdout.strip() == "False False", done.stderr


def test_the_cli_and_the_aggregator_load_no_cryptography() -> None:
    """The ``healthnet`` CLI, with its deploy group, and the aggregator load no cryptography: only
    generating a deployment (certificates) and secure aggregation's keys need it, and the
    aggregator folds and unmasks without keys. A node loads it with its secure aggregation side
    (about 50 ms beside torch's 1.4 s), policy or not."""
    code = "import sys, healthnet.cli, aggregator.service; print('cryptography' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert done.stdout.strip() == "False", done.stderr
