"""Specification of the built-in Heart Disease dataset: FLamby's preprocessing, split, scaling."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from sklearn.model_selection import train_test_split

from edge_node.datasets import HEART_DISEASE_HOSPITALS, DatasetError, load_dataset
from edge_node.datasets.heart_disease import (
    CONTINUOUS_FEATURES,
    FEATURE_NAMES,
    hospital_records,
    hospital_split,
    load_heart_disease,
)

REPO_ROOT = Path(__file__).resolve().parents[2]

# hospital, rows after the missing-value filter, train, test, patients with disease (num > 0)
HOSPITALS = [
    pytest.param("cleveland", 303, 199, 104, 139, id="cleveland"),
    pytest.param("hungarian", 261, 172, 89, 98, id="hungarian"),
    pytest.param("switzerland", 46, 30, 16, 45, id="switzerland"),
    pytest.param("va", 130, 85, 45, 101, id="va"),
]

# The SHA-256 of UCI's original files, as listed in shared/data/SHA256SUMS.
PUBLISHED_SHA256 = {
    "cleveland": "a74b7efa387bc9d108d7d0115d831fe9b414b29ae7124f331b622b4efa0427c8",
    "hungarian": "d1ad108f785768cd3d7e82dc522e6f5a61eea93cccfb3a46ee8076f73fc3d796",
    "switzerland": "834a405ccf5b66ab4056bb77794adc8df0b7125186454c0a1d002d33c6c3b314",
    "va": "e7c93d8d0d2acdadfa4c5e8de768e2191e7f618b952e29623f1f0d5949ff6b8f",
}

CONTINUOUS = [FEATURE_NAMES.index(name) for name in CONTINUOUS_FEATURES]
BINARY = [j for j in range(len(FEATURE_NAMES)) if j not in CONTINUOUS]


def flamby_train_test_split(labels: np.ndarray) -> tuple[list[int], list[int]]:
    """FLamby's dataset.py call, restated here so the test does not trust the generator script."""
    nb = len(labels)
    levels = np.unique(labels)
    if (len(np.unique(labels)) > 1) and all((labels == lev).sum() > 2 for lev in levels):
        stratify = labels
    else:
        stratify = None
    indices_train, indices_test = train_test_split(
        np.arange(nb),
        test_size=1.0 - 0.66,
        train_size=0.66,
        random_state=43,
        shuffle=True,
        stratify=stratify,
    )
    return sorted(indices_train.tolist()), sorted(indices_test.tolist())


@pytest.mark.parametrize("hospital", HEART_DISEASE_HOSPITALS)
def test_shipped_files_are_uci_originals(hospital: str) -> None:
    """The shipped data files are byte-identical to UCI's published originals."""
    data = resources.files("edge_node.datasets") / "heart_disease" / f"processed.{hospital}.data"
    assert hashlib.sha256(data.read_bytes()).hexdigest() == PUBLISHED_SHA256[hospital]


@pytest.mark.parametrize(("hospital", "rows", "n_train", "n_test", "diseased"), HOSPITALS)
def test_missing_value_filter_keeps_flamby_row_counts(
    hospital: str, rows: int, n_train: int, n_test: int, diseased: int
) -> None:
    """Dropping slope, ca and thal, then every row with a '?', leaves FLamby's row counts."""
    features, labels = hospital_records(hospital)
    assert features.shape == (rows, 13)
    assert labels.shape == (rows,)


@pytest.mark.parametrize(("hospital", "rows", "n_train", "n_test", "diseased"), HOSPITALS)
def test_split_sizes_match_flamby(
    hospital: str, rows: int, n_train: int, n_test: int, diseased: int
) -> None:
    """Each hospital splits into FLamby's train/test sizes: 199/104, 172/89, 30/16, 85/45."""
    dataset = load_dataset(f"heart-disease:{hospital}")
    assert (dataset.num_train, dataset.num_test) == (n_train, n_test)


@pytest.mark.parametrize(("hospital", "rows", "n_train", "n_test", "diseased"), HOSPITALS)
def test_label_is_disease_present(
    hospital: str, rows: int, n_train: int, n_test: int, diseased: int
) -> None:
    """The label is 1 exactly for num > 0, giving each hospital its known share of disease."""
    _, labels = hospital_records(hospital)
    assert set(labels.tolist()) <= {0, 1}
    assert int(labels.sum()) == diseased


@pytest.mark.parametrize("hospital", ["cleveland", "hungarian", "va"])
def test_stratified_split_keeps_label_balance(hospital: str) -> None:
    """Where both labels have more than two rows, train and test have the same disease share."""
    dataset = load_heart_disease(hospital)
    assert dataset.train_y.mean() == pytest.approx(dataset.test_y.mean(), abs=0.02)


def test_switzerland_has_a_single_negative_row_and_is_split_unstratified() -> None:
    """Switzerland keeps one patient without disease, so FLamby splits it without stratifying."""
    dataset = load_heart_disease("switzerland")
    negatives = int((dataset.train_y == 0).sum() + (dataset.test_y == 0).sum())
    assert negatives == 1


@pytest.mark.parametrize("hospital", HEART_DISEASE_HOSPITALS)
def test_every_hospital_has_the_same_13_features(hospital: str) -> None:
    """Every hospital yields the 13 features in one fixed order, even for levels it never has."""
    dataset = load_heart_disease(hospital)
    assert dataset.input_shape == (13,) == (len(FEATURE_NAMES),)
    assert dataset.train_x.dtype == np.float32
    assert dataset.train_y.dtype == np.int64
    assert dataset.num_classes == 2


