"""Specification of a regional aggregator's combine rule and of staleness across two levels."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from aggregator.aggregation import StalenessPolicy
from aggregator.combine import Combination, combine, combined_update_id, regional_stalenesses
from aggregator.core import AggregatorCore, BufferedUpdate, Fold
from common.compression import dense_tensor
from common.messages import (
    AggregatorState,
    Compression,
    Knobs,
    Quantization,
    StalenessKind,
    TrainMetrics,
    Update,
)

RUN = "run-1"
PARAMS = {
    "w": np.array([[0.1, 0.2, 0.3], [-0.1, -0.2, -0.3]], dtype=np.float32),
    "b": np.array([0.5, -0.5], dtype=np.float32),
}
SHAPES = {name: p.shape for name, p in PARAMS.items()}
POLICY = StalenessPolicy(StalenessKind.POLYNOMIAL, a=0.5)
Arrays = Mapping[str, np.ndarray]


def delta_of(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.normal(0, 0.1, s).astype(np.float32) for n, s in SHAPES.items()}


def hospital_update(uid: str, base: int, samples: int, seed: int) -> Update:
    return Update(
        update_id=uid,
        run_id=RUN,
        base_version=base,
        num_samples=samples,
        metrics=TrainMetrics(loss=0.1 * samples, accuracy=0.5, seconds=1.0),
        delta=tuple(dense_tensor(n, a) for n, a in delta_of(seed).items()),
    )


def validated(version: int, updates: list[tuple[str, Update]], **knobs: object) -> AggregatorCore:
    """A core at ``version`` that has validated and buffered ``updates`` (node, update)."""
    core = AggregatorCore(
        run_id=RUN,
        params=PARAMS,
        knobs=Knobs(buffer_size=len(updates), **knobs),
        version=version,
        state=AggregatorState.RUNNING,
    )
    for node, update in updates:
        assert core.receive(node, node, update, 100, now=1.0).accepted
    return core


def combined(
    buffer: tuple[BufferedUpdate, ...],
    reports: list[TrainMetrics] | None = None,
    *,
    region: str = "eu",
    compression: Compression | None = None,
    policy: StalenessPolicy = POLICY,
    sample_exponent: float = 1.0,
) -> Combination:
    return combine(
        buffer,
        reports or [TrainMetrics(loss=0.5, accuracy=0.5, seconds=1.0)] * len(buffer),
        region=region,
        run_id=RUN,
        shapes=SHAPES,
        policy=policy,
        sample_exponent=sample_exponent,
        compression=compression or Compression(),
    )


EU = [
    ("cleveland", hospital_update("c1", base=5, samples=10, seed=1)),
    ("hungarian", hospital_update("h1", base=4, samples=20, seed=2)),
    ("va", hospital_update("v1", base=3, samples=30, seed=3)),
]


def test_regional_staleness_is_measured_against_the_newest_base_in_the_buffer() -> None:
    """The newest base counts 0; an older one counts the versions between it and the newest."""
    assert regional_stalenesses([5, 4, 3, 5]) == [0, 1, 2, 0]
    with pytest.raises(ValueError, match="at least one"):
        regional_stalenesses([])


def test_the_combined_update_has_the_newest_base_and_the_summed_sample_count() -> None:
    """The core sees the region as one node with its hospitals' samples, trained from ``B``."""
    result = combined(validated(6, EU).buffer)
    assert result.update.base_version == 5
    assert result.update.num_samples == 60
    assert result.constituents == ("c1", "h1", "v1")
    assert result.stalenesses == (0, 1, 2)


def test_fresh_constituents_combine_to_their_sample_weighted_mean() -> None:
    """With every update on the same base and beta = 1, the combination is FedAvg's mean."""
    same_base = [(n, u.model_copy(update={"base_version": 5})) for n, u in EU]
    result = combined(validated(5, same_base).buffer)
    expected = {
        name: sum(u.num_samples * delta_of(i + 1)[name] for i, (_, u) in enumerate(EU)) / 60
        for name in SHAPES
    }
    for name, array in result.delta_arrays.items():
        np.testing.assert_allclose(array, expected[name], rtol=1e-5, atol=1e-7)


def test_an_older_base_is_discounted_by_its_regional_staleness() -> None:
    """A constituent ``r`` versions behind the newest counts ``a_i * f(r) / sum(a)``."""
    result = combined(validated(6, EU).buffer)
    expected = [n * POLICY.factor(r) / 60 for n, r in zip((10, 20, 30), (0, 1, 2), strict=True)]
    assert result.coefficients == pytest.approx(expected)


