"""Split one labelled set across simulated hospitals with a Dirichlet label skew, seeded.

Theory of operation. For every class, in sorted class order, the class's examples are shuffled
and cut into one share per hospital with proportions drawn from Dirichlet(alpha, ..., alpha):
the usual label-skew partition of federated-learning benchmarks (Hsu, Qi and Brown 2019; Li et
al., NIID-Bench, 2022). Small `alpha` gives each hospital a very different class mix; large
`alpha` approaches an IID split. A draw can leave a hospital with (almost) nothing, so the whole
draw is repeated, from the same generator, until every hospital holds at least `min_samples`
examples. Everything comes from one `numpy.random.Generator` seeded with `seed`, so the result
depends only on the labels and the arguments (and numpy's Dirichlet stream). Pure numpy, no I/O.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from ._dataset import DatasetError

__all__ = ["MAX_DRAWS", "dirichlet_partition"]

MAX_DRAWS = 10_000
"""Give up after this many draws rather than loop forever on a floor that is barely feasible."""


def dirichlet_partition(
    labels: NDArray[np.int64],
    parts: int,
    *,
    alpha: float,
    seed: int,
    min_samples: int = 1,
) -> tuple[list[NDArray[np.int64]], int]:
    """Return `parts` sorted, disjoint index arrays that cover `labels`, and the draws it took.

    Each class `c` is shuffled, then cut at `round(cumsum(p)[:-1] * count_c)` for
    `p ~ Dirichlet(alpha * ones(parts))`; part `h` takes the `h`-th piece of every class. Draws are
    repeated until every part has at least `min_samples` indices (at most `MAX_DRAWS` times).
    """
    if parts < 1:
        raise DatasetError(f"a partition needs at least one part, not {parts}")
    if not (np.isfinite(alpha) and alpha > 0):
        raise DatasetError(f"the Dirichlet concentration alpha must be positive, not {alpha}")
    if min_samples < 0:
        raise DatasetError(f"min_samples must not be negative, not {min_samples}")
    if labels.ndim != 1:
        raise DatasetError(f"labels must be a 1-D array, not of shape {labels.shape}")
    if parts * min_samples > len(labels):
        raise DatasetError(
            f"{len(labels)} examples cannot give {parts} parts at least {min_samples} each"
        )
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for draw in range(1, MAX_DRAWS + 1):
        pieces: list[list[NDArray[np.int64]]] = [[] for _ in range(parts)]
        for label in classes:
            members = rng.permutation(np.flatnonzero(labels == label))
            shares = rng.dirichlet(np.full(parts, float(alpha)))
            cuts = np.round(np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
            for piece, chunk in zip(pieces, np.split(members, cuts), strict=True):
                piece.append(chunk)
        result = [np.sort(np.concatenate(piece)).astype(np.int64) for piece in pieces]
        if min(len(part) for part in result) >= min_samples:
            return result, draw
    raise DatasetError(
        f"no Dirichlet({alpha}) draw in {MAX_DRAWS} gave every one of {parts} parts "
        f"{min_samples} examples; lower min_samples or raise alpha"
    )
