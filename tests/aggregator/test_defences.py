"""Specification of the poisoning defences: robust statistics, clipping, and the core's rules."""

from __future__ import annotations

from typing import Any

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
    norm_bound,
    robust_buffer_aggregate,
    trimmed_mean,
)
from aggregator.core import AggregatorCore
from common.errors import ControlError
from common.messages import (
    AggregationRule,
    ControlCommand,
    Knobs,
    NodeTally,
    NormPolicy,
    RejectReason,
    StalenessKind,
)
from tests.aggregator.test_core import DELTA, PARAMS, RUN, make_core, make_update, scaled, send
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
    (entry,) = [e for e in core.node_tallies() if e.node == "bad"]
    assert entry.quarantined
    assert entry.rejections == {"quarantined": 1}
    with pytest.raises(ControlError, match="already"):
        core.quarantine("bad")
    core.readmit("bad")
    assert send(core, make_update("d"), node="bad").accepted
    with pytest.raises(ControlError, match="not quarantined"):
        core.readmit("bad")


def test_quarantine_survives_in_the_node_tallies() -> None:
    """A core rebuilt from its tallies (as from a checkpoint) still refuses the quarantined node."""
    core = make_core()
    core.quarantine("bad")
    restored = AggregatorCore(
        run_id=core.run_id,
        params=PARAMS,
        knobs=core.knobs,
        state=core.state,
        nodes=core.node_tallies(),
    )
    assert send(restored, make_update("x"), node="bad").reason is RejectReason.QUARANTINED
    assert NodeTally(node="n").quarantined is False


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


# -- the norm bound: an absolute ceiling and an adaptive one that needs no tuning


@pytest.mark.parametrize(
    ("history", "initial", "expected"),
    [
        pytest.param([], 2.0, 20.0, id="warm-up-no-history"),
        pytest.param([0.1, 0.1], 2.0, 20.0, id="warm-up-two-known"),
        pytest.param([0.1, 0.3, 0.2], 2.0, 2.0, id="median-of-three"),
        pytest.param([9.0] * 30 + [0.1, 0.2, 0.3], 2.0, 90.0, id="median-of-the-window-only"),
        pytest.param([1e30, 0.1, 0.2], 2.0, 2.0, id="one-huge-norm-is-never-the-median"),
    ],
)
def test_adaptive_bound_is_a_multiple_of_the_median_norm_after_a_warm_up_on_the_model(
    history: list[float], initial: float, expected: float
) -> None:
    """10 x the median of the last 20 accepted norms once three are known; before that, 10 x
    the initial weights' norm."""
    bound = norm_bound(
        ceiling=None, multiplier=10.0, history=history, window=20, initial_norm=initial
    )
    assert bound is not None
    assert bound.value == pytest.approx(expected)


def test_norm_bound_is_the_tighter_of_ceiling_and_adaptive_and_none_without_either() -> None:
    """The ceiling always applies; a zero reference gives no adaptive bound; no knob, no bound."""
    history = [1.0, 1.0, 1.0]
    both = norm_bound(ceiling=5.0, multiplier=10.0, history=history, window=20, initial_norm=1.0)
    assert both is not None
    assert (both.value, both.source) == (5.0, "max_update_norm")
    adaptive = norm_bound(ceiling=50.0, multiplier=10.0, history=history, window=20, initial_norm=1)
    assert adaptive is not None
    assert adaptive.value == 10.0
    zero = norm_bound(ceiling=None, multiplier=10.0, history=[], window=20, initial_norm=0.0)
    assert zero is None
    assert (
        norm_bound(ceiling=None, multiplier=None, history=history, window=20, initial_norm=1)
        is None
    )


def test_an_attackers_first_update_is_held_to_the_initial_weights_norm() -> None:
    """Before any update is known, an update of float32-max values is rejected as norm_bound,
    and one the size of an honest step is accepted."""
    core = make_core(norm_multiplier=10.0)
    huge = make_update(
        "huge", delta={n: np.full(t.shape, 3e38, np.float32) for n, t in DELTA.items()}
    )
    verdict = send(core, huge)
    assert (verdict.accepted, verdict.reason) == (False, RejectReason.NORM_BOUND)
    assert "warm-up" in verdict.detail
    assert send(core, make_update("honest")).accepted
    assert core.counters().rejections == {"norm_bound": 1}
    assert core.norm_history == pytest.approx((global_norm(DELTA),))


def test_adaptive_bound_follows_the_median_of_accepted_updates() -> None:
    """Once three updates are known, 10 x their median norm separates accepted from rejected."""
    core = make_core(buffer_size=100, norm_multiplier=10.0)
    for i in range(3):
        assert send(core, make_update(f"h{i}"), node=f"n{i}").accepted
    assert send(core, make_update("nine", delta=scaled(9.0)), node="n4").accepted
    verdict = send(core, make_update("eleven", delta=scaled(11.0)), node="n5")
    assert (verdict.accepted, verdict.reason) == (False, RejectReason.NORM_BOUND)
    assert "median norm" in verdict.detail


