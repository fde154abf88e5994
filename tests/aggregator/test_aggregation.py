"""Specification of the aggregation maths: staleness-weighted FedAvg and the server optimizers."""

from __future__ import annotations

import copy
import math
import re
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from aggregator.aggregation import (
    ServerOptimizer,
    ServerOptimizerState,
    StalenessPolicy,
    buffer_aggregate,
    buffer_weights,
    decoded_sum,
    densify,
    fold_step,
    global_norm,
    robust_buffer_aggregate,
    sample_weight,
    server_step,
    weighted_average,
)
from aggregator.fold import BLOCK, COMPILED_MIN
from common.compression import DecodedTensor, all_finite, compress, decode_tensor
from common.messages import (
    AggregationRule,
    Compression,
    Quantization,
    ServerOptimizerKind,
    StalenessKind,
)
from tests.strategies import (
    FINITE,
    Received,
    compressions,
    model_shapes,
    params_like,
    received,
    received_buffers,
    staleness_policies,
    update_buffers,
)

PROPERTY = settings(max_examples=40, deadline=None)
EXPONENTS = st.floats(min_value=0, max_value=4, allow_nan=False)
LEARNING_RATES = st.floats(min_value=0.01, max_value=10, allow_nan=False)

Arrays = dict[str, np.ndarray]


def float32_atol(deltas: list[Arrays]) -> float:
    """What float32 rounding of K terms can shift a result by, relative to the largest input."""
    largest = max(float(np.max(np.abs(t), initial=0.0)) for d in deltas for t in d.values())
    return 4 * len(deltas) * float(np.finfo(np.float32).eps) * max(largest, 1.0)


def assert_params_close(actual: Arrays, expected: Arrays, *, atol: float) -> None:
    assert list(actual) == list(expected)
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], rtol=1e-6, atol=atol)


def assert_params_equal(actual: Any, expected: Any) -> None:
    assert list(actual) == list(expected)
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name])


def arrays(**tensors: list[Any]) -> Arrays:
    return {name: np.array(values, dtype=np.float32) for name, values in tensors.items()}


# -- buffer_aggregate and weighted_average


@PROPERTY
@given(buffer=update_buffers(), policy=staleness_policies(), beta=EXPONENTS, data=st.data())
def test_buffer_aggregate_does_not_depend_on_buffer_order(
    buffer: tuple[list[Arrays], list[int], list[int]],
    policy: StalenessPolicy,
    beta: float,
    data: st.DataObject,
) -> None:
    """Permuting the buffer permutes the effective weights and leaves the aggregate unchanged."""
    deltas, num_samples, stalenesses = buffer
    order = data.draw(st.permutations(range(len(deltas))))
    aggregate, weights = buffer_aggregate(deltas, num_samples, stalenesses, policy, beta)
    permuted, permuted_weights = buffer_aggregate(
        [deltas[i] for i in order],
        [num_samples[i] for i in order],
        [stalenesses[i] for i in order],
        policy,
        beta,
    )
    assert_params_close(permuted, aggregate, atol=float32_atol(deltas))
    np.testing.assert_allclose(permuted_weights, [weights[i] for i in order], rtol=1e-12)


@PROPERTY
@given(buffer=update_buffers(), data=st.data())
def test_weighted_average_does_not_depend_on_order(
    buffer: tuple[list[Arrays], list[int], list[int]], data: st.DataObject
) -> None:
    """weighted_average over a permuted buffer with permuted weights gives the same tensors."""
    deltas, num_samples, _ = buffer
    weights = [float(n) for n in num_samples]
    order = data.draw(st.permutations(range(len(deltas))))
    assert_params_close(
        weighted_average([deltas[i] for i in order], [weights[i] for i in order]),
        weighted_average(deltas, weights),
        atol=float32_atol(deltas),
    )


@PROPERTY
@given(
    layout=model_shapes().flatmap(params_like),
    num_samples=st.lists(st.integers(1, 1000), min_size=1, max_size=6),
    beta=EXPONENTS,
    policy=staleness_policies(),
)
def test_identical_fresh_updates_aggregate_to_that_update(
    layout: Arrays, num_samples: list[int], beta: float, policy: StalenessPolicy
) -> None:
    """A buffer of the same fresh delta, whatever the sample counts, aggregates to that delta."""
    deltas = [layout] * len(num_samples)
    aggregate, weights = buffer_aggregate(deltas, num_samples, [0] * len(num_samples), policy, beta)
    assert_params_equal(aggregate, layout)
    assert math.isclose(math.fsum(weights), 1.0, rel_tol=1e-12)


@PROPERTY
@given(
    buffer=update_buffers(),
    policy=staleness_policies(),
    beta=EXPONENTS,
    scale=st.integers(1, 1000),
)
def test_aggregate_is_invariant_to_scaling_every_sample_count(
    buffer: tuple[list[Arrays], list[int], list[int]],
    policy: StalenessPolicy,
    beta: float,
    scale: int,
) -> None:
    """Multiplying every sample count by the same factor changes neither aggregate nor weights."""
    deltas, num_samples, stalenesses = buffer
    aggregate, weights = buffer_aggregate(deltas, num_samples, stalenesses, policy, beta)
    scaled, scaled_weights = buffer_aggregate(
        deltas, [n * scale for n in num_samples], stalenesses, policy, beta
    )
    assert_params_close(scaled, aggregate, atol=float32_atol(deltas))
    np.testing.assert_allclose(scaled_weights, weights, rtol=1e-9)


@PROPERTY
@given(buffer=update_buffers(), policy=staleness_policies(), beta=EXPONENTS)
def test_aggregate_preserves_names_shapes_and_float32(
    buffer: tuple[list[Arrays], list[int], list[int]], policy: StalenessPolicy, beta: float
) -> None:
    """The aggregate names the same tensors, each with its shape, as float32."""
    deltas, num_samples, stalenesses = buffer
    aggregate, weights = buffer_aggregate(deltas, num_samples, stalenesses, policy, beta)
    assert list(aggregate) == list(deltas[0])
    for name, tensor in aggregate.items():
        assert tensor.shape == deltas[0][name].shape
        assert tensor.dtype == np.float32
    assert len(weights) == len(deltas)


@PROPERTY
@given(buffer=update_buffers(), policy=staleness_policies(), beta=EXPONENTS)
def test_aggregate_never_mutates_its_inputs(
    buffer: tuple[list[Arrays], list[int], list[int]], policy: StalenessPolicy, beta: float
) -> None:
    """Deltas, sample counts and stalenesses are exactly as they were after aggregation."""
    deltas, num_samples, stalenesses = buffer
    before = copy.deepcopy(buffer)
    buffer_aggregate(deltas, num_samples, stalenesses, policy, beta)
    weighted_average(deltas, [float(n) for n in num_samples])
    for delta, original in zip(deltas, before[0], strict=True):
        assert_params_equal(delta, original)
    assert (num_samples, stalenesses) == (before[1], before[2])


