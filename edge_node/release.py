"""Under what policy a node trains, and what it says beyond its update under DP.

:func:`node_policy` is the run's policy made stricter by the hospital's own, or the hospital's
alone when the run asks none: a node may always promise its patients more, never less.

The DP guarantee covers the update (the noisy weights). Everything else a node sends is outside
it, and reveals something about the hospital's records:

- an evaluation (loss, accuracy, correct and example counts on the local test split): how well a
  version fits the test patients; repeated over versions, a membership signal on them; under a
  personalisation policy, the personal model's loss and accuracy on the same split too (the
  personal model is trained without DP and never leaves, but its accuracy does);
- the training loss and accuracy in an update: the same on the training patients;
- the sample count in an update: the size of the training split (it weights the update in the
  fold, so it always leaves, exactly: the aggregator cannot weight a rounded count correctly,
  and the delta < 1/n check needs the true n).

Under :class:`~common.messages.MetricRelease`:

- ``exact``: sent as measured.
- ``rounded``: loss and accuracy (the personal model's too) to 2 decimals; an evaluation's
  example count down to a multiple of 10 (below 10 it becomes 0), its correct count from the
  rounded accuracy and count.
- ``suppressed``: no evaluation is sent; an update's training loss and accuracy are sent as 0
  (the schema requires the fields).

Pure functions of their arguments.
"""

from __future__ import annotations

from common.messages import Evaluation, MetricRelease, PrivacyPolicy, TrainMetrics
from common.privacy_policy import effective_privacy

__all__ = ["COUNT_STEP", "DECIMALS", "node_policy", "release_evaluation", "release_train_metrics"]

DECIMALS = 2
COUNT_STEP = 10


def node_policy(asked: PrivacyPolicy | None, own: PrivacyPolicy | None) -> PrivacyPolicy | None:
    """What a node trains under: the run's ``asked`` tightened by its ``own`` (None: no DP)."""
    if asked is None:
        return own
    return effective_privacy(asked, own)


def release_evaluation(evaluation: Evaluation, release: MetricRelease) -> Evaluation | None:
    """``evaluation`` as ``release`` lets it leave; None: it does not leave."""
    match release:
        case MetricRelease.EXACT:
            return evaluation
        case MetricRelease.SUPPRESSED:
            return None
        case MetricRelease.ROUNDED:
            examples = evaluation.num_examples // COUNT_STEP * COUNT_STEP
            accuracy = round(evaluation.accuracy, DECIMALS)
            return evaluation.model_copy(
                update={
                    "loss": None if evaluation.loss is None else round(evaluation.loss, DECIMALS),
                    "accuracy": accuracy,
                    "correct": min(examples, round(accuracy * examples)),
                    "num_examples": examples,
                    "personal_loss": _rounded(evaluation.personal_loss),
                    "personal_accuracy": _rounded(evaluation.personal_accuracy),
                }
            )


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, DECIMALS)


def release_train_metrics(metrics: TrainMetrics, release: MetricRelease) -> TrainMetrics:
    """An update's training metrics as ``release`` lets them leave (the time is not a metric of
    the records and leaves as measured)."""
    match release:
        case MetricRelease.EXACT:
            return metrics
        case MetricRelease.SUPPRESSED:
            return metrics.model_copy(update={"loss": 0.0, "accuracy": 0.0})
        case MetricRelease.ROUNDED:
            return metrics.model_copy(
                update={
                    "loss": round(metrics.loss, DECIMALS),
                    "accuracy": round(metrics.accuracy, DECIMALS),
                }
            )
