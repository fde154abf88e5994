"""Specification of dataset specs: CSV files, MedMNIST-style npz archives and plug-ins."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edge_node.datasets import DatasetError, LocalDataset, load_dataset


def write_csv(path: Path, header: str, rows: list[str]) -> Path:
    """Write a CSV file from a header line and row lines; return its path."""
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def labelled_rows(labels: list[int]) -> list[str]:
    """Rows `age,smoker,label` with a continuous age, a 0/1 column and the given labels."""
    return [f"{40 + 3 * i},{i % 2},{label}" for i, label in enumerate(labels)]


def tiny_dataset(**overrides: object) -> LocalDataset:
    """A valid two-class dataset of two train and one test example, with fields overridden."""
    fields: dict[str, object] = {
        "name": "tiny",
        "train_x": np.zeros((2, 3), dtype=np.float32),
        "train_y": np.array([0, 1], dtype=np.int64),
        "test_x": np.zeros((1, 3), dtype=np.float32),
        "test_y": np.array([1], dtype=np.int64),
        "num_classes": 2,
    }
    fields.update(overrides)
    return LocalDataset(**fields)  # type: ignore[arg-type]


# --- LocalDataset -------------------------------------------------------------------------------


def test_local_dataset_reports_shape_and_sizes() -> None:
    """input_shape drops the batch axis; num_train and num_test count examples."""
    dataset = tiny_dataset()
    assert dataset.input_shape == (3,)
    assert (dataset.num_train, dataset.num_test) == (2, 1)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        pytest.param({"train_x": np.zeros((2, 3))}, "float32", id="float64-inputs"),
        pytest.param({"train_y": np.array([0, 1], dtype=np.int32)}, "int64", id="int32-labels"),
        pytest.param(
            {"train_y": np.array([0, 1, 1], dtype=np.int64)}, "2 inputs but 3", id="count"
        ),
        pytest.param({"test_y": np.array([2], dtype=np.int64)}, r"0\.\.1", id="label-out-of-range"),
        pytest.param(
            {"test_x": np.zeros((1, 4), dtype=np.float32)}, "shape", id="test-shape-differs"
        ),
        pytest.param(
            {
                "train_x": np.zeros((0, 3), dtype=np.float32),
                "train_y": np.zeros(0, dtype=np.int64),
            },
            "empty",
            id="empty-train",
        ),
        pytest.param({"num_classes": 0}, "positive", id="no-classes"),
    ],
)
def test_local_dataset_rejects_inconsistent_arrays(
    overrides: dict[str, object], message: str
) -> None:
    """A LocalDataset whose arrays disagree in dtype, length, shape or label range cannot exist."""
    with pytest.raises(DatasetError, match=message):
        tiny_dataset(**overrides)


# --- CSV ----------------------------------------------------------------------------------------


def test_csv_reads_features_and_default_label_column(tmp_path: Path) -> None:
    """csv:<path> takes every column but `label` as a feature and splits the rows."""
    path = write_csv(tmp_path / "site.csv", "age,smoker,label", labelled_rows([0, 1] * 10))
    dataset = load_dataset(f"csv:{path}")
    assert dataset.name == "csv:site.csv"
    assert dataset.input_shape == (2,)
    assert dataset.num_classes == 2
    assert dataset.num_train + dataset.num_test == 20
    assert dataset.train_x.dtype == np.float32
    assert dataset.train_y.dtype == np.int64


def test_csv_label_option_names_the_label_column(tmp_path: Path) -> None:
    """#label=<column> picks the label column; the former `label` column becomes a feature."""
    rows = [f"{i},{i % 2},{i % 3}" for i in range(12)]
    path = write_csv(tmp_path / "site.csv", "x,outcome,label", rows)
    dataset = load_dataset(f"csv:{path}#label=outcome")
    assert dataset.input_shape == (2,)
    assert dataset.num_classes == 2


