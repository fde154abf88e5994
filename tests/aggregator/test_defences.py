"""Specification of the poisoning defences: robust statistics, clipping, and the core's rules."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from aggregator.aggregation import (
    StalenessPolicy,
    clip_to_norm,
    coordinate_median,
    densify,
    global_norm,
    robust_buffer_aggregate,
    trimmed_mean,
)
from aggregator.core import AggregatorCore
from common.errors import ControlError
from common.messages import (
    AggregationRule,
    NodeLedgerEntry,
    NormPolicy,
    RejectReason,
    StalenessKind,
)
from tests.aggregator.test_core import DELTA, PARAMS, make_core, make_update, scaled, send
from tests.strategies import params_like, update_buffers

CONSTANT = StalenessPolicy(StalenessKind.CONSTANT)


# -- robust statistics (pure numpy)


@given(update_buffers(min_size=1, max_size=7))
def test_median_and_trimmed_mean_lie_between_the_extremes(
    buffer: tuple[list[dict[str, np.ndarray]], list[int], list[int]],
) -> None:
    """Per coordinate, both statistics stay within the smallest and largest value given."""
    deltas, _, _ = buffer
    for aggregate in (coordinate_median(deltas), trimmed_mean(deltas, 0.25)):
        for name, value in aggregate.items():
            stack = np.stack([d[name] for d in deltas])
            assert value.dtype == np.float32
            assert value.shape == deltas[0][name].shape
            assert np.all(value >= stack.min(axis=0) - 1e-3)
            assert np.all(value <= stack.max(axis=0) + 1e-3)


@given(update_buffers(min_size=1, max_size=6), st.data())
def test_robust_statistics_do_not_depend_on_order(
    buffer: tuple[list[dict[str, np.ndarray]], list[int], list[int]], data: st.DataObject
) -> None:
    """Shuffling the buffer changes neither the median nor the trimmed mean."""
    deltas, _, _ = buffer
    shuffled = data.draw(st.permutations(deltas))
    for f in (coordinate_median, lambda d: trimmed_mean(d, 0.2)):
        a, b = f(deltas), f(shuffled)
        for name in a:
            np.testing.assert_allclose(a[name], b[name], rtol=1e-6, atol=1e-6)


@given(params_like({"w": (3, 2), "b": (2,)}), st.integers(1, 6))
def test_identical_inputs_give_that_input(delta: dict[str, np.ndarray], n: int) -> None:
    """n copies of one delta have that delta as median and trimmed mean."""
    for aggregate in (coordinate_median([delta] * n), trimmed_mean([delta] * n, 0.3)):
        for name, value in aggregate.items():
            np.testing.assert_allclose(value, delta[name], rtol=1e-6, atol=1e-6)


@given(
    st.lists(params_like({"w": (4,)}), min_size=3, max_size=3),
    st.floats(min_value=1e3, max_value=1e30),
)
def test_one_outlier_among_three_cannot_move_the_median_out_of_the_honest_range(
    honest: list[dict[str, np.ndarray]], scale: float
) -> None:
    """A huge delta among honest ones leaves the median within the honest values."""
    poisoned = {"w": np.full(4, scale, np.float32)}
    median = coordinate_median([*honest, poisoned])["w"]
    stack = np.stack([h["w"] for h in honest])
    assert np.all(median <= stack.max(axis=0) + 1e-3)
    assert np.all(median >= stack.min(axis=0) - 1e-3)


def test_trimmed_mean_drops_the_extremes_of_each_coordinate() -> None:
    """With trim 0.25 of four values, the largest and the smallest are dropped per coordinate."""
    deltas = [{"w": np.array([v, -v], np.float32)} for v in (1.0, 2.0, 3.0, 1000.0)]
    np.testing.assert_allclose(trimmed_mean(deltas, 0.25)["w"], [2.5, -2.5])
    np.testing.assert_allclose(trimmed_mean(deltas, 0.0)["w"], [251.5, -251.5])


def test_robust_aggregate_discounts_stale_deltas_and_ignores_sample_counts() -> None:
    """The robust rules take the median of f(s) * delta; weights are f(s) / K."""
    deltas = [{"w": np.array([2.0], np.float32)}] * 3
    policy = StalenessPolicy(StalenessKind.POLYNOMIAL, a=1.0)
    aggregate, weights = robust_buffer_aggregate(deltas, [0, 1, 3], policy, AggregationRule.MEDIAN)
    np.testing.assert_allclose(aggregate["w"], [1.0])  # median of 2, 1, 0.5
    assert weights == pytest.approx([1 / 3, 1 / 6, 1 / 12])


@given(params_like({"w": (3, 2), "b": (2,)}), st.floats(min_value=1e-3, max_value=1e3))
def test_clipping_bounds_the_norm_and_keeps_the_direction(
    delta: dict[str, np.ndarray], bound: float
) -> None:
    """A clipped delta has norm at most the bound and points the same way; a small one is kept."""
    clipped, norm = clip_to_norm(delta, bound)
    assert norm == pytest.approx(global_norm(delta))
    assert global_norm(clipped) <= bound * (1 + 1e-5)
    if norm <= bound:
        for name, value in delta.items():
            np.testing.assert_array_equal(clipped[name], value)
    else:
        scale = bound / norm
        for name, value in delta.items():
            np.testing.assert_allclose(clipped[name], value * scale, rtol=1e-4, atol=1e-30)


# -- the core's rules


def test_an_update_id_seen_from_another_node_is_a_replay() -> None:
    """n2 resending n1's accepted update id is rejected as replay and never folded."""
    core = make_core(buffer_size=3)
    assert send(core, make_update("u1"), node="n1").accepted
    verdict = send(core, make_update("u1"), node="n2")
    assert (verdict.accepted, verdict.reason) == (False, RejectReason.REPLAY)
    assert [u.node for u in core.buffer] == ["n1"]
    assert core.counters().rejections == {"replay": 1}


