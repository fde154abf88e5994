"""Specification of DP-SGD at the node: the plan of one version, the model check, the training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from common.messages import ModelSpec, PrivacyPolicy, TrainingConfig
from common.models import build_model, model_params
from edge_node.datasets import load_dataset
from edge_node.privacy import NotPrivatizable, check_private, plan_training, train_private
from edge_node.privacy_ledger import Charge, history_epsilon
from edge_node.training import evaluate

CPU = torch.device("cpu")
CONFIG = TrainingConfig(epochs=2, batch_size=16, learning_rate=0.05, optimizer="sgd")


def charges(policy: PrivacyPolicy, records: int, versions: int) -> list[Charge]:
    plan = plan_training(policy, records, CONFIG)
    return [
        Charge(
            run_id="r",
            base_version=v,
            update_id=f"u{v}",
            noise_multiplier=plan.noise_multiplier,
            sample_rate=plan.sample_rate,
            steps=plan.steps,
            max_grad_norm=plan.max_grad_norm,
            delta=policy.delta,
            epsilon_budget=policy.epsilon_budget,
            at=0.0,
        )
        for v in range(versions)
    ]


@pytest.mark.parametrize(
    ("records", "batches"),
    [
        pytest.param(160, 10, id="batches-divide-n"),
        pytest.param(30, 2, id="switzerland-30"),
        pytest.param(8, 1, id="one-batch"),
    ],
)
def test_a_version_is_epochs_times_the_batches_at_one_over_the_batches(
    records: int, batches: int
) -> None:
    """Opacus' Poisson loader: ceil(n / batch_size) steps per epoch, each at rate 1 / that."""
    plan = plan_training(PrivacyPolicy(noise_multiplier=1.0, epsilon_budget=5.0), records, CONFIG)
    assert (plan.steps, plan.sample_rate) == (CONFIG.epochs * batches, 1 / batches)
    assert (plan.noise_multiplier, plan.max_grad_norm) == (1.0, 1.0)


def test_a_step_budget_is_the_steps_charged_at_the_same_rate() -> None:
    """With a step budget a version is that many Poisson steps, each at 1 / the batches."""
    config = CONFIG.model_copy(update={"steps": 3})
    plan = plan_training(PrivacyPolicy(noise_multiplier=1.0, epsilon_budget=5.0), 160, config)
    assert (plan.steps, plan.sample_rate) == (3, 1 / 10)


@pytest.mark.parametrize("budget", [1.0, 3.0, 8.0])
def test_calibrated_noise_spends_the_budget_in_the_planned_versions(budget: float) -> None:
    """With calibrate_versions V, V versions come to the budget (within opacus' tolerance),
    and one more would pass it."""
    policy = PrivacyPolicy(calibrate_versions=10, epsilon_budget=budget, delta=1e-3)
    spent = history_epsilon(charges(policy, 172, 10), policy.delta)
    assert budget - 0.01 <= spent <= budget
    assert history_epsilon(charges(policy, 172, 11), policy.delta) > budget


@pytest.mark.parametrize(
    "spec",
    [
        pytest.param(ModelSpec(name="logreg", kwargs={"in_features": 13}), id="logreg"),
        pytest.param(ModelSpec(name="mlp", kwargs={"in_features": 13}), id="mlp"),
        pytest.param(ModelSpec(name="cnn", kwargs={"in_channels": 1}), id="cnn"),
    ],
)
def test_the_built_in_models_can_be_trained_privately(spec: ModelSpec) -> None:
    check_private(build_model(spec, seed=0))


class _BatchNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(13, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))  # type: ignore[no-any-return]


def test_a_model_opacus_cannot_protect_is_refused_naming_its_layer() -> None:
    """BatchNorm mixes examples in a batch: refused, by name, and never swapped for another."""
    model = _BatchNormNet()
    with pytest.raises(NotPrivatizable, match=r"body\.1 \(BatchNorm1d\)") as raised:
        check_private(model)
    assert "will not train it without" in str(raised.value)
    assert isinstance(model.body[1], nn.BatchNorm1d)  # the model is left as it was


def test_training_a_model_opacus_cannot_protect_raises_before_any_step() -> None:
    model = _BatchNormNet()
    x = np.zeros((20, 13), dtype=np.float32)
    y = np.zeros(20, dtype=np.int64)
    plan = plan_training(PrivacyPolicy(noise_multiplier=1.0, epsilon_budget=5.0), 20, CONFIG)
    with pytest.raises(NotPrivatizable):
        train_private(model, model_params(model), x, y, CONFIG, plan=plan, device=CPU)


def test_dp_training_learns_heart_disease_within_a_budget_of_3() -> None:
    """Ten DP versions at one hospital (epsilon 3 at delta 1e-3) beat the initial model."""
    data = load_dataset("heart-disease:hungarian")
    model = build_model(ModelSpec(name="logreg", kwargs={"in_features": 13}), seed=0)
    params = model_params(model)
    policy = PrivacyPolicy(calibrate_versions=10, epsilon_budget=3.0, delta=1e-3)
    plan = plan_training(policy, data.num_train, CONFIG)
    before = evaluate(model, params, data.test_x, data.test_y, device=CPU)
    for _ in range(10):
        result = train_private(
            model, params, data.train_x, data.train_y, CONFIG, plan=plan, device=CPU
        )
        params = result.params
        assert math.isfinite(result.loss)
        assert result.num_samples == data.num_train
    after = evaluate(model, params, data.test_x, data.test_y, device=CPU)
    assert after.accuracy >= before.accuracy + 0.1, (before.accuracy, after.accuracy)
    assert after.accuracy >= 0.7


def test_dp_training_does_not_touch_the_callers_model() -> None:
    """Opacus hooks a copy: the node's model object stays a plain module."""
    model = build_model(ModelSpec(name="logreg", kwargs={"in_features": 4}), seed=0)
    before = {k: v.copy() for k, v in model_params(model).items()}
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    plan = plan_training(PrivacyPolicy(noise_multiplier=1.0, epsilon_budget=5.0), 32, CONFIG)
    result = train_private(model, before, x, y, CONFIG, plan=plan, device=CPU)
    assert not any(
        p.grad_sample is not None for p in model.parameters() if hasattr(p, "grad_sample")
    )
    assert all(np.array_equal(before[k], v) for k, v in model_params(model).items())
    assert any(not np.array_equal(before[k], v) for k, v in result.params.items())


def test_dp_training_takes_the_planned_steps_past_an_epoch() -> None:
    """A step budget longer than an epoch runs the Poisson loader again: exactly plan.steps
    forward passes, the steps the ledger is charged for."""
    model = build_model(ModelSpec(name="logreg", kwargs={"in_features": 4}), seed=0)
    calls: list[int] = []
    model.register_forward_pre_hook(lambda _module, _inputs: calls.append(1))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    config = CONFIG.model_copy(update={"steps": 5})
    plan = plan_training(PrivacyPolicy(noise_multiplier=1.0, epsilon_budget=5.0), 32, config)
    train_private(model, model_params(model), x, y, config, plan=plan, device=CPU)
    assert plan.steps == len(calls) == 5
