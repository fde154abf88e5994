"""The built-in PneumoniaMNIST chest X-rays, split across eight simulated hospitals by label skew.

Theory of operation. MedMNIST v2's `pneumoniamnist.npz` ships unmodified inside this package (see
`pneumonia/README.md` for origin, licence and citations) and is read with `importlib.resources`
and `numpy.load(allow_pickle=False)`, so an installed wheel needs no download.

* **Train**: the official train split (4,708 images) is divided among `PNEUMONIA_HOSPITALS` by a
  Dirichlet(0.5) label-skew partition (`dirichlet_partition`, seed 0, every hospital at least 100
  images). The official validation split (524 images) is left out, as in MedMNIST's own
  benchmark, which trains on train, selects on val and reports test: the figures stay comparable.
* **Test**: every hospital's test set is the whole official test split (624 images), so every
  node reports the accuracy of the global model on the official test split, and the mean and
  pooled accuracies of a federation equal it.
* **Stored, not recomputed**: the per-hospital row indices live in `pneumonia/split.json`,
  written by `scripts/pneumonia_split.py`. A split computed at load time would hang on numpy's
  Dirichlet sampler giving the same floats on every machine and numpy release; a stored one is
  data, identical everywhere, and checked here to be a partition of the train split.
* Images are float32 `(1, 28, 28)` in [0, 1] (pixel / 255, no further normalisation), labels
  int64: 0 = normal, 1 = pneumonia.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ._dataset import DatasetError, LocalDataset
from ._npz_loader import load_npz

__all__ = [
    "ALPHA",
    "MIN_SAMPLES",
    "NUM_TRAIN",
    "PNEUMONIA_HOSPITALS",
    "SEED",
    "hospital_train_indices",
    "load_official",
    "load_pneumonia",
]

PNEUMONIA_HOSPITALS: tuple[str, ...] = tuple(f"hospital-{i}" for i in range(1, 9))
ALPHA = 0.5
SEED = 0
MIN_SAMPLES = 100
NUM_TRAIN = 4708
"""Images in the official train split, the rows that `split.json` partitions."""

_PACKAGE = __name__.rpartition(".")[0]
_DATA_DIR = "pneumonia"
_ARCHIVE = "pneumoniamnist.npz"


def load_pneumonia(hospital: str) -> LocalDataset:
    """Return one hospital's share of the train split and the whole official test split."""
    indices = hospital_train_indices(hospital)
    official = load_official()
    return LocalDataset(
        name=f"pneumonia:{hospital}",
        train_x=official.train_x[indices],
        train_y=official.train_y[indices],
        test_x=official.test_x,
        test_y=official.test_y,
        num_classes=2,
    )


def load_official() -> LocalDataset:
    """The shipped archive's official train and test splits, unpartitioned."""
    with resources.as_file(resources.files(_PACKAGE) / _DATA_DIR / _ARCHIVE) as path:
        official = load_npz(path)
    if official.num_train != NUM_TRAIN:
        raise DatasetError(
            f"{_ARCHIVE}: {official.num_train} train images, expected {NUM_TRAIN}; "
            "is it MedMNIST's original file?"
        )
    return official


def hospital_train_indices(hospital: str) -> NDArray[np.int64]:
    """Return the sorted rows of the official train split that `hospital` trains on."""
    if hospital not in PNEUMONIA_HOSPITALS:
        known = ", ".join(PNEUMONIA_HOSPITALS)
        raise DatasetError(f"unknown pneumonia hospital {hospital!r}; known: {known}")
    table = _split_table()
    lists = [_indices(table, name) for name in PNEUMONIA_HOSPITALS]
    # A table that is not a partition would leak rows between hospitals or drop some silently.
    joined = np.sort(np.concatenate(lists))
    if not np.array_equal(joined, np.arange(NUM_TRAIN)):
        raise DatasetError(
            f"split.json: the hospitals' rows are not a partition of the {NUM_TRAIN} train images"
        )
    return lists[PNEUMONIA_HOSPITALS.index(hospital)]


def _split_table() -> dict[str, Any]:
    text = (resources.files(_PACKAGE) / _DATA_DIR / "split.json").read_text("utf-8")
    table = json.loads(text).get("hospitals")
    if not isinstance(table, dict):
        raise DatasetError("pneumonia split.json has no 'hospitals' table")
    return table


def _indices(table: dict[str, Any], hospital: str) -> NDArray[np.int64]:
    entry = table.get(hospital)
    rows = entry.get("train") if isinstance(entry, dict) else None
    if not isinstance(rows, list) or not all(isinstance(row, int) for row in rows):
        raise DatasetError(f"pneumonia split.json: no list of train rows for {hospital!r}")
    return np.array(rows, dtype=np.int64)
