"""Parse a dataset spec string and hand it to the loader it names."""

from __future__ import annotations

import math
from pathlib import Path

from ._csv_loader import CsvOptions, load_csv
from ._dataset import DatasetError, LocalDataset
from ._npz_loader import load_npz
from ._plugin import load_plugin
from .heart_disease import load_heart_disease
from .pneumonia import load_pneumonia

__all__ = ["csv_arguments", "load_dataset"]

_CSV_KEYS = ("label", "test", "test_fraction", "seed")
# A slots dataclass keeps no defaults on the class, so read them from an instance.
_CSV_DEFAULTS = CsvOptions()


def load_dataset(spec: str) -> LocalDataset:
    """Load the dataset that `spec` names (grammar in the package docstring)."""
    scheme, colon, rest = spec.partition(":")
    if not colon or not scheme or not rest:
        raise DatasetError(f"dataset spec {spec!r} is not of the form <kind>:<argument>")
    match scheme:
        case "heart-disease":
            return load_heart_disease(rest)
        case "pneumonia":
            return load_pneumonia(rest)
        case "csv":
            path, options = csv_arguments(spec, rest)
            return load_csv(path, options)
        case "npz":
            return load_npz(Path(rest))
        case _ if _is_dotted_name(scheme) and rest.isidentifier():
            return load_plugin(scheme, rest)
    raise DatasetError(
        f"unknown dataset spec {spec!r}: expected heart-disease:<hospital>, "
        "pneumonia:<hospital>, csv:<path>, npz:<path> or <module.path>:<function>"
    )


def _is_dotted_name(text: str) -> bool:
    return all(part.isidentifier() for part in text.split("."))


def csv_arguments(spec: str, rest: str) -> tuple[Path, CsvOptions]:
    """Split `<path>#key=value&...` (the part of a ``csv:`` spec after the colon) into the CSV
    path and its options."""
    path, _, query = rest.partition("#")
    if not path:
        raise DatasetError(f"dataset spec {spec!r} names no CSV file")
    fields: dict[str, str] = {}
    for item in query.split("&") if query else []:
        key, equals, value = item.partition("=")
        if key not in _CSV_KEYS:
            raise DatasetError(
                f"dataset spec {spec!r}: unknown option {key!r}; known: {', '.join(_CSV_KEYS)}"
            )
        if not equals or not value:
            raise DatasetError(f"dataset spec {spec!r}: option {key!r} has no value")
        if key in fields:
            raise DatasetError(f"dataset spec {spec!r}: option {key!r} is given twice")
        fields[key] = value
    options = CsvOptions(
        label=fields.get("label", _CSV_DEFAULTS.label),
        test_path=Path(fields["test"]) if "test" in fields else None,
        test_fraction=_fraction(spec, fields.get("test_fraction")),
        seed=_seed(spec, fields.get("seed")),
    )
    return Path(path), options


def _fraction(spec: str, text: str | None) -> float:
    if text is None:
        return _CSV_DEFAULTS.test_fraction
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 < value < 1.0:
        raise DatasetError(f"dataset spec {spec!r}: test_fraction={text} is not in (0, 1)")
    return value


def _seed(spec: str, text: str | None) -> int:
    if text is None:
        return _CSV_DEFAULTS.seed
    if not (text.isascii() and text.isdigit()):
        raise DatasetError(f"dataset spec {spec!r}: seed={text} is not a non-negative integer")
    return int(text)