@PROPERTY
@given(buffer=update_buffers(), policy=staleness_policies())
def test_beta_zero_with_fresh_updates_is_the_plain_mean(
    buffer: tuple[list[Arrays], list[int], list[int]], policy: StalenessPolicy
) -> None:
    """With beta = 0 and no staleness every hospital counts equally: the aggregate is the mean."""
    deltas, num_samples, _ = buffer
    aggregate, weights = buffer_aggregate(deltas, num_samples, [0] * len(deltas), policy, 0.0)
    expected = {
        name: np.mean([d[name].astype(np.float64) for d in deltas], axis=0) for name in deltas[0]
    }
    assert_params_close(aggregate, expected, atol=float32_atol(deltas))
    np.testing.assert_allclose(weights, [1 / len(deltas)] * len(deltas), rtol=1e-12)


@PROPERTY
@given(
    delta=model_shapes().flatmap(params_like),
    num_samples=st.integers(1, 10_000),
    staleness=st.integers(0, 100),
    policy=staleness_policies(),
    beta=EXPONENTS,
)
def test_a_single_update_aggregates_to_its_discounted_delta(
    delta: Arrays, num_samples: int, staleness: int, policy: StalenessPolicy, beta: float
) -> None:
    """K = 1 gives f(s) * delta (FedAsync): the staleness discount is not normalised away."""
    factor = policy.factor(staleness)
    aggregate, weights = buffer_aggregate([delta], [num_samples], [staleness], policy, beta)
    expected = {name: factor * t.astype(np.float64) for name, t in delta.items()}
    assert_params_close(aggregate, expected, atol=float32_atol([delta]))
    assert weights == [pytest.approx(factor, rel=1e-12)]


def test_sample_counts_and_staleness_set_the_effective_weights() -> None:
    """w_i = n_i**beta * f(s_i), each divided by the sum of the sample weights n_i**beta."""
    policy = StalenessPolicy(StalenessKind.POLYNOMIAL, a=0.5)
    deltas = [arrays(w=[1.0, 0.0]), arrays(w=[0.0, 1.0])]
    aggregate, weights = buffer_aggregate(deltas, [10, 30], [0, 3], policy, 1.0)
    assert weights == [pytest.approx(0.25), pytest.approx(0.75 * 0.5)]
    np.testing.assert_allclose(aggregate["w"], [0.25, 0.375], rtol=1e-6)


def test_tensors_are_matched_by_name_not_by_position() -> None:
    """Two deltas naming the same tensors in a different order are averaged name by name."""
    first = {"w": np.ones(2, np.float32), "b": np.zeros(3, np.float32)}
    second = {"b": np.ones(3, np.float32), "w": np.zeros(2, np.float32)}
    out = weighted_average([first, second], [1.0, 1.0])
    np.testing.assert_allclose(out["w"], [0.5, 0.5])
    np.testing.assert_allclose(out["b"], [0.5, 0.5, 0.5])


# -- staleness functions


@pytest.mark.parametrize(
    ("policy", "staleness", "expected"),
    [
        pytest.param(StalenessPolicy(StalenessKind.CONSTANT), 0, 1.0, id="constant-fresh"),
        pytest.param(StalenessPolicy(StalenessKind.CONSTANT), 1000, 1.0, id="constant-stale"),
        pytest.param(StalenessPolicy(StalenessKind.POLYNOMIAL, a=0.5), 0, 1.0, id="poly-fresh"),
        pytest.param(StalenessPolicy(StalenessKind.POLYNOMIAL, a=0.5), 3, 0.5, id="poly-a0.5-s3"),
        pytest.param(StalenessPolicy(StalenessKind.POLYNOMIAL, a=0.5), 8, 1 / 3, id="poly-a0.5-s8"),
        pytest.param(StalenessPolicy(StalenessKind.POLYNOMIAL, a=1.0), 1, 0.5, id="poly-a1-s1"),
        pytest.param(StalenessPolicy(StalenessKind.POLYNOMIAL, a=0.0), 9, 1.0, id="poly-a0"),
        pytest.param(StalenessPolicy(StalenessKind.HINGE, a=0.5, b=4), 0, 1.0, id="hinge-fresh"),
        pytest.param(StalenessPolicy(StalenessKind.HINGE, a=0.5, b=4), 4, 1.0, id="hinge-at-b"),
        pytest.param(
            StalenessPolicy(StalenessKind.HINGE, a=0.5, b=4), 5, 2 / 3, id="hinge-just-past-b"
        ),
        pytest.param(StalenessPolicy(StalenessKind.HINGE, a=0.5, b=4), 6, 0.5, id="hinge-b+2"),
        pytest.param(StalenessPolicy(StalenessKind.HINGE, a=1.0, b=0), 0, 1.0, id="hinge-b0-s0"),
        pytest.param(StalenessPolicy(StalenessKind.HINGE, a=1.0, b=0), 1, 0.5, id="hinge-b0-s1"),
        pytest.param(StalenessPolicy(), 3, 0.5, id="default-is-poly-a0.5"),
    ],
)
def test_staleness_factor(policy: StalenessPolicy, staleness: int, expected: float) -> None:
    """f(s) for constant, polynomial (1+s)**-a and hinge 1 up to b, then 1/(a(s-b)+1)."""
    assert policy.factor(staleness) == pytest.approx(expected, rel=1e-12)


@PROPERTY
@given(policy=staleness_policies(), s=st.integers(0, 10_000), extra=st.integers(0, 10_000))
def test_staleness_factor_is_in_unit_interval_and_non_increasing(
    policy: StalenessPolicy, s: int, extra: int
) -> None:
    """f(0) = 1, 0 <= f(s) <= 1, and a staler update never counts more than a fresher one."""
    assert policy.factor(0) == 1.0
    assert 0.0 <= policy.factor(s + extra) <= policy.factor(s) <= 1.0


# -- refusals


def _w(*values: float) -> Arrays:
    return arrays(w=list(values))


POLICY = StalenessPolicy()


