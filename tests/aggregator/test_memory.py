"""Specification of VersionMemory: recycled memory for new versions, never one still held."""

from __future__ import annotations

import gc

import numpy as np
import pytest

from aggregator.memory import VersionMemory

SHAPES = {"conv": (4, 3, 3), "bias": (5,), "empty": (0,), "scalar": ()}


def address(arrays: dict[str, np.ndarray]) -> int:
    """Where the slab behind a version's arrays starts (its first tensor's data pointer)."""
    return int(arrays["conv"].__array_interface__["data"][0])


def test_take_gives_writeable_contiguous_float32_arrays_of_the_shapes() -> None:
    """One array per tensor, in the given order, each its own 64-byte-aligned region."""
    arrays = VersionMemory(SHAPES).take()
    assert list(arrays) == list(SHAPES)
    for name, array in arrays.items():
        assert array.shape == SHAPES[name]
        assert array.dtype == np.float32
        assert array.flags.c_contiguous
        assert array.flags.writeable
    arrays["conv"].fill(1.0)
    arrays["bias"].fill(2.0)
    arrays["scalar"][...] = 3.0
    assert float(arrays["conv"].sum()) == 36.0
    assert float(arrays["bias"].sum()) == 10.0
    starts = [a.__array_interface__["data"][0] for a in arrays.values() if a.size]
    assert len(set(starts)) == len(starts)
    assert all((s - starts[0]) % 64 == 0 for s in starts)


def test_memory_of_a_version_nobody_holds_is_reused() -> None:
    """Two slabs serve a run: the current version's and the next one's, alternately."""
    memory = VersionMemory(SHAPES)
    current = memory.take()
    seen = {address(current)}
    for _ in range(10):
        current = memory.take()  # the previous version is dropped here
        seen.add(address(current))
    assert memory.allocated == 2
    assert len(seen) == 2


@pytest.mark.parametrize(
    "keep_alive",
    [
        pytest.param(lambda v: v, id="the-mapping"),
        pytest.param(lambda v: v["bias"], id="one-tensor"),
        pytest.param(lambda v: v["conv"].reshape(-1)[3:], id="a-view-of-a-tensor"),
        pytest.param(lambda v: memoryview(v["conv"]), id="a-memoryview"),
        pytest.param(lambda v: np.frombuffer(memoryview(v["bias"]), np.uint8), id="frombuffer"),
    ],
)
def test_memory_still_reachable_is_never_handed_out(keep_alive: object) -> None:
    """Whatever part of an old version a caller keeps, its values survive any number of takes."""
    memory = VersionMemory(SHAPES)
    old = memory.take()
    old["conv"].fill(7.0)
    old["bias"].fill(7.0)
    held = keep_alive(old)  # type: ignore[operator]
    held_address = address(old)
    del old
    gc.collect()
    for _ in range(5):
        new = memory.take()
        assert address(new) != held_address
        new["conv"].fill(-1.0)
        new["bias"].fill(-1.0)
    assert held is not None
    assert memory.allocated >= 2


def test_values_kept_by_a_caller_are_not_overwritten() -> None:
    """The check the aggregator relies on, end to end: a held version's values do not change."""
    memory = VersionMemory(SHAPES)
    versions = []
    for i in range(6):
        arrays = memory.take()
        arrays["conv"].fill(float(i))
        versions.append(arrays["conv"])  # every version kept
    assert [float(v[0, 0, 0]) for v in versions] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert memory.allocated == 6


def test_at_most_keep_slabs_are_kept_when_callers_hold_every_version() -> None:
    """Held versions make new slabs; the class stops keeping the oldest, so memory is bounded."""
    memory = VersionMemory(SHAPES, keep=3)
    held = [memory.take() for _ in range(8)]
    assert memory.allocated == 8
    assert memory.kept == 3
    del held
    gc.collect()
    before = memory.allocated
    for _ in range(5):
        memory.take()
    assert memory.allocated == before  # the three it kept are free again and reused


def test_keep_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        VersionMemory(SHAPES, keep=0)
