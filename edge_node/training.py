"""Local training and evaluation with PyTorch, on numpy arrays in and numpy arrays out.

A global version can be finite and still useless: weights of 3e38 give infinite outputs, and every
loss on them is NaN. Both functions raise :class:`UnusableVersion` then, with the reason, so that
the node reports it and waits for the next version instead of sending NaN metrics or a NaN delta.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from common.errors import ConfigError, HealthNetError
from common.messages import TrainingConfig
from common.models import load_params, model_params

__all__ = [
    "EvalResult",
    "TrainResult",
    "UnusableVersion",
    "batches",
    "build_optimizer",
    "evaluate",
    "label_adjustment",
    "resolve_device",
    "train",
    "trained",
]

Params = Mapping[str, NDArray[np.float32]]


class UnusableVersion(HealthNetError):
    """The global version's loss or outputs are not finite: it can be neither evaluated nor
    trained on. Not this node's fault, nor a reason to stop: a later version may repair it."""


@dataclass(frozen=True, slots=True)
class TrainResult:
    params: dict[str, NDArray[np.float32]]
    loss: float
    accuracy: float
    seconds: float
    num_samples: int


@dataclass(frozen=True, slots=True)
class EvalResult:
    loss: float
    accuracy: float
    correct: int
    num_examples: int


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when this machine has it, else the CPU; any other must exist here.

    Checked when the node starts: a device that is not there would otherwise fail every job, and
    the node would stay up contributing nothing.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"device {name!r} is not a torch device: {exc}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(
                f"device {name!r}: this machine has no CUDA device torch can use "
                "(use --device cpu, or auto)"
            )
        if device.index is not None and device.index >= count:
            raise ConfigError(f"device {name!r}: this machine has {count} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {name!r}: MPS is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device {name!r}: only cpu, cuda[:N] and mps are supported")
    return device


def build_optimizer(model: nn.Module, config: TrainingConfig) -> torch.optim.Optimizer:
    """The optimizer ``config`` names, over ``model``'s parameters."""
    if config.optimizer == "adam":
        return torch.optim.Adam(
            model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
        )
    return torch.optim.SGD(
        model.parameters(),
        lr=config.learning_rate,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )


def train(
    model: nn.Module,
    base: Params,
    x: NDArray[np.float32],
    y: NDArray[np.int64],
    config: TrainingConfig,
    *,
    seed: int,
    device: torch.device,
    anchor: Params | None = None,
    proximal: float = 0.0,
) -> TrainResult:
    """Train ``model`` from ``base`` and return its new weights: ``config.steps_for(len(y))``
    batches (whole epochs unless the config sets a step budget), on the logit-adjusted loss when
    the config sets ``logit_adjustment`` (the reported loss and accuracy are the plain model's
    predictions' accuracy and the loss it trained on).

    With an ``anchor``, each batch's loss gains ``proximal / 2 * ||w - anchor||^2``: the pull
    towards the global model of Ditto's personal objective (the reported loss leaves it out).
    """
    started = time.perf_counter()
    load_params(model, base)
    model.to(device).train()
    optimizer = build_optimizer(model, config)
    loss_fn = nn.CrossEntropyLoss()
    features = torch.from_numpy(x).to(device)
    labels = torch.from_numpy(y).to(device)
    pulls = (
        []
        if anchor is None or proximal == 0
        else [
            (weight, torch.from_numpy(np.array(anchor[name], dtype=np.float32)).to(device))
            for name, weight in model.named_parameters()
        ]
    )
    generator = torch.Generator().manual_seed(seed)
    total_loss, correct, seen = 0.0, 0, 0
    adjustment: torch.Tensor | None = None
    for rows in batches(len(y), config, generator):
        batch = rows.to(device)
        logits = model(features[batch])
        if config.logit_adjustment and adjustment is None:
            adjustment = label_adjustment(y, logits.shape[1], config.logit_adjustment).to(device)
        loss = loss_fn(logits if adjustment is None else logits + adjustment, labels[batch])
        objective = loss
        for weight, target in pulls:
            objective = objective + proximal / 2 * (weight - target).pow(2).sum()
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        optimizer.step()
        total_loss += float(loss.detach()) * len(batch)
        correct += int((logits.detach().argmax(dim=1) == labels[batch]).sum())
        seen += len(batch)
    return trained(
        model, total_loss=total_loss, correct=correct, seen=seen, started=started, samples=len(y)
    )


def batches(
    records: int, config: TrainingConfig, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """The row indices of each batch of one update: ``config.steps_for(records)`` batches, the
    rows reshuffled at the start of each epoch (a step budget may end one mid-way)."""
    per_epoch = math.ceil(records / config.batch_size)
    for step in range(config.steps_for(records)):
        start = (step % per_epoch) * config.batch_size
        if start == 0:
            order = torch.randperm(records, generator=generator)
        yield order[start : start + config.batch_size]


def label_adjustment(y: NDArray[np.int64], classes: int, tau: float) -> torch.Tensor:
    """``tau * log(frequency of each of the classes among y)``, what the logit-adjusted loss
    adds to the logits (a class absent from ``y`` counts as seen once)."""
    counts = np.maximum(np.bincount(y, minlength=classes)[:classes], 1).astype(np.float64)
    return torch.tensor(tau * np.log(counts / counts.sum()), dtype=torch.float32)


def trained(
    model: nn.Module, *, total_loss: float, correct: int, seen: int, started: float, samples: int
) -> TrainResult:
    """What a training pass left in ``model``, once its loss and weights are known finite.

    ``total_loss`` and ``correct`` are summed over the ``seen`` examples; ``started`` is the
    ``time.perf_counter()`` the pass began at.
    """
    model.to("cpu")
    params = model_params(model)
    if not math.isfinite(total_loss):
        raise UnusableVersion(f"training loss is {total_loss}: the model's outputs are not finite")
    if not all(np.isfinite(p).all() for p in params.values()):
        raise UnusableVersion("training made the weights non-finite")
    return TrainResult(
        params=params,
        loss=total_loss / max(seen, 1),
        accuracy=correct / max(seen, 1),
        seconds=time.perf_counter() - started,
        num_samples=samples,
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    params: Params,
    x: NDArray[np.float32],
    y: NDArray[np.int64],
    *,
    device: torch.device,
    batch_size: int = 1024,
) -> EvalResult:
    load_params(model, params)
    model.to(device).eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    total_loss, correct = 0.0, 0
    for start in range(0, len(y), batch_size):
        features = torch.from_numpy(x[start : start + batch_size]).to(device)
        labels = torch.from_numpy(y[start : start + batch_size]).to(device)
        logits = model(features)
        total_loss += float(loss_fn(logits, labels))
        correct += int((logits.argmax(dim=1) == labels).sum())
    model.to("cpu")
    n = len(y)
    if not math.isfinite(total_loss):
        raise UnusableVersion(
            f"evaluation loss is {total_loss} on {n} examples: the model's outputs are not finite"
        )
    return EvalResult(
        loss=total_loss / max(n, 1), accuracy=correct / max(n, 1), correct=correct, num_examples=n
    )
