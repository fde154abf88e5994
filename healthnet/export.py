"""Export a pulled model copy to what a hospital's stack runs: safetensors, ONNX, TorchScript.

Every export writes beside the model copy (``model.json``, ``model.blob``, ``versions.jsonl``,
which keep the spec and the provenance) one file:

* ``model.safetensors``: the float32 weights, named as in the model's ``state_dict``; the header's
  metadata holds the model spec, run, version and the blob's sha256. No code, no pickle.
* ``model.onnx``: the model as an ONNX graph, opset :data:`ONNX_OPSET`, one input ``input``
  (float32, ``(batch, *input_shape)``) and one output ``logits`` (``(batch, num_classes)``), the
  batch axis dynamic. Exported with torch.onnx's ``torch.export`` path (``dynamo=True``), the one
  torch 2.13 maintains; the TorchScript-based exporter is deprecated.
* ``model.torchscript.pt``: a traced TorchScript module for libtorch (C++) stacks. TorchScript is
  deprecated in torch 2.13 but still what many deployed stacks load; its archive is read by
  ``torch.jit.load``, never by Python's pickle.

safetensors, onnx and onnxscript are imported here, when an export asks for them, so that the
aggregator and the nodes run without them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path

import torch
from torch import nn

from common.errors import ConfigError
from healthnet.lifecycle import ModelCopy, input_shape, load_model_copy

__all__ = ["ONNX_OPSET", "ExportFormat", "export_model"]

log = logging.getLogger(__name__)

# 18: the opset torch 2.13's exporter writes natively (no version conversion), and one that
# onnxruntime 1.17 and later run.
ONNX_OPSET = 18
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


class ExportFormat(StrEnum):
    SAFETENSORS = "safetensors"
    ONNX = "onnx"
    TORCHSCRIPT = "torchscript"

    @property
    def file_name(self) -> str:
        return _FILE_NAMES[self]


_FILE_NAMES = {
    ExportFormat.SAFETENSORS: "model.safetensors",
    ExportFormat.ONNX: "model.onnx",
    ExportFormat.TORCHSCRIPT: "model.torchscript.pt",
}


def export_model(
    copy_dir: Path, fmt: ExportFormat, *, example_shape: tuple[int, ...] | None = None
) -> Path:
    """Write ``fmt`` of the verified model copy in ``copy_dir`` into it; returns the file.

    ``example_shape`` is one example's shape (no batch axis), needed for ONNX and TorchScript of a
    plug-in model; a built-in model knows its own.
    """
    copy, model = load_model_copy(copy_dir)
    path = copy_dir / fmt.file_name
    match fmt:
        case ExportFormat.SAFETENSORS:
            _safetensors(copy, model, path)
        case ExportFormat.ONNX:
            _onnx(model, _example(copy, example_shape), path)
        case ExportFormat.TORCHSCRIPT:
            _torchscript(model, _example(copy, example_shape), path)
    log.info("v%d of run %s exported as %s to %s", copy.version, copy.run_id, fmt.value, path)
    return path


def _example(copy: ModelCopy, shape: tuple[int, ...] | None) -> torch.Tensor:
    shape = shape or input_shape(copy.model)
    if shape is None:
        raise ConfigError(
            f"model {copy.model.name!r} is a plug-in: give one example's shape (--input-shape)"
        )
    # Two examples, so that nothing in the trace specialises on a batch of one.
    return torch.zeros((2, *shape), dtype=torch.float32)


def _safetensors(copy: ModelCopy, model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {
        name: tensor.detach().to(torch.float32).contiguous()
        for name, tensor in model.state_dict().items()
        if tensor.is_floating_point()
    }
    metadata = {
        "format": "pt",
        "healthnet_model": json.dumps(copy.model.model_dump(mode="json"), sort_keys=True),
        "healthnet_run_id": copy.run_id,
        "healthnet_version": str(copy.version),
        "healthnet_blob_sha256": copy.sha256,
    }
    if copy.personal is not None:
        # A hospital's own model, trained against healthnet_version: not a global version.
        metadata["healthnet_personal"] = copy.personal
    save_file(tensors, str(path), metadata=metadata)


def _onnx(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    with _quiet_torch():
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            opset_version=ONNX_OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )


def _torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    with _quiet_torch():
        traced = torch.jit.trace(model, example)  # type: ignore[no-untyped-call]
        torch.jit.save(traced, str(path))


@contextlib.contextmanager
def _quiet_torch() -> Iterator[None]:
    """torch 2.13 warns about its own deprecations (TorchScript, pytree internals) while
    exporting, and the ONNX exporter logs every optional operator library it lacks: none of it is
    about the model, so it is kept out of the user's output."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)
