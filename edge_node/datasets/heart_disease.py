"""The built-in UCI Heart Disease dataset, one hospital per node, preprocessed as FLamby does.

Theory of operation. The four original UCI "processed" files ship inside this package (see
`heart_disease/README.md` for origin, licence and citations) and are read with
`importlib.resources`, so an installed wheel needs no download. Each hospital is turned into a
`LocalDataset` the way FLamby's Fed-Heart-Disease builds it (owkin/FLamby,
`flamby/datasets/fed_heart_disease/dataset.py`):

1. `?` means missing; drop `slope`, `ca` and `thal`, then every row that still has a missing
   value (303 / 261 / 46 / 130 rows remain for Cleveland / Hungarian / Switzerland / VA);
2. one-hot `cp` (levels 1-4) and `restecg` (levels 0-2) with the first level dropped. FLamby
   one-hot encodes the four hospitals pooled, so every hospital gets all 13 columns in the same
   order, even where a level never occurs there (`FEATURE_NAMES`);
3. label = `num > 0` (disease);
4. split train/test with the row indices in `heart_disease/split.json`, which
   `scripts/flamby_split.py` generates with FLamby's exact `train_test_split` call, so that the
   runtime does not need scikit-learn. Rows keep their file order within each split, as in FLamby;
5. standardise the continuous columns (`CONTINUOUS_FEATURES`) with the hospital's own train mean
   and sample std. Unlike FLamby, which standardises all 13 columns, the 0/1 columns stay 0/1.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ._dataset import DatasetError, LocalDataset
from ._scaling import standardise

__all__ = [
    "CONTINUOUS_FEATURES",
    "FEATURE_NAMES",
    "HEART_DISEASE_HOSPITALS",
    "hospital_records",
    "hospital_split",
    "load_heart_disease",
]

HEART_DISEASE_HOSPITALS: tuple[str, ...] = ("cleveland", "hungarian", "switzerland", "va")

FEATURE_NAMES: tuple[str, ...] = (
    "age",
    "sex",
    "trestbps",
    "chol",
    "fbs",
    "thalach",
    "exang",
    "oldpeak",
    "cp_2",
    "cp_3",
    "cp_4",
    "restecg_1",
    "restecg_2",
)
CONTINUOUS_FEATURES: tuple[str, ...] = ("age", "trestbps", "chol", "thalach", "oldpeak")

# The 14 columns of a UCI "processed" file, in file order.
_FILE_COLUMNS = (
    "age",
    "sex",
    "cp",
    "trestbps",
    "chol",
    "fbs",
    "restecg",
    "thalach",
    "exang",
    "oldpeak",
    "slope",
    "ca",
    "thal",
    "num",
)
_DROPPED = frozenset({"slope", "ca", "thal"})
_KEPT = tuple(i for i, name in enumerate(_FILE_COLUMNS) if name not in _DROPPED)
_PASSTHROUGH = ("age", "sex", "trestbps", "chol", "fbs", "thalach", "exang", "oldpeak")
# One-hot levels after dropping the first one; fixed so that every hospital has 13 columns.
_DUMMY_LEVELS = {"cp": (2.0, 3.0, 4.0), "restecg": (1.0, 2.0)}
_ALL_LEVELS = {"cp": (1.0, 2.0, 3.0, 4.0), "restecg": (0.0, 1.0, 2.0)}
_MISSING = "?"
_PACKAGE = __name__.rpartition(".")[0]
_DATA_DIR = "heart_disease"


def load_heart_disease(hospital: str) -> LocalDataset:
    """Return one hospital's standardised 13-feature train/test split with 0/1 disease labels."""
    features, labels = hospital_records(hospital)
    train_idx, test_idx = hospital_split(hospital)
    if len(train_idx) + len(test_idx) != len(labels):
        raise DatasetError(
            f"split.json: hospital {hospital!r} splits {len(train_idx) + len(test_idx)} rows, "
            f"but {len(labels)} rows survive the missing-value filter"
        )
    continuous = [FEATURE_NAMES.index(name) for name in CONTINUOUS_FEATURES]
    train_x, test_x = standardise(features[train_idx], features[test_idx], continuous)
    return LocalDataset(
        name=f"heart-disease:{hospital}",
        train_x=train_x,
        train_y=labels[train_idx],
        test_x=test_x,
        test_y=labels[test_idx],
        num_classes=2,
    )


