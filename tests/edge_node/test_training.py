"""Specification of models and local training: numpy weights in, trained numpy weights out."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import cast

import numpy as np
import pytest
import torch
from torch import nn

from common.errors import ConfigError
from common.messages import ModelSpec, TrainingConfig
from common.models import (
    BUILTIN_MODELS,
    PROBE_SHAPES,
    build_model,
    load_params,
    model_params,
    output_probe,
)
from edge_node.training import (
    UnusableVersion,
    batches,
    evaluate,
    label_adjustment,
    resolve_device,
    train,
)

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    """Keep torch to two threads: these tests must stay fast on small CI machines."""
    torch.set_num_threads(2)


def separable(n: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two Gaussian blobs in 4-d, far apart: a linear model can separate them."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n).astype(np.int64)
    x = rng.normal(0, 0.5, (n, 4)).astype(np.float32) + (2 * y[:, None] - 1) * 1.5
    return x.astype(np.float32), y


LOGREG = ModelSpec(name="logreg", kwargs={"in_features": 4})
CONFIG = TrainingConfig(epochs=5, batch_size=8, learning_rate=0.1)

BUILTINS = [
    pytest.param(LOGREG, (3, 4), id="logreg"),
    pytest.param(ModelSpec(name="mlp", kwargs={"in_features": 4, "hidden": 8}), (3, 4), id="mlp"),
    pytest.param(
        ModelSpec(name="cnn", kwargs={"in_channels": 1, "width": 2, "num_classes": 3}),
        (3, 1, 28, 28),
        id="cnn",
    ),
]


@pytest.mark.parametrize(("spec", "input_shape"), BUILTINS)
def test_every_builtin_model_builds_and_maps_inputs_to_class_logits(
    spec: ModelSpec, input_shape: tuple[int, ...]
) -> None:
    """Each built-in model builds from its spec and returns (batch, num_classes) logits."""
    model = build_model(spec, seed=0)
    num_classes = int(spec.kwargs.get("num_classes", 2))
    assert model(torch.zeros(input_shape)).shape == (input_shape[0], num_classes)


def test_the_builtin_table_covers_every_builtin() -> None:
    """The table above has one row per built-in model."""
    specs = [cast("ModelSpec", param.values[0]) for param in BUILTINS]
    assert {spec.name for spec in specs} == set(BUILTIN_MODELS)


@pytest.mark.parametrize(("spec", "input_shape"), BUILTINS)
def test_params_round_trip_through_numpy(spec: ModelSpec, input_shape: tuple[int, ...]) -> None:
    """model_params gives float32 arrays; load_params puts them into another model exactly."""
    source, target = build_model(spec, seed=1), build_model(spec, seed=2)
    params = model_params(source)
    assert params
    assert all(value.dtype == np.float32 for value in params.values())
    load_params(target, params)
    for name, value in model_params(target).items():
        np.testing.assert_array_equal(value, params[name])
    x = torch.randn(input_shape)
    torch.testing.assert_close(source(x), target(x))


def test_model_params_are_copies() -> None:
    """Changing the returned arrays does not change the model's weights."""
    model = build_model(LOGREG, seed=0)
    params = model_params(model)
    params["1.weight"][:] = 42.0
    assert not np.any(model_params(model)["1.weight"] == 42.0)


def test_the_same_seed_builds_the_same_initial_weights() -> None:
    """build_model(spec, seed) is deterministic; another seed gives other weights."""
    first, second = model_params(build_model(LOGREG, 3)), model_params(build_model(LOGREG, 3))
    other = model_params(build_model(LOGREG, 4))
    for name in first:
        np.testing.assert_array_equal(first[name], second[name])
    assert any(not np.array_equal(first[name], other[name]) for name in first)


