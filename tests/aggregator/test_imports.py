"""Specification of what the aggregator's modules load: no torch until a run needs a model."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "module",
    ["aggregator.service", "aggregator.core", "aggregator.aggregation", "aggregator.fold"],
)
def test_importing_the_aggregator_loads_no_torch(module: str) -> None:
    """torch comes in only where common.models builds a model (a fresh run, the output probe)."""
    code = f"import sys, {module}; print('torch' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "False", done.stderr
