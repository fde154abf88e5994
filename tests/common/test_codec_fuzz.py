"""Fuzzing the envelope decoder: random, mutated and structurally random frames never crash it.

Whatever the bytes, ``decode`` returns a validated Envelope or raises a ProtocolError (DecodeError,
SchemaError); any other exception is a bug. Runs its share of the 10,000 counted inputs.
"""

from __future__ import annotations

import time

import msgpack  # noqa: TID251 - frames of random structure need the raw encoder
import numpy as np
import pytest
from hypothesis import strategies as st

from common.codec import decode, encode, envelope
from common.compression import dense_tensor
from common.errors import ProtocolError
from common.messages import Envelope, Kind, TrainMetrics, Update
from tests.fuzzing import run_fuzz

pytestmark = pytest.mark.fuzz

LIMIT = 64 * 1024


def valid_update_bytes() -> bytes:
    update = Update(
        update_id="u1",
        run_id="run-1",
        base_version=3,
        num_samples=10,
        metrics=TrainMetrics(loss=0.5, accuracy=0.5, seconds=0.1),
        delta=(
            dense_tensor("w", np.ones((2, 3), np.float32)),
            dense_tensor("b", np.zeros(2, np.float32)),
        ),
    )
    return encode(envelope(update, sender="n1", sent_at=time.time()))


SEED = valid_update_bytes()


def decodes_or_refuses(data: bytes) -> Envelope | None:
    """The decoder's contract: an Envelope, or a ProtocolError, and nothing else."""
    try:
        return decode(data, max_bytes=LIMIT)
    except ProtocolError:
        return None


@st.composite
def mutations(draw: st.DrawFn) -> bytes:
    """A valid update envelope with bytes flipped, inserted, deleted or truncated."""
    data = bytearray(SEED)
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        match op:
            case "flip" if data:
                data[at] ^= 1 << draw(st.integers(0, 7))
            case "set" if data:
                data[at] = draw(st.integers(0, 255))
            case "insert":
                data[at:at] = draw(st.binary(min_size=1, max_size=16))
            case "delete" if data:
                del data[at : at + draw(st.integers(1, 16))]
            case "truncate":
                del data[at:]
            case _:
                pass
    return bytes(data)


leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=64)
    | st.sampled_from([k.value for k in Kind])
)
trees = st.recursive(
    leaves,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=12,
)


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    """msgpack of a 6-element envelope frame with plausible heads and a random body."""
    frame = [
        draw(st.sampled_from([1, 1, 1, 0, 2]) | st.integers(-(2**63), 2**64 - 1)),
        draw(st.sampled_from([k.value for k in Kind]) | st.text(max_size=8)),
        draw(st.sampled_from(["m1"]) | trees),
        draw(st.sampled_from(["n1"]) | trees),
        draw(st.floats() | trees),
        draw(trees),
    ]
    if draw(st.booleans()):
        frame = draw(st.lists(trees, max_size=8))
    packed: bytes = msgpack.packb(frame, use_bin_type=True)
    return packed


def test_random_bytes_never_crash_the_decoder() -> None:
    """Arbitrary bytes decode to an envelope or raise a ProtocolError."""
    run_fuzz("codec_random_bytes", st.binary(max_size=2048), decodes_or_refuses)


def test_mutated_envelopes_never_crash_the_decoder() -> None:
    """A valid update envelope, mutated, decodes or is refused with a ProtocolError."""
    run_fuzz("codec_mutated_envelopes", mutations(), decodes_or_refuses)


def test_frames_of_random_structure_never_crash_the_decoder() -> None:
    """Well-formed msgpack of any shape, envelope-like or not, decodes or is refused."""
    run_fuzz("codec_random_frames", frames(), decodes_or_refuses)


def test_the_seed_input_is_valid() -> None:
    """The mutation seed itself decodes, so the mutations start from a real update."""
    env = decodes_or_refuses(SEED)
    assert env is not None
    assert isinstance(env.body, Update)
