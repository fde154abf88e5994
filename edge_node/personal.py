"""Personalisation at the node: a model of the hospital's own beside the global one.

Theory of operation. Under a personalisation policy (:class:`~common.messages.Personalisation`,
in the manifest) a node does, for every global version it evaluates, one more piece of local
work on its *training* split, and evaluates the result on its test split beside the global model:

- ``finetune``: the global version, trained on for ``epochs`` more epochs (FedAvg + fine-tuning).
  Each version starts afresh from the global weights, so the personal model follows the
  federation.
- ``ditto``: a personal model ``v`` that lives across versions (Li et al., *Ditto*, ICML 2021).
  Each version trains ``v`` for ``epochs`` epochs on ``loss(v) + lambda / 2 * ||v - w||^2``, with
  ``w`` the global version: lambda 0 is local-only training, a large lambda is the global model.
  ``v`` starts from the first global version the node sees in a run.

With a ``holdout``, personal training leaves that fraction of the training split out (the same
records every version: :func:`holdout_split` is seeded by the node), and the hospital keeps the
personal model only where it beats the global version on them (:func:`prefers_personal`); else
it keeps the global version, and reports its accuracy as its own. Ditto goes on training its
personal model either way.

The global model, the update and its training are untouched: personal training runs in the
evaluation job, and its weights stay in the node's state directory
(:mod:`edge_node.personal_store`). Under differential privacy the personal model costs no
epsilon, since nothing trained on it leaves the hospital; its accuracy does, and is released as
the policy's metric release says, like the global model's (:mod:`edge_node.release`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from common.messages import Personalisation, PersonalisationMethod, TrainingConfig
from edge_node.personal_store import PersonalModel
from edge_node.training import TrainResult, train

__all__ = [
    "holdout_split",
    "personal_config",
    "personalise",
    "prefers_personal",
    "resumes",
    "start_from",
]

Params = Mapping[str, NDArray[np.float32]]


def personal_config(policy: Personalisation, config: TrainingConfig) -> TrainingConfig:
    """The run's training config with the policy's epochs and learning rate."""
    return config.model_copy(
        update={
            "epochs": policy.epochs,
            "learning_rate": policy.learning_rate or config.learning_rate,
        }
    )


def holdout_split(
    records: int, fraction: float, seed: int
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """The training rows personal training uses, and the held-out rows that choose the model.

    ``fraction`` 0 holds out nothing. Otherwise at least one row each way; the same ``seed``
    gives the same rows (a restarted node holds out what it held out before).
    """
    rows = np.arange(records, dtype=np.int64)
    if fraction <= 0 or records < 2:
        return rows, rows[:0]
    order = np.random.default_rng(seed).permutation(records)
    held = min(records - 1, max(1, round(fraction * records)))
    return np.sort(order[held:]), np.sort(order[:held])


def prefers_personal(personal_accuracy: float, global_accuracy: float) -> bool:
    """Keep the personal model only when it is more accurate on the held-out records: a tie goes
    to the global version, trained on every hospital's records."""
    return personal_accuracy > global_accuracy


def _fits(params: Params, reference: Params) -> bool:
    return set(params) == set(reference) and all(
        params[name].shape == reference[name].shape for name in reference
    )


def resumes(current: PersonalModel | None, run_id: str, version: int, method: str) -> bool:
    """True when ``current`` was already trained against ``version`` (or a later one) of
    ``run_id`` by ``method``: a restarted node evaluates it again instead of training twice."""
    return (
        current is not None
        and current.run_id == run_id
        and current.method == method
        and current.version >= version
    )


def start_from(
    policy: Personalisation, current: PersonalModel | None, run_id: str, global_params: Params
) -> Params:
    """Where this version's personal training starts: the global weights for fine-tuning, the
    personal model of this run for Ditto (the global weights when there is none yet)."""
    if (
        policy.method is PersonalisationMethod.DITTO
        and current is not None
        and current.run_id == run_id
        and current.method is PersonalisationMethod.DITTO
        and _fits(current.params, global_params)
    ):
        return current.params
    return global_params


def personalise(
    model: nn.Module,
    policy: Personalisation,
    *,
    start: Params,
    global_params: Params,
    x: NDArray[np.float32],
    y: NDArray[np.int64],
    config: TrainingConfig,
    seed: int,
    device: torch.device,
) -> TrainResult:
    """One version's personal training on the training split (``x``, ``y``) from ``start``."""
    ditto = policy.method is PersonalisationMethod.DITTO
    return train(
        model,
        start,
        x,
        y,
        personal_config(policy, config),
        seed=seed,
        device=device,
        anchor=global_params if ditto else None,
        proximal=policy.ditto_lambda if ditto else 0.0,
    )
