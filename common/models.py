"""Model architectures and the torch <-> numpy bridge; the only torch code shared by both roles.

A :class:`~common.messages.ModelSpec` names a built-in (``logreg``, ``mlp``, ``cnn``) or a user's
``module:function`` installed on every node; code never travels over the broker, only weights. The
aggregator builds the model once to draw the initial weights; nodes build it to train.

The aggregator also runs every new version on a **probe batch** (:func:`output_probe`) before it
publishes it: finite weights can give infinite outputs, and a version no node can evaluate would
stop the federation. The batch is drawn from the model's input shape, which the aggregator, having
no data, derives from the spec: the built-ins know theirs (:data:`PROBE_SHAPES`); a
``module:function`` factory may carry a ``probe_shape`` attribute (a tuple, or a callable of the
spec's kwargs giving one); failing that, a model whose first weighted layer is a ``Linear`` is
probed with that layer's ``in_features``. Any other model is not probed (weights are still checked
for finiteness).

Where torch comes in on the aggregator. For the built-ins it needs none before its first
publish: :mod:`common.model_init` draws their initial weights in numpy (torch's own scheme, names
and shapes) and defers their output probe, which it builds from this module when the first version
is judged or in the background once v0 is out. A user's factory is an ``nn.Module`` only torch can
initialise or run, so for it this module is imported where a fresh run starts or the probe is
built. Importing ``aggregator.service`` or its core, folding and rule loads no torch
(tests/aggregator/test_imports.py keeps it so, and that a fresh run publishes v0 without it).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from common.errors import ConfigError
from common.messages import ModelSpec
from common.model_init import PROBE_SHAPES

__all__ = [
    "BUILTIN_MODELS",
    "PROBE_SHAPES",
    "build_model",
    "load_params",
    "model_params",
    "output_probe",
    "probe_shape",
]

# Rows in the probe batch, and the seed of its values: deterministic, so a recovery that makes a
# version again judges it as the first time did.
PROBE_ROWS = 4
_PROBE_SEED = 20250613


def _logreg(in_features: int, num_classes: int = 2) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(int(in_features), int(num_classes)))


def _mlp(in_features: int, num_classes: int = 2, hidden: int = 64) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(int(in_features), int(hidden)),
        nn.ReLU(),
        nn.Linear(int(hidden), int(num_classes)),
    )


def _cnn(in_channels: int = 1, num_classes: int = 2, width: int = 16) -> nn.Module:
    """Two conv blocks for 28x28 images (MedMNIST): about 110 K parameters at width 16."""
    w = int(width)
    return nn.Sequential(
        nn.Conv2d(int(in_channels), w, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(w, 2 * w, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * w * 7 * 7, 64),
        nn.ReLU(),
        nn.Linear(64, int(num_classes)),
    )


BUILTIN_MODELS: Mapping[str, Callable[..., nn.Module]] = {
    "logreg": _logreg,
    "mlp": _mlp,
    "cnn": _cnn,
}


def build_model(spec: ModelSpec, seed: int | None = None) -> nn.Module:
    """Instantiate the model a spec names; ``seed`` fixes the initial weights."""
    factory = BUILTIN_MODELS.get(spec.name) or _import_factory(spec.name)
    if seed is not None:
        torch.manual_seed(seed)
    try:
        model = factory(**spec.kwargs)
    except TypeError as exc:
        raise ConfigError(
            f"model {spec.name!r} rejected its arguments {spec.kwargs}: {exc}"
        ) from exc
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model factory {spec.name!r} returned {type(model).__name__}")
    return model


def _import_factory(reference: str) -> Callable[..., Any]:
    module_name, sep, attr = reference.partition(":")
    if not sep or not module_name or not attr:
        known = ", ".join(BUILTIN_MODELS)
        raise ConfigError(f"model {reference!r} is neither built in ({known}) nor module:function")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, TypeError, ValueError) as exc:
        # TypeError / ValueError: relative or empty module names that importlib refuses.
        raise ConfigError(f"cannot load model factory {reference!r}: {exc}") from exc
    if not callable(factory):
        raise ConfigError(f"model factory {reference!r} is not callable")
    return factory  # type: ignore[no-any-return]


def model_params(model: nn.Module) -> dict[str, NDArray[np.float32]]:
    """The floating-point state (parameters and float buffers) as float32 numpy arrays."""
    return {
        name: tensor.detach().to("cpu", torch.float32).numpy().copy()
        for name, tensor in model.state_dict().items()
        if tensor.is_floating_point()
    }


def load_params(model: nn.Module, params: Mapping[str, NDArray[np.float32]]) -> None:
    """Copy weights into ``model`` in place, after checking names and shapes."""
    state = model.state_dict()
    expected = {name for name, tensor in state.items() if tensor.is_floating_point()}
    if set(params) != expected:
        missing, extra = sorted(expected - set(params)), sorted(set(params) - expected)
        raise ConfigError(f"weights do not fit the model: missing {missing}, unexpected {extra}")
    with torch.no_grad():
        for name, value in params.items():
            target = state[name]
            if tuple(target.shape) != value.shape:
                raise ConfigError(f"{name}: weights {value.shape} vs model {tuple(target.shape)}")
            target.copy_(torch.from_numpy(np.array(value, dtype=np.float32)))


def probe_shape(spec: ModelSpec, model: nn.Module) -> tuple[int, ...] | None:
    """One example's input shape for ``spec`` (see the module docstring), or None if unknown."""
    derive = PROBE_SHAPES.get(spec.name)
    if derive is None:
        declared = getattr(_import_factory(spec.name), "probe_shape", None)
        if callable(declared):
            return tuple(int(n) for n in declared(**spec.kwargs))
        if declared is not None:
            return tuple(int(n) for n in declared)
        first = next((m for m in model.modules() if list(m.parameters(recurse=False))), None)
        return (first.in_features,) if isinstance(first, nn.Linear) else None
    try:
        return derive(**spec.kwargs)
    except TypeError as exc:
        raise ConfigError(f"model {spec.name!r}: no input shape from {spec.kwargs}: {exc}") from exc


def output_probe(
    spec: ModelSpec, *, rows: int = PROBE_ROWS
) -> Callable[[Mapping[str, NDArray[np.float32]]], str | None] | None:
    """A function that runs weights on a fixed probe batch and says why its outputs are not
    finite (None when they are); None when the input shape of ``spec`` cannot be known."""
    model = build_model(spec)  # its own weights never matter: each call loads the candidate's
    shape = probe_shape(spec, model)
    if shape is None:
        return None
    generator = torch.Generator().manual_seed(_PROBE_SEED)
    batch = torch.randn((rows, *shape), generator=generator)
    model.eval()

    def probe(params: Mapping[str, NDArray[np.float32]]) -> str | None:
        load_params(model, params)
        with torch.no_grad():
            outputs = model(batch)
        if bool(torch.isfinite(outputs).all()):
            return None
        bad = int((~torch.isfinite(outputs)).sum())
        return f"{bad} of {outputs.numel()} outputs on the probe batch are not finite"

    return probe
