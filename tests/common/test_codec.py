"""Specification of the wire format: envelopes and tensors round-trip; anything else is refused."""

from __future__ import annotations

import struct
from typing import Any, cast

import msgpack  # noqa: TID251 - hand-crafted malformed frames need the raw encoder
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from common.codec import (
    OUT_OF_LINE_ALIGN,
    array_to_tensor,
    decode,
    decode_record,
    decode_tensors,
    encode,
    encode_record,
    encode_tensors,
    envelope,
    sha256_hex,
    tensor_to_array,
)
from common.compression import dense_tensor
from common.errors import DecodeError, ProtocolError, SchemaError
from common.messages import (
    SCHEMA_VERSION,
    TENSOR_DTYPES,
    Ack,
    AggregatorState,
    AggregatorStatus,
    Body,
    Contribution,
    ControlCommand,
    ControlReply,
    ControlRequest,
    Counters,
    Envelope,
    Evaluation,
    Kind,
    Knobs,
    Manifest,
    MaskedDelta,
    ModelDelta,
    ModelSpec,
    NodeState,
    NodeStatus,
    NodeTally,
    RejectReason,
    SecAggAnswer,
    SecAggKey,
    SecAggReceipt,
    SecAggShare,
    SecAggTerm,
    SecAggUnmask,
    TensorPayload,
    TrainingConfig,
    TrainMetrics,
    Update,
    VersionRecord,
    kind_of,
)

SHA = sha256_hex(b"model")
TENSOR = array_to_tensor("w", np.arange(6, dtype=np.float32).reshape(2, 3))
STATUS = AggregatorStatus(
    run_id="run-1",
    state=AggregatorState.RUNNING,
    version=4,
    buffer_fill=1,
    knobs=Knobs(buffer_size=3, max_update_norm=10.0),
    counters=Counters(received=5, accepted=4, rejected=1, rejections={"stale": 1}),
    nodes=(NodeTally(node="hosp-a", accepted=4, last_seen=12.5, eval_accuracy=0.75),),
    updated_at=1_700_000_000.25,
)
MANIFEST = Manifest(
    run_id="run-1",
    version=3,
    sha256=SHA,
    blob_bytes=2500,
    chunk_size=1000,
    chunk_count=3,
    model=ModelSpec(name="mlp", kwargs={"in_features": 13, "hidden": 8, "bias": True}),
    training=TrainingConfig(epochs=2, optimizer="adam"),
    created_at=1_700_000_000.5,
)
UPDATE = Update(
    update_id="u-1",
    run_id="run-1",
    base_version=3,
    num_samples=120,
    metrics=TrainMetrics(loss=0.4, accuracy=0.8, seconds=1.5),
    delta=(dense_tensor("w", np.arange(6, dtype=np.float32).reshape(2, 3)),),
)

DELTA = ModelDelta(
    manifest=MANIFEST.model_copy(update={"version": 4}),
    base_version=3,
    base_sha256=SHA,
    tensors=(dense_tensor("w", np.full((2, 3), 0.5, dtype=np.float32)),),
)

