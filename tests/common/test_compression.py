"""Specification of delta compression: what is sent, what is fed back, what a decoder refuses."""

from __future__ import annotations

import math
import re
import tracemalloc
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from common.codec import decode_record, encode_record
from common.compression import compress, decode_tensor, decompress
from common.compression_policy import keep_count
from common.errors import CompressionError, DecodeError, NonFiniteValues
from common.messages import CompressedTensor, Compression, Quantization
from tests.strategies import compressions, deltas, deltas_like, long_vectors

LOSSLESS = [
    pytest.param(Compression(), id="dense"),
    pytest.param(Compression(top_k=1.0), id="top-k-1.0"),
    pytest.param(Compression(error_feedback=False), id="dense-without-feedback"),
]
FP16 = Compression(quantization=Quantization.FP16, error_feedback=False)
INT8 = Compression(quantization=Quantization.INT8, error_feedback=False)
# float16 rounds to 11 significant bits; below its smallest normal the step is 2**-24.
FP16_RELATIVE = 2.0**-11
FP16_ABSOLUTE = 2.0**-25
EPS32 = float(np.finfo(np.float32).eps)
TINY32 = float(np.finfo(np.float32).smallest_subnormal)


def sent(tensor: CompressedTensor) -> np.ndarray:
    """What the receiver gets, dense, at the tensor's own shape."""
    return decompress(tensor, tensor.shape)


def sent_positions(tensor: CompressedTensor) -> np.ndarray:
    indices = decode_tensor(tensor, tensor.shape).indices
    return np.arange(tensor.size) if indices is None else indices


def leb128(values: list[int]) -> bytes:
    """A reference LEB128 encoder, one number at a time."""
    out = bytearray()
    for value in values:
        rest = value
        while True:
            group, rest = rest & 0x7F, rest >> 7
            out.append(group | (0x80 if rest else 0))
            if not rest:
                break
    return bytes(out)


# -- what is sent ------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", LOSSLESS)
@given(delta=deltas())
def test_lossless_settings_round_trip_exactly(policy: Compression, delta: dict[str, Any]) -> None:
    """Without top-k or quantization every tensor is sent dense and decodes bit for bit."""
    result = compress(delta, policy)
    for tensor in result.tensors:
        assert tensor.index_coding == "dense"
        assert tensor.indices == b""
        decoded = sent(tensor)
        assert decoded.dtype == np.float32
        np.testing.assert_array_equal(decoded, delta[tensor.name], strict=True)
        assert np.array_equal(np.signbit(decoded), np.signbit(delta[tensor.name]))
    assert result.wire_bytes == result.raw_bytes


@given(delta=deltas())
def test_float16_error_stays_within_half_a_unit_in_the_last_place(delta: dict[str, Any]) -> None:
    """fp16 values are off by at most 2**-11 relative, or 2**-25 where float16 is subnormal."""
    for tensor in compress(delta, FP16).tensors:
        original = delta[tensor.name].astype(np.float64)
        error = np.abs(sent(tensor) - original)
        assert tensor.values_dtype == "float16"
        assert np.all(error <= FP16_RELATIVE * np.abs(original) + FP16_ABSOLUTE)


@given(delta=deltas())
def test_int8_error_stays_within_half_a_step(delta: dict[str, Any]) -> None:
    """int8 values are off by at most half the per-tensor scale (plus float32 rounding)."""
    for tensor in compress(delta, INT8).tensors:
        original = delta[tensor.name].astype(np.float64)
        assert tensor.scale is not None
        peak = float(np.max(np.abs(original))) if original.size else 0.0
        if peak > 0:
            assert tensor.scale == pytest.approx(peak / 127, rel=1e-6, abs=TINY32)
        bound = tensor.scale * (0.5 + 1e-4) + 128 * TINY32
        assert np.all(np.abs(sent(tensor) - original) <= bound)


def test_an_all_zero_tensor_quantizes_to_zeros_with_a_unit_scale() -> None:
    """int8 needs a positive scale even when there is nothing to scale."""
    (tensor,) = compress({"w": np.zeros((3, 2), np.float32)}, INT8).tensors
    assert tensor.scale == 1.0
    np.testing.assert_array_equal(sent(tensor), np.zeros((3, 2), np.float32))