@pytest.mark.parametrize(
    "change",
    [
        pytest.param("missing", id="missing-tensor"),
        pytest.param("extra", id="unexpected-tensor"),
        pytest.param("shape", id="wrong-shape"),
    ],
)
def test_weights_that_do_not_fit_the_model_are_refused(change: str) -> None:
    """load_params raises ConfigError for missing, unexpected or mis-shaped tensors."""
    model = build_model(LOGREG, seed=0)
    before = model_params(model)
    params = dict(before)
    if change == "missing":
        del params["1.bias"]
    elif change == "extra":
        params["2.weight"] = np.zeros(3, dtype=np.float32)
    else:
        params["1.weight"] = np.zeros((2, 5), dtype=np.float32)
    with pytest.raises(ConfigError, match=r"1\.bias|2\.weight|1\.weight"):
        load_params(model, params)
    for name, value in model_params(model).items():
        np.testing.assert_array_equal(value, before[name])


def test_training_on_separable_data_lowers_the_loss() -> None:
    """Training returns float32 weights of unchanged shapes whose loss is below the start."""
    x, y = separable()
    model = build_model(LOGREG, seed=0)
    base = model_params(model)
    before = evaluate(model, base, x, y, device=CPU)
    result = train(model, base, x, y, CONFIG, seed=0, device=CPU)
    after = evaluate(model, result.params, x, y, device=CPU)
    assert after.loss < before.loss
    assert after.accuracy >= 0.95
    assert {name: v.shape for name, v in result.params.items()} == {
        name: v.shape for name, v in base.items()
    }
    assert all(v.dtype == np.float32 for v in result.params.values())
    assert result.num_samples == len(y)
    assert np.isfinite(result.loss)
    assert 0.0 <= result.accuracy <= 1.0
    assert result.seconds >= 0.0


def test_training_does_not_modify_the_base_weights() -> None:
    """The base params passed in are left as they were."""
    x, y = separable()
    model = build_model(LOGREG, seed=0)
    base = model_params(model)
    snapshot = {name: value.copy() for name, value in base.items()}
    train(model, base, x, y, CONFIG, seed=0, device=CPU)
    for name, value in base.items():
        np.testing.assert_array_equal(value, snapshot[name])


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(CONFIG, id="sgd"),
        pytest.param(
            TrainingConfig(epochs=3, batch_size=5, learning_rate=0.05, momentum=0.9), id="momentum"
        ),
        pytest.param(
            TrainingConfig(epochs=3, batch_size=16, optimizer="adam", learning_rate=0.01),
            id="adam",
        ),
    ],
)
def test_the_same_seed_trains_to_identical_weights(config: TrainingConfig) -> None:
    """Same base, data, config and seed: bit-identical weights, even from another model object."""
    x, y = separable()
    base = model_params(build_model(LOGREG, seed=0))
    first = train(build_model(LOGREG, 9), base, x, y, config, seed=5, device=CPU)
    second = train(build_model(LOGREG, 7), base, x, y, config, seed=5, device=CPU)
    for name in base:
        np.testing.assert_array_equal(first.params[name], second.params[name])
    assert first.loss == second.loss


def test_another_seed_shuffles_differently() -> None:
    """The seed drives the batch order: another seed gives other weights."""
    x, y = separable()
    base = model_params(build_model(LOGREG, seed=0))
    first = train(build_model(LOGREG), base, x, y, CONFIG, seed=1, device=CPU)
    second = train(build_model(LOGREG), base, x, y, CONFIG, seed=2, device=CPU)
    assert any(not np.array_equal(first.params[n], second.params[n]) for n in base)


def test_evaluate_counts_the_correct_predictions() -> None:
    """evaluate() counts argmax hits, in batches, and averages the loss over examples."""
    model = build_model(LOGREG, seed=0)
    # Logits = x @ W.T + b with W = identity on the first two features: class = argmax(x0, x1).
    params = {
        "1.weight": np.array([[1, 0, 0, 0], [0, 1, 0, 0]], dtype=np.float32),
        "1.bias": np.zeros(2, dtype=np.float32),
    }
    x = np.array(
        [[2, 0, 0, 0], [0, 2, 0, 0], [3, 1, 0, 0], [1, 3, 0, 0], [5, 0, 0, 0]], dtype=np.float32
    )
    y = np.array([0, 1, 1, 1, 1], dtype=np.int64)  # predictions: 0, 1, 0, 1, 0
    result = evaluate(model, params, x, y, device=CPU, batch_size=2)
    assert (result.correct, result.num_examples) == (3, 5)
    assert result.accuracy == pytest.approx(0.6)
    expected = nn.CrossEntropyLoss()(torch.from_numpy(x[:, :2]), torch.from_numpy(y))
    assert result.loss == pytest.approx(float(expected), rel=1e-5)