def test_the_core_folds_each_hospital_with_both_levels_discounts() -> None:
    """Folded at core version ``t``, hospital ``i`` moves the model by
    ``n_i * f(B - b_i) * f(t - B) / N`` times its delta: the core accepts the combined update
    as any node's, through its ordinary validation."""
    result = combined(validated(6, EU).buffer)
    core = AggregatorCore(
        run_id=RUN,
        params=PARAMS,
        knobs=Knobs(buffer_size=1),
        version=7,
        state=AggregatorState.RUNNING,
    )
    verdict = core.receive("region-eu", "region-eu", result.update, 100, now=2.0)
    assert verdict.accepted
    assert not verdict.duplicate
    fold = core.fold(now=2.0)
    assert isinstance(fold, Fold)
    core_staleness = 7 - 5
    for name in SHAPES:
        step = (
            sum(
                u.num_samples
                * POLICY.factor(5 - u.base_version)
                * POLICY.factor(core_staleness)
                * delta_of(i + 1)[name]
                for i, (_, u) in enumerate(EU)
            )
            / 60
        )
        np.testing.assert_allclose(fold.params[name] - PARAMS[name], step, rtol=1e-4, atol=1e-6)
    again = core.receive("region-eu", "region-eu", result.update, 100, now=3.0)
    assert again.accepted
    assert again.duplicate


@given(
    regional=st.integers(min_value=0, max_value=50),
    core=st.integers(min_value=0, max_value=50),
    a=st.floats(min_value=0.0, max_value=3.0),
)
def test_two_levels_discount_at_least_as_much_as_one(regional: int, core: int, a: float) -> None:
    """``f(r) * f(S) <= f(r + S)`` for the polynomial rule, and equality for the constant one."""
    poly = StalenessPolicy(StalenessKind.POLYNOMIAL, a=a)
    assert poly.factor(regional) * poly.factor(core) <= poly.factor(regional + core) * (1 + 1e-12)
    constant = StalenessPolicy(StalenessKind.CONSTANT)
    assert constant.factor(regional) * constant.factor(core) == constant.factor(regional + core)


def test_combining_again_gives_the_same_id_and_bytes() -> None:
    """After a crash the same constituents make the same update, which the core recognises."""
    first = combined(validated(6, EU).buffer)
    second = combined(validated(6, EU).buffer)
    assert first.update == second.update


@pytest.mark.parametrize(
    ("region", "ids", "other_region", "other_ids"),
    [
        pytest.param("eu", ["a", "b"], "us", ["a", "b"], id="region"),
        pytest.param("eu", ["a", "b"], "eu", ["b", "a"], id="order"),
        pytest.param("eu", ["a", "b"], "eu", ["a", "b", "c"], id="constituents"),
    ],
)
def test_the_combined_id_names_its_region_and_constituents(
    region: str, ids: list[str], other_region: str, other_ids: list[str]
) -> None:
    """Two different combinations never share an id; the id is a valid update id."""
    mine = combined_update_id(region, ids)
    assert mine != combined_update_id(other_region, other_ids)
    assert mine.startswith(f"{region}.")
    Update.model_validate(hospital_update("x", 0, 1, 0).model_dump() | {"update_id": mine})


def test_a_long_region_name_still_gives_a_valid_id() -> None:
    """Ids are at most 64 characters whatever the region is called."""
    uid = combined_update_id("r" * 64, ["a"])
    assert len(uid) <= 64
    Update.model_validate(hospital_update("x", 0, 1, 0).model_dump() | {"update_id": uid})


def test_the_combined_update_is_compressed_as_the_run_asks() -> None:
    """Under a top-k policy the core refuses a dense update, so the region compresses too."""
    policy = Compression(top_k=0.5, quantization=Quantization.FP16)
    buffer = validated(6, EU).buffer
    result = combined(buffer, compression=policy)
    core = AggregatorCore(
        run_id=RUN,
        params=PARAMS,
        knobs=Knobs(buffer_size=1, compression=policy),
        version=6,
        state=AggregatorState.RUNNING,
    )
    assert core.receive("region-eu", "region-eu", result.update, 100, now=1.0).accepted
    assert all(t.values_dtype == "float16" for t in result.update.delta)


def test_metrics_are_the_constituents_weighted_by_their_share() -> None:
    """Loss and accuracy are weighted as the deltas are; the time is the slowest hospital's."""
    reports = [
        TrainMetrics(loss=1.0, accuracy=0.2, seconds=1.0),
        TrainMetrics(loss=2.0, accuracy=0.4, seconds=3.0),
        TrainMetrics(loss=3.0, accuracy=0.6, seconds=2.0),
    ]
    same_base = [(n, u.model_copy(update={"base_version": 5})) for n, u in EU]
    result = combined(validated(5, same_base).buffer, reports)
    assert result.update.metrics.loss == pytest.approx((10 * 1 + 20 * 2 + 30 * 3) / 60)
    assert result.update.metrics.accuracy == pytest.approx((10 * 0.2 + 20 * 0.4 + 30 * 0.6) / 60)
    assert result.update.metrics.seconds == 3.0


def test_a_report_per_update_is_required() -> None:
    """A caller's mismatch is a bug, refused before anything is computed."""
    with pytest.raises(ValueError, match="one training report"):
        combined(validated(6, EU).buffer, [TrainMetrics(loss=0.5, accuracy=0.5, seconds=1.0)])
