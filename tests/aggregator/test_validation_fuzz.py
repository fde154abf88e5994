"""Fuzzing the update validator: hostile updates never crash the aggregator or reach the model.

Each input goes through the aggregator's receive path (decode, then AggregatorCore.receive, then a
fold when one is due), as the service runs it. Properties: only ProtocolError escapes the decoder
and nothing escapes the core; a rejected update leaves weights and buffer untouched; an accepted
one is float32 of the model's shapes, finite and within the norm bound (the ceiling or the
tighter adaptive bound); the model stays finite.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import strategies as st

from aggregator.aggregation import densify, global_norm
from aggregator.core import AggregatorCore, Fold
from common.codec import decode, encode, envelope
from common.compression import dense_tensor
from common.errors import ProtocolError
from common.messages import (
    AggregationRule,
    AggregatorState,
    CompressedTensor,
    Knobs,
    NormPolicy,
    TrainMetrics,
    Update,
)
from tests.common.test_codec_fuzz import mutations
from tests.fuzzing import BUDGET, run_fuzz

pytestmark = pytest.mark.fuzz

RUN = "run-1"
SHAPES = {"w": (2, 3), "b": (2,)}
BOUND = 10.0
SPECIAL = [0.0, -0.0, 1.0, -1.0, 1e-45, 3.4e38, -3.4e38, float("nan"), float("inf"), -float("inf")]


def fresh_core(
    rule: AggregationRule, policy: NormPolicy, multiplier: float | None = None
) -> AggregatorCore:
    params = {
        n: np.linspace(-1, 1, int(np.prod(s)), dtype=np.float32).reshape(s)
        for n, s in SHAPES.items()
    }
    knobs = Knobs(
        # A trimmed mean needs three updates to trim one per end.
        buffer_size=3 if rule is AggregationRule.TRIMMED_MEAN else 2,
        max_staleness=3,
        max_update_norm=BOUND,
        norm_multiplier=multiplier,
        norm_policy=policy,
        aggregation=rule,
        max_num_samples=10_000,
        one_update_per_version=True,
    )
    return AggregatorCore(
        run_id=RUN, params=params, knobs=knobs, version=2, state=AggregatorState.RUNNING
    )


# Strategies are built once: building them per draw costs more than the validation they feed.
_NAMES = st.sampled_from(["w", "b", "w", "b", "x"])
_VALUES_DTYPES = st.sampled_from(["float32"] * 3 + ["float16", "int8"])
_SHAPES = {
    name: st.sampled_from([SHAPES.get(name, (1,))] * 3 + [(3, 2), (2,), (6,), (0,), (1, 2, 3)])
    for name in ("w", "b", "x")
}
_SPECIAL_AT = st.lists(st.tuples(st.integers(0, 5), st.sampled_from(SPECIAL)), max_size=3)
_NODES = st.sampled_from(["n1", "n2"])
_IDS = st.sampled_from(["u1", "u2", "u3"]) | st.uuids().map(lambda u: u.hex)
_RUNS = st.sampled_from([RUN, RUN, RUN, "other-run"])
_VERSIONS = st.integers(0, 6)
_SAMPLES = st.integers(1, 10**12)
_METRICS = TrainMetrics(loss=0.5, accuracy=0.5, seconds=0.1)


# The largest scale an int8 tensor may have: 127 * scale is just below float32's largest value.
_SCALES = st.sampled_from([1e-3, 1.0, 1e-45, 2.679e36])
_WIRE = {"float32": "<f4", "float16": "<f2", "int8": "i1"}


@st.composite
def tensors(draw: st.DrawFn) -> CompressedTensor:
    """A compressed tensor whose fields agree with each other (the codec refuses any other) but
    may be wrong in every other way: shape, index stream (random bytes: repeats, out of range,
    truncated), values (any bit pattern: NaN, infinities, huge values, specials planted), scale."""
    name = draw(_NAMES)
    shape = draw(_SHAPES[name])
    size = int(np.prod(shape))
    values_dtype = draw(_VALUES_DTYPES)
    coding = draw(st.sampled_from(["dense", "dense", "varint", "bitmap"]))
    count = size if coding == "dense" else draw(st.integers(0, size))
    if coding == "varint":
        indices = draw(st.binary(min_size=count, max_size=count * 2))
    elif coding == "bitmap":
        indices = draw(st.binary(min_size=-(-size // 8), max_size=-(-size // 8)))
    else:
        indices = b""
    dtype = np.dtype(_WIRE[values_dtype])
    data = draw(st.binary(min_size=count * dtype.itemsize, max_size=count * dtype.itemsize))
    if dtype.kind == "f" and count:
        values = np.frombuffer(data, dtype=dtype).copy()
        for index, special in draw(_SPECIAL_AT):
            with np.errstate(over="ignore"):
                values[index % count] = special
        data = values.tobytes()
    return CompressedTensor(
        name=name,
        shape=shape,
        count=count,
        index_coding=coding,  # type: ignore[arg-type]
        indices=indices,
        values_dtype=values_dtype,  # type: ignore[arg-type]
        scale=draw(_SCALES) if values_dtype == "int8" else None,
        values=data,
    )


_TENSOR_LISTS = st.lists(tensors(), min_size=0, max_size=3)


@st.composite
def hostile_updates(draw: st.DrawFn) -> tuple[str, str, Update]:
    """(topic node, envelope sender, update), every field drawn from valid and hostile values."""
    node = draw(_NODES)
    sender = draw(st.sampled_from([node, node, node, "n3"]))
    update = Update(
        update_id=draw(_IDS),
        run_id=draw(_RUNS),
        base_version=draw(_VERSIONS),
        num_samples=draw(_SAMPLES),
        metrics=_METRICS,
        delta=tuple(draw(_TENSOR_LISTS)),
    )
    return node, sender, update


def check_receive(core: AggregatorCore, node: str, sender: str, update: Update) -> None:
    """One update through the core; the properties of the module docstring hold after it."""
    before = {n: p.copy() for n, p in core.params.items()}
    buffered = len(core.buffer)
    bound = core.norm_bound()
    assert bound is not None
    assert bound.value <= BOUND
    verdict = core.receive(node, sender, update, 100, time.time())
    if not verdict.accepted or verdict.duplicate:
        assert len(core.buffer) == buffered
    else:
        assert len(core.buffer) == buffered + 1
        buffered_update = core.buffer[-1]
        delta = densify(buffered_update.delta, buffered_update.scale)
        assert delta.keys() == SHAPES.keys()
        for name, shape in SHAPES.items():
            assert delta[name].dtype == np.float32
            assert delta[name].shape == shape
            assert np.isfinite(delta[name]).all()
        assert global_norm(delta) <= bound.value * (1 + 1e-5)
    for name, value in before.items():
        np.testing.assert_array_equal(core.params[name], value)
    if core.fold_due(time.time()) is not None:
        result = core.fold(time.time())
        if isinstance(result, Fold):
            assert all(np.isfinite(p).all() for p in core.params.values())
        else:
            for name, value in before.items():
                np.testing.assert_array_equal(core.params[name], value)


_RULES = st.sampled_from(list(AggregationRule))
_POLICIES = st.sampled_from(list(NormPolicy))
_MULTIPLIERS = st.sampled_from([None, 1.0, 3.0])
_SEQUENCES = st.lists(hostile_updates(), min_size=1, max_size=3)


@st.composite
def sequences(draw: st.DrawFn) -> tuple[AggregatorCore, list[tuple[str, str, Update]]]:
    return fresh_core(draw(_RULES), draw(_POLICIES), draw(_MULTIPLIERS)), draw(_SEQUENCES)


def test_hostile_updates_never_crash_the_core_or_reach_the_model() -> None:
    """Sequences of updates with wrong names, dtypes, shapes, values, runs, senders, versions,
    sample counts and reused ids are judged without an exception; only valid ones are buffered."""

    def target(drawn: tuple[AggregatorCore, list[tuple[str, str, Update]]]) -> None:
        core, updates = drawn
        for node, sender, update in updates:
            check_receive(core, node, sender, update)

    run_fuzz("validator_updates", sequences(), target)


def test_mutated_payloads_never_crash_the_receive_path() -> None:
    """Mutated update envelopes go through decode and the core as in the service: a ProtocolError
    or a verdict, never a crash, and the model is untouched unless an update is accepted."""

    def target(payload: bytes) -> None:
        core = fresh_core(AggregationRule.MEAN, NormPolicy.REJECT)
        try:
            env = decode(payload, max_bytes=64 * 1024)
        except ProtocolError:
            return
        if isinstance(env.body, Update):
            check_receive(core, "n1", env.sender, env.body)

    run_fuzz("validator_mutated_payloads", mutations(), target)


def test_the_fuzz_budget_is_ten_thousand_inputs() -> None:
    """The fuzz targets together run at least 10,000 inputs in every test run (CI included)."""
    assert sum(BUDGET.values()) >= 10_000


def test_a_valid_seed_update_is_accepted() -> None:
    """The fuzzed core accepts a plain valid update, so rejections above are the rules at work."""
    core = fresh_core(AggregationRule.MEAN, NormPolicy.REJECT)
    delta = tuple(dense_tensor(n, np.zeros(s, np.float32)) for n, s in SHAPES.items())
    update = Update(
        update_id="ok",
        run_id=RUN,
        base_version=2,
        num_samples=5,
        metrics=TrainMetrics(loss=0.1, accuracy=0.9, seconds=0.1),
        delta=delta,
    )
    payload = encode(envelope(update, sender="n1", sent_at=time.time()))
    env = decode(payload)
    assert isinstance(env.body, Update)
    assert core.receive("n1", env.sender, env.body, len(payload), time.time()).accepted