def test_evaluating_no_examples_gives_zeros() -> None:
    """An empty test split evaluates to zero counts without dividing by zero."""
    model = build_model(LOGREG, seed=0)
    empty_x, empty_y = np.zeros((0, 4), dtype=np.float32), np.zeros(0, dtype=np.int64)
    result = evaluate(model, model_params(model), empty_x, empty_y, device=CPU)
    assert (result.correct, result.num_examples, result.accuracy, result.loss) == (0, 0, 0.0, 0.0)


def test_auto_device_is_cuda_only_when_available() -> None:
    """resolve_device('auto') picks CUDA if present, else the CPU; other names pass through."""
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == CPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_a_cuda_device_on_a_machine_without_cuda_is_a_config_error(name: str) -> None:
    """Asking for CUDA where there is none fails when the node starts, naming the device."""
    with pytest.raises(ConfigError, match="no CUDA device"):
        resolve_device(name)


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "meta"])
def test_a_device_torch_does_not_know_or_we_do_not_train_on_is_a_config_error(name: str) -> None:
    """A misspelt or unsupported device name is refused at start, not at the first job."""
    with pytest.raises(ConfigError, match=repr(name)):
        resolve_device(name)


def test_a_module_function_reference_builds_a_users_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`module:function` imports the user's installed factory and calls it with the kwargs."""
    (tmp_path / "hospital_models.py").write_text(
        textwrap.dedent(
            """
            from torch import nn

            def tiny(in_features, num_classes=2):
                return nn.Linear(in_features, num_classes)

            NOT_CALLABLE = 3

            def not_a_module():
                return "a string"
            """
        ),
        encoding="utf-8",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "hospital_models", raising=False)
    model = build_model(ModelSpec(name="hospital_models:tiny", kwargs={"in_features": 5}), seed=0)
    assert isinstance(model, nn.Linear)
    assert (model.in_features, model.out_features) == (5, 2)
    with pytest.raises(ConfigError, match="not callable"):
        build_model(ModelSpec(name="hospital_models:NOT_CALLABLE"))
    with pytest.raises(ConfigError, match="returned str"):
        build_model(ModelSpec(name="hospital_models:not_a_module"))
    with pytest.raises(ConfigError, match="rejected its arguments"):
        build_model(ModelSpec(name="hospital_models:tiny", kwargs={"colour": "red"}))


@pytest.mark.parametrize(
    ("name", "message"),
    [
        pytest.param("resnet", "neither built in", id="unknown-builtin"),
        pytest.param("module:", "neither built in", id="no-function"),
        pytest.param(":function", "neither built in", id="no-module"),
        pytest.param("no_such_module_xyz:build", "cannot load", id="missing-module"),
        pytest.param("common.models:no_such_function", "cannot load", id="missing-function"),
        pytest.param("common.models:ConfigError.nope", "cannot load", id="dotted-attribute"),
        pytest.param(".relative:build", "cannot load", id="relative-module"),
        pytest.param("common.models:BUILTIN_MODELS", "not callable", id="not-callable"),
    ],
)
def test_bad_model_references_raise_config_error(name: str, message: str) -> None:
    """Unknown names and unloadable or uncallable `module:function` references are ConfigErrors."""
    with pytest.raises(ConfigError, match=message):
        build_model(ModelSpec(name=name))