def test_a_model_initialised_to_zeros_learns_the_norms_its_adaptive_bound_needs() -> None:
    """Zero initial weights give the warm-up no scale, so the first updates pass unbounded; their
    norms are still recorded, and from the fourth update on the median's bound applies."""
    zeros = {name: np.zeros_like(p) for name, p in PARAMS.items()}
    core = AggregatorCore(
        run_id=RUN, params=zeros, knobs=Knobs(buffer_size=100, norm_multiplier=10.0)
    )
    core.command(ControlCommand.START)
    assert core.norm_bound() is None
    for i in range(3):
        assert send(core, make_update(f"h{i}"), node=f"n{i}").accepted
    assert core.norm_history == pytest.approx((global_norm(DELTA),) * 3)
    verdict = send(core, make_update("big", delta=scaled(11.0)), node="bad")
    assert (verdict.accepted, verdict.reason) == (False, RejectReason.NORM_BOUND)


def test_adaptive_clip_scales_to_the_bound_and_remembers_the_clipped_norm() -> None:
    """With the clip policy, an update above the bound is scaled to it, and the history records
    the norm it was folded with, so an attacker cannot drag the median up by sending big."""
    core = make_core(buffer_size=100, norm_multiplier=2.0, norm_policy=NormPolicy.CLIP)
    for i in range(3):
        send(core, make_update(f"h{i}"), node=f"n{i}")
    verdict = send(core, make_update("big", delta=scaled(1000.0)), node="bad")
    assert verdict.accepted
    assert verdict.clipped
    unit = global_norm(DELTA)
    assert core.norm_history[-1] == pytest.approx(2 * unit)
    clipped = core.buffer[-1]
    assert global_norm(densify(clipped.delta, clipped.scale)) == pytest.approx(2 * unit, rel=1e-5)


# -- trimmed mean at its default trim_fraction


def test_trimmed_mean_at_the_default_fraction_trims_one_value_per_end_of_a_small_buffer() -> None:
    """floor(0.1 x 4) is 0, yet the default trim drops the largest and smallest value of four."""
    deltas = [{"w": np.array([v, -v], np.float32)} for v in (1.0, 2.0, 3.0, 1000.0)]
    default = Knobs().trim_fraction
    np.testing.assert_allclose(trimmed_mean(deltas, default)["w"], [2.5, -2.5])


def test_the_default_trimmed_mean_keeps_an_outlier_out_of_the_model() -> None:
    """aggregation trimmed_mean with buffer_size 4 and the default trim_fraction folds the
    honest delta: the 10^6 x update among four is trimmed."""
    core = make_core(buffer_size=4, aggregation=AggregationRule.TRIMMED_MEAN)
    for i, factor in enumerate((1.0, 1.0, 1.0, 1e6)):
        send(core, make_update(f"u{i}", delta=scaled(factor)), node=f"n{i}")
    fold = core.fold(0.0)
    for name in PARAMS:
        np.testing.assert_allclose(fold.params[name], PARAMS[name] + DELTA[name], rtol=1e-6)


@pytest.mark.parametrize(
    "knobs",
    [
        pytest.param({"aggregation": "trimmed_mean"}, id="buffer-of-two"),
        pytest.param({"aggregation": "trimmed_mean", "buffer_size": 1}, id="buffer-of-one"),
        pytest.param(
            {"aggregation": "trimmed_mean", "buffer_size": 10, "trim_fraction": 0.0},
            id="trim-fraction-zero",
        ),
    ],
)
def test_a_trimmed_mean_that_would_trim_nothing_is_refused(knobs: dict[str, Any]) -> None:
    """Knobs refuse a trimmed mean that could only be the mean, naming what to change."""
    with pytest.raises(ValueError, match="trims nothing"):
        Knobs(**knobs)


def test_set_knob_refuses_trimmed_mean_on_a_buffer_of_two_and_takes_it_with_a_bigger_one() -> None:
    """An operator's `set aggregation=trimmed_mean` at buffer_size 2 is refused cleanly; setting
    buffer_size 4 in the same request works."""
    core = make_core(buffer_size=2)
    with pytest.raises(ControlError, match="buffer_size >= 3"):
        core.set_knobs({"aggregation": "trimmed_mean"})
    assert core.knobs.aggregation is AggregationRule.MEAN
    knobs = core.set_knobs({"aggregation": "trimmed_mean", "buffer_size": 4})
    assert (knobs.aggregation, knobs.buffer_size) == (AggregationRule.TRIMMED_MEAN, 4)
