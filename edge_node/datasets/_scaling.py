"""Standardise chosen feature columns with statistics taken from the train split only."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

__all__ = ["binary_columns", "standardise"]


def binary_columns(x: NDArray[np.float64]) -> list[int]:
    """The indices of the columns of `x` whose every value is 0 or 1."""
    return [j for j in range(x.shape[1]) if bool(np.isin(x[:, j], (0.0, 1.0)).all())]


def standardise(
    train: NDArray[np.float64],
    test: NDArray[np.float64],
    columns: Sequence[int],
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Return float32 copies of `train` and `test` with `columns` scaled by train mean and std.

    The std is the sample std (ddof=1), as torch's `Tensor.std` computes it in FLamby. A column
    that is constant on train (Switzerland records `chol` as 0 for every patient) keeps std 1, so
    its train values become exactly 0 instead of a division by zero.
    """
    cols = list(columns)
    train_out = train.astype(np.float64, copy=True)
    test_out = test.astype(np.float64, copy=True)
    if cols:
        block = train[:, cols]
        constant = block.max(axis=0) == block.min(axis=0)
        # Constant columns are centred on their value, not on a mean that rounding may nudge.
        mean = np.where(constant, block[0], block.mean(axis=0))
        std = np.where(constant, 1.0, block.std(axis=0, ddof=1) if len(block) > 1 else 1.0)
        train_out[:, cols] = (block - mean) / std
        test_out[:, cols] = (test[:, cols] - mean) / std
    return train_out.astype(np.float32), test_out.astype(np.float32)