@pytest.mark.parametrize(
    ("train_labels", "test_labels", "expected_train", "expected_test"),
    [
        pytest.param([3, 7, 3], [7], [0, 1, 0], [1], id="sparse-codes"),
        pytest.param([1, 0, -1], [0], [2, 1, 0], [1], id="negative-code"),
        pytest.param([5, 5, 9], [2], [1, 1, 2], [0], id="class-only-in-test"),
    ],
)
def test_csv_labels_are_remapped_in_sorted_order_of_all_labels(
    tmp_path: Path,
    train_labels: list[int],
    test_labels: list[int],
    expected_train: list[int],
    expected_test: list[int],
) -> None:
    """Labels become 0..C-1 in sorted order of the union of train and test labels."""
    train = write_csv(tmp_path / "train.csv", "age,smoker,label", labelled_rows(train_labels))
    test = write_csv(tmp_path / "test.csv", "age,smoker,label", labelled_rows(test_labels))
    dataset = load_dataset(f"csv:{train}#test={test}")
    assert dataset.train_y.tolist() == expected_train
    assert dataset.test_y.tolist() == expected_test
    assert dataset.num_classes == len(set(train_labels) | set(test_labels))


def test_csv_explicit_test_file_is_used_whole_and_aligned_by_column_name(tmp_path: Path) -> None:
    """#test=<path> uses every row of both files, matching the test file's columns by name."""
    train = write_csv(tmp_path / "train.csv", "a,b,label", ["1,0,0", "3,1,1", "5,0,1"])
    test = write_csv(tmp_path / "test.csv", "label,b,a", ["1,1,3"])
    dataset = load_dataset(f"csv:{train}#test={test}")
    assert (dataset.num_train, dataset.num_test) == (3, 1)
    # `a` has train mean 3, so the test row's a=3 standardises to 0; `b` is 0/1 and kept.
    np.testing.assert_allclose(dataset.test_x, [[0.0, 1.0]])
    assert dataset.test_y.tolist() == [1]


def test_csv_test_file_with_different_columns_is_rejected(tmp_path: Path) -> None:
    """A test file whose columns differ from the train file's raises DatasetError."""
    train = write_csv(tmp_path / "train.csv", "a,b,label", ["1,0,0", "3,1,1"])
    test = write_csv(tmp_path / "test.csv", "a,c,label", ["1,1,1"])
    with pytest.raises(DatasetError, match="differ from the train file"):
        load_dataset(f"csv:{train}#test={test}")


def test_csv_split_is_reproducible_for_a_seed(tmp_path: Path) -> None:
    """The same seed gives the same split; another seed gives another one."""
    path = write_csv(tmp_path / "site.csv", "age,smoker,label", labelled_rows([0, 1] * 20))
    first = load_dataset(f"csv:{path}#seed=3")
    again = load_dataset(f"csv:{path}#seed=3")
    other = load_dataset(f"csv:{path}#seed=4")
    np.testing.assert_array_equal(first.test_x, again.test_x)
    assert not np.array_equal(first.test_x, other.test_x)


def test_csv_split_is_stratified_by_label(tmp_path: Path) -> None:
    """Each class sends round(test_fraction * its size) rows to test."""
    path = write_csv(tmp_path / "site.csv", "age,smoker,label", labelled_rows([0] * 30 + [1] * 10))
    dataset = load_dataset(f"csv:{path}#test_fraction=0.2")
    assert np.bincount(dataset.test_y).tolist() == [6, 2]
    assert np.bincount(dataset.train_y).tolist() == [24, 8]


def test_csv_split_falls_back_to_unstratified_when_a_class_has_one_row(tmp_path: Path) -> None:
    """With a single-row class the split is plain: round(test_fraction * N) rows go to test."""
    path = write_csv(tmp_path / "site.csv", "age,smoker,label", labelled_rows([0] * 9 + [1]))
    dataset = load_dataset(f"csv:{path}#test_fraction=0.3&seed=1")
    assert (dataset.num_train, dataset.num_test) == (7, 3)


def test_csv_standardises_continuous_columns_and_keeps_binary_ones(tmp_path: Path) -> None:
    """Non-0/1 columns get train mean 0 and std 1; 0/1 columns keep their values."""
    path = write_csv(tmp_path / "site.csv", "age,smoker,label", labelled_rows([0, 1] * 15))
    dataset = load_dataset(f"csv:{path}")
    np.testing.assert_allclose(dataset.train_x[:, 0].mean(), 0.0, atol=1e-6)
    np.testing.assert_allclose(dataset.train_x[:, 0].std(ddof=1), 1.0, rtol=1e-5)
    assert set(np.unique(dataset.train_x[:, 1]).tolist()) == {0.0, 1.0}