BODIES = [
    pytest.param(MANIFEST, id="manifest"),
    pytest.param(DELTA, id="model-delta"),
    pytest.param(UPDATE, id="update"),
    pytest.param(
        UPDATE.model_copy(
            update={
                "delta": (),
                "masked": MaskedDelta(policy_digest=SHA, elements=bytes(range(24))),
            }
        ),
        id="masked-update",
    ),
    pytest.param(
        Ack(update_id="u-1", accepted=False, reason=RejectReason.STALE, current_version=9),
        id="ack",
    ),
    pytest.param(
        NodeStatus(state=NodeState.TRAINING, version=3, software="0.1.0", num_train=10),
        id="node-status",
    ),
    pytest.param(
        Evaluation(run_id="run-1", version=3, loss=0.3, accuracy=0.5, correct=5, num_examples=10),
        id="evaluation",
    ),
    pytest.param(
        ControlRequest(
            request_id="r1",
            command=ControlCommand.SET,
            knobs={"buffer_size": 4, "server_lr": 0.5, "staleness": "hinge", "x": True, "y": None},
        ),
        id="control-request",
    ),
    pytest.param(ControlReply(request_id="r1", ok=True, message="done", status=STATUS), id="reply"),
    pytest.param(STATUS, id="aggregator-status"),
    pytest.param(
        VersionRecord(
            run_id="run-1",
            version=4,
            created_at=3.0,
            contributions=(
                Contribution(
                    node="hosp-a",
                    update_id="u-1",
                    base_version=3,
                    staleness=1,
                    num_samples=120,
                    staleness_factor=0.7,
                    weight=84.0,
                    bytes=1024,
                    train_loss=0.4,
                ),
            ),
            update_norm=0.25,
            train_loss=0.4,
            fold_seconds=0.01,
            reason="buffer_full",
        ),
        id="version-record",
    ),
    pytest.param(
        SecAggKey(
            federation="fed-1",
            identity="hosp-a",
            public_key=bytes(range(32)),
            certificate=b"-----BEGIN CERTIFICATE-----\n...",
            signature=b"\x30\x45" + bytes(69),
        ),
        id="secagg-key",
    ),
    pytest.param(
        SecAggShare(
            update_id="u-1", recipient="hosp-b", policy_digest="ab" * 32, sealed=bytes(100_000)
        ),
        id="secagg-share",
    ),
    pytest.param(
        SecAggReceipt(policy_digest="ab" * 32, update_ids=("u-1", "u-2")), id="secagg-receipt"
    ),
    pytest.param(
        SecAggUnmask(
            fold_id="f-1",
            policy_digest="ab" * 32,
            terms=(SecAggTerm(update_id="u-1", sender="hosp-a", weight=1024),),
        ),
        id="secagg-unmask",
    ),
    pytest.param(SecAggAnswer(fold_id="f-1", share_sum=bytes(range(8))), id="secagg-answer"),
    pytest.param(
        SecAggAnswer(fold_id="f-1", refusal="already released in another sum"),
        id="secagg-refusal",
    ),
]


def frame(
    body: Any,
    *,
    schema: Any = SCHEMA_VERSION,
    kind: Any = "node_status",
    message_id: Any = "m1",
    sender: Any = "hosp-a",
    sent_at: Any = 1.0,
) -> bytes:
    """A hand-built envelope frame, valid unless an argument makes it otherwise."""
    packed: bytes = msgpack.packb(
        [schema, kind, message_id, sender, sent_at, body], use_bin_type=True
    )
    return packed


def update_frame(**delta: Any) -> bytes:
    """An encoded update whose single (dense) tensor has the given fields overridden."""
    tensor = {
        "name": "w",
        "shape": [2],
        "count": 2,
        "index_coding": "dense",
        "indices": b"",
        "values_dtype": "float32",
        "values": b"\0" * 8,
        **delta,
    }
    body = UPDATE.model_dump() | {"delta": [tensor]}
    return frame(body, kind="update")


@pytest.mark.parametrize("body", BODIES)
def test_every_message_kind_round_trips(body: Body) -> None:
    """decode(encode(envelope)) returns an equal envelope, for every kind of body."""
    env = envelope(body, sender="hosp-a", sent_at=1234.5, message_id="m-1")
    decoded = decode(encode(env))
    assert decoded == env
    assert type(decoded.body) is type(body)


def test_the_body_table_covers_every_kind() -> None:
    """The round-trip table above has one body per Kind, so a new kind cannot go untested."""
    bodies = [cast("Body", param.values[0]) for param in BODIES]
    assert {kind_of(body) for body in bodies} == set(Kind)


def test_envelope_gets_a_fresh_message_id_unless_given() -> None:
    """Two envelopes built without a message id get distinct ids."""
    first = envelope(MANIFEST, sender="agg", sent_at=0.0)
    second = envelope(MANIFEST, sender="agg", sent_at=0.0)
    assert first.message_id != second.message_id


def test_an_envelope_whose_kind_does_not_match_its_body_cannot_be_built() -> None:
    """Envelope refuses a kind that names another body type."""
    with pytest.raises(ValidationError, match="carries a Manifest"):
        Envelope(kind=Kind.ACK, message_id="m", sender="s", sent_at=0.0, body=MANIFEST)


