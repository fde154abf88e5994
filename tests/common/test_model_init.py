"""Specification of common.model_init: the built-ins' first weights drawn in numpy as torch would
draw them (names, shapes, order, bounds, spread), and their output probe deferred, not dropped."""

from __future__ import annotations

import logging
import math
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from common.errors import ConfigError
from common.messages import ModelSpec
from common.model_init import (
    PROBE_SHAPES,
    DeferredProbe,
    builtin_layers,
    initial_params,
    model_probe,
)
from common.models import BUILTIN_MODELS, build_model, model_params, output_probe

BUILTINS = [
    pytest.param(ModelSpec(name="logreg", kwargs={"in_features": 13}), id="logreg"),
    pytest.param(
        ModelSpec(name="logreg", kwargs={"in_features": "5", "num_classes": 3}), id="logreg-str"
    ),
    pytest.param(ModelSpec(name="mlp", kwargs={"in_features": 30}), id="mlp"),
    pytest.param(
        ModelSpec(name="mlp", kwargs={"in_features": 4, "hidden": 8, "num_classes": 5}),
        id="mlp-hidden",
    ),
    pytest.param(ModelSpec(name="cnn", kwargs={}), id="cnn-defaults"),
    pytest.param(
        ModelSpec(name="cnn", kwargs={"in_channels": 3, "num_classes": 4, "width": 8}), id="cnn"
    ),
]


def test_every_builtin_has_a_numpy_layout_and_a_probe_shape() -> None:
    """The numpy layouts and the probe's input shapes cover exactly the torch built-ins."""
    specs = [param.values[0] for param in BUILTINS]
    assert {spec.name for spec in specs} == set(BUILTIN_MODELS)
    assert all(builtin_layers(spec) is not None for spec in specs)
    assert builtin_layers(ModelSpec(name="some_module:factory")) is None
    assert set(PROBE_SHAPES) == set(BUILTIN_MODELS)


@pytest.mark.parametrize("spec", BUILTINS)
def test_the_first_weights_have_the_torch_models_names_shapes_order_and_dtype(
    spec: ModelSpec,
) -> None:
    """A node loads v0 into the model it builds: every tensor of its state, in the same order."""
    ours = initial_params(spec, seed=0)
    torchs = model_params(build_model(spec, seed=0))
    assert list(ours) == list(torchs)
    for name, value in ours.items():
        assert value.shape == torchs[name].shape, name
        assert value.dtype == np.float32, name
        assert value.flags.c_contiguous, name


@pytest.mark.parametrize("spec", BUILTINS)
def test_the_first_weights_follow_torchs_default_initialisation(spec: ModelSpec) -> None:
    """Weights and biases are uniform within 1/sqrt(fan_in) (kaiming-uniform, a = sqrt(5)): inside
    the bound, reaching near it, centred, with the spread of a uniform, as torch's own are."""
    ours = initial_params(spec, seed=1)
    torchs = model_params(build_model(spec, seed=1))
    for name, value in ours.items():
        weight = ours[name.replace(".bias", ".weight")]
        bound = 1.0 / math.sqrt(math.prod(weight.shape[1:]))
        for drawn in (value, torchs[name]):
            assert np.all(np.abs(drawn) <= bound * (1 + 1e-6)), name
        if value.size >= 500:  # enough draws for the moments to be close, at any seed
            for drawn in (value, torchs[name]):
                assert np.abs(drawn).max() > 0.95 * bound, name
                assert abs(float(drawn.mean())) < 0.1 * bound, name
                assert float(drawn.std()) == pytest.approx(bound / math.sqrt(3), rel=0.1), name


def test_the_seed_fixes_the_first_weights() -> None:
    """The same seed gives the same weights; another seed, others."""
    spec = ModelSpec(name="mlp", kwargs={"in_features": 6})
    first, again, other = initial_params(spec, 3), initial_params(spec, 3), initial_params(spec, 4)
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert not any(np.array_equal(first[k], other[k]) for k in first)


@pytest.mark.parametrize(
    ("spec", "detail"),
    [
        (ModelSpec(name="logreg", kwargs={}), "rejected its arguments"),
        (ModelSpec(name="mlp", kwargs={"in_features": 4, "depth": 2}), "rejected its arguments"),
        (ModelSpec(name="cnn", kwargs={"width": "wide"}), "rejected its arguments"),
        (ModelSpec(name="logreg", kwargs={"in_features": 0}), "would have shape"),
    ],
)
def test_a_built_in_with_bad_arguments_is_refused_before_any_weights(
    spec: ModelSpec, detail: str
) -> None:
    """Bad arguments are a ConfigError at start-up, from the weights and from the probe alike,
    not a failure at the first fold."""
    with pytest.raises(ConfigError, match=detail):
        initial_params(spec, seed=0)
    with pytest.raises(ConfigError, match=detail):
        model_probe(spec)


