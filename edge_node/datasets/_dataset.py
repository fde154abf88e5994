"""The in-memory shape every local dataset takes, and the error raised when one cannot be built."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from common.errors import ConfigError

__all__ = ["DatasetError", "LocalDataset"]


class DatasetError(ConfigError, ValueError):
    """A dataset spec, file, column or value cannot be turned into a `LocalDataset`.

    It is a `ConfigError` because a data reference is part of a node's configuration, and a
    `ValueError` so that callers outside healthNET can catch it the ordinary way.
    """


@dataclass(frozen=True, slots=True)
class LocalDataset:
    """One hospital's train and test data, ready for a model: float32 inputs, int64 class indices.

    Inputs are `(N, *input_shape)`; images are channels-first `(N, C, H, W)` scaled to [0, 1].
    Labels are class indices in `0 .. num_classes - 1`. The arrays are not copied: treat them as
    read-only.
    """

    name: str
    train_x: NDArray[np.float32]
    train_y: NDArray[np.int64]
    test_x: NDArray[np.float32]
    test_y: NDArray[np.int64]
    num_classes: int

    def __post_init__(self) -> None:
        # Plug-ins build this class themselves, so the invariants are checked here, once, rather
        # than by every trainer that consumes it.
        _check_split(self.name, "train", self.train_x, self.train_y, self.num_classes)
        _check_split(self.name, "test", self.test_x, self.test_y, self.num_classes)
        if self.num_train == 0:
            raise DatasetError(f"dataset {self.name!r}: the train split is empty")
        if self.test_x.shape[1:] != self.train_x.shape[1:]:
            raise DatasetError(
                f"dataset {self.name!r}: test inputs have shape {self.test_x.shape[1:]} per "
                f"example, train inputs {self.train_x.shape[1:]}"
            )

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one example, without the batch axis."""
        return tuple(int(n) for n in self.train_x.shape[1:])

    @property
    def num_train(self) -> int:
        """How many training examples there are."""
        return int(self.train_y.shape[0])

    @property
    def num_test(self) -> int:
        """How many test examples there are."""
        return int(self.test_y.shape[0])


def _check_split(
    name: str,
    split: str,
    x: NDArray[np.float32],
    y: NDArray[np.int64],
    num_classes: int,
) -> None:
    """Raise `DatasetError` unless `x` and `y` form a well-typed split with labels in range."""
    where = f"dataset {name!r}, {split} split"
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim < 2:
        raise DatasetError(f"{where}: inputs must be a float32 array of shape (N, ...)")
    if not isinstance(y, np.ndarray) or y.dtype != np.int64 or y.ndim != 1:
        raise DatasetError(f"{where}: labels must be an int64 array of shape (N,)")
    if x.shape[0] != y.shape[0]:
        raise DatasetError(f"{where}: {x.shape[0]} inputs but {y.shape[0]} labels")
    if num_classes < 1:
        raise DatasetError(f"dataset {name!r}: num_classes must be positive, not {num_classes}")
    if y.size and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise DatasetError(f"{where}: labels must lie in 0..{num_classes - 1}")
