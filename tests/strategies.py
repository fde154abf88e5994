"""Hypothesis strategies shared by the property tests: model states, deltas, messages."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from aggregator.aggregation import StalenessPolicy
from common.compression import DecodedTensor, compress, decode_tensor, decompress
from common.messages import Compression, Quantization, StalenessKind

FINITE = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_infinity=False, width=32)
shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=5)


@st.composite
def model_shapes(draw: st.DrawFn) -> dict[str, tuple[int, ...]]:
    """A model as tensor name -> shape."""
    names = draw(
        st.lists(
            st.sampled_from(["w", "b", "conv", "fc", "head"]), min_size=1, max_size=4, unique=True
        )
    )
    return {name: draw(shapes) for name in names}


def params_like(layout: dict[str, tuple[int, ...]]) -> st.SearchStrategy[dict[str, np.ndarray]]:
    """float32 arrays with the given layout and finite values."""
    return st.fixed_dictionaries(
        {name: hnp.arrays(np.float32, shape, elements=FINITE) for name, shape in layout.items()}
    )


@st.composite
def update_buffers(
    draw: st.DrawFn, min_size: int = 1, max_size: int = 5
) -> tuple[list[dict[str, np.ndarray]], list[int], list[int]]:
    """A buffer of deltas over one layout: (deltas, sample counts, stalenesses)."""
    layout = draw(model_shapes())
    size = draw(st.integers(min_value=min_size, max_value=max_size))
    drawn = draw(st.lists(params_like(layout), min_size=size, max_size=size))
    # fixed_dictionaries may order keys differently per draw; give every delta the layout's order.
    deltas = [{name: delta[name] for name in layout} for delta in drawn]
    num_samples = draw(st.lists(st.integers(1, 1000), min_size=size, max_size=size))
    stalenesses = draw(st.lists(st.integers(0, 50), min_size=size, max_size=size))
    return deltas, num_samples, stalenesses


@st.composite
def staleness_policies(draw: st.DrawFn) -> StalenessPolicy:
    """Any staleness function f(s) the knobs allow."""
    return StalenessPolicy(
        kind=draw(st.sampled_from(StalenessKind)),
        a=draw(st.floats(min_value=0, max_value=5, allow_nan=False)),
        b=draw(st.integers(min_value=0, max_value=20)),
    )


# Deltas for compression: finite float32 values, with exact repeats and signed zeros often enough
# that top-k has ties to break.
DELTA_VALUES = st.one_of(FINITE, st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, -0.5]))


@st.composite
def deltas(draw: st.DrawFn, max_side: int = 6) -> dict[str, np.ndarray]:
    """A delta over a random layout of small tensors, scalars and empty tensors included."""
    names = draw(
        st.lists(
            st.sampled_from(["w", "b", "conv", "fc", "head"]), min_size=1, max_size=4, unique=True
        )
    )
    layout_shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=max_side)
    return {
        name: draw(hnp.arrays(np.float32, draw(layout_shapes), elements=DELTA_VALUES))
        for name in names
    }


def deltas_like(delta: dict[str, np.ndarray]) -> st.SearchStrategy[dict[str, np.ndarray]]:
    """Another delta with the same names and shapes."""
    return st.fixed_dictionaries(
        {
            name: hnp.arrays(np.float32, value.shape, elements=DELTA_VALUES)
            for name, value in delta.items()
        }
    )


def long_vectors(max_size: int = 3000) -> st.SearchStrategy[np.ndarray]:
    """float32 vectors long enough for gaps between kept entries to need two varint bytes."""
    return hnp.arrays(np.float32, st.integers(1, max_size), elements=DELTA_VALUES)


def compressions(
    *, quantization: st.SearchStrategy[Quantization] | None = None
) -> st.SearchStrategy[Compression]:
    """Any compression policy: dense or top-k (all of it included), any quantization."""
    return st.builds(
        Compression,
        top_k=st.none() | st.just(1.0) | st.floats(min_value=1e-3, max_value=1.0),
        quantization=st.sampled_from(Quantization) if quantization is None else quantization,
        error_feedback=st.booleans(),
    )


@dataclass(frozen=True, slots=True)
class Received:
    """One delta as the aggregator holds it after decoding (what it folds), and what it means."""

    decoded: dict[str, DecodedTensor]
    dense: dict[str, np.ndarray]


def received(delta: dict[str, np.ndarray], policy: Compression) -> Received:
    """``delta`` sent under ``policy`` and decoded as the aggregator decodes an update."""
    shapes = {name: value.shape for name, value in delta.items()}
    tensors = compress(delta, policy).tensors
    return Received(
        decoded={t.name: decode_tensor(t, shapes[t.name]) for t in tensors},
        dense={t.name: decompress(t, shapes[t.name]) for t in tensors},
    )


@st.composite
def received_buffers(
    draw: st.DrawFn, min_size: int = 1, max_size: int = 5
) -> tuple[list[Received], list[int], list[int]]:
    """A buffer as the aggregator folds it: each delta under its own node's compression policy,
    decoded; with its sample counts and stalenesses."""
    deltas, num_samples, stalenesses = draw(update_buffers(min_size, max_size))
    policies = draw(st.lists(compressions(), min_size=len(deltas), max_size=len(deltas)))
    return (
        [received(d, p) for d, p in zip(deltas, policies, strict=True)],
        num_samples,
        stalenesses,
    )