def test_int8_of_float32s_largest_value_stays_a_float32() -> None:
    """peak / 127 rounds up at float32's largest value; the scale is rounded down instead, so the
    tensor is one the receiver accepts and 127 * scale does not overflow."""
    largest = float(np.finfo(np.float32).max)
    vector = np.array([largest, -largest, 1.0], np.float32)
    (tensor,) = compress({"v": vector}, INT8).tensors
    assert tensor.structural_error() is None
    assert np.all(np.isfinite(decompress(tensor, vector.shape)))


def test_float16_clips_values_beyond_its_range_and_feeds_the_excess_back() -> None:
    """A value beyond float16's range travels as its largest finite value; the rest stays behind."""
    policy = Compression(quantization=Quantization.FP16)
    delta = {"w": np.array([1e6, -1e6, 1.0], np.float32)}
    result = compress(delta, policy)
    np.testing.assert_array_equal(sent(result.tensors[0]), [65504.0, -65504.0, 1.0])
    np.testing.assert_array_equal(result.residual["w"], [1e6 - 65504, -1e6 + 65504, 0.0])


@given(vector=long_vectors(), policy=compressions(quantization=st.just(Quantization.NONE)))
def test_top_k_keeps_the_largest_magnitudes_lowest_index_first_on_ties(
    vector: np.ndarray, policy: Compression
) -> None:
    """Top-k sends ceil(top_k * n) entries: the largest magnitudes, ties to the lowest indices."""
    (tensor,) = compress({"v": vector}, policy).tensors
    k = keep_count(policy, vector.size)
    assert (
        tensor.count
        == k
        == (vector.size if policy.top_k is None else max(1, math.ceil(policy.top_k * vector.size)))
    )
    # A stable sort by descending magnitude ranks equal magnitudes by index.
    expected = np.sort(np.argsort(-np.abs(vector), kind="stable")[:k])
    np.testing.assert_array_equal(sent_positions(tensor), expected)
    kept = np.zeros(vector.size, dtype=bool)
    kept[expected] = True
    if 0 < k < vector.size:
        assert np.abs(vector[kept]).min() >= np.abs(vector[~kept]).max()
    np.testing.assert_array_equal(sent(tensor)[kept], vector[kept])
    assert not sent(tensor)[~kept].any()


@given(vector=long_vectors(), policy=compressions())
def test_index_coding_is_the_smaller_of_varints_and_a_bitmap(
    vector: np.ndarray, policy: Compression
) -> None:
    """Sparse tensors send LEB128 gaps or a bitmap, whichever is shorter; dense ones no indices."""
    (tensor,) = compress({"v": vector}, policy).tensors
    if tensor.count == vector.size:
        assert (tensor.index_coding, tensor.indices) == ("dense", b"")
        return
    positions = sent_positions(tensor)
    varints = leb128(np.diff(positions, prepend=0).tolist())
    mask = np.zeros(vector.size, dtype=bool)
    mask[positions] = True
    bitmap = np.packbits(mask).tobytes()
    assert len(tensor.indices) == min(len(varints), len(bitmap))
    assert tensor.indices == (bitmap if len(bitmap) <= len(varints) else varints)
    assert tensor.index_coding == ("bitmap" if len(bitmap) <= len(varints) else "varint")


def test_indices_far_apart_travel_as_multi_byte_varints() -> None:
    """Gaps of 128 and more take two or three varint bytes and decode back to the same positions."""
    vector = np.zeros(100_000, np.float32)
    positions = np.array([0, 127, 128, 300, 16_511, 16_512, 99_999])
    vector[positions] = np.arange(1, positions.size + 1, dtype=np.float32)
    (tensor,) = compress({"v": vector}, Compression(top_k=positions.size / vector.size)).tensors
    assert tensor.index_coding == "varint"
    assert tensor.indices == leb128(np.diff(positions, prepend=0).tolist())
    assert len(tensor.indices) > positions.size
    np.testing.assert_array_equal(sent(tensor), vector)


# -- error feedback ----------------------------------------------------------------------------