DTYPES = sorted(TENSOR_DTYPES)
SHAPES = [
    pytest.param((), id="scalar"),
    pytest.param((0,), id="empty"),
    pytest.param((3, 0, 2), id="empty-inner"),
    pytest.param((5,), id="vector"),
    pytest.param((2, 3, 4), id="rank-3"),
    pytest.param((1,) * 8, id="rank-8"),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_allowed_dtype_and_shape_round_trips(dtype: str, shape: tuple[int, ...]) -> None:
    """array -> tensor -> array and blob -> arrays keep values, dtype and shape exactly."""
    rng = np.random.default_rng(0)
    array = (rng.standard_normal(shape) * 50).astype(dtype)
    tensor = array_to_tensor("t", array)
    assert (tensor.dtype, tensor.shape) == (dtype, shape)
    back = tensor_to_array(tensor)
    assert back.dtype == np.dtype(dtype)
    assert back.shape == shape
    np.testing.assert_array_equal(back, array)
    blob = decode_tensors(encode_tensors({"t": array, "u": array}))
    assert list(blob) == ["t", "u"]
    np.testing.assert_array_equal(blob["t"], array)


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        pytest.param(np.array([1.0], dtype=">f4"), b"\x00\x00\x80\x3f", id="big-endian-float32"),
        pytest.param(np.array([1.0], dtype="<f4"), b"\x00\x00\x80\x3f", id="float32"),
        pytest.param(np.array([1], dtype=">i4"), b"\x01\x00\x00\x00", id="big-endian-int32"),
        pytest.param(np.array([1.0], dtype=">f2"), b"\x00\x3c", id="big-endian-float16"),
    ],
)
def test_tensor_bytes_are_little_endian_whatever_the_input_order(
    array: np.ndarray, expected: bytes
) -> None:
    """array_to_tensor writes little-endian bytes and keeps the values of big-endian input."""
    tensor = array_to_tensor("x", array)
    assert tensor.data == expected
    np.testing.assert_array_equal(tensor_to_array(tensor), array)


def test_non_contiguous_arrays_are_encoded_by_value() -> None:
    """A transposed (non-contiguous) array is encoded in logical order."""
    array = np.arange(6, dtype=np.float32).reshape(2, 3).T
    np.testing.assert_array_equal(tensor_to_array(array_to_tensor("t", array)), array)


def test_decoded_tensors_are_read_only_views() -> None:
    """tensor_to_array returns a read-only array: received bytes cannot be mutated in place."""
    array = tensor_to_array(TENSOR)
    assert not array.flags.writeable


def test_a_blob_naming_a_tensor_twice_is_refused() -> None:
    """decode_tensors raises DecodeError when two tensors share a name."""
    item = TENSOR.model_dump()
    with pytest.raises(DecodeError, match="'w' appears twice"):
        decode_tensors(msgpack.packb([item, item], use_bin_type=True))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param(msgpack.packb({"w": 1}), "not an array", id="not-a-list"),
        pytest.param(msgpack.packb([{"name": "w"}]), "invalid tensor", id="missing-fields"),
        pytest.param(b"\xc1", "msgpack", id="not-msgpack"),
    ],
)
def test_malformed_tensor_blobs_are_refused(data: bytes, message: str) -> None:
    """decode_tensors raises DecodeError for anything but a list of valid tensors."""
    with pytest.raises(DecodeError, match=message):
        decode_tensors(data)


def test_a_tensor_blob_over_the_size_limit_is_refused() -> None:
    """decode_tensors refuses a blob longer than max_bytes before unpacking it."""
    blob = encode_tensors({"w": np.zeros(100, dtype=np.float32)})
    with pytest.raises(DecodeError, match="exceeds the limit"):
        decode_tensors(blob, max_bytes=len(blob) - 1)


VALID_STATUS = {"state": "idle"}
# msgpack's own packer refuses such depth, so splice 2000 nested one-element arrays in by hand.
DEEP = frame({"state": "@nest@"}).replace(msgpack.packb("@nest@"), b"\x91" * 2000 + b"\x00")