@pytest.mark.parametrize(
    ("call", "reason"),
    [
        pytest.param(
            lambda: StalenessPolicy(StalenessKind.CONSTANT).factor(-1),
            "staleness must be non-negative, got -1",
            id="constant-s<0",
        ),
        pytest.param(
            lambda: StalenessPolicy(StalenessKind.POLYNOMIAL).factor(-1),
            "staleness must be non-negative, got -1",
            id="poly-s<0",
        ),
        pytest.param(
            lambda: StalenessPolicy(StalenessKind.HINGE).factor(-1),
            "staleness must be non-negative, got -1",
            id="hinge-s<0",
        ),
        pytest.param(
            lambda: buffer_aggregate([_w(1)], [1], [-1], POLICY, 1.0),
            "staleness must be non-negative, got -1",
            id="buffer-negative-s",
        ),
        pytest.param(
            lambda: sample_weight(0, 1.0),
            "an update needs at least one sample, got 0",
            id="zero-samples",
        ),
        pytest.param(
            lambda: sample_weight(-3, 0.0),
            "an update needs at least one sample, got -3",
            id="negative-samples",
        ),
        pytest.param(
            lambda: buffer_aggregate([_w(1)], [0], [0], POLICY, 1.0),
            "an update needs at least one sample, got 0",
            id="buffer-n=0",
        ),
        pytest.param(
            lambda: buffer_aggregate([], [], [], POLICY, 1.0),
            "need one sample count per staleness, and at least one",
            id="empty-buffer",
        ),
        pytest.param(
            lambda: buffer_aggregate([_w(1), _w(2)], [1], [0, 0], POLICY, 1.0),
            "need one sample count and one staleness per delta",
            id="buffer-missing-count",
        ),
        pytest.param(
            lambda: buffer_aggregate([_w(1)], [1], [0, 0], POLICY, 1.0),
            "need one sample count and one staleness per delta",
            id="buffer-extra-staleness",
        ),
        pytest.param(
            lambda: weighted_average([_w(1), arrays(b=[1])], [1, 1]),
            "deltas name different tensors",
            id="different-names",
        ),
        pytest.param(
            lambda: weighted_average([_w(1), arrays(w=[1], b=[1])], [1, 1]),
            "deltas name different tensors",
            id="extra-name",
        ),
        pytest.param(
            lambda: weighted_average([arrays(w=[1], b=[1]), _w(1)], [1, 1]),
            "deltas name different tensors",
            id="missing-name",
        ),
        pytest.param(
            lambda: weighted_average([_w(1, 2), _w(1)], [1, 1]),
            "tensor 'w': shape (1,) != (2,)",
            id="different-shapes",
        ),
        pytest.param(
            lambda: buffer_aggregate([_w(1, 2), _w(1, 2, 3)], [1, 1], [0, 0], POLICY, 1.0),
            "tensor 'w': shape (3,) != (2,)",
            id="buffer-different-shapes",
        ),
        pytest.param(
            lambda: weighted_average([], []),
            "need one weight per delta, got 0 deltas, 0",
            id="no-deltas",
        ),
        pytest.param(
            lambda: weighted_average([_w(1)], [1, 1]),
            "need one weight per delta, got 1 deltas, 2",
            id="weights-length",
        ),
        pytest.param(
            lambda: weighted_average([_w(1), _w(2)], [1, -1]),
            "weights must be finite, non-negative and not all zero: [1, -1]",
            id="negative-weight",
        ),
        pytest.param(
            lambda: weighted_average([_w(1), _w(2)], [1, math.nan]),
            "weights must be finite, non-negative and not all zero: [1, nan]",
            id="nan-weight",
        ),
        pytest.param(
            lambda: weighted_average([_w(1), _w(2)], [1, math.inf]),
            "weights must be finite, non-negative and not all zero: [1, inf]",
            id="inf-weight",
        ),
        pytest.param(
            lambda: weighted_average([_w(1), _w(2)], [0, 0]),
            "weights must be finite, non-negative and not all zero: [0, 0]",
            id="all-zero-weights",
        ),
        pytest.param(
            lambda: weighted_average([_w(1)], [1], 0.0),
            "normalizer must be finite and positive, got 0.0",
            id="zero-normalizer",
        ),
        pytest.param(
            lambda: weighted_average([_w(1)], [1], -1.0),
            "normalizer must be finite and positive, got -1.0",
            id="negative-normalizer",
        ),
        pytest.param(
            lambda: weighted_average([_w(1)], [1], math.nan),
            "normalizer must be finite and positive, got nan",
            id="nan-normalizer",
        ),
        pytest.param(
            lambda: weighted_average([_w(1)], [1], math.inf),
            "normalizer must be finite and positive, got inf",
            id="inf-normalizer",
        ),
        pytest.param(
            lambda: server_step(_w(1), arrays(b=[1]), ServerOptimizerState(), ServerOptimizer()),
            "delta and params name different tensors",
            id="step-different-names",
        ),
        pytest.param(
            lambda: server_step(_w(1), _w(1, 2, 3), ServerOptimizerState(), ServerOptimizer()),
            "tensor 'w': delta shape (3,) != params (1,)",
            id="step-different-shapes",
        ),
    ],
)
def test_invalid_input_raises_value_error(call: Any, reason: str) -> None:
    """Negative staleness, empty samples, mismatched tensors and bad weights are refused, each
    saying why."""
    with pytest.raises(ValueError, match=f"^{re.escape(reason)}$"):
        call()


# -- server optimizers


@PROPERTY
@given(layout=model_shapes(), lr=LEARNING_RATES, data=st.data())
def test_sgd_step_is_params_plus_lr_times_delta(
    layout: dict[str, tuple[int, ...]], lr: float, data: st.DataObject
) -> None:
    """The plain server optimizer returns exactly x + lr * delta, in float32."""
    params = data.draw(params_like(layout))
    delta = data.draw(params_like(layout))
    new, state = server_step(
        params, delta, ServerOptimizerState(), ServerOptimizer(ServerOptimizerKind.SGD, lr=lr)
    )
    assert_params_equal(new, {k: params[k] + np.float32(lr) * delta[k] for k in params})
    assert all(t.dtype == np.float32 for t in new.values())
    assert state.step == 1


@PROPERTY
@given(
    layout=model_shapes(),
    lr=st.floats(min_value=0.01, max_value=2, allow_nan=False),
    momentum=st.floats(min_value=0, max_value=0.99, allow_nan=False),
    data=st.data(),
)
def test_fedavgm_momentum_accumulates_across_steps(
    layout: dict[str, tuple[int, ...]], lr: float, momentum: float, data: st.DataObject
) -> None:
    """FedAvgM: m1 = d1, x1 = x0 + lr m1; m2 = mu m1 + d2, x2 = x1 + lr m2."""
    x0, d1, d2 = (data.draw(params_like(layout)) for _ in range(3))
    opt = ServerOptimizer(ServerOptimizerKind.FEDAVGM, lr=lr, momentum=momentum)
    x1, state1 = server_step(x0, d1, ServerOptimizerState(), opt)
    x2, state2 = server_step(x1, d2, state1, opt)
    for name in layout:
        m1 = d1[name].astype(np.float64)
        m2 = momentum * m1 + d2[name]
        np.testing.assert_allclose(state1.m[name], m1, rtol=1e-6)
        np.testing.assert_allclose(state2.m[name], m2, rtol=1e-5, atol=1e-3)
        np.testing.assert_allclose(x2[name], x0[name] + lr * m1 + lr * m2, rtol=1e-5, atol=1e-2)
    assert state2.step == 2


def test_fedavgm_moves_further_on_a_repeated_delta() -> None:
    """With momentum, the same delta twice moves the params by lr * (1 + (1 + mu)) * delta."""
    opt = ServerOptimizer(ServerOptimizerKind.FEDAVGM, lr=1.0, momentum=0.5)
    x1, state = server_step(_w(0.0), _w(1.0), ServerOptimizerState(), opt)
    x2, _ = server_step(x1, _w(1.0), state, opt)
    np.testing.assert_allclose(x1["w"], [1.0])
    np.testing.assert_allclose(x2["w"], [2.5])


ADAPTIVE = [
    pytest.param(ServerOptimizerKind.FEDADAM, id="fedadam"),
    pytest.param(ServerOptimizerKind.FEDYOGI, id="fedyogi"),
]