@given(delta=deltas(), policy=compressions(), data=st.data())
def test_sent_plus_residual_equals_the_accumulated_delta(
    delta: dict[str, Any], policy: Compression, data: st.DataObject
) -> None:
    """Error feedback loses nothing: decoded(sent) + new residual == delta + old residual."""
    policy = policy.model_copy(update={"error_feedback": True})
    carried = data.draw(deltas_like(delta))
    result = compress(delta, policy, carried)
    assert result.residual.keys() == delta.keys()
    for tensor in result.tensors:
        accumulated = delta[tensor.name] + carried[tensor.name]
        total = sent(tensor) + result.residual[tensor.name]
        if policy.quantization is Quantization.NONE:
            np.testing.assert_array_equal(total, accumulated)
        else:
            assert np.all(np.abs(total - accumulated) <= np.spacing(np.abs(accumulated)))


def test_what_top_k_holds_back_is_sent_later() -> None:
    """An entry too small to be sent now grows with the residual until it is sent."""
    policy = Compression(top_k=0.5)
    first = compress({"w": np.array([1.0, 0.5], np.float32)}, policy)
    np.testing.assert_array_equal(sent(first.tensors[0]), [1.0, 0.0])
    np.testing.assert_array_equal(first.residual["w"], [0.0, 0.5])
    second = compress({"w": np.array([0.0, 0.6], np.float32)}, policy, first.residual)
    np.testing.assert_allclose(sent(second.tensors[0]), [0.0, 1.1])
    np.testing.assert_array_equal(second.residual["w"], [0.0, 0.0])


@settings(max_examples=50)
@given(first=deltas(), policy=compressions(), steps=st.integers(1, 3), data=st.data())
def test_over_several_calls_everything_is_sent_or_still_carried(
    first: dict[str, Any], policy: Compression, steps: int, data: st.DataObject
) -> None:
    """Summed over calls, what was sent plus the last residual equals the sum of the deltas."""
    policy = policy.model_copy(update={"error_feedback": True})
    history = [first] + [data.draw(deltas_like(first)) for _ in range(steps)]
    residual: dict[str, np.ndarray] | None = None
    total_sent = {name: np.zeros(value.shape) for name, value in first.items()}
    for delta in history:
        result = compress(delta, policy, residual)
        for tensor in result.tensors:
            total_sent[tensor.name] += sent(tensor)
        residual = result.residual
    assert residual is not None
    for name in first:
        expected = sum(d[name].astype(np.float64) for d in history)
        scale = sum(np.abs(d[name].astype(np.float64)) for d in history)
        error = np.abs(total_sent[name] + residual[name] - expected)
        assert np.all(error <= 8 * EPS32 * scale)


def test_without_error_feedback_the_residual_is_empty_and_ignored() -> None:
    """error_feedback=False sends the delta alone and carries nothing."""
    policy = Compression(top_k=0.5, error_feedback=False)
    result = compress(
        {"w": np.array([1.0, 0.5], np.float32)}, policy, {"w": np.array([0.0, 9.0], np.float32)}
    )
    assert result.residual == {}
    np.testing.assert_array_equal(sent(result.tensors[0]), [1.0, 0.0])


@given(delta=deltas(), policy=compressions())
def test_compress_never_modifies_its_arguments(delta: dict[str, Any], policy: Compression) -> None:
    """The delta and the residual passed in are left exactly as they were."""
    residual = {name: value * np.float32(0.5) for name, value in delta.items()}
    before = {name: value.copy() for name, value in delta.items()}
    residual_before = {name: value.copy() for name, value in residual.items()}
    compress(delta, policy, residual)
    for name, value in delta.items():
        np.testing.assert_array_equal(value, before[name], strict=True)
        np.testing.assert_array_equal(residual[name], residual_before[name], strict=True)


@given(delta=deltas(), policy=compressions())
def test_byte_counts_are_dense_float32_and_the_payload(
    delta: dict[str, Any], policy: Compression
) -> None:
    """raw_bytes counts 4 bytes an entry; wire_bytes counts the index and value bytes sent."""
    result = compress(delta, policy)
    assert result.raw_bytes == 4 * sum(value.size for value in delta.values())
    assert result.wire_bytes == sum(len(t.indices) + len(t.values) for t in result.tensors)
    expected_ratio = result.raw_bytes / result.wire_bytes if result.wire_bytes else 1.0
    assert result.ratio == expected_ratio


