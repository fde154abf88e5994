"""Specification of compression policies: what a node may send and what the aggregator admits."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given

from common.compression import compress
from common.compression_policy import (
    admits,
    at_least_as_strict_as,
    effective_policy,
    keep_count,
    strength,
)
from common.messages import Compression, Quantization
from tests.strategies import compressions, deltas


def test_quantizations_are_ordered_by_the_bits_they_send() -> None:
    """NONE < FP16 < INT8: a stronger quantization sends fewer bits per value."""
    ordered = sorted(Quantization, key=strength)
    assert ordered == [Quantization.NONE, Quantization.FP16, Quantization.INT8]


@given(asked=compressions(), own=compressions())
def test_a_nodes_own_policy_only_tightens_the_runs(asked: Compression, own: Compression) -> None:
    """effective_policy is at least as strict as both, and takes the node's error feedback."""
    effective = effective_policy(asked, own)
    assert at_least_as_strict_as(effective, asked)
    assert at_least_as_strict_as(effective, own)
    assert effective.error_feedback is own.error_feedback
    assert effective_policy(asked, None) == asked


@pytest.mark.parametrize(
    ("node", "asked", "expected"),
    [
        pytest.param(Compression(), Compression(), True, id="same"),
        pytest.param(Compression(top_k=0.01), Compression(top_k=0.1), True, id="fewer-entries"),
        pytest.param(Compression(top_k=0.1), Compression(top_k=0.01), False, id="more-entries"),
        pytest.param(Compression(), Compression(top_k=0.5), False, id="dense-for-top-k"),
        pytest.param(Compression(top_k=1.0), Compression(), True, id="top-k-1-is-dense"),
        pytest.param(
            Compression(quantization=Quantization.INT8),
            Compression(quantization=Quantization.FP16),
            True,
            id="int8-for-fp16",
        ),
        pytest.param(
            Compression(quantization=Quantization.FP16),
            Compression(quantization=Quantization.INT8),
            False,
            id="fp16-for-int8",
        ),
        pytest.param(
            Compression(quantization=Quantization.NONE),
            Compression(quantization=Quantization.FP16),
            False,
            id="float32-for-fp16",
        ),
        pytest.param(
            Compression(top_k=0.01, error_feedback=False),
            Compression(top_k=0.01),
            True,
            id="feedback-is-not-strictness",
        ),
    ],
)
def test_a_node_may_compress_more_than_asked_never_less(
    node: Compression, asked: Compression, expected: bool
) -> None:
    """at_least_as_strict_as orders policies by kept fraction and quantization strength."""
    assert at_least_as_strict_as(node, asked) is expected


@given(delta=deltas(), node=compressions(), asked=compressions())
def test_a_policy_admits_the_tensors_of_any_policy_at_least_as_strict(
    delta: dict[str, Any], node: Compression, asked: Compression
) -> None:
    """Tensors compressed under a stricter policy are admitted by the asked one."""
    if at_least_as_strict_as(node, asked):
        assert all(admits(asked, t) for t in compress(delta, node).tensors)


def test_a_policy_refuses_tensors_that_send_too_much() -> None:
    """admits() is false for more entries or a weaker dtype than asked."""
    vector = {"v": np.arange(100, dtype=np.float32)}
    asked = Compression(top_k=0.1, quantization=Quantization.FP16)
    assert not admits(asked, compress(vector, Compression(top_k=0.2)).tensors[0])
    assert not admits(asked, compress(vector, Compression(top_k=0.1)).tensors[0])
    assert admits(asked, compress(vector, asked).tensors[0])


@pytest.mark.parametrize(
    ("top_k", "size", "expected"),
    [
        pytest.param(None, 7, 7, id="dense"),
        pytest.param(0.1, 25, 3, id="rounds-up"),
        pytest.param(1e-6, 25, 1, id="at-least-one"),
        pytest.param(0.5, 0, 0, id="empty-tensor"),
    ],
)
def test_keep_count_is_at_least_one_and_rounds_up(
    top_k: float | None, size: int, expected: int
) -> None:
    """k = max(1, ceil(top_k * n)) for a non-empty tensor."""
    assert keep_count(Compression(top_k=top_k), size) == expected
