"""Load a numeric CSV file with a header row and an integer label column as a `LocalDataset`."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from ._dataset import DatasetError, LocalDataset
from ._scaling import Scaling, binary_columns, fit_scaling

if TYPE_CHECKING:
    from _csv import Reader

__all__ = ["CsvOptions", "CsvPreprocessing", "csv_preprocessing", "load_csv", "split_rows"]


@dataclass(frozen=True, slots=True)
class CsvOptions:
    """How to read a CSV: the label column, and either a test file or a seeded split."""

    label: str = "label"
    test_path: Path | None = None
    test_fraction: float = 0.34
    seed: int = 0


@dataclass(frozen=True, slots=True)
class _Table:
    """The parsed body of one CSV file: feature names and values, and raw integer labels."""

    features: tuple[str, ...]
    x: NDArray[np.float64]
    y: NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class CsvPreprocessing:
    """What `load_csv` does to a record: its feature columns in order, the scaling fitted on the
    train split, and the raw labels that the class indices 0..C-1 stand for."""

    features: tuple[str, ...]
    label: str
    classes: tuple[int, ...]
    scaling: Scaling


def load_csv(path: Path, options: CsvOptions) -> LocalDataset:
    """Read `path` (and `options.test_path`) into a train/test split with standardised features.

    Labels are remapped to 0..C-1 in sorted order of the labels seen in train and test together.
    Columns that hold only 0 and 1 on train are left as they are; the others are standardised with
    the train split's mean and std.
    """
    features, train_x, train_y, test_x, test_y = _split(path, options)
    preprocessing = _fit(features, options.label, train_x, train_y, test_y)
    classes = np.array(preprocessing.classes, dtype=np.int64)
    return LocalDataset(
        name=f"csv:{path.name}",
        train_x=preprocessing.scaling.apply(train_x),
        train_y=np.searchsorted(classes, train_y).astype(np.int64),
        test_x=preprocessing.scaling.apply(test_x),
        test_y=np.searchsorted(classes, test_y).astype(np.int64),
        num_classes=len(classes),
    )


def csv_preprocessing(path: Path, options: CsvOptions) -> CsvPreprocessing:
    """The preprocessing `load_csv` applies to this file's records (fitted on its train split)."""
    features, train_x, train_y, _, test_y = _split(path, options)
    return _fit(features, options.label, train_x, train_y, test_y)


_Split = tuple[
    tuple[str, ...], NDArray[np.float64], NDArray[np.int64], NDArray[np.float64], NDArray[np.int64]
]


def _split(path: Path, options: CsvOptions) -> _Split:
    table = _read_table(path, options.label)
    if options.test_path is None:
        train_idx, test_idx = split_rows(table.y, options.test_fraction, options.seed)
        return (
            table.features,
            table.x[train_idx],
            table.y[train_idx],
            table.x[test_idx],
            table.y[test_idx],
        )
    test = _read_table(options.test_path, options.label)
    return table.features, table.x, table.y, _align(test, table.features, options.test_path), test.y


def _fit(
    features: tuple[str, ...],
    label: str,
    train_x: NDArray[np.float64],
    train_y: NDArray[np.int64],
    test_y: NDArray[np.int64],
) -> CsvPreprocessing:
    classes = np.unique(np.concatenate([train_y, test_y]))
    binary = binary_columns(train_x)
    continuous = [j for j in range(train_x.shape[1]) if j not in binary]
    return CsvPreprocessing(
        features=features,
        label=label,
        classes=tuple(int(c) for c in classes),
        scaling=fit_scaling(train_x, continuous),
    )


def split_rows(
    y: NDArray[np.int64], test_fraction: float, seed: int
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Return sorted train and test row indices, a seeded split stratified where possible.

    The split is stratified when every class has at least two rows, so that each class can appear
    on both sides; each class then gives round(test_fraction * its size) rows to test, at least
    one and never all. Otherwise the rows are shuffled and split as a whole the same way.
    """
    if not 0.0 < test_fraction < 1.0:
        raise DatasetError(f"test_fraction must lie strictly between 0 and 1, not {test_fraction}")
    if len(y) < 2:
        raise DatasetError(f"a train/test split needs at least 2 rows, the file has {len(y)}")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(y, return_counts=True)
    if bool((counts >= 2).all()):
        groups = [np.flatnonzero(y == c) for c in classes]
    else:
        groups = [np.arange(len(y))]
    test_parts = []
    for group in groups:
        n_test = min(max(math.floor(test_fraction * len(group) + 0.5), 1), len(group) - 1)
        test_parts.append(rng.permutation(group)[:n_test])
    test_idx = np.sort(np.concatenate(test_parts)).astype(np.int64)
    train_idx = np.setdiff1d(np.arange(len(y)), test_idx).astype(np.int64)
    return train_idx, test_idx


def _align(table: _Table, features: tuple[str, ...], path: Path) -> NDArray[np.float64]:
    """Return the test table's features in the train file's column order."""
    if set(table.features) != set(features):
        raise DatasetError(
            f"{path}: columns {sorted(table.features)} differ from the train file's "
            f"{sorted(features)}"
        )
    return table.x[:, [table.features.index(name) for name in features]]


def _read_table(path: Path, label: str) -> _Table:
    """Parse a CSV file whose cells must all be finite numbers, and integers in `label`."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as file:
            return _parse(path, csv.reader(file), label)
    except OSError as error:
        raise DatasetError(f"cannot read CSV file {path}: {error.strerror or error}") from error
    except (csv.Error, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: not a readable CSV file: {error}") from error


def _parse(path: Path, reader: Reader, label: str) -> _Table:
    header = [name.strip() for name in next(reader, [])]
    _check_header(path, header, label)
    label_at = header.index(label)
    rows: list[list[float]] = []
    labels: list[int] = []
    for cells in reader:
        if not any(cell.strip() for cell in cells):
            continue  # blank lines, often a trailing one, carry no data
        where = f"{path}, line {reader.line_num}"
        if len(cells) != len(header):
            raise DatasetError(f"{where}: {len(cells)} fields, the header has {len(header)}")
        values = [
            _number(f"{where}, column {name!r}", cell)
            for name, cell in zip(header, cells, strict=True)
        ]
        labels.append(_integer(f"{where}, column {label!r}", values.pop(label_at)))
        rows.append(values)
    if not rows:
        raise DatasetError(f"{path}: the file has a header but no data rows")
    features = tuple(name for name in header if name != label)
    return _Table(features, np.array(rows, dtype=np.float64), np.array(labels, dtype=np.int64))


def _check_header(path: Path, header: list[str], label: str) -> None:
    if not header:
        raise DatasetError(f"{path}: the file is empty; expected a header row")
    if any(not name for name in header):
        raise DatasetError(f"{path}: the header row has an empty column name")
    duplicates = sorted({name for name in header if header.count(name) > 1})
    if duplicates:
        raise DatasetError(f"{path}: duplicate column names {duplicates}")
    if label not in header:
        raise DatasetError(f"{path}: no label column {label!r}; the columns are {header}")
    if len(header) < 2:
        raise DatasetError(f"{path}: no feature columns besides the label {label!r}")


def _number(where: str, cell: str) -> float:
    text = cell.strip()
    if not text:
        raise DatasetError(f"{where}: missing value")
    try:
        value = float(text)
    except ValueError:
        raise DatasetError(f"{where}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise DatasetError(f"{where}: {text!r} is not a finite number")
    return value


def _integer(where: str, value: float) -> int:
    if not value.is_integer():
        raise DatasetError(f"{where}: label {value} is not an integer class")
    return int(value)
