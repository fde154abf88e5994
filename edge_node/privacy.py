"""DP-SGD on the node with Opacus: the plan for one version, the check of the model, the training.

Theory of operation. Under a :class:`~common.messages.PrivacyPolicy` a node trains with Opacus:
every example's gradient is clipped to ``max_grad_norm`` (C), Gaussian noise of standard
deviation ``noise_multiplier`` x C is added to each batch's sum, and batches are drawn by Poisson
sampling. Opacus' own convention fixes what one version costs (:func:`plan_training`): a data
loader of ``ceil(n / batch_size)`` batches becomes that many Poisson steps per epoch, each record
in a step with probability ``1 / ceil(n / batch_size)`` (``batch_size / n`` when the batches
divide n; the accountant is charged with the rate actually sampled). A policy that calibrates
picks the smallest noise (opacus' ``get_noise_multiplier``, RDP accountant) with which
``calibrate_versions`` such versions spend the budget at delta.

Randomness. The noise and the Poisson sample must be unknown to anyone who sees the update: a
noise an observer can regenerate can be subtracted. So DP training never uses the node's seed
(which is in its settings, and 0 by default): both generators are seeded from the operating
system's CSPRNG for every version, and DP runs are not reproducible. torch's generators are not
cryptographically secure themselves; Opacus' ``secure_mode`` (torchcsprng) would close that gap
at a large cost in speed, and is not used.

Models. Opacus computes per-example gradients for layers without buffers that its validator
accepts: all three built-ins (``logreg``, ``mlp``, ``cnn``: Linear, Conv2d, ReLU, MaxPool2d,
Flatten) are supported. A model with an unsupported layer (BatchNorm, an LSTM of the plain torch
kind, ...) is refused with :class:`NotPrivatizable`, naming each offending layer: the node never
"fixes" it into another architecture, and never trains it without privacy.
"""

from __future__ import annotations

import copy
import logging
import math
import secrets
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from opacus import PrivacyEngine
from opacus.accountants.utils import get_noise_multiplier
from opacus.grad_sample import GradSampleModule
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.errors import ConfigError
from common.messages import PrivacyPolicy, TrainingConfig
from common.models import load_params
from edge_node.training import Params, TrainResult, build_optimizer, trained

log = logging.getLogger(__name__)

__all__ = ["DpPlan", "NotPrivatizable", "check_private", "plan_training", "train_private"]


class NotPrivatizable(ConfigError):
    """The model has layers Opacus cannot compute per-example gradients for: no DP training."""


@dataclass(frozen=True, slots=True)
class DpPlan:
    """What one version's DP training takes: the accountant's charge, and the clipping norm."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float


def plan_training(policy: PrivacyPolicy, records: int, config: TrainingConfig) -> DpPlan:
    """The noise, sample rate and steps of one version's training on ``records`` records."""
    batches = math.ceil(records / config.batch_size)
    sample_rate = 1 / batches
    steps = config.steps_for(records)
    if policy.noise_multiplier is not None:
        noise = policy.noise_multiplier
    else:
        versions = policy.calibrate_versions or 1  # the policy sets one of the two
        with warnings.catch_warnings():
            # The search tries small noises whose best RDP order is the largest one; their
            # epsilon is still an upper bound (see edge_node.privacy_ledger).
            warnings.filterwarnings("ignore", message="Optimal order", category=UserWarning)
            noise = get_noise_multiplier(
                target_epsilon=policy.epsilon_budget,
                target_delta=policy.delta,
                sample_rate=sample_rate,
                steps=steps * versions,
                accountant="rdp",
                epsilon_tolerance=0.01,
            )
    return DpPlan(
        noise_multiplier=float(noise),
        sample_rate=sample_rate,
        steps=steps,
        max_grad_norm=policy.max_grad_norm,
    )


def check_private(model: nn.Module) -> None:
    """Raise :class:`NotPrivatizable`, naming every layer Opacus cannot train privately."""
    problems: list[str] = []
    for name, layer in model.named_modules():
        if not any(p.requires_grad for p in layer.parameters(recurse=False)):
            continue
        label = f"{name or '(root)'} ({type(layer).__name__})"
        validator = ModuleValidator.VALIDATORS.get(type(layer))
        # Opacus' explanations run to paragraphs; their first sentence names the problem.
        problems.extend(
            f"{label}: {str(error).split('. ')[0]}"
            for error in (validator(layer) if validator else ())
        )
        if any(True for _ in layer.buffers(recurse=False)):
            problems.append(f"{label}: a trainable layer with buffers (state that is not private)")
    if problems:
        raise NotPrivatizable(
            "Opacus cannot train this model with differential privacy; the node will not train it "
            "without: " + "; ".join(problems)
        )


def _steps(loader: DataLoader[Any], steps: int) -> Iterator[Any]:
    """The first ``steps`` batches of ``loader``, run through as many times as that takes (each
    pass draws its Poisson batches afresh): the steps the accountant charged for."""
    done = 0
    while done < steps:
        for batch in loader:
            yield batch
            done += 1
            if done == steps:
                return


def train_private(
    model: nn.Module,
    base: Params,
    x: NDArray[np.float32],
    y: NDArray[np.int64],
    config: TrainingConfig,
    *,
    plan: DpPlan,
    device: torch.device,
) -> TrainResult:
    """DP-SGD from ``base`` as ``plan`` says; a copy of ``model`` is trained (Opacus hooks it).

    The sample and the noise are drawn from fresh secret seeds (see the module's docstring).
    """
    started = time.perf_counter()
    if config.logit_adjustment:
        log.warning(
            "logit_adjustment %g is not applied under a privacy policy: the hospital's label "
            "counts would be read outside DP-SGD's accounting",
            config.logit_adjustment,
        )
    work = copy.deepcopy(model)
    load_params(work, base)
    work.to(device).train()
    check_private(work)
    generator = torch.Generator().manual_seed(secrets.randbits(63))
    noise = torch.Generator(device=device).manual_seed(secrets.randbits(63))
    loader = DataLoader(
        TensorDataset(torch.from_numpy(x), torch.from_numpy(y)),
        batch_size=config.batch_size,
        generator=generator,
    )
    with warnings.catch_warnings():
        # Opacus' reminder of secure_mode, which the module's docstring answers.
        warnings.filterwarnings("ignore", message="Secure RNG turned off", category=UserWarning)
        engine = PrivacyEngine(accountant="rdp")
    private, optimizer, private_loader = engine.make_private(
        module=work,
        optimizer=build_optimizer(work, config),
        data_loader=loader,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.max_grad_norm,
        poisson_sampling=True,
        noise_generator=noise,
    )
    loss_fn = nn.CrossEntropyLoss()
    total_loss, correct, seen = 0.0, 0, 0
    with warnings.catch_warnings():
        # Opacus' hooks fire on the first layer, whose inputs (the data) need no gradient.
        warnings.filterwarnings(
            "ignore", message="Full backward hook is firing", category=UserWarning
        )
        for batch_x, batch_y in _steps(private_loader, plan.steps):
            features, labels = batch_x.to(device), batch_y.to(device)
            logits = private(features)
            loss = loss_fn(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            # An empty Poisson batch is a step too (noise alone); its mean loss is NaN.
            if len(labels) > 0:
                total_loss += float(loss.detach()) * len(labels)
                correct += int((logits.detach().argmax(dim=1) == labels).sum())
                seen += len(labels)
    if isinstance(private, GradSampleModule):
        private.remove_hooks()
    return trained(
        work, total_loss=total_loss, correct=correct, seen=seen, started=started, samples=len(y)
    )