def hospital_records(hospital: str) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """Return the rows left after FLamby's missing-value filter: raw 13 features and 0/1 labels.

    The features are one-hot encoded but not standardised; row `i` here is index `i` in
    `split.json`.
    """
    _check_hospital(hospital)
    file_name = f"processed.{hospital}.data"
    text = (resources.files(_PACKAGE) / _DATA_DIR / file_name).read_text("ascii")
    rows: list[list[float]] = []
    labels: list[int] = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        values = _parse_line(file_name, line_number, line)
        if values is None:
            continue
        record = dict(zip((_FILE_COLUMNS[i] for i in _KEPT), values, strict=True))
        rows.append(_encode(file_name, line_number, record))
        labels.append(int(record["num"] > 0))
    return np.array(rows, dtype=np.float64), np.array(labels, dtype=np.int64)


def hospital_split(hospital: str) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Return the shipped train and test row indices (into `hospital_records`) of a hospital."""
    _check_hospital(hospital)
    entry = _split_table().get(hospital)
    if not isinstance(entry, dict):
        raise DatasetError(f"split.json has no entry for hospital {hospital!r}")
    train = np.array(entry.get("train", []), dtype=np.int64)
    test = np.array(entry.get("test", []), dtype=np.int64)
    rows = entry.get("rows")
    # A split that does not partition the rows would silently leak test rows into training.
    if not isinstance(rows, int) or sorted([*train.tolist(), *test.tolist()]) != list(range(rows)):
        raise DatasetError(f"split.json: hospital {hospital!r} is not a partition of its rows")
    return train, test


def _split_table() -> dict[str, Any]:
    """Read the `hospitals` table of `split.json`."""
    text = (resources.files(_PACKAGE) / _DATA_DIR / "split.json").read_text("utf-8")
    table = json.loads(text).get("hospitals")
    if not isinstance(table, dict):
        raise DatasetError("split.json has no 'hospitals' table")
    return table


def _check_hospital(hospital: str) -> None:
    if hospital not in HEART_DISEASE_HOSPITALS:
        known = ", ".join(HEART_DISEASE_HOSPITALS)
        raise DatasetError(f"unknown heart-disease hospital {hospital!r}; known: {known}")


def _parse_line(file_name: str, line_number: int, line: str) -> list[float] | None:
    """Return the kept columns of one line as numbers, or None when one of them is missing."""
    fields = [field.strip() for field in line.split(",")]
    if len(fields) != len(_FILE_COLUMNS):
        raise DatasetError(
            f"{file_name}, line {line_number}: {len(fields)} fields, expected {len(_FILE_COLUMNS)}"
        )
    kept = [fields[i] for i in _KEPT]
    if any(field in {_MISSING, ""} for field in kept):
        return None
    try:
        return [float(field) for field in kept]
    except ValueError as error:
        raise DatasetError(f"{file_name}, line {line_number}: {error}") from error


def _encode(file_name: str, line_number: int, record: dict[str, float]) -> list[float]:
    """Lay one record out as the 13 features of `FEATURE_NAMES`."""
    features = [record[name] for name in _PASSTHROUGH]
    for column, levels in _DUMMY_LEVELS.items():
        value = record[column]
        if value not in _ALL_LEVELS[column]:
            raise DatasetError(
                f"{file_name}, line {line_number}, column {column!r}: unexpected level {value}"
            )
        features.extend(float(value == level) for level in levels)
    return features