def test_builtin_models_reject_unknown_arguments() -> None:
    """Kwargs a built-in does not take raise ConfigError naming the model."""
    with pytest.raises(ConfigError, match="'logreg' rejected its arguments"):
        build_model(ModelSpec(name="logreg", kwargs={"in_features": 4, "depth": 3}))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="this machine has no CUDA device")
def test_training_on_cuda_matches_the_cpu_and_returns_cpu_float32_weights() -> None:
    """On CUDA the CNN trains to the CPU's weights (within float noise), returned on the CPU."""
    spec = ModelSpec(name="cnn", kwargs={"in_channels": 1, "width": 4, "num_classes": 2})
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 64).astype(np.int64)
    x = (rng.normal(0, 1, (64, 1, 28, 28)) + y[:, None, None, None]).astype(np.float32)
    base = model_params(build_model(spec, seed=0))
    config = TrainingConfig(epochs=2, batch_size=16, learning_rate=0.05)
    cuda = resolve_device("auto")
    assert cuda.type == "cuda"
    on_gpu = train(build_model(spec, seed=0), base, x, y, config, seed=3, device=cuda)
    on_cpu = train(build_model(spec, seed=0), base, x, y, config, seed=3, device=CPU)
    for name, value in on_gpu.params.items():
        assert value.dtype == np.float32
        np.testing.assert_allclose(value, on_cpu.params[name], rtol=1e-3, atol=1e-4)
    scored = evaluate(build_model(spec), on_gpu.params, x, y, device=cuda)
    assert scored.accuracy == pytest.approx(
        evaluate(build_model(spec), on_cpu.params, x, y, device=CPU).accuracy, abs=1 / 64
    )


