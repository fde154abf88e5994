"""Specification of how update sizes are told: both byte counts, the comparative right way round."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.wire_size import describe_wire_size, wire_comparative


@pytest.mark.parametrize(
    ("wire", "dense", "expected"),
    [
        pytest.param(559, 112, "5.0x larger than dense", id="envelope-outweighs-a-tiny-model"),
        pytest.param(34_000, 418_000, "12.3x smaller than dense", id="compressed"),
        pytest.param(1000, 1000, "the same size as dense", id="equal"),
        pytest.param(1004, 1000, "the same size as dense", id="within-rounding"),
        pytest.param(100, 0, "no dense size to compare", id="no-dense"),
        pytest.param(0, 100, "no dense size to compare", id="nothing-sent"),
    ],
)
def test_the_comparative_says_larger_or_smaller_by_the_right_factor(
    wire: float, dense: float, expected: str
) -> None:
    """A wire size above dense is 'larger', below it 'smaller', by the ratio of the two."""
    assert wire_comparative(wire, dense) == expected


def test_the_description_names_both_byte_counts() -> None:
    """The sentence carries the wire bytes, the dense float32 bytes and the comparative."""
    assert describe_wire_size(559, 112) == (
        "559 bytes on the wire, 112 as dense float32 (5.0x larger than dense)"
    )
    assert describe_wire_size(34_000.4, 418_000) == (
        "34,000 bytes on the wire, 418,000 as dense float32 (12.3x smaller than dense)"
    )


@given(
    wire=st.floats(min_value=1, max_value=1e12),
    dense=st.floats(min_value=1, max_value=1e12),
)
def test_larger_and_smaller_never_contradict_the_numbers(wire: float, dense: float) -> None:
    """'larger' only when wire exceeds dense, 'smaller' only when it is below, factor >= 1."""
    text = wire_comparative(wire, dense)
    if "larger" in text:
        assert wire > dense
    elif "smaller" in text:
        assert wire < dense
    factor = text.split("x ", 1)[0]
    if factor[0].isdigit():
        assert float(factor) >= 1.0
