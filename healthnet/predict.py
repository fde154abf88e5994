"""``healthnet predict``: run a pulled model on a hospital's own records, one CSV row per record.

Two kinds of data, named like a node's ``--data``:

* a node dataset spec (``heart-disease:<hospital>``, ``pneumonia:<hospital>``, ``csv:…``,
  ``npz:…``, a plug-in): the spec's **test split**, built by the node's own loader, so with
  exactly the preprocessing the node trained and evaluated with. Its labels are known, so the run
  reports the accuracy, which equals what the node reported to the aggregator for that version.
* ``records:<file.csv>``: new records, a CSV whose header names the training columns (extra
  columns are ignored; an ``id`` column names the rows, a label column is optional). They are
  standardised with the hospital's own statistics, which ``healthnet model pull … --data SPEC``
  fitted on the hospital's train split and kept in the model copy (``preprocessing.json``): the
  statistics stay at the hospital, the aggregator never sees them. A record with a missing or
  non-numeric cell becomes a row with an error, and the run goes on.

Predictions are the class with the largest logit (as the node evaluates) and the softmax
probabilities, computed in batches of the node's evaluation size.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict
from torch import nn

from common.errors import ConfigError
from common.files import atomic_write
from edge_node.datasets import (
    DatasetError,
    Scaling,
    csv_arguments,
    csv_preprocessing,
    fit_scaling,
    load_dataset,
)
from edge_node.datasets.heart_disease import (
    CONTINUOUS_FEATURES,
    FEATURE_NAMES,
    hospital_records,
    hospital_split,
)
from healthnet.lifecycle import load_model_copy

__all__ = [
    "PREPROCESSING_JSON",
    "Prediction",
    "PredictionRun",
    "Preprocessing",
    "fit_preprocessing",
    "predict",
    "write_preprocessing",
]

PREPROCESSING_JSON = "preprocessing.json"
RECORDS = "records:"
# The node evaluates in batches of this size (edge_node.training.evaluate): the same batches give
# the same float32 sums, so the same predictions.
_BATCH = 1024


class Preprocessing(BaseModel):
    """``preprocessing.json``: how a hospital's raw records become model inputs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal[1] = 1
    fitted_on: str
    features: tuple[str, ...]
    label: str
    classes: tuple[int, ...]
    scaled_columns: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def scaling(self) -> Scaling:
        return Scaling(self.scaled_columns, self.mean, self.std)


def fit_preprocessing(spec: str) -> Preprocessing:
    """The preprocessing a node with ``--data spec`` trains with, fitted on its train split."""
    scheme, _, rest = spec.partition(":")
    match scheme:
        case "heart-disease":
            features, _ = hospital_records(rest)
            train, _ = hospital_split(rest)
            continuous = [FEATURE_NAMES.index(name) for name in CONTINUOUS_FEATURES]
            scaling = fit_scaling(features[train], continuous)
            return _preprocessing(spec, FEATURE_NAMES, "label", (0, 1), scaling)
        case "csv":
            path, options = csv_arguments(spec, rest)
            fitted = csv_preprocessing(path, options)
            return _preprocessing(
                spec, fitted.features, fitted.label, fitted.classes, fitted.scaling
            )
    raise ConfigError(
        f"records need the preprocessing of a tabular spec (heart-disease:…, csv:…), not {spec!r}; "
        "image data is scaled to [0, 1] without statistics: predict on its spec directly"
    )


def _preprocessing(
    spec: str, features: Sequence[str], label: str, classes: Sequence[int], scaling: Scaling
) -> Preprocessing:
    return Preprocessing(
        fitted_on=spec,
        features=tuple(features),
        label=label,
        classes=tuple(classes),
        scaled_columns=scaling.columns,
        mean=scaling.mean,
        std=scaling.std,
    )


def write_preprocessing(model_dir: Path, spec: str) -> Preprocessing:
    """Fit the hospital's preprocessing on its data and keep it in its model copy."""
    preprocessing = fit_preprocessing(spec)
    atomic_write(
        model_dir / PREPROCESSING_JSON, (preprocessing.model_dump_json(indent=2) + "\n").encode()
    )
    return preprocessing


@dataclass(frozen=True, slots=True)
class Prediction:
    id: str
    predicted: int | None
    probabilities: tuple[float, ...]
    label: int | None = None
    error: str = ""


@dataclass(frozen=True, slots=True)
class PredictionRun:
    version: int
    classes: tuple[int, ...]
    rows: tuple[Prediction, ...]

    @property
    def errors(self) -> int:
        return sum(1 for row in self.rows if row.error)

    @property
    def labelled(self) -> list[Prediction]:
        return [r for r in self.rows if r.label is not None and r.predicted is not None]

    @property
    def correct(self) -> int:
        return sum(1 for r in self.labelled if r.label == r.predicted)

    @property
    def accuracy(self) -> float | None:
        labelled = self.labelled
        return self.correct / len(labelled) if labelled else None


