"""Specification of `healthnet predict`: a model copy on a hospital's own records."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
import pytest

from common.codec import encode_tensors, sha256_hex
from common.errors import ConfigError
from common.messages import ModelSpec
from common.models import build_model, model_params
from edge_node.datasets import load_dataset
from edge_node.datasets.heart_disease import hospital_records, hospital_split
from healthnet.lifecycle import ModelCopy, write_model_copy
from healthnet.predict import fit_preprocessing, predict, write_preprocessing

SPEC = ModelSpec(name="logreg", kwargs={"in_features": 3, "num_classes": 2})


def model_copy(directory: Path, spec: ModelSpec = SPEC) -> Path:
    blob = encode_tensors(model_params(build_model(spec, seed=3)))
    copy = ModelCopy(
        run_id="run-1",
        version=5,
        model=spec,
        sha256=sha256_hex(blob),
        blob_bytes=len(blob),
        source="test",
        pulled_at=time.time(),
    )
    write_model_copy(directory, copy, blob, [])
    return directory


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])
    return path


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture
def hospital(tmp_path: Path) -> tuple[Path, str]:
    """A hospital's CSV data (train and test files, labels 3 and 7) and its model copy."""
    rng = np.random.default_rng(0)
    header = ["age", "smoker", "chol", "outcome"]

    def rows(n: int) -> list[list[object]]:
        return [
            [round(rng.normal(60, 9), 1), int(rng.integers(0, 2)), round(rng.normal(230, 40)),
             int(rng.choice([3, 7]))]
            for _ in range(n)
        ]  # fmt: skip

    write_csv(tmp_path / "train.csv", header, rows(40))
    write_csv(tmp_path / "test.csv", header, rows(15))
    spec = f"csv:{tmp_path / 'train.csv'}#label=outcome&test={tmp_path / 'test.csv'}"
    copy = model_copy(tmp_path / "model")
    write_preprocessing(copy, spec)
    return copy, spec


def test_records_are_scaled_with_the_hospitals_own_statistics(
    hospital: tuple[Path, str], tmp_path: Path
) -> None:
    """New records in the training columns get exactly the predictions of the node's own test
    split: the statistics kept in the model copy are the ones the node trained with."""
    copy, spec = hospital
    split = predict(copy, spec, tmp_path / "split.csv")
    records = predict(copy, f"records:{tmp_path / 'test.csv'}", tmp_path / "records.csv")
    assert len(records.rows) == 15
    assert records.classes == (3, 7)  # the file's own labels, not class indices
    for a, b in zip(split.rows, records.rows, strict=True):
        assert a.probabilities == b.probabilities
        assert records.classes[a.predicted or 0] == b.predicted
    assert split.accuracy == records.accuracy


def test_a_bad_record_gets_an_error_row_and_the_run_goes_on(
    hospital: tuple[Path, str], tmp_path: Path
) -> None:
    """A missing or non-numeric cell makes that row's error, in order, without a prediction."""
    copy, _ = hospital
    data = write_csv(
        tmp_path / "new.csv",
        ["id", "chol", "smoker", "age", "note"],
        [["p1", 250, 1, 61.5, "x"], ["p2", "", 0, 70, ""], ["p3", 210, "yes", 48, ""],
         ["p4", 199, 0, 55, ""]],
    )  # fmt: skip
    run = predict(copy, f"records:{data}", tmp_path / "out.csv")
    rows = read_rows(tmp_path / "out.csv")
    assert [r["id"] for r in rows] == ["p1", "p2", "p3", "p4"]
    assert rows[1]["error"] == "column 'chol': missing value"
    assert rows[2]["error"] == "column 'smoker': 'yes' is not a number"
    assert rows[1]["predicted"] == rows[2]["predicted"] == ""
    for row in (rows[0], rows[3]):
        assert row["error"] == ""
        assert row["predicted"] in {"3", "7"}
        assert float(row["p_3"]) + float(row["p_7"]) == pytest.approx(1.0)
    assert run.errors == 2


def test_records_without_a_training_column_are_refused_whole(
    hospital: tuple[Path, str], tmp_path: Path
) -> None:
    """A file that lacks a column the model reads is a configuration error, said up front."""
    copy, _ = hospital
    data = write_csv(tmp_path / "new.csv", ["age", "chol"], [[60, 200]])
    with pytest.raises(ConfigError, match="smoker"):
        predict(copy, f"records:{data}", tmp_path / "out.csv")


def test_records_need_the_statistics_in_the_model_copy(tmp_path: Path) -> None:
    """Without preprocessing.json the run says how to get it instead of guessing a scaling."""
    copy = model_copy(tmp_path / "model")
    data = write_csv(tmp_path / "new.csv", ["a", "b", "c"], [[1, 2, 3]])
    with pytest.raises(ConfigError, match="--data"):
        predict(copy, f"records:{data}", tmp_path / "out.csv")


@pytest.mark.parametrize("hospital_name", ["cleveland", "switzerland"])
def test_heart_disease_statistics_reproduce_the_nodes_inputs_exactly(hospital_name: str) -> None:
    """The fitted preprocessing turns a hospital's raw test rows into the very float32 inputs its
    node evaluates on (Switzerland has a constant column)."""
    preprocessing = fit_preprocessing(f"heart-disease:{hospital_name}")
    features, _ = hospital_records(hospital_name)
    _, test = hospital_split(hospital_name)
    dataset = load_dataset(f"heart-disease:{hospital_name}")
    assert np.array_equal(preprocessing.scaling.apply(features[test]), dataset.test_x)


def test_image_specs_have_no_statistics_to_keep() -> None:
    """Asking for the records preprocessing of an image spec says to predict on the spec."""
    with pytest.raises(ConfigError, match="image"):
        fit_preprocessing("pneumonia:hospital-1")
