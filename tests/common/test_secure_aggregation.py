"""Specification of secure aggregation's maths: the field, masks, sharing and unmasking."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from aggregator.aggregation import StalenessPolicy, buffer_weights
from common.errors import DecodeError
from common.secure_aggregation import (
    PRIME,
    ClipViolation,
    FieldVector,
    InconsistentAnswers,
    QuantizationPlan,
    RandomBytes,
    SharingScheme,
    dequantize,
    from_bytes,
    integer_weights,
    mask,
    mask_update,
    quantize,
    random_elements,
    reconstruct,
    share,
    to_bytes,
    unmask_sum,
    weighted_sum,
)
from common.secure_aggregation.sharing import _lagrange_row

PLAN = QuantizationPlan()


def seeded_bytes(seed: int) -> RandomBytes:
    """A reproducible stand-in for os.urandom, so that the statistical tests are deterministic."""
    rng = np.random.default_rng(seed)
    return rng.bytes


def run_protocol(
    deltas: list[np.ndarray],
    coefficients: list[float],
    scheme: SharingScheme,
    answering: tuple[int, ...],
    seed: int,
) -> np.ndarray:
    """Every node masks and shares its delta; the ``answering`` holders each return the weighted
    sum of the shares they hold; the aggregator unmasks. Returns what the aggregator gets."""
    rng = np.random.default_rng(seed)
    random_bytes = seeded_bytes(seed + 1)
    updates = [
        mask_update(delta, PLAN, scheme, rng=rng, random_bytes=random_bytes) for delta in deltas
    ]
    weights, scale = integer_weights(coefficients, PLAN.weight_levels)
    answers = {
        j: weighted_sum([update.shares[j] for update in updates], weights) for j in answering
    }
    masked = [update.masked for update in updates]
    return unmask_sum(masked, weights, answers, plan=PLAN, scheme=scheme, scale=scale)


# -- the field


def test_quantization_plan_keeps_the_largest_sum_inside_the_field() -> None:
    """max_terms updates at +clip with the largest weight sum to at most (p - 1) / 2."""
    assert PLAN.max_terms * PLAN.weight_levels * PLAN.levels <= (PRIME - 1) // 2
    assert PLAN.levels == 65_535


def test_quantization_plan_refuses_a_plan_with_no_room() -> None:
    """A plan whose terms times weights exceed the field leaves no level: it is refused."""
    with pytest.raises(ValueError, match="no room"):
        QuantizationPlan(max_terms=2**16, weight_levels=2**16)


@given(
    values=hnp.arrays(np.float64, st.integers(1, 50), elements=st.floats(-10, 10, allow_nan=False)),
    seed=st.integers(0, 2**32 - 1),
)
def test_quantize_then_dequantize_is_within_one_level_of_the_clipped_value(
    values: np.ndarray, seed: int
) -> None:
    """Each coordinate comes back clipped to [-c, c] and off by less than one level."""
    quantized = quantize(values, PLAN, np.random.default_rng(seed))
    assert quantized.dtype == np.int64
    assert np.all((quantized >= 0) & (quantized < PRIME))
    back = dequantize(quantized, PLAN)
    clipped = np.clip(values, -PLAN.clip, PLAN.clip)
    assert np.all(np.abs(back - clipped) <= PLAN.resolution + 1e-12)


def test_stochastic_rounding_is_unbiased() -> None:
    """A value between two levels rounds up as often as its distance from the lower one says."""
    value = 0.3 * PLAN.resolution
    rounded = dequantize(quantize(np.full(40_000, value), PLAN, np.random.default_rng(1)), PLAN)
    assert abs(rounded.mean() - value) < 0.02 * PLAN.resolution


def test_quantize_refuses_non_finite_values() -> None:
    """NaN and infinity have no field element."""
    with pytest.raises(ValueError, match="non-finite"):
        quantize(np.array([0.0, np.nan]), PLAN, np.random.default_rng(0))


@given(coefficients=st.lists(st.floats(1e-6, 1e3), min_size=1, max_size=16))
def test_integer_weights_approximate_the_coefficients_within_half_a_step(
    coefficients: list[float],
) -> None:
    """ω_i · scale is within scale / 2 of each coefficient (or is the floor 1), ω_i in [1, W]."""
    weights, scale = integer_weights(coefficients, PLAN.weight_levels)
    assert all(1 <= w <= PLAN.weight_levels for w in weights)
    for weight, coefficient in zip(weights, coefficients, strict=True):
        assert weight == 1 or abs(weight * scale - coefficient) <= scale / 2 * (1 + 1e-9)
    assert max(weights) == PLAN.weight_levels


@pytest.mark.parametrize("bad", [[], [0.0], [-1.0], [math.inf]], ids=str)
def test_integer_weights_refuse_a_weight_that_is_not_positive(bad: list[float]) -> None:
    """Every update in a sum needs a positive weight for its mask to cancel."""
    with pytest.raises(ValueError, match="coefficient"):
        integer_weights(bad, 16)


def test_field_vectors_round_trip_through_bytes() -> None:
    """Four little-endian bytes per element, and back."""
    vector = random_elements(1000, seeded_bytes(0))
    data = to_bytes(vector)
    assert len(data) == 4000
    assert np.array_equal(from_bytes(data, 1000), vector)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\x00" * 7, id="short"),
        pytest.param(b"\x00" * 12, id="long"),
        pytest.param(b"\x00" * 4 + b"\xff\xff\xff\x7f", id="the-prime-itself"),
        pytest.param(b"\xff" * 8, id="above-the-prime"),
    ],
)
def test_from_bytes_refuses_what_is_not_field_elements(data: bytes) -> None:
    """A wrong length or an element >= p from the network is a decode error."""
    with pytest.raises(DecodeError):
        from_bytes(data, 2)


def test_random_elements_redraw_the_one_value_equal_to_the_prime() -> None:
    """All-ones 31-bit draws are p itself: they are drawn again, not kept or reduced to 0."""
    draws = iter([b"\xff\xff\xff\x7f" * 3, b"\x05\x00\x00\x00" * 3])
    vector = random_elements(3, lambda n: next(draws)[:n])
    assert vector.tolist() == [5, 5, 5]


# -- masks hide the update


def test_a_masked_update_is_uniform_whatever_the_update() -> None:
    """Masked vectors of the two most different updates (all +c, all -c) both pass a
    chi-square test of uniformity over 64 bins, and no threshold on a masked value tells their
    coordinates apart better than chance."""
    size = 64_000
    rng = np.random.default_rng(7)
    masked = {}
    for sign in (+1.0, -1.0):
        quantized = quantize(np.full(size, sign * PLAN.clip), PLAN, rng)
        masked[sign] = mask(quantized, random_elements(size, seeded_bytes(int(sign) + 10)))
    critical = 101.9  # chi-square, 63 degrees of freedom, p = 0.001
    for vector in masked.values():
        counts = np.bincount((vector * 64) // PRIME, minlength=64)
        expected = size / 64
        assert float(((counts - expected) ** 2 / expected).sum()) < critical
    # The best a reader of one coordinate can do is guess the sign from where y falls.
    for threshold in np.linspace(0, PRIME, 17)[1:-1]:
        says_positive = np.concatenate([masked[+1.0] < threshold, masked[-1.0] >= threshold])
        accuracy = float(says_positive.mean())
        assert abs(accuracy - 0.5) < 0.01, threshold


def test_masked_values_do_not_correlate_with_the_update() -> None:
    """Across coordinates of a varied update, the masked value's correlation with the update is
    what two independent samples give (|r| < 4 / sqrt(n))."""
    size = 50_000
    delta = np.random.default_rng(3).normal(0, 1, size)
    quantized = quantize(delta, PLAN, np.random.default_rng(4))
    masked = mask(quantized, random_elements(size, seeded_bytes(5)))
    centred = np.where(masked > PRIME // 2, masked - PRIME, masked).astype(np.float64)
    assert abs(np.corrcoef(delta, centred)[0, 1]) < 4 / math.sqrt(size)
    assert abs(np.corrcoef(delta, masked.astype(np.float64))[0, 1]) < 4 / math.sqrt(size)


# -- sharing

SCHEMES = [
    pytest.param(SharingScheme(holders=2, privacy=1), id="N2-T1-U2"),
    pytest.param(SharingScheme(holders=4, privacy=1), id="N4-T1-U3"),
    pytest.param(SharingScheme(holders=3, privacy=2), id="N3-T2-U3-shamir"),
    pytest.param(SharingScheme(holders=4, privacy=2), id="N4-T2-U4"),
    pytest.param(SharingScheme(holders=5, privacy=1, recovery=4), id="N5-T1-U4"),
    pytest.param(SharingScheme(holders=8, privacy=1), id="N8-T1-U5"),
    pytest.param(SharingScheme(holders=8, privacy=2), id="N8-T2-U6"),
]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_any_threshold_of_holders_rebuild_the_secret(scheme: SharingScheme) -> None:
    """Every subset of U holders, and every larger one, rebuilds the mask exactly."""
    secret = random_elements(101, seeded_bytes(1))
    shares = share(secret, scheme, seeded_bytes(2))
    assert all(s.shape == (scheme.share_length(101),) for s in shares)
    for size in range(scheme.threshold, scheme.holders + 1):
        for subset in itertools.combinations(range(scheme.holders), size):
            rebuilt = reconstruct({j: shares[j] for j in subset}, scheme, secret.size)
            assert np.array_equal(rebuilt, secret), subset


@pytest.mark.parametrize("scheme", SCHEMES)
def test_fewer_than_the_threshold_cannot_rebuild(scheme: SharingScheme) -> None:
    """U - 1 answers are refused, not guessed from."""
    shares = share(random_elements(10, seeded_bytes(1)), scheme, seeded_bytes(2))
    with pytest.raises(ValueError, match="needed"):
        reconstruct(dict(enumerate(shares[: scheme.threshold - 1])), scheme, 10)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_any_privacy_many_shares_are_explained_by_every_secret(scheme: SharingScheme) -> None:
    """For T shares of one mask and any other candidate mask, exactly one choice of the random
    chunks produces those same T shares: the T colluders cannot tell which mask was shared."""
    size = 24
    shares = share(random_elements(size, seeded_bytes(1)), scheme, seeded_bytes(2))
    candidate = random_elements(size, seeded_bytes(3))
    length = scheme.share_length(size)
    padded = np.zeros(length * scheme.chunks, dtype=np.int64)
    padded[:size] = candidate
    colluders = list(range(scheme.privacy))
    # The polynomial through the candidate's chunks (points 1..m) and the colluders' shares.
    points = [*range(1, scheme.chunks + 1), *(scheme.holder_point(j) for j in colluders)]
    values = [*padded.reshape(scheme.chunks, length), *(shares[j] for j in colluders)]

    def at(x: int) -> FieldVector:
        total = np.zeros(length, dtype=np.int64)
        for c, v in zip(_lagrange_row(points, x), values, strict=True):
            total = (total + v * c) % PRIME
        return total

    random_chunks = [at(x) for x in range(scheme.chunks + 1, scheme.threshold + 1)]
    forged = share_with_chunks(candidate, random_chunks, scheme)
    for j in colluders:
        assert np.array_equal(forged[j], shares[j])
    assert np.array_equal(reconstruct(dict(enumerate(forged)), scheme, size), candidate)


def share_with_chunks(
    secret: FieldVector, random_chunks: list[FieldVector], scheme: SharingScheme
) -> list[FieldVector]:
    """``share`` with its random chunks given: the random source replays them."""
    stream = iter([chunk.astype("<u4").tobytes() for chunk in random_chunks])
    return share(secret, scheme, lambda _: next(stream))


def test_one_share_is_uniform_whatever_the_secret() -> None:
    """With T = 1, one holder's share of an all-zero mask and of an all-(p-1) mask both pass a
    chi-square test of uniformity."""
    scheme = SharingScheme(holders=4, privacy=1)
    critical = 101.9  # chi-square, 63 degrees of freedom, p = 0.001
    for value in (0, PRIME - 1):
        secret = np.full(40_000, value, dtype=np.int64)
        holder = share(secret, scheme, seeded_bytes(value % 1000))[0]
        counts = np.bincount((holder * 64) // PRIME, minlength=64)
        expected = holder.size / 64
        assert float(((counts - expected) ** 2 / expected).sum()) < critical


def test_a_wrong_answer_beyond_the_threshold_is_detected() -> None:
    """With more than U answers, one that is off by one element is caught, not folded."""
    scheme = SharingScheme(holders=4, privacy=1)
    shares = share(random_elements(9, seeded_bytes(1)), scheme, seeded_bytes(2))
    answers = dict(enumerate(shares))
    answers[3] = answers[3].copy()
    answers[3][0] = (answers[3][0] + 1) % PRIME
    with pytest.raises(InconsistentAnswers, match="holder 3"):
        reconstruct(answers, scheme, 9)


@pytest.mark.parametrize(
    ("holders", "privacy", "recovery", "message"),
    [
        pytest.param(1, 1, None, "at least 2", id="one-holder"),
        pytest.param(4, 1, 2, "two different sums", id="minority-recovery"),
        pytest.param(5, 1, 3, "two different sums", id="bare-majority-with-a-colluder"),
        pytest.param(8, 2, 5, "two different sums", id="bare-majority-with-two-colluders"),
        pytest.param(4, 4, None, "privacy < recovery", id="privacy-not-below-recovery"),
        pytest.param(4, 1, 5, "recovery <= holders", id="recovery-above-holders"),
        pytest.param(4, 0, None, "privacy", id="no-privacy"),
    ],
)
def test_a_scheme_that_could_leak_a_mask_is_refused(
    holders: int, privacy: int, recovery: int | None, message: str
) -> None:
    """Recovery must exceed (holders + privacy) / 2 and privacy: otherwise two sets of holders,
    helped by the colluders, could each release a different sum of one mask, or the colluders
    could rebuild it."""
    with pytest.raises(ValueError, match=message):
        SharingScheme(holders=holders, privacy=privacy, recovery=recovery)


# -- the whole protocol


@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    nodes=st.integers(2, 6),
    size=st.integers(1, 40),
    seed=st.integers(0, 2**31),
)
def test_the_unmasked_sum_is_the_plaintext_weighted_sum_within_quantization_error(
    data: st.DataObject, nodes: int, size: int, seed: int
) -> None:
    """Whatever the deltas, staleness weights and the U holders that answer, the aggregator
    gets Σ w_i Δ_i within one level per update plus the integer weights' rounding."""
    deltas = [
        data.draw(hnp.arrays(np.float64, size, elements=st.floats(-3.9, 3.9))) for _ in range(nodes)
    ]
    samples = data.draw(st.lists(st.integers(1, 500), min_size=nodes, max_size=nodes))
    staleness = data.draw(st.lists(st.integers(0, 20), min_size=nodes, max_size=nodes))
    coefficients = buffer_weights(samples, staleness, StalenessPolicy(), 1.0)
    holders = max(nodes, 2)
    scheme = SharingScheme(holders=holders, privacy=data.draw(st.integers(1, holders - 1)))
    answering = tuple(
        sorted(
            data.draw(
                st.lists(
                    st.integers(0, holders - 1),
                    min_size=scheme.threshold,
                    max_size=holders,
                    unique=True,
                )
            )
        )
    )
    got = run_protocol(deltas, coefficients, scheme, answering, seed)
    expected = sum(c * d for c, d in zip(coefficients, deltas, strict=True))
    weights, scale = integer_weights(coefficients, PLAN.weight_levels)
    weight_error = sum(abs(w * scale - c) for w, c in zip(weights, coefficients, strict=True))
    bound = scale * sum(weights) * PLAN.resolution + weight_error * PLAN.clip + 1e-9
    assert np.all(np.abs(got - expected) <= bound)


