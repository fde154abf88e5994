"""Load an image dataset stored in MedMNIST's `.npz` layout as a channels-first `LocalDataset`."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from ._dataset import DatasetError, LocalDataset

__all__ = ["load_npz"]

_REQUIRED = ("train_images", "train_labels", "test_images", "test_labels")


def load_npz(path: Path) -> LocalDataset:
    """Read `path` (uint8 images `(N, H, W)` or `(N, H, W, 3)`, labels `(N,)` or `(N, 1)`).

    Images become float32 `(N, C, H, W)` in [0, 1]; labels become int64 `(N,)`, kept as they are
    (MedMNIST's classes are already 0..C-1), and `num_classes` is one more than the largest label.
    The `val_*` arrays, if present, are ignored.
    """
    arrays = _read_arrays(path)
    train_x = _images(path, "train_images", arrays["train_images"])
    test_x = _images(path, "test_images", arrays["test_images"])
    if train_x.shape[1:] != test_x.shape[1:]:
        raise DatasetError(
            f"{path}: train images are {train_x.shape[1:]} (C, H, W) but test images are "
            f"{test_x.shape[1:]}"
        )
    train_y = _labels(path, "train_labels", arrays["train_labels"], len(train_x))
    test_y = _labels(path, "test_labels", arrays["test_labels"], len(test_x))
    return LocalDataset(
        name=f"npz:{path.stem}",
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        num_classes=int(max(train_y.max(initial=0), test_y.max(initial=0))) + 1,
    )


def _read_arrays(path: Path) -> dict[str, NDArray[np.generic]]:
    """Return the four required arrays of the archive, never unpickling anything."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise DatasetError(f"{path}: a single .npy array, expected an .npz archive")
            missing = [key for key in _REQUIRED if key not in archive.files]
            if missing:
                raise DatasetError(f"{path}: missing arrays {missing}; it has {archive.files}")
            return {key: archive[key] for key in _REQUIRED}
    except OSError as error:
        raise DatasetError(f"cannot read npz file {path}: {error.strerror or error}") from error
    except (ValueError, zipfile.BadZipFile) as error:
        # numpy raises ValueError for pickled (object) arrays and for files that are not .npy/.npz.
        raise DatasetError(
            f"{path}: not a readable npz archive of plain arrays: {error}"
        ) from error


def _images(path: Path, key: str, images: NDArray[np.generic]) -> NDArray[np.float32]:
    """Convert uint8 `(N, H, W)` or `(N, H, W, 3)` images to float32 `(N, C, H, W)` in [0, 1]."""
    if images.dtype != np.uint8:
        raise DatasetError(f"{path}: {key} must be uint8, not {images.dtype}")
    if images.ndim == 3:
        channels_first = images[:, np.newaxis, :, :]
    elif images.ndim == 4 and images.shape[3] == 3:
        channels_first = images.transpose(0, 3, 1, 2)
    else:
        raise DatasetError(
            f"{path}: {key} has shape {images.shape}; expected (N, H, W) or (N, H, W, 3)"
        )
    if len(images) == 0:
        raise DatasetError(f"{path}: {key} holds no images")
    return np.ascontiguousarray(channels_first, dtype=np.float32) / np.float32(255.0)


def _labels(path: Path, key: str, labels: NDArray[np.generic], count: int) -> NDArray[np.int64]:
    """Convert integer labels `(N,)` or `(N, 1)` to int64 `(N,)`, checking they match the images."""
    if not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(f"{path}: {key} must hold integers, not {labels.dtype}")
    if labels.ndim == 2 and labels.shape[1] == 1:
        flat = labels[:, 0]
    elif labels.ndim == 1:
        flat = labels
    else:
        # MedMNIST's multi-label sets (ChestMNIST) have (N, 14) labels: not a class index.
        raise DatasetError(f"{path}: {key} has shape {labels.shape}; expected (N,) or (N, 1)")
    if len(flat) != count:
        raise DatasetError(f"{path}: {key} has {len(flat)} labels for {count} images")
    if flat.size and int(flat.min()) < 0:
        raise DatasetError(f"{path}: {key} holds negative labels")
    return flat.astype(np.int64)
