"""Specification of folding: decoded update tensors added into the aggregator's accumulators."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.fold import (
    COMPILED_MIN,
    accumulate,
    fold,
    fold_block,
    fold_blocks,
    squared_norm,
    step_block,
)
from common.compression import compress, decode_tensor
from common.messages import CompressedTensor, Compression, Quantization
from tests.common.test_compression import (
    EPS32,
    FP16,
    HOSTILE,
    INT8,
    SHAPE,
    sent,
    sent_positions,
)
from tests.strategies import compressions, deltas, long_vectors

WEIGHTS = st.one_of(st.just(0.0), st.just(1.0), st.floats(1e-6, 4), st.floats(-4, -1e-6))


@given(delta=deltas(), policy=compressions(), weight=WEIGHTS)
def test_accumulate_adds_weight_times_the_decompressed_tensor(
    delta: dict[str, Any], policy: Compression, weight: float
) -> None:
    """accumulate(t, out, w) == out + w * decompress(t), in float32 and float64 accumulators."""
    for tensor in compress(delta, policy).tensors:
        dense = sent(tensor).astype(np.float64)
        for dtype in (np.float32, np.float64):
            start = np.linspace(-1, 1, tensor.size, dtype=dtype).reshape(tensor.shape)
            out = start.copy()
            accumulate(tensor, out, weight)
            expected = start + weight * dense
            # decompress rounds to float32, so its part of the sum is only float32-exact.
            tolerance = 4 * np.finfo(dtype).eps * np.abs(start) + 4 * EPS32 * np.abs(weight * dense)
            assert np.all(np.abs(out - expected) <= tolerance)


@given(delta=deltas(), policy=compressions(), weight=WEIGHTS)
def test_fold_with_replace_writes_weight_times_the_decompressed_tensor(
    delta: dict[str, Any], policy: Compression, weight: float
) -> None:
    """fold(..., replace=True) overwrites whatever the accumulator held, zeros where unsent."""
    for tensor in compress(delta, policy).tensors:
        for dtype in (np.float32, np.float64):
            expected = np.zeros(tensor.shape, dtype=dtype)
            accumulate(tensor, expected, weight)
            out = np.full(tensor.shape, np.nan, dtype=dtype)  # garbage, as np.empty may hold
            fold(decode_tensor(tensor, tensor.shape), out, weight, replace=True)
            np.testing.assert_array_equal(out, expected)


def test_fold_with_replace_overwrites_large_tensors_block_by_block() -> None:
    """Past one fold block, every setting's replace equals adding into zeros, bit for bit."""
    rng = np.random.default_rng(11)
    vector = rng.standard_normal(300_001).astype(np.float32)
    for policy in (Compression(), FP16, INT8,
                   Compression(top_k=0.3, quantization=Quantization.INT8)):  # fmt: skip
        (tensor,) = compress({"v": vector}, policy).tensors
        decoded = decode_tensor(tensor, vector.shape)
        for weight in (1.0, -0.37):
            expected = np.zeros(vector.size, np.float32)
            fold(decoded, expected, weight)
            out = np.full(vector.size, np.inf, np.float32)
            fold(decoded, out, weight, replace=True)
            np.testing.assert_array_equal(out, expected)


@given(vector=long_vectors(), policy=compressions(), cut=st.floats(0, 1), replace=st.booleans())
def test_folding_block_by_block_equals_folding_the_whole_tensor(
    vector: np.ndarray, policy: Compression, cut: float, replace: bool
) -> None:
    """Any split of the flat tensor into two blocks folds to the same sums, bit for bit."""
    (tensor,) = compress({"v": vector}, policy).tensors
    decoded = decode_tensor(tensor, vector.shape)
    start = np.linspace(-1, 1, vector.size, dtype=np.float32)
    whole = start.copy()
    fold(decoded, whole, -0.75, replace=replace)
    blocks = start.copy()
    middle = round(cut * vector.size)
    fold_block(decoded, blocks[:middle], -0.75, 0, replace=replace)
    fold_block(decoded, blocks[middle:], -0.75, middle, replace=replace)
    np.testing.assert_array_equal(blocks, whole)


# A tensor of two compiled blocks and a short one; each delta of a buffer under one of these.
COMPILED_SIZE = 2 * COMPILED_MIN + 3
BUFFER_POLICIES = [Compression(), Compression(), FP16, Compression(), Compression(), Compression(),
                   Compression(), INT8, Compression(top_k=0.3), Compression()]  # fmt: skip