@pytest.mark.parametrize("spec", BUILTINS)
def test_a_built_ins_probe_is_deferred_and_judges_as_the_torch_probe_does(
    spec: ModelSpec,
) -> None:
    """The probe is built at its first call, then passes the first weights and fails weights of
    3e38 with the same verdicts as common.models.output_probe."""
    probe = model_probe(spec)
    assert isinstance(probe, DeferredProbe)
    assert not probe.built
    params = initial_params(spec, seed=2)
    huge = {name: np.full_like(value, 3e38) for name, value in params.items()}
    direct = output_probe(spec)
    assert direct is not None
    assert probe(params) is None
    assert probe.built
    assert probe(huge) == direct(huge)
    assert probe(huge) is not None


def test_warming_builds_the_probe_once() -> None:
    """warm() builds the probe; later calls use it."""
    probe = DeferredProbe(ModelSpec(name="logreg", kwargs={"in_features": 3}))
    probe.warm()
    assert probe.built
    built = probe._probe
    probe.warm()
    assert probe._probe is built


def test_a_deferred_probe_that_finds_no_input_shape_passes_every_version_and_says_so_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """When the deferred build gives no probe (common.models.output_probe says None), warming
    and every call pass without raising, and the log says once why nothing is probed, as it does
    for a model probed at once."""
    import common.models

    monkeypatch.setattr(common.models, "output_probe", lambda spec, **_: None)
    spec = ModelSpec(name="logreg", kwargs={"in_features": 3})
    probe = model_probe(spec)
    assert isinstance(probe, DeferredProbe)
    huge = {name: np.full_like(v, 3e38) for name, v in initial_params(spec, seed=0).items()}
    with caplog.at_level(logging.WARNING, logger="common.model_init"):
        probe.warm()
        assert probe.built
        assert probe(huge) is None
        assert probe(huge) is None
    said = [r.getMessage() for r in caplog.records if "no input shape to probe" in r.getMessage()]
    assert len(said) == 1, said
    assert said[0].startswith("model logreg: ")


def test_a_deferred_probe_whose_build_raises_raises_at_each_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A build that fails (torch or the model broken) is not taken for "no probe": it raises
    again where the probe is called, and a later build that succeeds is used."""
    import common.models

    real = common.models.output_probe

    def broken(spec: ModelSpec, **_: object) -> None:
        raise ConfigError("torch is broken")

    monkeypatch.setattr(common.models, "output_probe", broken)
    spec = ModelSpec(name="logreg", kwargs={"in_features": 3})
    probe = DeferredProbe(spec)
    params = initial_params(spec, seed=0)
    for attempt in (probe.warm, lambda: probe(params)):
        with pytest.raises(ConfigError, match="torch is broken"):
            attempt()
        assert not probe.built
    monkeypatch.setattr(common.models, "output_probe", real)
    assert probe(params) is None
    assert probe.built


def test_a_users_model_is_initialised_and_probed_by_torch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A ``module:function`` factory's weights are its torch initialisation, and its probe is
    built at once (a factory that cannot be probed gives None, as before, and the log says so)."""
    (tmp_path / "init_models.py").write_text(
        textwrap.dedent(
            """
            from torch import nn

            def linear(in_features):
                return nn.Sequential(nn.Linear(in_features, 4), nn.ReLU(), nn.Linear(4, 2))

            def conv():
                return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten())
            """
        ),
        encoding="utf-8",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "init_models", raising=False)
    spec = ModelSpec(name="init_models:linear", kwargs={"in_features": 6})
    params = initial_params(spec, seed=5)
    expected = model_params(build_model(spec, seed=5))
    assert list(params) == list(expected)
    assert all(np.array_equal(params[k], expected[k]) for k in params)
    probe = model_probe(spec)
    assert probe is not None
    assert not isinstance(probe, DeferredProbe)
    assert probe(params) is None
    with caplog.at_level(logging.WARNING, logger="common.model_init"):
        assert model_probe(ModelSpec(name="init_models:conv")) is None
    assert "model init_models:conv: no input shape to probe" in caplog.text
    with pytest.raises(ConfigError, match="cannot load model factory"):
        model_probe(ModelSpec(name="init_models:missing"))