def test_a_rejected_update_id_resent_stays_rejected_as_a_replay() -> None:
    """An id once rejected (future version) is a replay later, even once that version exists."""
    core = make_core(buffer_size=1)
    assert send(core, make_update("early", base_version=1)).reason is RejectReason.FUTURE_VERSION
    assert send(core, make_update("u1")).accepted
    core.fold(0.0)
    assert core.version == 1
    assert send(core, make_update("early", base_version=1)).reason is RejectReason.REPLAY


def test_quarantine_drops_buffered_updates_and_refuses_new_ones_until_readmitted() -> None:
    """A quarantined node's buffered updates leave the buffer; its next ones are rejected."""
    core = make_core(buffer_size=5)
    send(core, make_update("a"), node="bad")
    send(core, make_update("b"), node="good")
    assert core.quarantine("bad") == ("a",)
    assert [u.update_id for u in core.buffer] == ["b"]
    verdict = send(core, make_update("c"), node="bad")
    assert (verdict.accepted, verdict.reason) == (False, RejectReason.QUARANTINED)
    (entry,) = [e for e in core.ledger() if e.node == "bad"]
    assert entry.quarantined
    assert entry.rejections == {"quarantined": 1}
    with pytest.raises(ControlError, match="already"):
        core.quarantine("bad")
    core.readmit("bad")
    assert send(core, make_update("d"), node="bad").accepted
    with pytest.raises(ControlError, match="not quarantined"):
        core.readmit("bad")


def test_quarantine_survives_in_the_ledger() -> None:
    """A core rebuilt from its ledger (as from a checkpoint) still refuses the quarantined node."""
    core = make_core()
    core.quarantine("bad")
    restored = AggregatorCore(
        run_id=core.run_id, params=PARAMS, knobs=core.knobs, state=core.state, nodes=core.ledger()
    )
    assert send(restored, make_update("x"), node="bad").reason is RejectReason.QUARANTINED
    assert NodeLedgerEntry(node="n").quarantined is False


def test_one_update_per_version_refuses_a_flood_from_one_base() -> None:
    """With one_update_per_version, a second update from the same base is rate_limited."""
    core = make_core(buffer_size=5, one_update_per_version=True)
    assert send(core, make_update("u1")).accepted
    verdict = send(core, make_update("u2"))
    assert (verdict.accepted, verdict.reason) == (False, RejectReason.RATE_LIMITED)
    assert send(core, make_update("u3"), node="n2").accepted
    assert send(core, make_update("u1")).duplicate  # a resend is not a flood


def test_too_many_samples_are_rejected() -> None:
    """A sample count above max_num_samples (weight inflation) is rejected as sample_count."""
    core = make_core(max_num_samples=1000)
    assert send(core, make_update("ok", num_samples=1000)).accepted
    verdict = send(core, make_update("big", num_samples=1001))
    assert (verdict.accepted, verdict.reason) == (False, RejectReason.SAMPLE_COUNT)


def test_norm_policy_clip_accepts_a_large_update_scaled_to_the_bound() -> None:
    """With norm_policy clip, a large update is accepted with its delta scaled to the bound."""
    core = make_core(max_update_norm=0.1, norm_policy=NormPolicy.CLIP)
    verdict = send(core, make_update(delta=scaled(100)))
    assert verdict.accepted
    assert verdict.clipped
    assert "clipped" in verdict.detail
    buffered = core.buffer[0]
    assert global_norm(densify(buffered.delta, buffered.scale)) == pytest.approx(0.1, rel=1e-5)
    assert core.counters().clipped == 1


def test_median_rule_folds_the_median_of_the_buffer() -> None:
    """With aggregation median, a poisoned delta among three does not reach the model."""
    core = make_core(buffer_size=3, aggregation=AggregationRule.MEDIAN)
    for i, factor in enumerate((1.0, 1.0, 1e6)):
        send(core, make_update(f"u{i}", delta=scaled(factor)), node=f"n{i}")
    fold = core.fold(0.0)
    for name in PARAMS:
        np.testing.assert_allclose(fold.params[name], PARAMS[name] + DELTA[name], rtol=1e-6)
