"""Standardise chosen feature columns with statistics taken from the train split only."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

__all__ = ["Scaling", "binary_columns", "fit_scaling", "standardise"]


def binary_columns(x: NDArray[np.float64]) -> list[int]:
    """The indices of the columns of `x` whose every value is 0 or 1."""
    return [j for j in range(x.shape[1]) if bool(np.isin(x[:, j], (0.0, 1.0)).all())]


@dataclass(frozen=True, slots=True)
class Scaling:
    """The statistics a train split gives its chosen columns: ``(x - mean) / std`` per column.

    Kept as a value so that a hospital's prediction on new records applies exactly what its
    training applied (the same float64 operations, so the same float32 inputs).
    """

    columns: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def apply(self, x: NDArray[np.float64]) -> NDArray[np.float32]:
        """A float32 copy of `x` with `columns` standardised."""
        out = x.astype(np.float64, copy=True)
        if self.columns:
            cols = list(self.columns)
            out[:, cols] = (x[:, cols] - np.array(self.mean)) / np.array(self.std)
        return out.astype(np.float32)


def fit_scaling(train: NDArray[np.float64], columns: Sequence[int]) -> Scaling:
    """The train split's mean and std of `columns`.

    The std is the sample std (ddof=1), as torch's `Tensor.std` computes it in FLamby. A column
    that is constant on train (Switzerland records `chol` as 0 for every patient) keeps std 1, so
    its train values become exactly 0 instead of a division by zero.
    """
    cols = list(columns)
    if not cols:
        return Scaling((), (), ())
    block = train[:, cols]
    constant = block.max(axis=0) == block.min(axis=0)
    # Constant columns are centred on their value, not on a mean that rounding may nudge.
    mean = np.where(constant, block[0], block.mean(axis=0))
    std = np.where(constant, 1.0, block.std(axis=0, ddof=1) if len(block) > 1 else 1.0)
    return Scaling(
        tuple(cols),
        tuple(float(m) for m in mean),
        tuple(float(s) for s in np.broadcast_to(std, mean.shape)),
    )


def standardise(
    train: NDArray[np.float64],
    test: NDArray[np.float64],
    columns: Sequence[int],
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Return float32 copies of `train` and `test` with `columns` scaled by train mean and std
    (`fit_scaling`)."""
    scaling = fit_scaling(train, columns)
    return scaling.apply(train), scaling.apply(test)