@pytest.mark.parametrize(
    ("delta", "residual", "message"),
    [
        pytest.param({"w": np.array([1, 2])}, None, "floating point", id="integer-delta"),
        pytest.param({"w": np.array([1.0, np.nan])}, None, "NaN or infinity", id="nan-delta"),
        pytest.param(
            {"w": np.array([1.0, 2.0])}, {"w": np.zeros(3)}, "does not fit", id="residual-shape"
        ),
        pytest.param(
            {"w": np.array([1.0, 2.0])}, {"b": np.zeros(2)}, "lacks: \\['b'\\]", id="residual-name"
        ),
        pytest.param(
            {"w": np.array([3e38], np.float32)},
            {"w": np.array([3e38], np.float32)},
            "NaN or infinity",
            id="overflowing-sum",
        ),
    ],
)
def test_compress_refuses_what_it_cannot_send(
    delta: dict[str, Any], residual: dict[str, Any] | None, message: str
) -> None:
    """A non-float or non-finite delta, or a residual that does not fit it, is a ValueError."""
    with pytest.raises(ValueError, match=message):
        compress(delta, Compression(), residual)


# -- the wire model ----------------------------------------------------------------------------


@given(delta=deltas(), policy=compressions())
def test_compressed_tensors_round_trip_through_the_codec(
    delta: dict[str, Any], policy: Compression
) -> None:
    """encode_record / decode_record give back an equal CompressedTensor, and the policy too."""
    for tensor in compress(delta, policy).tensors:
        assert decode_record(CompressedTensor, encode_record(tensor)) == tensor
    assert decode_record(Compression, encode_record(policy)) == policy


@pytest.mark.parametrize(
    ("top_k", "reason"),
    [
        pytest.param(0.0, "Input should be greater than 0", id="zero"),
        pytest.param(-0.1, "Input should be greater than 0", id="negative"),
        pytest.param(1.5, "Input should be less than or equal to 1", id="over-one"),
        pytest.param(math.nan, "Input should be a finite number", id="nan"),
        pytest.param(math.inf, "Input should be a finite number", id="inf"),
    ],
)
def test_a_policy_with_an_impossible_fraction_cannot_be_built(top_k: float, reason: str) -> None:
    """top_k must lie in (0, 1] and be finite; the refusal names top_k and the bound."""
    with pytest.raises(
        ValidationError, match=f"1 validation error for Compression\ntop_k\n  {reason} "
    ):
        Compression(top_k=top_k)


# -- hostile payloads --------------------------------------------------------------------------

SHAPE = (4, 5)
FLOAT32_2 = np.array([1.0, 2.0], "<f4").tobytes()


def payload(**fields: Any) -> CompressedTensor:
    """A valid sparse tensor of SHAPE (indices 3 and 7, float32) with ``fields`` overridden.

    Built without validation, as a decoder may meet it.
    """
    base: dict[str, Any] = {
        "name": "w",
        "shape": SHAPE,
        "count": 2,
        "index_coding": "varint",
        "indices": bytes([3, 4]),
        "values_dtype": "float32",
        "scale": None,
        "values": FLOAT32_2,
    }
    return CompressedTensor.model_construct(**(base | fields))


def dense(**fields: Any) -> CompressedTensor:
    values = np.arange(20, dtype="<f4").tobytes()
    return payload(
        **({"count": 20, "index_coding": "dense", "indices": b"", "values": values} | fields)
    )


def int8(**fields: Any) -> CompressedTensor:
    return payload(**({"values_dtype": "int8", "values": b"\x01\x02", "scale": 0.5} | fields))


def bitmap(bits: list[int]) -> CompressedTensor:
    return payload(index_coding="bitmap", indices=bytes(bits))


