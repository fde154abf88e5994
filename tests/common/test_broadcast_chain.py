"""Specification of the compressed broadcast chain: exact reconstruction, gaps, error feedback."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from common.broadcast_chain import (
    BroadcastDtype,
    ChainFollower,
    Step,
    View,
    advance,
    apply_delta,
    reset,
    view_blob,
)
from common.codec import sha256_hex
from common.errors import CompressionError
from common.messages import (
    Compression,
    Manifest,
    ModelDelta,
    ModelSpec,
    Quantization,
    TrainingConfig,
)

RUN = "run-1"
SHAPES = {"conv.weight": (8, 1, 3, 3), "conv.bias": (8,), "fc.weight": (2, 200)}


def _target(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {name: rng.normal(0, 0.1, shape).astype(np.float32) for name, shape in SHAPES.items()}


def _walk(start: View, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {k: (v + rng.normal(0, 0.01, v.shape)).astype(np.float32) for k, v in start.items()}


def _manifest(step: Step, version: int, policy: Compression | None, run: str = RUN) -> Manifest:
    blob = view_blob(step.view, step.dtype)
    return Manifest(
        run_id=run,
        version=version,
        sha256=sha256_hex(blob),
        blob_bytes=len(blob),
        chunk_size=1 << 20,
        chunk_count=1,
        model=ModelSpec(name="cnn"),
        training=TrainingConfig(),
        created_at=0.0,
        broadcast_dtype=step.dtype,
        broadcast_compression=policy,
    )


class Chain:
    """The aggregator's side, as the core runs it: a true model and its broadcast view."""

    def __init__(self, policy: Compression, dtype: BroadcastDtype, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.policy = policy
        self.dtype = dtype
        self.true = _target(self.rng)
        self.step = reset(self.true, dtype)
        self.version = 0
        self.manifest = _manifest(self.step, 0, policy)

    def next(self) -> ModelDelta:
        self.true = _walk(self.true, self.rng)
        base = self.manifest
        self.step = advance(self.step.view, self.true, self.policy, self.dtype)
        assert self.step.tensors is not None
        self.version += 1
        self.manifest = _manifest(self.step, self.version, self.policy)
        return ModelDelta(
            manifest=self.manifest,
            base_version=base.version,
            base_sha256=base.sha256,
            tensors=self.step.tensors,
        )


POLICIES = [
    pytest.param(
        Compression(top_k=0.01, quantization=Quantization.FP16), "float32", id="top1%-fp16"
    ),
    pytest.param(
        Compression(top_k=0.1, quantization=Quantization.INT8), "float16", id="top10%-int8-f16"
    ),
    pytest.param(Compression(), "float32", id="lossless"),
    pytest.param(Compression(quantization=Quantization.INT8), "float16", id="dense-int8-f16"),
]


@pytest.mark.parametrize(("policy", "dtype"), POLICIES)
def test_a_node_that_follows_every_delta_holds_the_aggregators_view_bit_for_bit(
    policy: Compression, dtype: BroadcastDtype
) -> None:
    """Twenty deltas applied in order reproduce the aggregator's view exactly, sha256 and all."""
    chain = Chain(policy, dtype)
    follower = ChainFollower()
    follower.on_snapshot(chain.manifest, chain.step.view)
    for _ in range(20):
        held = follower.on_delta(chain.next())
        assert held is not None
        assert held.manifest == chain.manifest
        for name, value in chain.step.view.items():
            assert held.view[name].tobytes() == value.tobytes()
    assert not follower.wants_snapshot
    assert follower.refused == 0


def test_error_feedback_carries_what_a_delta_left_out_until_the_view_reaches_the_model() -> None:
    """With top 10 % and a model that stands still, ten deltas bring the view to it exactly:
    the residual (model minus view) shrinks at every step and nothing is lost."""
    rng = np.random.default_rng(1)
    target = _target(rng)
    step = reset({k: np.zeros_like(v) for k, v in target.items()}, "float32")
    policy = Compression(top_k=0.1)

    def residual(view: View) -> float:
        return float(np.sqrt(sum(np.sum((target[k] - view[k]) ** 2) for k in target)))

    norms = [residual(step.view)]
    for _ in range(10):
        step = advance(step.view, target, policy, "float32")
        norms.append(residual(step.view))
    assert all(b < a for a, b in itertools.pairwise(norms) if a > 0)
    assert norms[-1] == 0.0


def test_quantized_deltas_converge_to_the_model_within_the_quantization_step() -> None:
    """int8 deltas leave what they rounded away in the residual, so later deltas send it."""
    rng = np.random.default_rng(2)
    target = _target(rng)
    step = reset({k: np.zeros_like(v) for k, v in target.items()}, "float32")
    for _ in range(30):
        step = advance(step.view, target, Compression(quantization=Quantization.INT8), "float32")
    error = max(float(np.abs(target[k] - step.view[k]).max()) for k in target)
    assert error < 1e-6


def test_a_missed_delta_is_a_gap_that_the_snapshot_mends() -> None:
    """A node that misses v2 keeps v3's delta, asks for a snapshot, and after the snapshot of v3
    follows v4's delta again."""
    policy = Compression(top_k=0.05, quantization=Quantization.FP16)
    chain = Chain(policy, "float32")
    follower = ChainFollower()
    follower.on_snapshot(chain.manifest, chain.step.view)
    assert follower.on_delta(chain.next()) is not None  # v1
    chain.next()  # v2: lost
    v3 = chain.next()
    assert follower.on_delta(v3) is None
    assert follower.wants_snapshot
    held = follower.on_snapshot(chain.manifest, chain.step.view)  # the retained snapshot of v3
    assert held is not None
    assert held.manifest.version == 3
    assert not follower.wants_snapshot
    held = follower.on_delta(chain.next())
    assert held is not None
    assert held.manifest.version == 4


def test_a_manifest_past_the_version_held_is_a_gap() -> None:
    """The delta comes before its manifest: a manifest of a later version means one was missed."""
    chain = Chain(Compression(top_k=0.05), "float32")
    follower = ChainFollower()
    follower.on_snapshot(chain.manifest, chain.step.view)
    follower.on_manifest(chain.manifest)
    assert not follower.wants_snapshot
    chain.next()
    follower.on_manifest(chain.manifest)
    assert follower.wants_snapshot


def test_a_late_joiner_takes_the_snapshot_then_the_pending_deltas_after_it() -> None:
    """Deltas that arrive before the snapshot they continue are kept and applied after it."""
    chain = Chain(Compression(top_k=0.05, quantization=Quantization.INT8), "float16")
    for _ in range(3):
        chain.next()
    snapshot, view = chain.manifest, chain.step.view
    v4, v5 = chain.next(), chain.next()
    follower = ChainFollower()
    assert follower.wants_snapshot
    assert follower.on_delta(v5) is None
    assert follower.on_delta(v4) is None
    held = follower.on_snapshot(snapshot, view)
    assert held is not None
    assert held.manifest.version == 5
    assert held.view["fc.weight"].tobytes() == chain.step.view["fc.weight"].tobytes()


def test_a_delta_from_another_base_is_refused_and_asks_for_the_snapshot() -> None:
    """Same base version, different weights (a fork, or a node's damaged view): refused, never
    applied."""
    chain = Chain(Compression(top_k=0.05), "float32")
    follower = ChainFollower()
    other = reset(_target(np.random.default_rng(9)), "float32")
    follower.on_snapshot(_manifest(other, 0, chain.policy), other.view)
    with pytest.raises(CompressionError, match="base v0 has sha256"):
        follower.on_delta(chain.next())
    assert follower.wants_snapshot
    assert follower.refused == 1
    assert follower.held is not None
    assert follower.held.manifest.version == 0


def test_a_delta_that_does_not_reproduce_its_digest_is_refused() -> None:
    chain = Chain(Compression(top_k=0.05), "float32")
    follower = ChainFollower()
    follower.on_snapshot(chain.manifest, chain.step.view)
    delta = chain.next()
    wrong = delta.model_copy(
        update={"manifest": delta.manifest.model_copy(update={"sha256": "0" * 64})}
    )
    with pytest.raises(CompressionError, match="does not reproduce"):
        follower.on_delta(wrong)
    assert follower.wants_snapshot


def test_a_delta_that_does_not_fit_the_model_is_refused() -> None:
    chain = Chain(Compression(top_k=0.05), "float32")
    delta = chain.next()
    with pytest.raises(CompressionError, match="each tensor of the model once"):
        apply_delta(chain.step.view, delta.tensors[:1], "float32")


def test_a_run_that_sends_no_deltas_keeps_the_node_on_snapshots() -> None:
    step = reset(_target(np.random.default_rng(3)), "float32")
    follower = ChainFollower()
    follower.on_snapshot(_manifest(step, 0, None), step.view)
    assert follower.wants_snapshot


def test_a_view_beyond_float16s_range_widens_to_float32() -> None:
    huge = {"w": np.full((4,), 1e6, np.float32)}
    step = advance({"w": np.zeros(4, np.float32)}, huge, Compression(), "float16")
    assert step.widened
    assert step.dtype == "float32"
    assert step.view["w"].tobytes() == huge["w"].tobytes()
