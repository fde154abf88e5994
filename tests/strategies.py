"""Hypothesis strategies shared by the property tests: model states, deltas, messages."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

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
