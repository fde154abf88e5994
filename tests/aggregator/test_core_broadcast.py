"""Specification of the core's broadcast view: deltas while the chain is on, resets otherwise."""

from __future__ import annotations

import numpy as np

from aggregator.aggregation import ServerOptimizerState
from aggregator.core import AggregatorCore, Broadcast, Fold
from common.broadcast_chain import ChainFollower
from common.codec import decode_tensors
from common.compression import dense_tensor
from common.messages import (
    AggregatorState,
    Compression,
    Knobs,
    ModelSpec,
    Quantization,
    TrainMetrics,
    Update,
)

MODEL = ModelSpec(name="logreg", kwargs={"in_features": 3, "num_classes": 2})
PARAMS = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(2, np.float32)}
CHAIN = Compression(top_k=0.5, quantization=Quantization.FP16)


def core(knobs: Knobs) -> AggregatorCore:
    return AggregatorCore(run_id="run-1", params=PARAMS, knobs=knobs, state=AggregatorState.RUNNING)


def fold(c: AggregatorCore, seed: int) -> Broadcast:
    """One update (K = 1) makes the next version; its broadcast as the service publishes it."""
    rng = np.random.default_rng(seed)
    update = Update(
        update_id=f"u{seed}",
        run_id="run-1",
        base_version=c.version,
        num_samples=10,
        metrics=TrainMetrics(loss=0.5, accuracy=0.5, seconds=0.1),
        delta=tuple(
            dense_tensor(n, rng.normal(0, 0.1, a.shape).astype(np.float32))
            for n, a in PARAMS.items()
        ),
    )
    assert c.receive("n1", "n1", update, 100, 1.0).accepted
    assert isinstance(c.fold(1.0), Fold)
    return c.broadcast(model=MODEL, chunk_size=1 << 20, now=1.0)


def test_without_the_chain_every_version_is_its_weights_and_no_delta() -> None:
    c = core(Knobs(buffer_size=1))
    broadcast = fold(c, 1)
    assert broadcast.delta is None
    assert c.broadcast_view is None
    for name, value in decode_tensors(broadcast.blob).items():
        assert value.tobytes() == c.params[name].tobytes()


def test_with_the_chain_each_version_has_a_delta_from_the_last_and_the_view_lags_the_model() -> (
    None
):
    """The manifest announces the chain; the view differs from the weights (top 50 %), and the
    difference is what the next delta carries first."""
    c = core(Knobs(buffer_size=1, broadcast_compression=CHAIN))
    v0 = c.broadcast(model=MODEL, chunk_size=1 << 20, now=0.0)
    follower = ChainFollower()
    follower.on_snapshot(v0.manifest, decode_tensors(v0.blob))
    for seed in range(1, 4):
        broadcast = fold(c, seed)
        assert broadcast.manifest.broadcast_compression == CHAIN
        assert broadcast.delta is not None
        assert broadcast.delta.base_version == c.version - 1
        held = follower.on_delta(broadcast.delta)
        assert held is not None
        assert held.manifest.sha256 == broadcast.manifest.sha256
    view = c.broadcast_view
    assert view is not None
    assert any(not np.array_equal(view[k], c.params[k]) for k in PARAMS)


def test_a_rollback_resets_the_chain_to_the_weights() -> None:
    """A rollback's version has no delta: its view is the rolled-back weights, for everyone."""
    c = core(Knobs(buffer_size=1, broadcast_compression=CHAIN))
    for seed in range(1, 3):
        fold(c, seed)
    c.rollback(0, PARAMS, ServerOptimizerState(), now=2.0)
    broadcast = c.broadcast(model=MODEL, chunk_size=1 << 20, now=2.0)
    assert broadcast.delta is None
    assert c.broadcast_view is None
    for name, value in decode_tensors(broadcast.blob).items():
        assert value.tobytes() == PARAMS[name].tobytes()
    assert fold(c, 9).delta is not None  # and the chain goes on from there


def test_turning_the_chain_off_live_resets_the_next_version() -> None:
    c = core(Knobs(buffer_size=1, broadcast_compression=CHAIN))
    fold(c, 1)
    c.set_knobs({"broadcast_compression": None})
    broadcast = fold(c, 2)
    assert broadcast.delta is None
    assert broadcast.manifest.broadcast_compression is None
    c.set_knobs({"broadcast_compression.top_k": 0.25})
    assert fold(c, 3).delta is not None