def huge(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Weights of 3e38: finite, and their outputs on any input are not."""
    return {name: np.full_like(value, 3e38) for name, value in params.items()}


def test_evaluating_a_version_whose_outputs_are_not_finite_says_why() -> None:
    """Finite weights of 3e38 give a NaN loss: UnusableVersion with the reason, not a NaN."""
    x, y = separable()
    model = build_model(LOGREG, seed=0)
    with pytest.raises(UnusableVersion, match="outputs are not finite"):
        evaluate(model, huge(model_params(model)), x, y, device=CPU)


def test_training_on_a_version_whose_outputs_are_not_finite_says_why() -> None:
    """Training from weights of 3e38 raises UnusableVersion rather than return a NaN delta."""
    x, y = separable()
    model = build_model(LOGREG, seed=0)
    with pytest.raises(UnusableVersion, match="not finite"):
        train(model, huge(model_params(model)), x, y, CONFIG, seed=0, device=CPU)


@pytest.mark.parametrize(("spec", "input_shape"), BUILTINS)
def test_the_probe_passes_a_built_in_models_weights_and_fails_huge_ones(
    spec: ModelSpec, input_shape: tuple[int, ...]
) -> None:
    """Each built-in is probed on a batch of its own input shape: its initial weights pass,
    weights of 3e38 fail with a count of the non-finite outputs."""
    probe = output_probe(spec)
    assert probe is not None
    params = model_params(build_model(spec, seed=3))
    assert probe(params) is None
    failure = probe(huge(params))
    assert failure is not None
    assert "outputs on the probe batch are not finite" in failure


def test_the_probe_table_covers_every_builtin() -> None:
    """Every built-in model has an input shape for the probe."""
    assert set(PROBE_SHAPES) == set(BUILTIN_MODELS)


def test_a_users_model_is_probed_by_its_declared_shape_or_its_first_linear_layer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A factory's ``probe_shape`` gives the input shape; without it a first Linear layer does;
    a model with neither is not probed (None)."""
    (tmp_path / "probe_models.py").write_text(
        textwrap.dedent(
            """
            from torch import nn

            def declared(channels=1):
                return nn.Sequential(nn.Conv2d(channels, 2, 3), nn.Flatten(), nn.Linear(72, 2))

            declared.probe_shape = lambda channels=1: (channels, 8, 8)

            def linear(in_features):
                return nn.Sequential(nn.Linear(in_features, 4), nn.ReLU(), nn.Linear(4, 2))

            def conv():
                return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten())
            """
        ),
        encoding="utf-8",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "probe_models", raising=False)
    linear = ModelSpec(name="probe_models:linear", kwargs={"in_features": 6})
    probe = output_probe(linear)
    assert probe is not None
    params = model_params(build_model(linear, seed=0))
    assert probe(params) is None
    assert probe(huge(params)) is not None
    declared = ModelSpec(name="probe_models:declared", kwargs={"channels": 2})
    declared_probe = output_probe(declared)
    assert declared_probe is not None
    params = model_params(build_model(declared, seed=0))
    assert declared_probe(params) is None
    assert declared_probe(huge(params)) is not None
    assert output_probe(ModelSpec(name="probe_models:conv")) is None


def epochs_of(config: TrainingConfig, records: int) -> list[list[int]]:
    """Each batch of one update's training, as lists of row indices."""
    generator = torch.Generator().manual_seed(0)
    return [rows.tolist() for rows in batches(records, config, generator)]


@pytest.mark.parametrize(
    ("config", "records", "steps", "examples"),
    [
        pytest.param(TrainingConfig(epochs=2, batch_size=4), 10, 6, 20, id="two-epochs"),
        pytest.param(TrainingConfig(batch_size=4, steps=2), 10, 2, 8, id="budget-within-one"),
        pytest.param(TrainingConfig(batch_size=4, steps=5), 10, 5, 18, id="budget-over-one"),
        pytest.param(TrainingConfig(epochs=3, batch_size=4, steps=1), 10, 1, 4, id="budget-wins"),
    ],
)
def test_an_update_takes_the_step_budget_or_whole_epochs(
    config: TrainingConfig, records: int, steps: int, examples: int
) -> None:
    """An update is ``steps`` batches when a step budget is set, else ``epochs`` whole epochs;
    every epoch goes through each row once, and the examples counted are the batches' rows."""
    found = epochs_of(config, records)
    assert len(found) == config.steps_for(records) == steps
    assert sum(len(rows) for rows in found) == config.examples_for(records) == examples
    per_epoch = -(-records // config.batch_size)
    for start in range(0, len(found), per_epoch):
        epoch = [i for rows in found[start : start + per_epoch] for i in rows]
        assert len(set(epoch)) == len(epoch)
        if len(found) - start >= per_epoch:
            assert sorted(epoch) == list(range(records))


def test_label_adjustment_is_tau_log_local_frequencies() -> None:
    """The adjustment is tau * log of each class's share of the rows; an absent class counts
    as seen once."""
    y = np.array([1, 1, 1, 0], dtype=np.int64)
    assert label_adjustment(y, 2, 0.5).tolist() == pytest.approx(
        [0.5 * np.log(0.25), 0.5 * np.log(0.75)]
    )
    assert label_adjustment(y, 3, 1.0).tolist() == pytest.approx(np.log([1 / 5, 3 / 5, 1 / 5]))


def test_logit_adjusted_training_does_not_learn_the_local_label_mix() -> None:
    """On features that say nothing, plain training learns the hospital's 90 % majority; the
    logit-adjusted loss (tau = 1) leaves the model's own prediction near even."""
    y = np.array([1] * 90 + [0] * 10, dtype=np.int64)
    x = np.zeros((100, 4), dtype=np.float32)
    model = build_model(LOGREG, seed=0)
    base = model_params(model)
    shares = {}
    for tau in (0.0, 1.0):
        config = TrainingConfig(epochs=30, batch_size=20, learning_rate=0.5, logit_adjustment=tau)
        params = train(model, base, x, y, config, seed=0, device=CPU).params
        load_params(model, params)
        with torch.no_grad():
            shares[tau] = float(torch.softmax(model(torch.zeros(1, 4)), dim=1)[0, 1])
    assert shares[0.0] == pytest.approx(0.9, abs=0.03)
    assert shares[1.0] == pytest.approx(0.5, abs=0.03)
