"""Load a dataset from a user plug-in: a `module.path:function` that returns a `LocalDataset`."""

from __future__ import annotations

import importlib

from ._dataset import DatasetError, LocalDataset

__all__ = ["load_plugin"]


def load_plugin(module_name: str, function_name: str) -> LocalDataset:
    """Import `module_name`, call its `function_name()` and check that it built a `LocalDataset`.

    Exceptions raised by the plug-in's own code propagate unchanged: they are its author's to read.
    """
    spec = f"{module_name}:{function_name}"
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise DatasetError(
            f"dataset plug-in {spec!r}: cannot import {module_name!r}: {error}"
        ) from error
    function = getattr(module, function_name, None)
    if function is None:
        raise DatasetError(f"dataset plug-in {spec!r}: {module_name!r} has no {function_name!r}")
    if not callable(function):
        raise DatasetError(f"dataset plug-in {spec!r}: {function_name!r} is not callable")
    dataset = function()
    if not isinstance(dataset, LocalDataset):
        raise DatasetError(
            f"dataset plug-in {spec!r} returned {type(dataset).__name__}, not a LocalDataset"
        )
    return dataset