# (payload, error, message, structural): a structural problem is one the model itself refuses.
HOSTILE = [
    pytest.param(payload(shape=(5, 4)), CompressionError, "model's", False, id="shape-mismatch"),
    pytest.param(payload(shape=(20,)), CompressionError, "model's", False, id="shape-flattened"),
    pytest.param(payload(count=-1), CompressionError, "non-negative", True, id="count-negative"),
    pytest.param(dense(count=21), CompressionError, "exceeds the 20", True, id="count-over-size"),
    pytest.param(payload(count=3), CompressionError, "value bytes", True, id="count-vs-values"),
    pytest.param(
        payload(values=FLOAT32_2 + b"\0"), CompressionError, "value bytes", True, id="values-long"
    ),
    pytest.param(
        dense(count=19, values=bytes(76)), CompressionError, "sends all", True, id="dense-short"
    ),
    pytest.param(dense(indices=b"\0"), CompressionError, "no indices", True, id="dense-indices"),
    pytest.param(
        payload(values_dtype="float64", values=bytes(16)),
        CompressionError,
        "not one of",
        True,
        id="values-float64",
    ),
    pytest.param(
        payload(values_dtype="int32"), CompressionError, "not one of", True, id="values-int32"
    ),
    pytest.param(payload(index_coding="rle"), CompressionError, "unknown index", True, id="rle"),
    pytest.param(int8(scale=None), CompressionError, "need a scale", True, id="int8-no-scale"),
    pytest.param(int8(scale=math.nan), CompressionError, "finite positive", True, id="scale-nan"),
    pytest.param(int8(scale=math.inf), CompressionError, "finite positive", True, id="scale-inf"),
    pytest.param(int8(scale=0.0), CompressionError, "finite positive", True, id="scale-zero"),
    pytest.param(int8(scale=-1.0), CompressionError, "finite positive", True, id="scale-negative"),
    pytest.param(int8(scale=3.4e38), CompressionError, "beyond float32", True, id="scale-too-big"),
    pytest.param(payload(scale=1.0), CompressionError, "take no scale", True, id="float32-scale"),
    pytest.param(
        payload(indices=bytes([3, 0x84])), CompressionError, "truncated", False, id="varint-cut"
    ),
    pytest.param(
        payload(count=3, indices=bytes([1, 0x82, 0]), values=bytes(12)),
        CompressionError,
        "decode to 2 indices, count says 3",
        False,
        id="varint-too-few",
    ),
    pytest.param(
        payload(indices=bytes([0, 1, 1])),
        CompressionError,
        "decode to 3 indices, count says 2",
        False,
        id="varint-too-many",
    ),
    pytest.param(
        payload(count=1, indices=bytes([0x83, 0]), values=FLOAT32_2[:4]),
        CompressionError,
        "overlong",
        False,
        id="varint-overlong-for-size",
    ),
    pytest.param(
        payload(count=1, indices=bytes([0x80] * 10 + [1]), values=FLOAT32_2[:4]),
        CompressionError,
        "cannot hold",
        True,
        id="varint-over-ten-bytes",
    ),
    pytest.param(
        payload(indices=bytes([3, 0])), CompressionError, "repeat", False, id="varint-duplicate"
    ),
    pytest.param(
        payload(indices=bytes([0x80, 0, 0])),
        CompressionError,
        "overlong",
        False,
        id="varint-padded-zero",
    ),
    pytest.param(
        payload(indices=bytes([19, 1])), CompressionError, "out of range", False, id="varint-past"
    ),
    pytest.param(
        payload(count=1, indices=bytes([20]), values=FLOAT32_2[:4]),
        CompressionError,
        "index 20 is out of range for 20",
        False,
        id="varint-first-past",
    ),
    pytest.param(
        bitmap([0b0001_0001, 0]), CompressionError, "bitmap of 2 bytes", True, id="bitmap-short"
    ),
    pytest.param(
        bitmap([0b0001_0001, 0, 0, 0]), CompressionError, "expected 3", True, id="bitmap-long"
    ),
    pytest.param(
        bitmap([0b0001_0101, 0, 0]),
        CompressionError,
        "marks 3 entries, count says 2",
        False,
        id="bitmap-popcount",
    ),
    pytest.param(
        bitmap([0b0001_0000, 0, 0b0000_0001]),
        CompressionError,
        "past entry 20",
        False,
        id="bitmap-past-end",
    ),
    pytest.param(
        payload(values=np.array([1, np.nan], "<f4").tobytes()),
        NonFiniteValues,
        "NaN or infinity",
        False,
        id="float32-nan",
    ),
    pytest.param(
        dense(values=np.r_[np.zeros(19), -np.inf].astype("<f4").tobytes()),
        NonFiniteValues,
        "NaN or infinity",
        False,
        id="float32-infinity",
    ),
    pytest.param(
        payload(values_dtype="float16", values=np.array([np.inf, 1], "<f2").tobytes()),
        NonFiniteValues,
        "NaN or infinity",
        False,
        id="float16-infinity",
    ),
    pytest.param(
        payload(values_dtype="float16", values=np.array([1, -np.inf], "<f2").tobytes()),
        NonFiniteValues,
        "NaN or infinity",
        False,
        id="float16-negative-infinity",
    ),
    pytest.param(
        payload(values_dtype="float16", values=bytes([0x01, 0xFE, 0, 0])),
        NonFiniteValues,
        "NaN or infinity",
        False,
        id="float16-negative-nan",
    ),
]