@pytest.mark.parametrize("kind", ADAPTIVE)
@PROPERTY
@given(layout=model_shapes(), lr=LEARNING_RATES, data=st.data())
def test_adaptive_optimizers_move_params_with_the_delta(
    kind: ServerOptimizerKind,
    layout: dict[str, tuple[int, ...]],
    lr: float,
    data: st.DataObject,
) -> None:
    """Every coordinate moves in the direction of its delta, over two steps of the same delta."""
    params = data.draw(params_like(layout))
    delta = data.draw(params_like(layout))
    opt = ServerOptimizer(kind, lr=lr)
    once, state = server_step(params, delta, ServerOptimizerState(), opt)
    twice, _ = server_step(once, delta, state, opt)
    for name in layout:
        assert np.all((once[name] - params[name]) * delta[name] >= 0)
        assert np.all((twice[name] - once[name]) * delta[name] >= 0)


# Three pseudo-gradients for a two-coordinate tensor. Under FedYogi the first coordinate's second
# moment grows (0.01 + tau^2 > tau^2 = v), shrinks (0.05^2 < v) and grows again (2^2 > v); the
# second's stays put on a zero delta (sign times zero).
ADAPTIVE_X0 = (0.0, 1.0)
ADAPTIVE_DELTAS = ((1.0, -0.5), (0.05, -0.5), (-2.0, 0.0))
ADAPTIVE_OPT = {"lr": 0.5, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}


def adaptive_by_hand(kind: ServerOptimizerKind, steps: int) -> list[tuple[float, float, float]]:
    """(x, m, v) per coordinate after ``steps`` steps, from Reddi et al., "Adaptive Federated
    Optimization" (ICLR 2021), Algorithm 2, in float64 with the paper's initial moments:

        m_0 = 0,  v_0 = tau^2
        m_t = beta1 m_{t-1} + (1 - beta1) d_t
        v_t = beta2 v_{t-1} + (1 - beta2) d_t^2                        (FedAdam)
        v_t = v_{t-1} - (1 - beta2) d_t^2 sign(v_{t-1} - d_t^2)        (FedYogi)
        x_t = x_{t-1} + lr m_t / (sqrt(v_t) + tau)
    """
    lr, beta1, beta2, tau = (ADAPTIVE_OPT[k] for k in ("lr", "beta1", "beta2", "tau"))
    result = []
    for coordinate, x0 in enumerate(ADAPTIVE_X0):
        x, m, v = x0, 0.0, tau**2
        for delta in ADAPTIVE_DELTAS[:steps]:
            d = delta[coordinate]
            m = beta1 * m + (1 - beta1) * d
            if kind is ServerOptimizerKind.FEDADAM:
                v = beta2 * v + (1 - beta2) * d * d
            else:
                v = v - (1 - beta2) * d * d * float(np.sign(v - d * d))
            x = x + lr * m / (math.sqrt(v) + tau)
        result.append((x, m, v))
    return result


@pytest.mark.parametrize(
    ("kind", "first", "third"),
    [
        pytest.param(
            ServerOptimizerKind.FEDADAM,
            # m1 = 0.1 d1; v1 = 0.99 tau^2 + 0.01 d1^2; x1 = x0 + 0.5 m1 / (sqrt(v1) + tau)
            [(0.495025244, 0.1, 0.01000099), (0.509899049, -0.05, 0.00250099)],
            [(0.71172444, -0.1145, 0.0498267203), (-0.75459002, -0.0855, 0.0049262203)],
            id="fedadam",
        ),
        pytest.param(
            ServerOptimizerKind.FEDYOGI,
            # m1 = 0.1 d1; v1 = tau^2 + 0.01 d1^2 (d1^2 > tau^2); x1 as for FedAdam
            [(0.495024999, 0.1, 0.010001), (0.50990001, -0.05, 0.002501)],
            [(0.710930995, -0.1145, 0.049976), (-0.748505356, -0.0855, 0.005001)],
            id="fedyogi",
        ),
    ],
)
def test_adaptive_optimizers_follow_the_papers_update_step_by_step(
    kind: ServerOptimizerKind,
    first: list[tuple[float, float, float]],
    third: list[tuple[float, float, float]],
) -> None:
    """FedAdam and FedYogi give the params and moments of the paper's update rule after each of
    three steps (to float32 precision), including Yogi's shrinking second moment."""
    # The hand computation, checked against the figures listed with each case.
    np.testing.assert_allclose(adaptive_by_hand(kind, 1), first, rtol=1e-8)
    np.testing.assert_allclose(adaptive_by_hand(kind, 3), third, rtol=1e-8)
    opt = ServerOptimizer(kind, **ADAPTIVE_OPT)  # type: ignore[arg-type]
    params, state = arrays(w=list(ADAPTIVE_X0)), ServerOptimizerState()
    for step, delta in enumerate(ADAPTIVE_DELTAS, start=1):
        params, state = server_step(params, arrays(w=list(delta)), state, opt)
        x, m, v = (list(column) for column in zip(*adaptive_by_hand(kind, step), strict=True))
        np.testing.assert_allclose(params["w"], x, rtol=2e-6, err_msg=f"x after step {step}")
        np.testing.assert_allclose(state.m["w"], m, rtol=2e-6, err_msg=f"m after step {step}")
        np.testing.assert_allclose(state.v["w"], v, rtol=2e-6, err_msg=f"v after step {step}")
        assert state.step == step


@pytest.mark.parametrize("kind", ADAPTIVE)
@PROPERTY
@given(layout=model_shapes(), data=st.data())
def test_adaptive_optimizers_keep_one_moment_per_tensor(
    kind: ServerOptimizerKind, layout: dict[str, tuple[int, ...]], data: st.DataObject
) -> None:
    """m and v name every tensor, with its shape, as float32, and the step count grows."""
    params = data.draw(params_like(layout))
    state = ServerOptimizerState()
    for step in (1, 2):
        params, state = server_step(
            params, data.draw(params_like(layout)), state, ServerOptimizer(kind)
        )
        assert state.step == step
        for moments in (state.m, state.v):
            assert {n: t.shape for n, t in moments.items()} == layout
            assert all(t.dtype == np.float32 for t in moments.values())
        assert all(np.all(v > 0) for v in state.v.values())


@pytest.mark.parametrize(
    "kind",
    [pytest.param(kind, id=kind.value) for kind in ServerOptimizerKind],
)
@PROPERTY
@given(layout=model_shapes(), data=st.data())
def test_server_step_never_mutates_params_delta_or_state(
    kind: ServerOptimizerKind, layout: dict[str, tuple[int, ...]], data: st.DataObject
) -> None:
    """params, delta and the optimizer state are unchanged after a step, on its second use too."""
    params, delta = data.draw(params_like(layout)), data.draw(params_like(layout))
    opt = ServerOptimizer(kind)
    _, state = server_step(params, delta, ServerOptimizerState(), opt)
    before = copy.deepcopy((params, delta, dict(state.m), dict(state.v), state.step))
    server_step(params, delta, state, opt)
    assert_params_equal(params, before[0])
    assert_params_equal(delta, before[1])
    assert_params_equal(state.m, before[2])
    assert_params_equal(state.v, before[3])
    assert state.step == before[4]