@pytest.mark.parametrize(
    ("row", "message"),
    [
        pytest.param("41,abc,1", r"line 3, column 'smoker': 'abc' is not a number", id="text"),
        pytest.param("41,,1", r"line 3, column 'smoker': missing value", id="empty"),
        pytest.param("41,?,1", r"line 3, column 'smoker': '\?' is not a number", id="question"),
        pytest.param("nan,1,1", r"line 3, column 'age': 'nan' is not a finite", id="nan"),
        pytest.param("41,1,0.5", r"line 3, column 'label': label 0.5 is not an integer", id="frac"),
        pytest.param("41,1", r"line 3: 2 fields, the header has 3", id="short-row"),
    ],
)
def test_csv_bad_value_names_its_line_and_column(tmp_path: Path, row: str, message: str) -> None:
    """A missing or non-numeric cell raises DatasetError naming the file line and the column."""
    path = write_csv(tmp_path / "site.csv", "age,smoker,label", ["40,0,0", row, "42,1,1"])
    with pytest.raises(DatasetError, match=message):
        load_dataset(f"csv:{path}")


@pytest.mark.parametrize(
    ("header", "rows", "suffix", "message"),
    [
        pytest.param("age,smoker", ["1,0"], "", "no label column 'label'", id="no-label"),
        pytest.param("age,label", ["1,0"], "#label=y", "no label column 'y'", id="no-named-label"),
        pytest.param("label", ["0", "1"], "", "no feature columns", id="label-only"),
        pytest.param("a,a,label", ["1,2,0"], "", "duplicate column names", id="duplicate"),
        pytest.param("age,label", [], "", "no data rows", id="header-only"),
        pytest.param("age,label", ["1,0"], "", "at least 2 rows", id="one-row-to-split"),
    ],
)
def test_csv_bad_layout_is_rejected(
    tmp_path: Path, header: str, rows: list[str], suffix: str, message: str
) -> None:
    """A CSV without a usable label column, features or rows raises DatasetError."""
    path = write_csv(tmp_path / "site.csv", header, rows)
    with pytest.raises(DatasetError, match=message):
        load_dataset(f"csv:{path}{suffix}")


def test_csv_missing_file_is_a_dataset_error(tmp_path: Path) -> None:
    """A CSV path that does not exist raises DatasetError naming the path."""
    with pytest.raises(DatasetError, match=r"nowhere\.csv"):
        load_dataset(f"csv:{tmp_path / 'nowhere.csv'}")


@pytest.mark.parametrize(
    ("suffix", "message"),
    [
        pytest.param("#test_fraction=1.5", r"not in \(0, 1\)", id="fraction-too-big"),
        pytest.param("#test_fraction=abc", r"not in \(0, 1\)", id="fraction-not-number"),
        pytest.param("#seed=-1", "non-negative integer", id="negative-seed"),
        pytest.param("#colour=red", "unknown option 'colour'", id="unknown-option"),
        pytest.param("#seed", "has no value", id="no-value"),
        pytest.param("#seed=1&seed=2", "given twice", id="duplicate-option"),
    ],
)
def test_csv_bad_options_are_rejected(tmp_path: Path, suffix: str, message: str) -> None:
    """A malformed option after '#' raises DatasetError naming the spec."""
    path = write_csv(tmp_path / "site.csv", "age,smoker,label", labelled_rows([0, 1] * 5))
    with pytest.raises(DatasetError, match=message):
        load_dataset(f"csv:{path}{suffix}")


# --- npz ----------------------------------------------------------------------------------------


