"""Specification of `healthnet model export`: safetensors, ONNX and TorchScript of a model copy."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from common.codec import encode_tensors, sha256_hex
from common.errors import ConfigError
from common.messages import ModelSpec
from common.models import build_model, model_params
from edge_node.datasets import load_dataset
from healthnet.export import ONNX_OPSET, ExportFormat, export_model
from healthnet.lifecycle import ModelCopy, load_model_copy, write_model_copy

LOGREG = ModelSpec(name="logreg", kwargs={"in_features": 13, "num_classes": 2})
CNN = ModelSpec(name="cnn", kwargs={"in_channels": 1, "num_classes": 2, "width": 8})


def model_copy(directory: Path, spec: ModelSpec) -> Path:
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


def test_safetensors_holds_the_weights_and_the_spec(tmp_path: Path) -> None:
    """The safetensors file has every weight, bit for bit, and names the model and version."""
    from safetensors import safe_open

    copy = model_copy(tmp_path, LOGREG)
    path = export_model(copy, ExportFormat.SAFETENSORS)
    _, model = load_model_copy(copy)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    assert json.loads(metadata["healthnet_model"]) == LOGREG.model_dump(mode="json")
    assert metadata["healthnet_version"] == "5"
    assert tensors.keys() == model.state_dict().keys()
    for name, value in model.state_dict().items():
        assert torch.equal(tensors[name], value)


def test_torchscript_computes_what_torch_computes(tmp_path: Path) -> None:
    """The traced module gives torch's logits on heart-disease records, for any batch size."""
    copy = model_copy(tmp_path, LOGREG)
    path = export_model(copy, ExportFormat.TORCHSCRIPT)
    _, model = load_model_copy(copy)
    x = torch.from_numpy(load_dataset("heart-disease:cleveland").test_x)
    with pytest.warns(DeprecationWarning, match="deprecated"):
        traced = torch.jit.load(str(path))  # TorchScript's own reader, not pickle
    with torch.no_grad():
        assert torch.allclose(traced(x), model(x), atol=1e-6)
        assert torch.allclose(traced(x[:5]), model(x[:5]), atol=1e-6)


def test_a_plug_in_model_needs_an_input_shape(tmp_path: Path) -> None:
    """A model the exporter cannot know the input of asks for --input-shape."""
    spec = ModelSpec(name="tests.healthnet.test_export:tiny")
    copy = model_copy(tmp_path, spec)
    with pytest.raises(ConfigError, match="input-shape"):
        export_model(copy, ExportFormat.ONNX)
    assert export_model(copy, ExportFormat.TORCHSCRIPT, example_shape=(4,)).is_file()


def tiny() -> torch.nn.Module:
    return torch.nn.Linear(4, 3)


@pytest.mark.slow
def test_onnx_equals_torch_on_every_test_image(tmp_path: Path) -> None:
    """The ONNX graph (opset pinned, named input and output, dynamic batch) run by onnxruntime
    gives torch's logits within 1e-5 on every PneumoniaMNIST test image."""
    import onnx
    import onnxruntime

    copy = model_copy(tmp_path, CNN)
    path = export_model(copy, ExportFormat.ONNX)
    graph = onnx.load(str(path))
    assert [o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")] == [ONNX_OPSET]
    assert [i.name for i in graph.graph.input] == ["input"]
    assert [o.name for o in graph.graph.output] == ["logits"]
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic: dynamic
    _, model = load_model_copy(copy)
    x = load_dataset("pneumonia:hospital-1").test_x
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (x, x[:1], x[:7]):
        (onnx_logits,) = session.run(["logits"], {"input": batch})
        with torch.no_grad():
            torch_logits = model(torch.from_numpy(batch)).numpy()
        assert np.abs(onnx_logits - torch_logits).max() <= 1e-5