@pytest.mark.parametrize(
    "kind",
    [pytest.param(kind, id=kind.value) for kind in ServerOptimizerKind],
)
@PROPERTY
@given(layout=model_shapes(), lr=st.sampled_from([1.0, 0.5]), data=st.data())
def test_server_step_into_the_delta_equals_the_step_into_new_arrays(
    kind: ServerOptimizerKind, layout: dict[str, tuple[int, ...]], lr: float, data: st.DataObject
) -> None:
    """reuse_delta writes the same params, bit for bit, into the delta's own arrays."""
    params, delta = data.draw(params_like(layout)), data.draw(params_like(layout))
    opt = ServerOptimizer(kind, lr=lr)
    _, state = server_step(params, delta, ServerOptimizerState(), opt)
    expected, expected_state = server_step(params, delta, state, opt)
    given_up = {name: np.array(t, dtype=np.float32) for name, t in delta.items()}
    got, got_state = server_step(params, given_up, state, opt, reuse_delta=True)
    assert_params_equal(got, expected)
    assert all(got[name] is given_up[name] for name in got)
    assert_params_equal(got_state.m, expected_state.m)
    assert_params_equal(got_state.v, expected_state.v)


def test_server_step_into_a_read_only_delta_is_refused() -> None:
    params = arrays(w=[1.0, 2.0])
    frozen = arrays(w=[0.5, 0.5])
    frozen["w"].flags.writeable = False
    with pytest.raises(ValueError, match="writeable float32"):
        server_step(params, frozen, ServerOptimizerState(), ServerOptimizer(), reuse_delta=True)


# -- fold_step: the weighted sum and the plain server step in one pass

FOLD_POLICIES = [
    Compression(),
    Compression(quantization=Quantization.FP16),
    Compression(top_k=0.1, quantization=Quantization.INT8),
    Compression(top_k=0.01, quantization=Quantization.FP16),
]


def decoded_buffer(
    layout: dict[str, tuple[int, ...]], count: int, seed: int
) -> list[dict[str, Any]]:
    """``count`` deltas of the layout, each under another compression policy, decoded."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        raw = {n: rng.standard_normal(s).astype(np.float32) for n, s in layout.items()}
        tensors = compress(raw, FOLD_POLICIES[i % len(FOLD_POLICIES)]).tensors
        out.append({t.name: decode_tensor(t, layout[t.name]) for t in tensors})
    return out


@pytest.mark.parametrize("lr", [1.0, 0.7])
@pytest.mark.parametrize("count", [1, 4])
def test_fold_step_equals_the_sum_then_the_step_bit_for_bit(count: int, lr: float) -> None:
    """Across block boundaries and every compression: the same version, norm and finiteness."""
    layout = {"conv": (3, BLOCK + 17), "fc": (5, 7), "bias": (2,), "empty": (0,)}
    rng = np.random.default_rng(3)
    params = {n: rng.standard_normal(s).astype(np.float32) for n, s in layout.items()}
    deltas = decoded_buffer(layout, count, seed=count)
    coefficients = [0.4, -0.25, 1.0, 0.125][:count]
    aggregate = decoded_sum(deltas, coefficients, layout)
    expected_norm = global_norm(aggregate)
    expected, _ = server_step(params, aggregate, ServerOptimizerState(), ServerOptimizer(lr=lr))
    got, norm, finite = fold_step(params, deltas, coefficients, lr)
    assert_params_equal(got, expected)
    assert norm == expected_norm
    assert finite


# A large tensor whose last block is short, one of COMPILED_MIN entries and two small ones: in a
# model this large, dense float32 buffers of up to four take one compiled call per tensor.
DENSE_LAYOUT = {"conv": (2, BLOCK + 9), "fc": (COMPILED_MIN,), "small": (3, 5), "bias": (7,)}


FP16 = Compression(quantization=Quantization.FP16)


@pytest.mark.parametrize("lr", [1.0, -0.3])
@pytest.mark.parametrize("count", [1, 2, 3, 4, 5])
@pytest.mark.parametrize(
    ("policies", "first"),
    [
        pytest.param([Compression()], 1.0, id="float32"),
        pytest.param([FP16], 0.37, id="float16"),
        pytest.param([FP16, Compression()], 1e-40, id="mixed-subnormal-factor"),
        pytest.param([Compression(), FP16], 2e5, id="mixed-factor-past-float16-bias"),
    ],
)
def test_fold_step_of_dense_updates_equals_the_sum_then_the_step_bit_for_bit(
    count: int, lr: float, policies: list[Compression], first: float
) -> None:
    """Dense float32 and float16 buffers of every size up to a compiled group and past it: the
    same version, the same norm (global_norm of the sum) and finiteness as the separate steps,
    whatever the factor (1 takes numpy's add without a product; a float16 factor beyond
    2**-112 * float32's range is applied in two products, as numpy's path does)."""
    rng = np.random.default_rng(count)
    params = {n: rng.standard_normal(s).astype(np.float32) for n, s in DENSE_LAYOUT.items()}
    deltas = []
    for i in range(count):
        raw = {n: rng.standard_normal(s).astype(np.float32) for n, s in DENSE_LAYOUT.items()}
        tensors = compress(raw, policies[i % len(policies)]).tensors
        deltas.append({t.name: decode_tensor(t, DENSE_LAYOUT[t.name]) for t in tensors})
    coefficients = [float(c) for c in rng.normal(size=count)]
    coefficients[0] = first
    aggregate = decoded_sum(deltas, coefficients, DENSE_LAYOUT)
    expected, _ = server_step(params, aggregate, ServerOptimizerState(), ServerOptimizer(lr=lr))
    got, norm, finite = fold_step(params, deltas, coefficients, lr)
    assert_params_equal(got, expected)
    assert norm == global_norm(aggregate)
    # Small tensors' squares are BLAS's float32 dot: a relative error near 1e-7.
    assert norm == pytest.approx(
        math.sqrt(sum(float(np.sum(a.astype(np.float64) ** 2)) for a in aggregate.values())),
        rel=1e-6,
    )
    assert finite


@pytest.mark.parametrize("name", ["conv", "fc", "small"])
@pytest.mark.parametrize("bad", ["overflow", "infinite step"])
def test_fold_step_of_dense_updates_says_when_the_new_version_is_not_finite(
    name: str, bad: str
) -> None:
    """One entry past float32's range, in any tensor of a compiled model, or a step that
    overflows: the fold says so."""
    params = {n: np.ones(s, np.float32) for n, s in DENSE_LAYOUT.items()}
    raw = {n: np.zeros(s, np.float32) for n, s in DENSE_LAYOUT.items()}
    where = np.unravel_index(params[name].size - 1, DENSE_LAYOUT[name])
    raw[name][where] = 3e38
    if bad == "infinite step":
        params[name][where] = 3e38
    tensors = compress(raw, Compression()).tensors
    delta = {t.name: decode_tensor(t, DENSE_LAYOUT[t.name]) for t in tensors}
    coefficients = [4.0] if bad == "overflow" else [1.0]
    _, _, finite = fold_step(params, [delta], coefficients, 1.0)
    assert not finite


def test_fold_step_and_decoded_sum_write_into_out_when_given() -> None:
    """Into the caller's arrays, whatever they held, with the same result as into new ones."""
    layout = {"conv": (3, BLOCK + 17), "fc": (5, 7), "empty": (0,)}
    rng = np.random.default_rng(4)
    params = {n: rng.standard_normal(s).astype(np.float32) for n, s in layout.items()}
    deltas = decoded_buffer(layout, 3, seed=5)
    coefficients = [0.5, 0.25, -0.125]
    expected, expected_norm, _ = fold_step(params, deltas, coefficients, 0.7)
    out = {n: np.full(s, np.nan, dtype=np.float32) for n, s in layout.items()}
    got, norm, finite = fold_step(params, deltas, coefficients, 0.7, out=out)
    assert all(got[n] is out[n] for n in layout)
    assert_params_equal(got, expected)
    assert (norm, finite) == (expected_norm, True)
    out = {n: np.full(s, np.nan, dtype=np.float32) for n, s in layout.items()}
    total = decoded_sum(deltas, coefficients, layout, out=out)
    assert all(total[n] is out[n] for n in layout)
    assert_params_equal(total, decoded_sum(deltas, coefficients, layout))


