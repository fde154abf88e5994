"""Specification of the Dirichlet label-skew partition: a seeded, covering, disjoint split."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edge_node.datasets import DatasetError
from edge_node.datasets._partition import dirichlet_partition

label_arrays = hnp.arrays(
    np.int64, st.integers(min_value=8, max_value=300), elements=st.integers(0, 3)
)


@settings(deadline=None)
@given(
    labels=label_arrays,
    parts=st.integers(1, 8),
    alpha=st.floats(0.05, 100.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_parts_are_sorted_disjoint_and_cover_every_index(
    labels: np.ndarray, parts: int, alpha: float, seed: int
) -> None:
    """Every index lands in exactly one part, and each part is sorted int64."""
    # No floor: a part may be empty, so that every draw is accepted and only the cut is tested.
    result, draws = dirichlet_partition(labels, parts, alpha=alpha, seed=seed, min_samples=0)
    assert len(result) == parts
    assert draws == 1
    for part in result:
        assert part.dtype == np.int64
        assert np.array_equal(part, np.sort(part))
    assert np.array_equal(np.sort(np.concatenate(result)), np.arange(len(labels)))


@settings(deadline=None)
@given(labels=label_arrays, seed=st.integers(0, 2**32 - 1))
def test_every_part_reaches_the_floor(labels: np.ndarray, seed: int) -> None:
    """With min_samples set, no part holds fewer indices than the floor."""
    floor = len(labels) // 8
    result, _ = dirichlet_partition(labels, 4, alpha=0.5, seed=seed, min_samples=floor)
    assert min(len(part) for part in result) >= floor


def test_same_seed_gives_the_same_partition_and_another_seed_another() -> None:
    """The partition is a function of labels, parts, alpha and seed."""
    labels = np.repeat(np.arange(2, dtype=np.int64), 500)
    first, _ = dirichlet_partition(labels, 8, alpha=0.5, seed=3, min_samples=20)
    again, _ = dirichlet_partition(labels, 8, alpha=0.5, seed=3, min_samples=20)
    other, _ = dirichlet_partition(labels, 8, alpha=0.5, seed=4, min_samples=20)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_small_alpha_skews_labels_and_large_alpha_evens_them() -> None:
    """Class shares spread far apart at alpha 0.1 and stay near the global share at alpha 1000."""
    labels = np.repeat(np.arange(2, dtype=np.int64), 2000)

    def spread(alpha: float) -> float:
        parts, _ = dirichlet_partition(labels, 8, alpha=alpha, seed=0, min_samples=1)
        shares = [float(labels[part].mean()) for part in parts]
        return max(shares) - min(shares)

    assert spread(0.1) > 0.5
    assert spread(1000.0) < 0.1


@pytest.mark.parametrize(
    ("parts", "alpha", "min_samples", "message"),
    [
        pytest.param(0, 0.5, 0, "at least one part", id="no-parts"),
        pytest.param(4, 0.0, 0, "alpha must be positive", id="zero-alpha"),
        pytest.param(4, float("nan"), 0, "alpha must be positive", id="nan-alpha"),
        pytest.param(4, 0.5, -1, "must not be negative", id="negative-floor"),
        pytest.param(4, 0.5, 26, "cannot give 4 parts at least 26", id="floor-too-high"),
    ],
)
def test_impossible_requests_are_refused(
    parts: int, alpha: float, min_samples: int, message: str
) -> None:
    """Bad arguments raise DatasetError naming the problem instead of looping or misbehaving."""
    labels = np.zeros(100, dtype=np.int64)
    with pytest.raises(DatasetError, match=message):
        dirichlet_partition(labels, parts, alpha=alpha, seed=0, min_samples=min_samples)


def test_a_floor_no_draw_meets_gives_up_with_a_reason() -> None:
    """A feasible but improbable floor ends in DatasetError after MAX_DRAWS draws."""
    labels = np.zeros(100, dtype=np.int64)
    with pytest.raises(DatasetError, match="no Dirichlet"):
        dirichlet_partition(labels, 4, alpha=0.01, seed=0, min_samples=25)
