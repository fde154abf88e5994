"""How the fuzz targets run: a fixed number of Hypothesis inputs each, counted, so that CI provably
executes them all (10,000 in total; see docs/security.md, Fuzzing)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# Inputs per fuzz target; tests/aggregator/test_validation_fuzz.py checks they add up to 10,000.
BUDGET: dict[str, int] = {
    "codec_random_bytes": 3000,
    "codec_mutated_envelopes": 2500,
    "codec_random_frames": 1000,
    "validator_updates": 2500,
    "validator_mutated_payloads": 1000,
}


def run_fuzz(name: str, strategy: st.SearchStrategy[Any], target: Callable[[Any], None]) -> int:
    """Run ``target`` on exactly ``BUDGET[name]`` generated inputs (or fail); return the count."""
    calls = 0

    @settings(
        max_examples=BUDGET[name],
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(strategy)
    def fuzz(value: Any) -> None:
        nonlocal calls
        calls += 1
        target(value)

    fuzz()
    assert calls >= BUDGET[name], f"{name}: Hypothesis ran only {calls} of {BUDGET[name]} inputs"
    return calls