@pytest.mark.parametrize(("tensor", "error", "message", "structural"), HOSTILE)
def test_hostile_payloads_are_refused_with_a_reason(
    tensor: CompressedTensor, error: type[Exception], message: str, structural: bool
) -> None:
    """decode_tensor and decompress refuse each payload with the reason the table gives."""
    del structural
    with pytest.raises(error, match=message):
        decode_tensor(tensor, SHAPE)
    with pytest.raises(error, match=message):
        decompress(tensor, SHAPE)


# Where the wire model refuses a field by its declared type or bound, pydantic words the reason:
# (field, words). The other structural checks are the model's own, worded as the decoder's.
WIRE_FIELD_REASONS = {
    "count-negative": ("count", "Input should be greater than or equal to 0"),
    "values-float64": ("values_dtype", "Input should be 'float32', 'float16' or 'int8'"),
    "values-int32": ("values_dtype", "Input should be 'float32', 'float16' or 'int8'"),
    "rle": ("index_coding", "Input should be 'dense', 'varint' or 'bitmap'"),
    "scale-nan": ("scale", "Input should be a finite number"),
    "scale-inf": ("scale", "Input should be a finite number"),
    "scale-zero": ("scale", "Input should be greater than 0"),
    "scale-negative": ("scale", "Input should be greater than 0"),
}


@pytest.mark.parametrize(
    ("tensor", "field", "message"),
    [
        pytest.param(p.values[0], *WIRE_FIELD_REASONS.get(p.id, ("body", p.values[2])), id=p.id)
        for p in HOSTILE
        if p.values[3]
    ],
)
def test_the_wire_model_refuses_what_it_can_check_without_reading_the_payload(
    tensor: CompressedTensor, field: str, message: str
) -> None:
    """A structurally inconsistent tensor cannot be built, nor decoded from a record; both say
    which field is wrong and why."""
    fields = dict(tensor)
    with pytest.raises(ValidationError, match=message):
        CompressedTensor(**fields)
    prefix = "invalid CompressedTensor record: "
    if field == "body":
        reason = f"^{re.escape(prefix)}body: Value error, tensor 'w': .*{message}"
    else:
        reason = f"^{re.escape(f'{prefix}{field}: {message}')}$"
    with pytest.raises(DecodeError, match=reason):
        decode_record(CompressedTensor, encode_record(tensor))


def test_the_hostile_table_covers_every_check() -> None:
    """Every refusal the decoder can give appears in the table at least once."""
    ids = {p.id for p in HOSTILE}
    assert len(ids) == len(HOSTILE)
    assert {"bitmap-popcount", "varint-duplicate", "scale-nan", "count-over-size"} <= ids


HUGE = 1 << 40


