"""Specification of the built-in PneumoniaMNIST dataset: shipped file, hospital split, test set."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from edge_node.datasets import PNEUMONIA_HOSPITALS, DatasetError, LocalDataset, load_dataset
from edge_node.datasets._partition import dirichlet_partition
from edge_node.datasets.pneumonia import (
    ALPHA,
    MIN_SAMPLES,
    NUM_TRAIN,
    SEED,
    hospital_train_indices,
    load_official,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA = resources.files("edge_node.datasets") / "pneumonia"

# The SHA-256 of MedMNIST's official file, as listed in shared/data/SHA256SUMS.
PUBLISHED_SHA256 = "e1792d3f03751cb101e99f19a63b3c1941436c988665f47853417b05be250cd8"
# The MD5 that the medmnist package itself checks (INFO["pneumoniamnist"]["MD5"]).
MEDMNIST_MD5 = "28209eda62fecd6e6a2d98b1501bb15f"


@pytest.fixture(scope="module")
def official() -> LocalDataset:
    """The unpartitioned official train and test splits."""
    return load_official()


@pytest.fixture(scope="module")
def hospitals() -> dict[str, LocalDataset]:
    """Every hospital's dataset, loaded through its spec."""
    return {name: load_dataset(f"pneumonia:{name}") for name in PNEUMONIA_HOSPITALS}


def test_shipped_archive_is_medmnists_original() -> None:
    """The shipped npz is byte-identical to MedMNIST's official PneumoniaMNIST file."""
    data = (DATA / "pneumoniamnist.npz").read_bytes()
    assert hashlib.sha256(data).hexdigest() == PUBLISHED_SHA256
    assert hashlib.md5(data, usedforsecurity=False).hexdigest() == MEDMNIST_MD5


def test_official_splits_have_medmnists_sizes_and_labels(official: LocalDataset) -> None:
    """Train holds 4,708 images (1,214 normal) and test 624 (234 normal), as MedMNIST states."""
    assert np.bincount(official.train_y).tolist() == [1214, 3494]
    assert np.bincount(official.test_y).tolist() == [234, 390]
    assert official.num_train == NUM_TRAIN


def test_hospitals_partition_the_train_split(hospitals: dict[str, LocalDataset]) -> None:
    """The eight hospitals' train rows are disjoint and together are the whole train split."""
    rows = [hospital_train_indices(name) for name in PNEUMONIA_HOSPITALS]
    joined = np.concatenate(rows)
    assert len(joined) == len(np.unique(joined)) == NUM_TRAIN
    assert sum(d.num_train for d in hospitals.values()) == NUM_TRAIN


def test_hospital_train_images_are_the_indexed_official_rows(
    official: LocalDataset, hospitals: dict[str, LocalDataset]
) -> None:
    """A hospital trains on exactly the official train images and labels its split names."""
    for name, dataset in hospitals.items():
        rows = hospital_train_indices(name)
        assert np.array_equal(dataset.train_x, official.train_x[rows])
        assert np.array_equal(dataset.train_y, official.train_y[rows])


def test_every_hospital_tests_on_the_whole_official_test_split(
    official: LocalDataset, hospitals: dict[str, LocalDataset]
) -> None:
    """Each node's test set is the official test split, so its accuracy is the official one."""
    for dataset in hospitals.values():
        assert np.array_equal(dataset.test_x, official.test_x)
        assert np.array_equal(dataset.test_y, official.test_y)


def test_every_hospital_has_the_floor_and_both_classes(
    hospitals: dict[str, LocalDataset],
) -> None:
    """No hospital holds fewer than MIN_SAMPLES images, and each sees both classes."""
    for name, dataset in hospitals.items():
        assert dataset.num_train >= MIN_SAMPLES, name
        assert set(np.unique(dataset.train_y).tolist()) == {0, 1}, name


def test_labels_are_skewed_across_hospitals(hospitals: dict[str, LocalDataset]) -> None:
    """The pneumonia share differs widely between hospitals (Dirichlet 0.5), unlike an IID split."""
    shares = [float(d.train_y.mean()) for d in hospitals.values()]
    assert max(shares) - min(shares) > 0.5
    assert len({round(share, 2) for share in shares}) == len(shares)


def test_images_are_float32_channels_first_in_unit_range(
    hospitals: dict[str, LocalDataset],
) -> None:
    """Images are float32 (N, 1, 28, 28) in [0, 1] for the built-in CNN; labels are 0/1 int64."""
    for dataset in hospitals.values():
        assert dataset.input_shape == (1, 28, 28)
        assert dataset.num_classes == 2
        for x in (dataset.train_x, dataset.test_x):
            assert x.dtype == np.float32
            assert float(x.min()) >= 0.0
            assert float(x.max()) <= 1.0
        assert dataset.train_y.dtype == np.int64


def test_split_json_records_the_label_counts(hospitals: dict[str, LocalDataset]) -> None:
    """split.json's per-hospital label counts (tabulated in the README) match the data."""
    table = json.loads((DATA / "split.json").read_text("utf-8"))["hospitals"]
    for name, dataset in hospitals.items():
        assert table[name]["labels"] == np.bincount(dataset.train_y, minlength=2).tolist()


def test_shipped_split_is_the_seeded_dirichlet_partition(official: LocalDataset) -> None:
    """split.json is what dirichlet_partition draws from the train labels with the fixed seed."""
    parts, _ = dirichlet_partition(
        official.train_y, len(PNEUMONIA_HOSPITALS), alpha=ALPHA, seed=SEED, min_samples=MIN_SAMPLES
    )
    for name, part in zip(PNEUMONIA_HOSPITALS, parts, strict=True):
        assert np.array_equal(hospital_train_indices(name), part), name


def test_generator_script_reproduces_split_json() -> None:
    """scripts/pneumonia_split.py --check finds the shipped split.json up to date."""
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "pneumonia_split.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert done.returncode == 0, done.stderr


def test_unknown_hospital_is_rejected_with_the_known_ones() -> None:
    """An unknown hospital name raises DatasetError listing the eight hospitals."""
    with pytest.raises(DatasetError, match="hospital-1, hospital-2"):
        load_dataset("pneumonia:hospital-9")