@pytest.mark.parametrize(
    ("out", "match"),
    [
        pytest.param({"w": np.empty(4, np.float32)}, "other tensors", id="other-tensors"),
        pytest.param({"v": np.empty(3, np.float32)}, "not float32", id="wrong-shape"),
        pytest.param({"v": np.empty(4, np.float64)}, "not float32", id="wrong-dtype"),
        pytest.param({"v": np.empty(8, np.float32)[::2]}, "C-contiguous", id="strided"),
        pytest.param({"v": np.frombuffer(bytes(16), np.float32)}, "writeable", id="read-only"),
    ],
)
def test_fold_step_refuses_an_out_that_does_not_fit(out: Arrays, match: str) -> None:
    params = arrays(v=[1.0, 2.0, 3.0, 4.0])
    deltas = decoded_buffer({"v": (4,)}, 1, seed=0)
    with pytest.raises(ValueError, match=match):
        fold_step(params, deltas, [1.0], 1.0, out=out)


def test_fold_step_never_writes_over_the_version_it_folds_from() -> None:
    """out sharing memory with params is refused: that version may be published or held."""
    params = {"v": np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)}
    deltas = decoded_buffer({"v": (4,)}, 1, seed=0)
    with pytest.raises(ValueError, match="shares memory"):
        fold_step(params, deltas, [1.0], 1.0, out={"v": params["v"]})
    np.testing.assert_array_equal(params["v"], [1.0, 2.0, 3.0, 4.0])


def test_fold_step_says_when_the_new_version_is_not_finite() -> None:
    """Finite updates whose sum overflows float32 give a non-finite version: flagged, not hidden."""
    layout = {"w": (4,)}
    params = arrays(w=[3e38, 0.0, 0.0, 0.0])
    deltas = decoded_buffer(layout, 1, seed=0)
    big = {"w": deltas[0]["w"]._replace(values=np.full(4, 3e38, np.float32))}
    _, _, finite = fold_step(params, [big], [1.0], 1.0)
    assert not finite


def test_fold_step_refuses_deltas_of_another_model() -> None:
    deltas = decoded_buffer({"w": (4,)}, 1, seed=0)
    with pytest.raises(ValueError, match="other tensors"):
        fold_step(arrays(v=[1.0, 2.0, 3.0, 4.0]), deltas, [1.0], 1.0)
    with pytest.raises(ValueError, match="finite"):
        fold_step(arrays(w=[1.0, 2.0, 3.0, 4.0]), deltas, [math.nan], 1.0)


# -- the rule as the aggregator runs it
#
# AggregatorCore folds a buffer under the mean rule with fold_step (the plain server step) or with
# decoded_sum and then server_step (the other optimizers): on the deltas as it decoded them, with
# the coefficients buffer_weights gives times each update's clip scale. Under a robust rule it
# takes robust_buffer_aggregate of the deltas densified. The properties stated above for the
# reference buffer_aggregate hold for what those return, to float32 rounding.

ReceivedBuffer = tuple[list[Received], list[int], list[int]]
EPS32 = float(np.finfo(np.float32).eps)
CLIP_SCALES = st.one_of(st.just(1.0), st.floats(min_value=0.01, max_value=1.0))
# Finite float32 values, with some so close to its largest that two of them overflow.
NEAR_OVERFLOW = st.one_of(FINITE, st.sampled_from([3.0e38, -3.0e38, 2.0e38, -1.7e38]))


def layout_of(delta: Arrays) -> dict[str, tuple[int, ...]]:
    return {name: t.shape for name, t in delta.items()}


def step_atol(params: Arrays, deltas: list[Arrays], lr: float) -> float:
    """float32_atol of the pseudo-gradient times lr, plus the rounding of adding it to params."""
    largest = max(float(np.max(np.abs(t), initial=0.0)) for t in params.values())
    return lr * float32_atol(deltas) + 4 * EPS32 * max(largest, 1.0)


def norm_atol(deltas: list[Arrays]) -> float:
    """What float32_atol per entry can shift the L2 norm of a delta by."""
    return math.sqrt(sum(t.size for t in deltas[0].values())) * float32_atol(deltas)


def pseudo_gradient(
    decoded: list[dict[str, DecodedTensor]], coefficients: list[float]
) -> tuple[Arrays, float, bool]:
    """fold_step from zero weights at lr 1: exactly the pseudo-gradient it adds to a version."""
    zeros = {name: np.zeros(t.shape, np.float32) for name, t in decoded[0].items()}
    return fold_step(zeros, decoded, coefficients, 1.0)


@PROPERTY
@given(
    buffer=received_buffers(),
    policy=staleness_policies(),
    beta=EXPONENTS,
    lr=LEARNING_RATES,
    data=st.data(),
)
def test_fold_step_is_the_staleness_weighted_mean_of_the_received_deltas(
    buffer: ReceivedBuffer, policy: StalenessPolicy, beta: float, lr: float, data: st.DataObject
) -> None:
    """The version the aggregator folds is x + lr * buffer_aggregate of the deltas it decoded,
    each scaled by its clip, and the norm it records is that aggregate's."""
    updates, num_samples, stalenesses = buffer
    scales = data.draw(st.lists(CLIP_SCALES, min_size=len(updates), max_size=len(updates)))
    params = data.draw(params_like(layout_of(updates[0].dense)))
    weights = buffer_weights(num_samples, stalenesses, policy, beta)
    coefficients = [w * scale for w, scale in zip(weights, scales, strict=True)]
    got, norm, finite = fold_step(params, [r.decoded for r in updates], coefficients, lr)
    clipped = [
        {name: t.astype(np.float64) * scale for name, t in r.dense.items()}
        for r, scale in zip(updates, scales, strict=True)
    ]
    aggregate, reference_weights = buffer_aggregate(clipped, num_samples, stalenesses, policy, beta)
    expected, _ = server_step(params, aggregate, ServerOptimizerState(), ServerOptimizer(lr=lr))
    dense = [r.dense for r in updates]
    assert_params_close(got, expected, atol=step_atol(params, dense, lr))
    assert norm == pytest.approx(global_norm(aggregate), rel=1e-5, abs=norm_atol(dense))
    assert finite
    assert weights == reference_weights