def medmnist_arrays(image_shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """MedMNIST-layout arrays: 4 train and 2 test uint8 images, (N, 1) labels, val included."""
    rng = np.random.default_rng(0)

    def images(n: int) -> np.ndarray:
        return rng.integers(0, 256, size=(n, *image_shape), dtype=np.uint8)

    return {
        "train_images": images(4),
        "train_labels": np.array([[0], [1], [2], [1]], dtype=np.uint8),
        "val_images": images(1),
        "val_labels": np.array([[0]], dtype=np.uint8),
        "test_images": images(2),
        "test_labels": np.array([[1], [0]], dtype=np.uint8),
    }


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write `arrays` as an uncompressed npz archive, the way MedMNIST ships its files."""
    # numpy's stub types **kwds so that they could collide with its `allow_pickle: bool`.
    np.savez(path, **arrays)  # type: ignore[arg-type]


def test_npz_grayscale_images_become_one_channel_in_unit_range(tmp_path: Path) -> None:
    """(N, H, W) uint8 images become float32 (N, 1, H, W) divided by 255; labels (N,) int64."""
    arrays = medmnist_arrays((5, 6))
    path = tmp_path / "breastmnist.npz"
    save_npz(path, arrays)
    dataset = load_dataset(f"npz:{path}")
    assert dataset.name == "npz:breastmnist"
    assert dataset.input_shape == (1, 5, 6)
    assert dataset.train_x.dtype == np.float32
    np.testing.assert_allclose(dataset.train_x[:, 0], arrays["train_images"] / 255.0, rtol=1e-6)
    assert dataset.train_y.tolist() == [0, 1, 2, 1]
    assert dataset.test_y.tolist() == [1, 0]
    assert dataset.num_classes == 3


def test_npz_rgb_images_become_channels_first(tmp_path: Path) -> None:
    """(N, H, W, 3) images become (N, 3, H, W) with each channel in its own plane."""
    arrays = medmnist_arrays((5, 6, 3))
    path = tmp_path / "retinamnist.npz"
    save_npz(path, arrays)
    dataset = load_dataset(f"npz:{path}")
    assert dataset.input_shape == (3, 5, 6)
    expected = arrays["test_images"].transpose(0, 3, 1, 2) / 255.0
    np.testing.assert_allclose(dataset.test_x, expected, rtol=1e-6)


def test_npz_accepts_flat_labels(tmp_path: Path) -> None:
    """Labels stored as (N,) instead of (N, 1) are read the same way."""
    arrays = medmnist_arrays((4, 4))
    arrays["train_labels"] = arrays["train_labels"][:, 0]
    path = tmp_path / "flat.npz"
    save_npz(path, arrays)
    assert load_dataset(f"npz:{path}").train_y.tolist() == [0, 1, 2, 1]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        pytest.param("test_labels", None, r"missing arrays \['test_labels'\]", id="missing-key"),
        pytest.param(
            "train_images", np.zeros((4, 5, 6), dtype=np.float32), "must be uint8", id="float"
        ),
        pytest.param(
            "train_images", np.zeros((4, 5, 6, 2), dtype=np.uint8), "expected", id="two-channels"
        ),
        pytest.param(
            "train_labels", np.zeros((3, 1), dtype=np.uint8), "3 labels for 4 images", id="count"
        ),
        pytest.param(
            "train_labels", np.zeros((4, 14), dtype=np.uint8), r"\(N,\) or \(N, 1\)", id="multi"
        ),
        pytest.param(
            "test_images", np.zeros((2, 7, 7), dtype=np.uint8), "test images are", id="size"
        ),
    ],
)
def test_npz_bad_arrays_are_rejected(
    tmp_path: Path, key: str, value: np.ndarray | None, message: str
) -> None:
    """Missing keys and wrong dtypes or shapes raise DatasetError naming the array at fault."""
    arrays = medmnist_arrays((5, 6))
    if value is None:
        del arrays[key]
    else:
        arrays[key] = value
    path = tmp_path / "bad.npz"
    save_npz(path, arrays)
    with pytest.raises(DatasetError, match=message):
        load_dataset(f"npz:{path}")


def test_npz_object_arrays_are_refused_not_unpickled(tmp_path: Path) -> None:
    """An archive holding a pickled object array raises DatasetError instead of unpickling it."""
    arrays: dict[str, np.ndarray] = dict(medmnist_arrays((5, 6)))
    arrays["train_labels"] = np.array([[0], [1], [2], [1]], dtype=object)
    path = tmp_path / "pickled.npz"
    save_npz(path, arrays)
    with pytest.raises(DatasetError, match="not a readable npz archive"):
        load_dataset(f"npz:{path}")


@pytest.mark.parametrize(
    ("content", "name"),
    [
        pytest.param(b"not a zip file at all", "garbage.npz", id="garbage"),
        pytest.param(None, "absent.npz", id="absent"),
    ],
)
def test_npz_unreadable_file_is_a_dataset_error(
    tmp_path: Path, content: bytes | None, name: str
) -> None:
    """A file that is missing or not an npz archive raises DatasetError naming the path."""
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DatasetError, match=name):
        load_dataset(f"npz:{path}")


# --- plug-ins -----------------------------------------------------------------------------------


@pytest.fixture
def plugin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory on sys.path whose modules are forgotten again after the test."""
    monkeypatch.syspath_prepend(tmp_path)
    yield tmp_path
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", "") or "").startswith(str(tmp_path)):
            del sys.modules[name]


def write_module(directory: Path, module: str, body: str) -> None:
    """Write `module`.py with the dedented `body` into `directory`."""
    (directory / f"{module}.py").write_text(textwrap.dedent(body), encoding="utf-8")


def test_plugin_function_returning_a_local_dataset_is_loaded(plugin_dir: Path) -> None:
    """<module>:<function> imports the module and returns what the function builds."""
    body = """
        import numpy as np
        from edge_node.datasets import LocalDataset

        def build():
            return LocalDataset(
                name="site-a",
                train_x=np.ones((3, 2), dtype=np.float32),
                train_y=np.array([0, 1, 0], dtype=np.int64),
                test_x=np.ones((1, 2), dtype=np.float32),
                test_y=np.array([1], dtype=np.int64),
                num_classes=2,
            )
    """
    write_module(plugin_dir, "site_a_data", body)
    dataset = load_dataset("site_a_data:build")
    assert dataset.name == "site-a"
    assert (dataset.num_train, dataset.num_test) == (3, 1)


def test_plugin_in_a_package_is_found_by_dotted_path(plugin_dir: Path) -> None:
    """A dotted module path reaches a function inside a package."""
    package = plugin_dir / "hospital_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("", encoding="utf-8")
    body = """
        from edge_node.datasets import load_dataset

        def build():
            return load_dataset("heart-disease:va")
    """
    write_module(package, "loaders", body)
    assert load_dataset("hospital_pkg.loaders:build").name == "heart-disease:va"


@pytest.mark.parametrize(
    ("body", "spec", "message"),
    [
        pytest.param(
            "def build():\n    return 42\n", "p_int:build", "returned int", id="not-dataset"
        ),
        pytest.param("x = 1\n", "p_absent:build", "has no 'build'", id="no-function"),
        pytest.param("build = 3\n", "p_value:build", "not callable", id="not-callable"),
    ],
)
def test_plugin_that_does_not_build_a_dataset_is_rejected(
    plugin_dir: Path, body: str, spec: str, message: str
) -> None:
    """A plug-in whose attribute is missing, not callable or returns a non-dataset is refused."""
    write_module(plugin_dir, spec.partition(":")[0], body)
    with pytest.raises(DatasetError, match=message):
        load_dataset(spec)


def test_plugin_module_that_does_not_exist_is_a_dataset_error() -> None:
    """An unimportable plug-in module raises DatasetError naming it."""
    with pytest.raises(DatasetError, match="cannot import 'no_such_module_here'"):
        load_dataset("no_such_module_here:build")


# --- spec grammar -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        pytest.param("", "not of the form", id="empty"),
        pytest.param("heart-disease", "not of the form", id="no-colon"),
        pytest.param("heart-disease:", "not of the form", id="no-argument"),
        pytest.param(":build", "not of the form", id="no-kind"),
        pytest.param("csv:#label=y", "names no CSV file", id="csv-without-path"),
        pytest.param("ftp://host/data.csv", "unknown dataset spec", id="url"),
        pytest.param("my-site:build", "unknown dataset spec", id="dashed-module"),
        pytest.param("pkg..mod:build", "unknown dataset spec", id="empty-module-part"),
        pytest.param("pkg.mod:build()", "unknown dataset spec", id="call-syntax"),
    ],
)
def test_malformed_or_unknown_spec_is_rejected(spec: str, message: str) -> None:
    """A spec that fits none of the four forms raises DatasetError quoting it."""
    with pytest.raises(DatasetError, match=message):
        load_dataset(spec)


def test_dataset_error_is_a_value_error() -> None:
    """Callers outside healthNET can catch DatasetError as a ValueError."""
    with pytest.raises(ValueError, match="unknown dataset spec"):
        load_dataset("nonsense:not a function")