MALFORMED = [
    pytest.param(b"\xc1", DecodeError, "not a msgpack document", id="not-msgpack"),
    pytest.param(b"", DecodeError, "not a msgpack document", id="empty"),
    pytest.param(frame(VALID_STATUS)[:-3], DecodeError, "not a msgpack document", id="truncated"),
    pytest.param(frame(VALID_STATUS) + b"\x00", DecodeError, "extra data", id="trailing-bytes"),
    pytest.param(msgpack.packb({"kind": "ack"}), DecodeError, "6-element array", id="a-map"),
    pytest.param(msgpack.packb([1, 2, 3, 4, 5]), DecodeError, "6-element array", id="5-elements"),
    pytest.param(
        msgpack.packb([1, "ack", "m", "s", 0.0, {}, 7]), DecodeError, "6-element", id="7-elements"
    ),
    pytest.param(frame(VALID_STATUS, schema=2), SchemaError, "schema version 2", id="schema-2"),
    pytest.param(frame(VALID_STATUS, schema=0), SchemaError, "schema version 0", id="schema-0"),
    pytest.param(frame(VALID_STATUS, schema="1"), SchemaError, "schema version", id="schema-str"),
    pytest.param(frame(VALID_STATUS, kind="gossip"), SchemaError, "'gossip'", id="unknown-kind"),
    pytest.param(frame(VALID_STATUS, kind=["ack"]), SchemaError, "message kind", id="kind-list"),
    pytest.param(frame([1, 2]), DecodeError, "body is not a map", id="body-list"),
    pytest.param(frame("idle"), DecodeError, "body is not a map", id="body-str"),
    pytest.param(frame({}), DecodeError, "state", id="missing-field"),
    pytest.param(frame(VALID_STATUS | {"extra": 1}), DecodeError, "extra", id="extra-field"),
    pytest.param(
        frame(VALID_STATUS, kind="ack"), DecodeError, "invalid ack message", id="kind-vs-body"
    ),
    pytest.param(frame(VALID_STATUS, sender="a/b"), DecodeError, "sender", id="bad-sender"),
    pytest.param(frame(VALID_STATUS, message_id=7), DecodeError, "message_id", id="bad-id"),
    pytest.param(frame(VALID_STATUS, sent_at=float("nan")), DecodeError, "sent_at", id="nan-time"),
    pytest.param(update_frame(values=b"\0" * 7), DecodeError, "7 value bytes", id="tensor-short"),
    pytest.param(update_frame(values=b"\0" * 9), DecodeError, "expected 8", id="tensor-long"),
    pytest.param(update_frame(values_dtype="float64"), DecodeError, "dtype", id="dtype-float64"),
    pytest.param(update_frame(values_dtype="object"), DecodeError, "dtype", id="dtype-object"),
    pytest.param(update_frame(values_dtype="<f4"), DecodeError, "dtype", id="dtype-numpy-string"),
    pytest.param(
        update_frame(shape=[1] * 9, count=1, values=b"\0" * 4), DecodeError, "shape", id="rank-9"
    ),
    pytest.param(
        update_frame(shape=[-2], count=0, values=b""), DecodeError, "shape", id="negative-dim"
    ),
    pytest.param(update_frame(shape=[2**62, 2**62]), DecodeError, "dense coding", id="huge-dims"),
    pytest.param(msgpack.packb("a" * 70_000), DecodeError, "max_str_len", id="long-string"),
    pytest.param(
        frame(VALID_STATUS | {"software": "x" * 70_000}),
        DecodeError,
        "max_str_len",
        id="long-field",
    ),
    pytest.param(msgpack.packb(msgpack.ExtType(1, b"ab")), DecodeError, "ext", id="ext-type"),
    pytest.param(msgpack.packb({1: 2}), DecodeError, "map key", id="int-map-key"),
    pytest.param(b"\xdd\xff\xff\xff\xff", DecodeError, "max_array_len", id="huge-array-header"),
    pytest.param(DEEP, DecodeError, r"(?i)nest|deep|depth", id="deep-nesting"),
]


@pytest.mark.parametrize(("data", "error", "message"), MALFORMED)
def test_malformed_input_raises_the_right_protocol_error_with_a_clear_message(
    data: bytes, error: type[ProtocolError], message: str
) -> None:
    """Each kind of malformed input raises its ProtocolError subclass, saying what is wrong."""
    with pytest.raises(error, match=message) as info:
        decode(data)
    assert type(info.value) is error


def test_a_message_over_max_bytes_is_refused_before_it_is_unpacked() -> None:
    """decode raises DecodeError naming the size and the limit for an oversized message."""
    data = encode(envelope(UPDATE, sender="hosp-a", sent_at=0.0))
    assert decode(data, max_bytes=len(data)).body == UPDATE
    with pytest.raises(
        DecodeError, match=rf"{len(data)} bytes exceeds the limit of {len(data) - 1}"
    ):
        decode(data, max_bytes=len(data) - 1)


