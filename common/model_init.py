"""What the aggregator needs of a model before its first publish: no torch where numpy suffices.

The aggregator holds weights only as numpy arrays; torch is for nodes that train. A fresh run needs
two things of the model its spec names (:mod:`common.models`): the first version's weights, and the
**output probe** that judges each new version. For the built-in models (``logreg``, ``mlp``,
``cnn``) neither needs torch before the first publish:

- :func:`initial_params` draws the weights in numpy with torch's own default scheme for these
  layers (``nn.Linear``, ``nn.Conv2d``: weights kaiming-uniform with ``a = sqrt(5)``, biases
  uniform; both amount to ``uniform(-1/sqrt(fan_in), 1/sqrt(fan_in))``), seeded, under the names,
  shapes and order of the torch model's ``state_dict``. The values are not torch's (another
  generator); the distribution is. Nodes never build v0 themselves: they receive it.
- :func:`model_probe` checks the spec at once (its arguments, the probe's input shape) and returns a
  :class:`DeferredProbe`, which builds the torch forward pass on its first call or when
  :meth:`DeferredProbe.warm` is run (the service does so in the background after v0 is out).
  The probe is a forward pass through the torch model, as nodes evaluate it, so that a version
  the aggregator passes is one the nodes can run: it is deferred, not replaced. Should the build
  find no input shape after all (:func:`common.models.output_probe` gives None), the deferred probe
  says so once, as an eager one does at start-up, and passes every version: the aggregator runs
  without a probe, checking weights for finiteness only, as it always has for such a model.

A user's ``module:function`` factory returns an ``nn.Module`` that only torch can initialise or
run, so for it both are built at once with torch, as before (:func:`common.models.output_probe`).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Mapping

import numpy as np
from numpy.typing import NDArray

from common.errors import ConfigError
from common.messages import ModelSpec

__all__ = [
    "PROBE_SHAPES",
    "DeferredProbe",
    "builtin_layers",
    "initial_params",
    "model_probe",
]

log = logging.getLogger(__name__)

Params = dict[str, NDArray[np.float32]]
Probe = Callable[[Mapping[str, NDArray[np.float32]]], str | None]

# A built-in's weighted layers in state_dict order: the name prefix (the index in its
# nn.Sequential) and the weight's shape; each has a bias of shape (weight.shape[0],).
Layers = list[tuple[str, tuple[int, ...]]]


def _logreg(in_features: int, num_classes: int = 2) -> Layers:
    return [("1", (int(num_classes), int(in_features)))]


def _mlp(in_features: int, num_classes: int = 2, hidden: int = 64) -> Layers:
    return [("1", (int(hidden), int(in_features))), ("3", (int(num_classes), int(hidden)))]


def _cnn(in_channels: int = 1, num_classes: int = 2, width: int = 16) -> Layers:
    w = int(width)
    return [
        ("0", (w, int(in_channels), 3, 3)),
        ("3", (2 * w, w, 3, 3)),
        ("7", (64, 2 * w * 7 * 7)),
        ("9", (int(num_classes), 64)),
    ]


# Mirrors common.models.BUILTIN_MODELS: the same names and the same arguments.
_BUILTIN_LAYERS: Mapping[str, Callable[..., Layers]] = {
    "logreg": _logreg,
    "mlp": _mlp,
    "cnn": _cnn,
}

# One example's input shape for each built-in, from the spec's kwargs.
PROBE_SHAPES: Mapping[str, Callable[..., tuple[int, ...]]] = {
    "logreg": lambda in_features, **_: (int(in_features),),
    "mlp": lambda in_features, **_: (int(in_features),),
    "cnn": lambda in_channels=1, **_: (int(in_channels), 28, 28),
}


def builtin_layers(spec: ModelSpec) -> Layers | None:
    """The weighted layers of a built-in model, or None if the spec names a user's factory."""
    layout = _BUILTIN_LAYERS.get(spec.name)
    if layout is None:
        return None
    try:
        layers = layout(**spec.kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"model {spec.name!r} rejected its arguments {spec.kwargs}: {exc}"
        ) from exc
    for prefix, shape in layers:
        if min(shape) < 1:
            raise ConfigError(
                f"model {spec.name!r} with {spec.kwargs}: layer {prefix} would have shape {shape}"
            )
    return layers


def initial_params(spec: ModelSpec, seed: int | None = None) -> Params:
    """The first version's weights for ``spec``; ``seed`` fixes them. numpy for the built-ins,
    the torch model's own initialisation for a user's factory."""
    layers = builtin_layers(spec)
    if layers is None:
        from common.models import build_model, model_params

        return model_params(build_model(spec, seed=seed))
    rng = np.random.default_rng(seed)
    params: Params = {}
    for prefix, shape in layers:
        # torch's reset_parameters for Linear and Conv2d: kaiming_uniform_(a=sqrt(5)) has the
        # bound gain * sqrt(3 / fan_in) with gain sqrt(2 / (1 + 5)), that is 1 / sqrt(fan_in);
        # the bias is uniform within the same bound.
        fan_in = math.prod(shape[1:])
        bound = 1.0 / math.sqrt(fan_in)
        params[f"{prefix}.weight"] = rng.uniform(-bound, bound, shape).astype(np.float32)
        params[f"{prefix}.bias"] = rng.uniform(-bound, bound, shape[0]).astype(np.float32)
    return params


def model_probe(spec: ModelSpec) -> Probe | None:
    """The output probe for ``spec``: deferred for a built-in (its arguments and input shape are
    checked now), built at once with torch for a user's factory; None, said in the log, when that
    factory's input shape cannot be known (see :mod:`common.models`)."""
    if builtin_layers(spec) is None:
        from common.models import output_probe

        probe = output_probe(spec)
        if probe is None:
            _say_no_probe(spec)
        return probe
    try:
        PROBE_SHAPES[spec.name](**spec.kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model {spec.name!r}: no input shape from {spec.kwargs}: {exc}") from exc
    return DeferredProbe(spec)


def _say_no_probe(spec: ModelSpec) -> None:
    log.warning(
        "model %s: no input shape to probe new versions with; only their weights are "
        "checked for finiteness (give the factory a probe_shape)",
        spec.name,
    )


class DeferredProbe:
    """A built-in model's output probe (:func:`common.models.output_probe`), which imports torch
    and builds the model on its first call, or on :meth:`warm`, whichever comes first.

    A build that finds no input shape leaves no probe: every call passes (says None) and the log
    says why, once. A build that raises raises again at the next call: torch or the model is
    broken, and the aggregator stops rather than publish versions it was meant to check."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self._lock = threading.Lock()
        self._built = False
        self._probe: Probe | None = None

    @property
    def built(self) -> bool:
        return self._built

    def warm(self) -> None:
        """Build the probe now (torch and the model), so that the first fold does not wait."""
        self._build()

    def __call__(self, params: Mapping[str, NDArray[np.float32]]) -> str | None:
        probe = self._build()
        return None if probe is None else probe(params)

    def _build(self) -> Probe | None:
        with self._lock:
            if not self._built:
                from common.models import output_probe

                probe = output_probe(self.spec)
                if probe is None:
                    _say_no_probe(self.spec)
                self._probe, self._built = probe, True
            return self._probe