# No deadline: the first example compiles the loops (seconds), the others take milliseconds.
@settings(deadline=None, max_examples=30)
@given(
    count=st.integers(1, len(BUFFER_POLICIES)),
    seed=st.integers(0, 2**32 - 1),
    ones=st.sets(st.integers(0, len(BUFFER_POLICIES) - 1)),
)
def test_fold_blocks_equals_folding_each_tensor_in_turn_bit_for_bit(
    count: int, seed: int, ones: set[int]
) -> None:
    """Runs of dense float32 tensors, compiled into one pass, sum as fold_block does them one
    after the other (the first replacing), around the other settings and at weight 1."""
    rng = np.random.default_rng(seed)
    decoded = []
    for policy in BUFFER_POLICIES[:count]:
        vector = rng.standard_normal(COMPILED_SIZE).astype(np.float32)
        (tensor,) = compress({"v": vector}, policy).tensors
        decoded.append(decode_tensor(tensor, vector.shape))
    weights = [1.0 if i in ones else float(w) for i, w in enumerate(rng.normal(size=count))]
    for start, stop in ((0, COMPILED_MIN), (COMPILED_MIN, 2 * COMPILED_MIN),
                        (2 * COMPILED_MIN, COMPILED_SIZE), (0, COMPILED_SIZE)):  # fmt: skip
        got = np.full(stop - start, np.nan, np.float32)
        fold_blocks(decoded, got, weights, start)
        expected = np.full(stop - start, np.nan, np.float32)
        for i, (d, w) in enumerate(zip(decoded, weights, strict=True)):
            fold_block(d, expected, w, start, replace=i == 0)
        np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("size", [5, COMPILED_SIZE])
@pytest.mark.parametrize("lr", [1.0, 0.3, -2.0])
def test_step_block_is_numpys_product_and_sum(size: int, lr: float) -> None:
    """step_block writes old + lr * block as numpy's float32 multiply and add do, compiled or
    not, and says that the result is finite."""
    rng = np.random.default_rng(5)
    block, old = rng.standard_normal((2, size)).astype(np.float32)
    expected = block.copy()
    if lr != 1.0:
        np.multiply(expected, np.float32(lr), out=expected)
    np.add(expected, old, out=expected)
    assert step_block(block, old, lr)
    np.testing.assert_array_equal(block.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("size", [5, COMPILED_SIZE])
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan, "overflow"])
def test_step_block_says_when_a_new_weight_is_not_finite(size: int, bad: float | str) -> None:
    """An infinity, a NaN, or a sum of finite values past float32's range, anywhere."""
    for where in (0, size // 2, size - 1):
        block, old = np.ones(size, np.float32), np.ones(size, np.float32)
        if bad == "overflow":
            block[where] = old[where] = np.float32(3e38)
        else:
            block[where] = bad
        with np.errstate(over="ignore", invalid="ignore"):
            assert not step_block(block, old, 1.0)


def test_fold_blocks_refuses_a_block_outside_a_tensor_of_the_run() -> None:
    (tensor,) = compress({"v": np.ones(COMPILED_MIN, np.float32)}, Compression()).tensors
    decoded = decode_tensor(tensor, (COMPILED_MIN,))
    with pytest.raises(ValueError, match="outside"):
        fold_blocks([decoded, decoded], np.zeros(COMPILED_MIN, np.float32), [1.0, 1.0], 1)
    with pytest.raises(ValueError, match="one weight per tensor"):
        fold_blocks([decoded], np.zeros(COMPILED_MIN, np.float32), [1.0, 2.0], 0)


def test_a_block_outside_the_tensor_is_refused() -> None:
    (tensor,) = compress({"v": np.ones(10, np.float32)}, Compression()).tensors
    decoded = decode_tensor(tensor, (10,))
    with pytest.raises(ValueError, match="outside"):
        fold_block(decoded, np.zeros(4, np.float32), 1.0, 8)
    with pytest.raises(ValueError, match="one-dimensional"):
        fold_block(decoded, np.zeros((2, 2), np.float32), 1.0, 0)


@given(vector=long_vectors(), policy=compressions())
def test_a_sparse_tensor_folds_only_into_its_own_entries(
    vector: np.ndarray, policy: Compression
) -> None:
    """Entries that were not sent keep their exact accumulator value."""
    (tensor,) = compress({"v": vector}, policy).tensors
    out = np.full(vector.size, 0.25, np.float32)
    accumulate(tensor, out, 2.0)
    untouched = np.ones(vector.size, dtype=bool)
    untouched[sent_positions(tensor)] = False
    assert np.all(out[untouched] == 0.25)


@given(delta=deltas(), policy=compressions())
def test_squared_norm_is_the_decoded_tensors(delta: dict[str, Any], policy: Compression) -> None:
    """squared_norm(decode_tensor(t)) equals the squared L2 norm of decompress(t)."""
    for tensor in compress(delta, policy).tensors:
        dense = sent(tensor).astype(np.float64)
        expected = float(np.sum(dense * dense))
        got = squared_norm(decode_tensor(tensor, tensor.shape))
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-30)