@pytest.mark.parametrize(
    ("tensor", "reason"),
    [
        pytest.param(
            CompressedTensor.model_construct(
                name="w",
                shape=(HUGE,),
                count=HUGE // 2,
                index_coding="varint",
                indices=bytes([1, 1, 1, 1]),
                values_dtype="int8",
                scale=1.0,
                values=bytes(4),
            ),
            "tensor 'w': 4 value bytes for 549755813888 int8 values, expected 549755813888",
            id="varint-claims-half-a-trillion",
        ),
        pytest.param(
            CompressedTensor.model_construct(
                name="w",
                shape=(HUGE,),
                count=4,
                index_coding="varint",
                indices=bytes([0xFF] * 40),
                values_dtype="int8",
                scale=1.0,
                values=bytes(4),
            ),
            "tensor 'w': the varint index stream is truncated",
            id="varint-that-never-ends",
        ),
        pytest.param(
            CompressedTensor.model_construct(
                name="w",
                shape=(HUGE,),
                count=1,
                index_coding="bitmap",
                indices=bytes([0x80]),
                values_dtype="float16",
                scale=None,
                values=bytes(2),
            ),
            "tensor 'w': bitmap of 1 bytes for 1099511627776 entries, expected 137438953472",
            id="bitmap-of-one-byte-for-a-trillion",
        ),
        pytest.param(
            CompressedTensor.model_construct(
                name="w",
                shape=(HUGE,),
                count=HUGE,
                index_coding="dense",
                indices=b"",
                values_dtype="float32",
                scale=None,
                values=bytes(8),
            ),
            "tensor 'w': 8 value bytes for 1099511627776 float32 values, expected 4398046511104",
            id="dense-claims-a-trillion",
        ),
    ],
)
def test_a_huge_claimed_count_fails_fast_without_allocating(
    tensor: CompressedTensor, reason: str
) -> None:
    """Against a 2**40-entry model, tiny payloads claiming huge counts are refused for their
    inconsistency and allocate next to nothing."""
    tracemalloc.start()
    try:
        with pytest.raises(CompressionError, match=f"^{re.escape(reason)}$"):
            decode_tensor(tensor, (HUGE,))
        with pytest.raises(CompressionError, match=f"^{re.escape(reason)}$"):
            decompress(tensor, (HUGE,))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024


@pytest.mark.parametrize("dtype", ["<f4", "<f2"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_single_non_finite_value_in_a_large_tensor_is_refused(dtype: str, bad: float) -> None:
    """The fast finiteness checks for large tensors still find one bad value among many."""
    values = np.full(50_000, 0.5, dtype=dtype)
    values[31_337] = bad
    tensor = CompressedTensor(
        name="w",
        shape=(50_000,),
        count=50_000,
        index_coding="dense",
        values_dtype=np.dtype(dtype).name,
        values=values.tobytes(),
    )
    with pytest.raises(NonFiniteValues, match=r"^tensor 'w': values hold NaN or infinity$"):
        decode_tensor(tensor, (50_000,))


def test_large_finite_values_whose_squares_overflow_are_accepted() -> None:
    """Finiteness is about the values, not their sum of squares."""
    values = np.full(50_000, 3e30, dtype="<f4")
    tensor = CompressedTensor(
        name="w",
        shape=(50_000,),
        count=50_000,
        index_coding="dense",
        values_dtype="float32",
        values=values.tobytes(),
    )
    np.testing.assert_array_equal(decompress(tensor, (50_000,)), values)


@given(
    vector=long_vectors(max_size=400),
    policy=compressions(),
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
)
def test_a_mutated_index_stream_decodes_consistently_or_is_refused(
    vector: np.ndarray, policy: Compression, flips: list[tuple[int, int]]
) -> None:
    """Corrupted index bytes either decode to count distinct in-range indices or raise."""
    (tensor,) = compress({"v": vector}, policy).tensors
    if not tensor.indices:
        return
    corrupted = bytearray(tensor.indices)
    for position, value in flips:
        corrupted[position % len(corrupted)] = value
    hostile = tensor.model_copy(update={"indices": bytes(corrupted)})
    try:
        decoded = decode_tensor(hostile, vector.shape)
    except CompressionError:
        return
    assert decoded.indices is not None
    assert decoded.indices.size == tensor.count
    assert np.all(np.diff(decoded.indices) > 0)
    assert decoded.indices[0] >= 0
    assert decoded.indices[-1] < vector.size