@PROPERTY
@given(buffer=received_buffers(), policy=staleness_policies(), beta=EXPONENTS)
def test_decoded_sum_is_the_staleness_weighted_mean_of_the_received_deltas(
    buffer: ReceivedBuffer, policy: StalenessPolicy, beta: float
) -> None:
    """The pseudo-gradient the aggregator hands FedAvgM, FedAdam and FedYogi is buffer_aggregate's,
    and bit for bit the one fold_step adds under the plain server step."""
    updates, num_samples, stalenesses = buffer
    decoded, dense = [r.decoded for r in updates], [r.dense for r in updates]
    coefficients = buffer_weights(num_samples, stalenesses, policy, beta)
    total = decoded_sum(decoded, coefficients, layout_of(dense[0]))
    aggregate, _ = buffer_aggregate(dense, num_samples, stalenesses, policy, beta)
    assert_params_close(total, aggregate, atol=float32_atol(dense))
    assert_params_equal(total, pseudo_gradient(decoded, coefficients)[0])


@PROPERTY
@given(buffer=received_buffers(), policy=staleness_policies(), beta=EXPONENTS, data=st.data())
def test_fold_step_does_not_depend_on_the_order_of_the_buffer(
    buffer: ReceivedBuffer, policy: StalenessPolicy, beta: float, data: st.DataObject
) -> None:
    """The same updates folded in any order give the same pseudo-gradient and norm."""
    updates, num_samples, stalenesses = buffer
    order = data.draw(st.permutations(range(len(updates))))
    folded, norm, _ = pseudo_gradient(
        [r.decoded for r in updates], buffer_weights(num_samples, stalenesses, policy, beta)
    )
    permuted, permuted_norm, _ = pseudo_gradient(
        [updates[i].decoded for i in order],
        buffer_weights(
            [num_samples[i] for i in order], [stalenesses[i] for i in order], policy, beta
        ),
    )
    dense = [r.dense for r in updates]
    assert_params_close(permuted, folded, atol=float32_atol(dense))
    assert permuted_norm == pytest.approx(norm, rel=1e-5, abs=norm_atol(dense))


@PROPERTY
@given(
    delta=model_shapes().flatmap(params_like),
    sent_as=compressions(),
    num_samples=st.lists(st.integers(1, 1000), min_size=1, max_size=6),
    policy=staleness_policies(),
    beta=EXPONENTS,
)
def test_fold_step_of_identical_fresh_updates_is_that_update(
    delta: Arrays,
    sent_as: Compression,
    num_samples: list[int],
    policy: StalenessPolicy,
    beta: float,
) -> None:
    """Fresh copies of one delta, whatever their sample counts, fold to that delta: the
    coefficients of a fresh buffer sum to one."""
    update = received(delta, sent_as)
    coefficients = buffer_weights(num_samples, [0] * len(num_samples), policy, beta)
    folded, _, _ = pseudo_gradient([update.decoded] * len(num_samples), coefficients)
    assert math.isclose(math.fsum(coefficients), 1.0, rel_tol=1e-12)
    assert_params_close(folded, update.dense, atol=float32_atol([update.dense] * len(num_samples)))


@PROPERTY
@given(buffer=received_buffers(), policy=staleness_policies(), scale=st.integers(1, 1000))
def test_fold_step_is_invariant_to_scaling_every_sample_count(
    buffer: ReceivedBuffer, policy: StalenessPolicy, scale: int
) -> None:
    """Multiplying every sample count by the same factor does not change the fold."""
    updates, num_samples, stalenesses = buffer
    decoded = [r.decoded for r in updates]
    folded, _, _ = pseudo_gradient(decoded, buffer_weights(num_samples, stalenesses, policy, 1.0))
    scaled, _, _ = pseudo_gradient(
        decoded, buffer_weights([n * scale for n in num_samples], stalenesses, policy, 1.0)
    )
    assert_params_close(scaled, folded, atol=float32_atol([r.dense for r in updates]))


@PROPERTY
@given(buffer=received_buffers(), policy=staleness_policies(), lr=LEARNING_RATES, data=st.data())
def test_synchronous_fedavg_folds_the_sample_weighted_mean(
    buffer: ReceivedBuffer, policy: StalenessPolicy, lr: float, data: st.DataObject
) -> None:
    """Every update fresh and beta = 1 (buffer_size = nodes, max_staleness = 0): FedAvg's
    x + lr * sum(n_i * delta_i) / sum(n_i), whatever the staleness function."""
    updates, num_samples, _ = buffer
    dense = [r.dense for r in updates]
    params = data.draw(params_like(layout_of(dense[0])))
    coefficients = buffer_weights(num_samples, [0] * len(updates), policy, 1.0)
    got, _, _ = fold_step(params, [r.decoded for r in updates], coefficients, lr)
    mean = weighted_average(dense, [float(n) for n in num_samples])
    expected = {name: params[name] + lr * mean[name].astype(np.float64) for name in params}
    assert_params_close(got, expected, atol=step_atol(params, dense, lr))


@PROPERTY
@given(buffer=received_buffers(), policy=staleness_policies())
def test_beta_zero_with_fresh_updates_folds_the_plain_mean(
    buffer: ReceivedBuffer, policy: StalenessPolicy
) -> None:
    """With beta = 0 and no staleness every hospital counts equally: the fold is the mean."""
    updates, num_samples, _ = buffer
    dense = [r.dense for r in updates]
    folded, _, _ = pseudo_gradient(
        [r.decoded for r in updates],
        buffer_weights(num_samples, [0] * len(updates), policy, 0.0),
    )
    expected = {
        name: np.mean([d[name].astype(np.float64) for d in dense], axis=0) for name in dense[0]
    }
    assert_params_close(folded, expected, atol=float32_atol(dense))


@PROPERTY
@given(
    delta=model_shapes().flatmap(params_like),
    sent_as=compressions(),
    num_samples=st.integers(1, 10_000),
    staleness=st.integers(0, 100),
    policy=staleness_policies(),
    beta=EXPONENTS,
    lr=LEARNING_RATES,
    data=st.data(),
)
def test_fedasync_folds_params_plus_lr_times_f_of_s_times_the_delta(
    *,
    delta: Arrays,
    sent_as: Compression,
    num_samples: int,
    staleness: int,
    policy: StalenessPolicy,
    beta: float,
    lr: float,
    data: st.DataObject,
) -> None:
    """K = 1 folds x + lr * f(s) * delta whatever the sample count: the discount stays."""
    update = received(delta, sent_as)
    params = data.draw(params_like(layout_of(delta)))
    coefficients = buffer_weights([num_samples], [staleness], policy, beta)
    got, norm, finite = fold_step(params, [update.decoded], coefficients, lr)
    factor = policy.factor(staleness)
    expected = {
        name: params[name] + lr * factor * update.dense[name].astype(np.float64) for name in params
    }
    assert_params_close(got, expected, atol=step_atol(params, [update.dense], lr))
    assert norm == pytest.approx(
        factor * global_norm(update.dense), rel=1e-5, abs=norm_atol([update.dense])
    )
    assert finite