def test_large_tensors_fold_block_by_block_like_small_ones() -> None:
    """Tensors longer than one fold block give the same sums as a plain numpy expression."""
    rng = np.random.default_rng(7)
    vector = rng.standard_normal(300_001).astype(np.float32)
    for quantization in Quantization:
        for top_k in (None, 0.3):
            policy = Compression(top_k=top_k, quantization=quantization)
            (tensor,) = compress({"v": vector}, policy).tensors
            out = np.ones(vector.size, np.float32)
            accumulate(tensor, out, -0.5)
            np.testing.assert_allclose(out, 1 - 0.5 * sent(tensor), rtol=1e-6, atol=1e-7)


def test_a_weight_too_large_for_the_float16_shortcut_still_folds_exactly() -> None:
    """Folding float16 values with a huge weight takes two multiplications instead of one."""
    (tensor,) = compress({"v": np.array([1.0, -2.0, 2.0**-20], np.float32)}, FP16).tensors
    out = np.zeros(3, np.float32)
    accumulate(tensor, out, 2.0**20)
    np.testing.assert_array_equal(out, [2.0**20, -(2.0**21), 1.0])


@pytest.mark.parametrize(
    ("out", "weight", "message"),
    [
        pytest.param(np.zeros(3, np.float16), 1.0, "float32 or float64", id="float16-out"),
        pytest.param(np.zeros(4, np.float32), 1.0, "does not fit", id="wrong-shape"),
        pytest.param(np.zeros(6, np.float32)[::2], 1.0, "C-contiguous", id="strided"),
        pytest.param(np.zeros(3, np.float32), math.inf, "overflows", id="infinite-weight"),
        pytest.param(np.zeros(3, np.float32), 1e39, "overflows", id="weight-beyond-float32"),
    ],
)
def test_fold_refuses_an_accumulator_it_cannot_add_into(
    out: np.ndarray, weight: float, message: str
) -> None:
    """The accumulator must be a contiguous float32/float64 array of the tensor's shape."""
    (tensor,) = compress({"v": np.ones(3, np.float32)}, Compression()).tensors
    with pytest.raises(ValueError, match=message):
        fold(decode_tensor(tensor, (3,)), out, weight)


@pytest.mark.parametrize(("tensor", "error", "message", "structural"), HOSTILE)
def test_accumulate_refuses_each_hostile_payload_and_leaves_the_sum_untouched(
    tensor: CompressedTensor, error: type[Exception], message: str, structural: bool
) -> None:
    """accumulate refuses what the decoder refuses, before it adds anything."""
    del structural
    out = np.ones(SHAPE, np.float32)
    with pytest.raises(error, match=message):
        accumulate(tensor, out, 1.0)
    assert np.all(out == 1.0)


def test_the_compiled_loops_run_uncached_where_numba_cannot_write_a_cache(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A hardened install (read-only package, no home) makes numba refuse cache=True at
    decoration; the kernels' module must then load and compile in memory, not fail to import."""
    import numba

    from aggregator import fold_kernels

    real = numba.njit

    def refusing(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("cache"):
            raise RuntimeError("cannot cache function 'probe': no locator available")
        return real(*args, **kwargs)

    monkeypatch.setattr(numba, "njit", refusing)
    with caplog.at_level("INFO", logger="aggregator.fold_kernels"):
        assert fold_kernels._disk_cache_available() is False
    assert "NUMBA_CACHE_DIR" in caplog.text
    monkeypatch.setattr(numba, "njit", real)
    assert fold_kernels._disk_cache_available() is True
