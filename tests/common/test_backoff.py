"""Specification of reconnect backoff: capped exponential ceiling with full jitter."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.backoff import Backoff


@given(
    initial=st.floats(0.001, 10),
    factor=st.floats(1, 100),
    attempt=st.integers(-5, 200),
    seed=st.integers(0, 2**32),
)
def test_delays_lie_within_zero_and_the_capped_exponential(
    initial: float, factor: float, attempt: int, seed: int
) -> None:
    """delay(n) is in [0, min(cap, initial * 2**n)] (n below 0 counts as 0)."""
    backoff = Backoff(initial=initial, cap=initial * factor, rng=random.Random(seed))
    bound = min(backoff.cap, initial * 2.0 ** max(attempt, 0))
    assert backoff.ceiling(attempt) == pytest.approx(bound)
    assert 0.0 <= backoff.delay(attempt) <= bound


@pytest.mark.parametrize(
    ("attempt", "ceiling"),
    [
        pytest.param(0, 0.5, id="first"),
        pytest.param(1, 1.0, id="second"),
        pytest.param(3, 4.0, id="fourth"),
        pytest.param(6, 30.0, id="capped"),
        pytest.param(1000, 30.0, id="stays-capped"),
    ],
)
def test_the_default_ceiling_doubles_from_half_a_second_up_to_thirty(
    attempt: int, ceiling: float
) -> None:
    """Defaults: 0.5 s, doubling per attempt, never more than 30 s."""
    assert Backoff().ceiling(attempt) == ceiling


@pytest.mark.parametrize(
    "attempt", [pytest.param(10**6, id="million"), pytest.param(10**100, id="googol")]
)
def test_huge_attempt_numbers_do_not_overflow(attempt: int) -> None:
    """Attempt counts far past any cap give the cap, not an OverflowError or inf."""
    backoff = Backoff(initial=1.0, cap=math.inf)
    assert math.isfinite(backoff.ceiling(attempt))
    assert 0.0 <= backoff.delay(attempt) <= backoff.ceiling(attempt)
    assert Backoff(initial=1.0, cap=60.0).ceiling(attempt) == 60.0


def test_delays_are_jittered_not_constant() -> None:
    """Successive delays for the same attempt differ (full jitter), and spread over the range."""
    backoff = Backoff(initial=1.0, cap=8.0, rng=random.Random(1))
    delays = [backoff.delay(3) for _ in range(200)]
    assert len(set(delays)) == len(delays)
    assert min(delays) < 2.0
    assert max(delays) > 6.0


def test_a_seeded_rng_reproduces_the_same_delays() -> None:
    """Two backoffs with equally seeded generators produce the same sequence."""
    first = Backoff(rng=random.Random(42))
    second = Backoff(rng=random.Random(42))
    assert [first.delay(n) for n in range(20)] == [second.delay(n) for n in range(20)]


@pytest.mark.parametrize(
    ("initial", "cap"),
    [
        pytest.param(0.0, 1.0, id="zero-initial"),
        pytest.param(-1.0, 1.0, id="negative-initial"),
        pytest.param(2.0, 1.0, id="initial-over-cap"),
        pytest.param(math.nan, 1.0, id="nan-initial"),
        pytest.param(1.0, math.nan, id="nan-cap"),
        pytest.param(-2.0, -1.0, id="both-negative"),
    ],
)
def test_invalid_parameters_are_rejected(initial: float, cap: float) -> None:
    """Backoff needs 0 < initial <= cap."""
    with pytest.raises(ValueError, match="0 < initial <= cap"):
        Backoff(initial=initial, cap=cap)