def test_a_contributor_that_drops_out_after_sending_still_unmasks() -> None:
    """The sender of one update answers nothing: the other holders rebuild its mask too."""
    scheme = SharingScheme(holders=4, privacy=1)
    deltas = [np.full(28, v) for v in (0.1, -0.2, 0.3)]
    got = run_protocol(deltas, [1.0, 1.0, 1.0], scheme, answering=(1, 2, 3), seed=0)
    assert np.allclose(got, 0.2, atol=3 * PLAN.resolution)


def test_unmask_refuses_a_sum_that_could_wrap_around() -> None:
    """More terms than the plan allows could wrap: refused before any arithmetic."""
    scheme = SharingScheme(holders=2, privacy=1)
    vector = random_elements(3, seeded_bytes(0))
    small = QuantizationPlan(max_terms=2)
    with pytest.raises(ValueError, match="wrap"):
        unmask_sum([vector] * 3, [1, 1, 1], {0: vector, 1: vector}, plan=small, scheme=scheme)


def test_a_contributor_that_did_not_clip_is_caught_at_unmasking() -> None:
    """A node masks values far beyond ±clip (here ten times the clip, as integers): the
    unmasked sum leaves what clipped updates can reach, and the fold is refused."""
    scheme = SharingScheme(holders=4, privacy=1)
    honest = mask_update(
        np.full(5, 1.0),
        PLAN,
        scheme,
        rng=np.random.default_rng(0),
        random_bytes=seeded_bytes(1),
    )
    cheat_mask = random_elements(5, seeded_bytes(2))
    cheat = mask(np.full(5, 10 * PLAN.levels, dtype=np.int64), cheat_mask)
    cheat_shares = share(cheat_mask, scheme, seeded_bytes(3))
    answers = {j: weighted_sum([honest.shares[j], cheat_shares[j]], [1, 1]) for j in range(3)}
    with pytest.raises(ClipViolation, match="did not clip"):
        unmask_sum([honest.masked, cheat], [1, 1], answers, plan=PLAN, scheme=scheme)