def test_first_cleveland_row_is_encoded_in_feature_order() -> None:
    """Cleveland's first line (cp 1, restecg 2) becomes 8 raw values then cp and restecg dummies."""
    features, labels = hospital_records("cleveland")
    # 63.0,1.0,1.0,145.0,233.0,1.0,2.0,150.0,0.0,2.3,3.0,0.0,6.0,0
    expected = [63, 1, 145, 233, 1, 150, 0, 2.3, 0, 0, 0, 0, 1]
    np.testing.assert_allclose(features[0], expected)
    assert labels[0] == 0


@pytest.mark.parametrize("hospital", HEART_DISEASE_HOSPITALS)
def test_one_hot_columns_mark_at_most_one_level(hospital: str) -> None:
    """At most one cp dummy and one restecg dummy is set per row (none for the dropped level)."""
    features, _ = hospital_records(hospital)
    cp = features[:, FEATURE_NAMES.index("cp_2") : FEATURE_NAMES.index("cp_4") + 1]
    restecg = features[:, FEATURE_NAMES.index("restecg_1") :]
    assert set(cp.sum(axis=1).tolist()) <= {0.0, 1.0}
    assert set(restecg.sum(axis=1).tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("hospital", HEART_DISEASE_HOSPITALS)
def test_continuous_columns_are_standardised_on_train(hospital: str) -> None:
    """age, trestbps, chol, thalach, oldpeak have train mean 0 and sample std 1, or are all 0."""
    train = load_heart_disease(hospital).train_x[:, CONTINUOUS].astype(np.float64)
    np.testing.assert_allclose(train.mean(axis=0), 0.0, atol=1e-6)
    std = train.std(axis=0, ddof=1)
    # Switzerland records chol as 0 for everyone: a constant column stays constant, at 0.
    constant = np.all(train == 0.0, axis=0)
    np.testing.assert_allclose(std[~constant], 1.0, rtol=1e-5)
    assert (hospital == "switzerland") == bool(constant.any())


@pytest.mark.parametrize("hospital", HEART_DISEASE_HOSPITALS)
def test_test_split_is_scaled_with_train_statistics(hospital: str) -> None:
    """Test rows are standardised with the train split's mean and std, not their own."""
    features, _ = hospital_records(hospital)
    train_idx, test_idx = hospital_split(hospital)
    raw_train = features[train_idx][:, CONTINUOUS]
    std = raw_train.std(axis=0, ddof=1)
    std[std == 0] = 1.0
    expected = (features[test_idx][:, CONTINUOUS] - raw_train.mean(axis=0)) / std
    actual = load_heart_disease(hospital).test_x[:, CONTINUOUS]
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hospital", HEART_DISEASE_HOSPITALS)
def test_binary_columns_are_left_as_zero_or_one(hospital: str) -> None:
    """sex, fbs, exang and the one-hot columns keep their 0/1 values in train and test."""
    dataset = load_heart_disease(hospital)
    features, _ = hospital_records(hospital)
    train_idx, test_idx = hospital_split(hospital)
    np.testing.assert_array_equal(dataset.train_x[:, BINARY], features[train_idx][:, BINARY])
    np.testing.assert_array_equal(dataset.test_x[:, BINARY], features[test_idx][:, BINARY])
    assert set(np.unique(dataset.train_x[:, BINARY]).tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("hospital", HEART_DISEASE_HOSPITALS)
def test_split_json_equals_flambys_train_test_split(hospital: str) -> None:
    """The shipped split is the one scikit-learn draws with FLamby's exact call (as index sets)."""
    _, labels = hospital_records(hospital)
    expected_train, expected_test = flamby_train_test_split(labels)
    train_idx, test_idx = hospital_split(hospital)
    assert train_idx.tolist() == expected_train
    assert test_idx.tolist() == expected_test


@pytest.mark.parametrize("hospital", HEART_DISEASE_HOSPITALS)
def test_split_keeps_file_order_within_each_side(hospital: str) -> None:
    """Rows keep their file order in each split, as FLamby's set-membership selection does."""
    dataset = load_heart_disease(hospital)
    _, labels = hospital_records(hospital)
    train_idx, test_idx = hospital_split(hospital)
    assert np.all(np.diff(train_idx) > 0)
    np.testing.assert_array_equal(dataset.train_y, labels[train_idx])
    np.testing.assert_array_equal(dataset.test_y, labels[test_idx])


def test_split_json_is_what_the_generator_script_writes() -> None:
    """scripts/flamby_split.py --check passes: split.json is not stale or hand-edited."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "flamby_split.py"), "--check"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_loading_does_not_import_scikit_learn() -> None:
    """The edge node's runtime loads the built-in data without scikit-learn."""
    code = (
        "import sys; from edge_node.datasets import load_dataset; "
        "load_dataset('heart-disease:va'); sys.exit('sklearn' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-c", code], env=env, check=False)
    assert result.returncode == 0


@pytest.mark.parametrize(
    "spec",
    [
        pytest.param("heart-disease:mars", id="unknown-hospital"),
        pytest.param("heart-disease:Cleveland", id="wrong-case"),
    ],
)
def test_unknown_hospital_is_rejected(spec: str) -> None:
    """An unknown hospital raises DatasetError that lists the known ones."""
    with pytest.raises(DatasetError, match="known: cleveland, hungarian, switzerland, va"):
        load_dataset(spec)