class Record(BaseModel):
    """A disk record with nested data, as checkpoints and outboxes write."""

    name: str
    weights: tuple[TensorPayload, ...]
    knobs: Knobs


def test_records_round_trip() -> None:
    """decode_record(encode_record(record)) returns an equal record."""
    record = Record(name="ckpt", weights=(TENSOR,), knobs=Knobs(buffer_size=7))
    assert decode_record(Record, encode_record(record)) == record


def test_a_record_that_does_not_validate_is_a_decode_error() -> None:
    """decode_record raises DecodeError naming the model and the bad field."""
    with pytest.raises(DecodeError, match=r"invalid Record record: name"):
        decode_record(Record, encode_record(Knobs()))


def test_a_record_over_max_bytes_is_refused() -> None:
    """decode_record honours max_bytes."""
    data = encode_record(Knobs())
    with pytest.raises(DecodeError, match="exceeds the limit"):
        decode_record(Knobs, data, max_bytes=len(data) - 1)


# -- fuzzing: whatever the bytes, decode() raises only ProtocolError

VALID_UPDATE = encode(envelope(UPDATE, sender="hosp-a", sent_at=1.0, message_id="m-1"))
FUZZ = settings(
    max_examples=1500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)


def decode_or_protocol_error(data: bytes) -> None:
    """Decode, accepting success or a ProtocolError; any other exception fails the test."""
    try:
        decode(data)
    except ProtocolError as exc:
        message = str(exc)
    else:
        return
    assert message, "a ProtocolError must say what is wrong"


@FUZZ
@given(st.binary(max_size=300))
def test_decoding_random_bytes_only_raises_protocol_errors(data: bytes) -> None:
    """decode(random bytes) either succeeds or raises a ProtocolError, never anything else."""
    decode_or_protocol_error(data)