def predict(model_dir: Path, data: str, out: Path) -> PredictionRun:
    """Predict every record of ``data`` with the model copy in ``model_dir``; write ``out``."""
    copy, model = load_model_copy(model_dir)
    if data.startswith(RECORDS):
        preprocessing = _read_preprocessing(model_dir)
        rows = _predict_records(model, preprocessing, Path(data.removeprefix(RECORDS)))
        classes = preprocessing.classes
    else:
        dataset = load_dataset(data)
        outputs = _probabilities(model, dataset.test_x)
        classes = tuple(range(dataset.num_classes))
        rows = [
            Prediction(
                id=f"test-{i}",
                predicted=int(predicted),
                probabilities=tuple(float(p) for p in probabilities),
                label=int(label),
            )
            for i, (predicted, probabilities, label) in enumerate(
                zip(*outputs, dataset.test_y, strict=True)
            )
        ]
    run = PredictionRun(version=copy.version, classes=classes, rows=tuple(rows))
    _write(run, out)
    return run


def _read_preprocessing(model_dir: Path) -> Preprocessing:
    path = model_dir / PREPROCESSING_JSON
    if not path.is_file():
        raise ConfigError(
            f"{model_dir} has no {PREPROCESSING_JSON}: pull the model with --data <your training "
            "data spec> so that records are scaled with your own statistics"
        )
    try:
        return Preprocessing.model_validate_json(path.read_bytes())
    except ValueError as exc:
        raise ConfigError(f"{path} is not a preprocessing description: {exc}") from exc


@torch.no_grad()
def _probabilities(
    model: nn.Module, x: NDArray[np.float32]
) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
    predicted, probabilities = [], []
    for start in range(0, len(x), _BATCH):
        logits = model(torch.from_numpy(np.ascontiguousarray(x[start : start + _BATCH])))
        predicted.append(logits.argmax(dim=1).numpy())
        probabilities.append(torch.softmax(logits, dim=1).numpy())
    if not predicted:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    return np.concatenate(predicted), np.concatenate(probabilities)


def _predict_records(
    model: nn.Module, preprocessing: Preprocessing, path: Path
) -> list[Prediction]:
    parsed = _read_records(path, preprocessing)
    good = [(i, values) for i, (_, values, _, error) in enumerate(parsed) if not error]
    results: dict[int, tuple[int, tuple[float, ...]]] = {}
    if good:
        x = preprocessing.scaling.apply(np.array([v for _, v in good], dtype=np.float64))
        predicted, probabilities = _probabilities(model, x)
        for (i, _), p, probs in zip(good, predicted, probabilities, strict=True):
            results[i] = (preprocessing.classes[int(p)], tuple(float(q) for q in probs))
    rows = []
    for i, (row_id, _, label, error) in enumerate(parsed):
        if i in results:
            predicted_class, probs = results[i]
            rows.append(Prediction(row_id, predicted_class, probs, label))
        else:
            rows.append(Prediction(row_id, None, (), label, error))
    return rows


_Record = tuple[str, list[float], int | None, str]


def _read_records(path: Path, preprocessing: Preprocessing) -> list[_Record]:
    """(id, feature values, label, error) per data row; a bad row gets an error, not an end."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as file:
            reader = csv.reader(file)
            header = [name.strip() for name in next(reader, [])]
            missing = [name for name in preprocessing.features if name not in header]
            if missing:
                raise ConfigError(
                    f"{path}: no column {missing}; the model reads {list(preprocessing.features)}"
                )
            records = []
            for cells in reader:
                if not any(cell.strip() for cell in cells):
                    continue
                records.append(_record(header, cells, reader.line_num, preprocessing))
            return records
    except OSError as exc:
        raise DatasetError(f"cannot read records {path}: {exc.strerror or exc}") from exc
    except (csv.Error, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: not a readable CSV file: {exc}") from exc


def _record(
    header: list[str], cells: list[str], line: int, preprocessing: Preprocessing
) -> _Record:
    row = dict(zip(header, cells, strict=False))
    row_id = row.get("id", "").strip() or f"line-{line}"
    if len(cells) != len(header):
        return row_id, [], None, f"line {line}: {len(cells)} fields, the header has {len(header)}"
    values, problems = [], []
    for name in preprocessing.features:
        value, problem = _number(row[name])
        values.append(value)
        if problem:
            problems.append(f"column {name!r}: {problem}")
    label = None
    if preprocessing.label in row:
        number, problem = _number(row[preprocessing.label])
        if not problem and number.is_integer() and int(number) in preprocessing.classes:
            label = int(number)
    return row_id, values, label, "; ".join(problems)


def _number(cell: str) -> tuple[float, str]:
    text = cell.strip()
    if not text:
        return math.nan, "missing value"
    try:
        value = float(text)
    except ValueError:
        return math.nan, f"{text!r} is not a number"
    if not math.isfinite(value):
        return math.nan, f"{text!r} is not a finite number"
    return value, ""


def _write(run: PredictionRun, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    header = ["id", "predicted", *(f"p_{c}" for c in run.classes), "label", "error"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    blank = ["" for _ in run.classes]
    writer.writerows(
        [
            row.id,
            "" if row.predicted is None else str(row.predicted),
            *([repr(p) for p in row.probabilities] if row.probabilities else blank),
            "" if row.label is None else str(row.label),
            row.error,
        ]
        for row in run.rows
    )
    atomic_write(out, buffer.getvalue().encode())