@PROPERTY
@given(
    delta=model_shapes().flatmap(params_like),
    sent_as=compressions(),
    num_samples=st.lists(st.integers(1, 1000), min_size=1, max_size=5),
    policy=staleness_policies(),
    beta=EXPONENTS,
    data=st.data(),
)
def test_a_staler_buffer_never_moves_the_model_further(
    *,
    delta: Arrays,
    sent_as: Compression,
    num_samples: list[int],
    policy: StalenessPolicy,
    beta: float,
    data: st.DataObject,
) -> None:
    """Updates in one direction from staler bases make a step no longer than from fresher ones:
    the staleness discount of the fold is monotone."""
    count = len(num_samples)
    stalenesses = data.draw(st.lists(st.integers(0, 50), min_size=count, max_size=count))
    extra = data.draw(st.lists(st.integers(0, 50), min_size=count, max_size=count))
    update = received(delta, sent_as)
    _, fresher, _ = pseudo_gradient(
        [update.decoded] * count, buffer_weights(num_samples, stalenesses, policy, beta)
    )
    staler_by = [s + e for s, e in zip(stalenesses, extra, strict=True)]
    _, staler, _ = pseudo_gradient(
        [update.decoded] * count, buffer_weights(num_samples, staler_by, policy, beta)
    )
    assert staler <= fresher * (1 + 1e-5)


@PROPERTY
@given(
    layout=model_shapes(),
    count=st.integers(1, 3),
    lr=st.sampled_from([1.0, 0.5, 2.0]),
    data=st.data(),
)
def test_fold_step_says_exactly_when_the_new_version_is_not_finite(
    layout: dict[str, tuple[int, ...]], count: int, lr: float, data: st.DataObject
) -> None:
    """Near float32's largest value, the flag the aggregator discards a batch on is False exactly
    when a weight of the new version is not finite: a non-finite version is never published."""

    def near_overflow() -> Arrays:
        return data.draw(
            st.fixed_dictionaries(
                {
                    name: hnp.arrays(np.float32, shape, elements=NEAR_OVERFLOW, fill=st.nothing())
                    for name, shape in layout.items()
                }
            )
        )

    params = near_overflow()
    decoded = [received(near_overflow(), Compression()).decoded for _ in range(count)]
    coefficients = data.draw(
        st.lists(st.floats(min_value=0, max_value=1), min_size=count, max_size=count)
    )
    got, _, finite = fold_step(params, decoded, coefficients, lr)
    assert finite == all(bool(np.isfinite(t).all()) for t in got.values())


@PROPERTY
@given(
    size=st.sampled_from([0, 1, 100, 1023, 1024, 4095, 4096, 5000]),
    dtype=st.sampled_from([np.float16, np.float32, np.float64]),
    magnitude=st.sampled_from([1.0, 1e4, 1e20]),
    bad=st.sampled_from([None, math.nan, math.inf, -math.inf]),
    seed=st.integers(0, 2**32 - 1),
)
def test_the_finiteness_check_of_the_fold_path_is_numpys_at_every_size(
    size: int, dtype: type[np.floating[Any]], magnitude: float, bad: float | None, seed: int
) -> None:
    """all_finite, which judges the weights the other optimizers step to, agrees with
    np.isfinite on every path it takes: float16 bit patterns, one dot product, the exact scan."""
    rng = np.random.default_rng(seed)
    with np.errstate(over="ignore"):
        values = (rng.standard_normal(size) * magnitude).astype(dtype)
    if bad is not None and size:
        values[rng.integers(size)] = bad
    assert all_finite(values) == bool(np.isfinite(values).all())


@pytest.mark.parametrize(
    "rule",
    [
        pytest.param(AggregationRule.MEDIAN, id="median"),
        pytest.param(AggregationRule.TRIMMED_MEAN, id="trimmed-mean"),
    ],
)
@PROPERTY
@given(
    buffer=received_buffers(),
    policy=staleness_policies(),
    trim=st.floats(min_value=0, max_value=0.49),
)
def test_the_robust_fold_stays_within_the_discounted_deltas(
    rule: AggregationRule, buffer: ReceivedBuffer, policy: StalenessPolicy, trim: float
) -> None:
    """Under the median or the trimmed mean the aggregator folds the statistic of the decoded
    f(s_i) * delta_i: each coordinate between their smallest and largest, weights f(s_i) / K."""
    updates, _, stalenesses = buffer
    got, weights = robust_buffer_aggregate(
        [densify(r.decoded) for r in updates], stalenesses, policy, rule, trim
    )
    dense = [r.dense for r in updates]
    expected, expected_weights = robust_buffer_aggregate(dense, stalenesses, policy, rule, trim)
    assert_params_close(got, expected, atol=float32_atol(dense))
    assert weights == expected_weights
    tolerance = float32_atol(dense)
    for name, value in got.items():
        discounted = np.stack(
            [
                policy.factor(s) * d[name].astype(np.float64)
                for d, s in zip(dense, stalenesses, strict=True)
            ]
        )
        assert np.all(value >= discounted.min(axis=0) - tolerance)
        assert np.all(value <= discounted.max(axis=0) + tolerance)


@settings(max_examples=6, deadline=None)
@given(
    extra=st.integers(-2, 40),
    sent_as=st.lists(compressions(), min_size=1, max_size=4),
    seed=st.integers(0, 2**32 - 1),
    policy=staleness_policies(),
    lr=LEARNING_RATES,
)
def test_fold_step_across_a_block_boundary_is_the_staleness_weighted_mean(
    extra: int, sent_as: list[Compression], seed: int, policy: StalenessPolicy, lr: float
) -> None:
    """A tensor just short of, at or past one block folds like a small one: the reference rule."""
    layout = {"conv": (BLOCK + extra,), "bias": (3,)}
    rng = np.random.default_rng(seed)
    updates = [
        received({n: rng.standard_normal(s).astype(np.float32) for n, s in layout.items()}, p)
        for p in sent_as
    ]
    params = {n: rng.standard_normal(s).astype(np.float32) for n, s in layout.items()}
    num_samples = [int(n) for n in rng.integers(1, 1000, len(sent_as))]
    stalenesses = [int(s) for s in rng.integers(0, 20, len(sent_as))]
    coefficients = buffer_weights(num_samples, stalenesses, policy, 1.0)
    got, norm, finite = fold_step(params, [r.decoded for r in updates], coefficients, lr)
    dense = [r.dense for r in updates]
    aggregate, _ = buffer_aggregate(dense, num_samples, stalenesses, policy, 1.0)
    expected, _ = server_step(params, aggregate, ServerOptimizerState(), ServerOptimizer(lr=lr))
    assert_params_close(got, expected, atol=step_atol(params, dense, lr))
    assert norm == pytest.approx(global_norm(aggregate), rel=1e-5, abs=norm_atol(dense))
    assert finite


@PROPERTY
@given(params=model_shapes().flatmap(params_like))
def test_global_norm_matches_numpy(params: Arrays) -> None:
    """The L2 norm of all tensors together equals numpy's norm of their concatenation."""
    flat = np.concatenate([t.ravel().astype(np.float64) for t in params.values()])
    assert global_norm(params) == pytest.approx(float(np.linalg.norm(flat)), rel=1e-5, abs=1e-6)


def test_global_norm_of_large_finite_tensors_is_finite() -> None:
    """Any finite float32 tensor has a finite norm: squares are summed beyond float32's range."""
    params = arrays(w=[3e19, 4e19], b=[0.0])
    assert global_norm(params) == pytest.approx(5e19, rel=1e-6)