@st.composite
def mutations(draw: st.DrawFn, base: bytes = VALID_UPDATE) -> bytes:
    """A valid encoded update with bytes flipped, inserted, deleted or the tail cut off."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, max(len(data) - 1, 0)))
        match draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"])):
            case "flip":
                if data:
                    data[position] ^= 1 << draw(st.integers(0, 7))
            case "set":
                if data:
                    data[position] = draw(st.integers(0, 255))
            case "insert":
                data[position:position] = draw(st.binary(min_size=1, max_size=4))
            case "delete":
                del data[position : position + draw(st.integers(1, 4))]
            case _:
                del data[position:]
    return bytes(data)


@FUZZ
@given(mutations())
def test_decoding_mutated_updates_only_raises_protocol_errors(data: bytes) -> None:
    """decode(a mutated valid update) either succeeds or raises a ProtocolError."""
    decode_or_protocol_error(data)


# Values msgpack can carry, to build structurally plausible but wrong frames.
msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=10)
    | st.binary(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@FUZZ
@given(
    schema=st.sampled_from([SCHEMA_VERSION, True, 1.0]) | msgpack_values,
    kind=st.sampled_from([k.value for k in Kind]) | msgpack_values,
    body=st.fixed_dictionaries({}, optional=dict.fromkeys(UPDATE.model_dump(), msgpack_values))
    | msgpack_values,
    message_id=st.sampled_from(["m-1"]) | msgpack_values,
    sent_at=st.sampled_from([1.0]) | msgpack_values,
)
def test_decoding_well_formed_frames_with_wrong_values_only_raises_protocol_errors(
    schema: Any, kind: Any, body: Any, message_id: Any, sent_at: Any
) -> None:
    """Frames of six well-formed msgpack values with any contents raise only ProtocolError."""
    decode_or_protocol_error(
        frame(body, schema=schema, kind=kind, message_id=message_id, sent_at=sent_at)
    )


def test_the_fuzzed_base_message_is_itself_valid() -> None:
    """The mutation fuzzer starts from a valid update, so it explores near-valid inputs."""
    assert decode(VALID_UPDATE).body == UPDATE


# -- large byte strings after the document


LARGE = np.arange(20_000, dtype=np.float32)  # 80 KB of values: past OUT_OF_LINE_BYTES
LARGE_UPDATE = UPDATE.model_copy(
    update={"delta": (dense_tensor("big", LARGE), dense_tensor("w", np.ones(6, np.float32)))}
)
VALID_LARGE = encode(envelope(LARGE_UPDATE, sender="hosp-a", sent_at=1.0, message_id="m-2"))
REFERENCE = b"\xd7\x01" + struct.pack("<Q", LARGE.nbytes)  # msgpack fixext 8, type 1


def document_end(data: bytes) -> int:
    unpacker = msgpack.Unpacker(raw=False, ext_hook=lambda code, payload: None)
    unpacker.feed(data)
    unpacker.skip()
    return unpacker.tell()


def test_large_byte_strings_follow_the_document_aligned_and_decode_in_place() -> None:
    """The values travel after the msgpack document at a 64-byte offset and come back as a
    read-only view of the message, equal to what was sent; small ones stay in the document."""
    end = document_end(VALID_LARGE)
    start = end + (-end % OUT_OF_LINE_ALIGN)
    assert len(VALID_LARGE) == start + LARGE.nbytes
    assert VALID_LARGE[start:] == LARGE.tobytes()
    assert REFERENCE in VALID_LARGE[:end]
    body = decode(VALID_LARGE).body
    assert isinstance(body, Update)
    big, small = body.delta
    assert isinstance(big.values, memoryview)
    assert big.values.readonly
    assert bytes(big.values) == LARGE.tobytes()
    assert isinstance(small.values, bytes)
    assert body == LARGE_UPDATE
    assert encode(envelope(body, sender="hosp-a", sent_at=1.0, message_id="m-2")) == VALID_LARGE


def test_a_mutable_buffer_is_copied_before_its_views_are_handed_out() -> None:
    """Decoding a bytearray gives values that later writes to the bytearray cannot change."""
    data = bytearray(VALID_LARGE)
    body = decode(data).body  # type: ignore[arg-type]
    assert isinstance(body, Update)
    data[-4:] = b"\xff\xff\xff\xff"
    assert bytes(body.delta[0].values) == LARGE.tobytes()


def _padded(document: bytes) -> bytes:
    return document + bytes(-len(document) % OUT_OF_LINE_ALIGN)


def _with_reference(length: int) -> bytes:
    return VALID_LARGE.replace(REFERENCE, b"\xd7\x01" + struct.pack("<Q", length), 1)


REFERENCE_AS_SENDER = (
    _padded(
        msgpack.packb(
            [1, "update", "m-1", msgpack.ExtType(1, struct.pack("<Q", 1)), 1.0, UPDATE.model_dump()]
        )
    )
    + b"x"
)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param(VALID_LARGE[:-1], "follow", id="tail-truncated"),
        pytest.param(VALID_LARGE + b"\x00", "follow", id="tail-too-long"),
        pytest.param(VALID_LARGE[: document_end(VALID_LARGE)], "follow", id="tail-missing"),
        pytest.param(_with_reference(LARGE.nbytes + 4), "follow", id="length-too-long"),
        pytest.param(_with_reference(2**64 - 1), "follow", id="length-huge"),
        pytest.param(
            _padded(VALID_LARGE[: document_end(VALID_LARGE)])[:-1]
            + b"\x01"
            + VALID_LARGE[-LARGE.nbytes :],
            "padding",
            id="padding-not-zero",
        ),
        pytest.param(
            VALID_LARGE.replace(REFERENCE, b"\xd7\x02" + REFERENCE[2:], 1), "ext", id="other-ext"
        ),
        pytest.param(
            msgpack.packb([1, "ack", "m-1", msgpack.ExtType(1, b"\x00" * 4), 1.0, {}]),
            "ext",
            id="short-reference",
        ),
        pytest.param(REFERENCE_AS_SENDER, "sender", id="reference-as-sender"),
    ],
)
def test_malformed_out_of_line_strings_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        decode(data)


@FUZZ
@given(mutations(base=VALID_LARGE[:4096] + VALID_LARGE[-64:]))
def test_decoding_mutated_large_updates_only_raises_protocol_errors(data: bytes) -> None:
    """Mutations of the document and the head and tail of the strings after it."""
    decode_or_protocol_error(data)


def test_a_masked_update_carries_no_plaintext_delta() -> None:
    masked = MaskedDelta(policy_digest=SHA, elements=b"\x01\x00\x00\x00")
    with pytest.raises(ValidationError, match="no plaintext delta"):
        Update(**{**UPDATE.model_dump(), "masked": masked})
