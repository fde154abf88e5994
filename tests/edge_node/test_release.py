"""Specification of what a DP node says beyond its update, and of the policy it trains under."""

from __future__ import annotations

import pytest

from common.messages import Evaluation, MetricRelease, PrivacyPolicy, TrainMetrics
from common.privacy_policy import at_least_as_private_as
from edge_node.release import node_policy, release_evaluation, release_train_metrics

EVALUATION = Evaluation(
    run_id="r", version=3, loss=0.456789, accuracy=0.7777, correct=70, num_examples=90
)
METRICS = TrainMetrics(loss=0.612345, accuracy=0.654321, seconds=1.25)
RUN = PrivacyPolicy(noise_multiplier=1.0, epsilon_budget=8.0, delta=1e-3)


def test_exact_sends_everything_as_measured() -> None:
    assert release_evaluation(EVALUATION, MetricRelease.EXACT) == EVALUATION
    assert release_train_metrics(METRICS, MetricRelease.EXACT) == METRICS


def test_rounded_coarsens_metrics_to_two_decimals_and_counts_to_tens() -> None:
    released = release_evaluation(EVALUATION, MetricRelease.ROUNDED)
    assert released is not None
    assert (released.loss, released.accuracy) == (0.46, 0.78)
    assert (released.num_examples, released.correct) == (90, 70)
    assert (released.run_id, released.version) == ("r", 3)
    metrics = release_train_metrics(METRICS, MetricRelease.ROUNDED)
    assert (metrics.loss, metrics.accuracy, metrics.seconds) == (0.61, 0.65, 1.25)


@pytest.mark.parametrize(
    ("examples", "correct", "shown"),
    [
        pytest.param(89, 68, (80, 61), id="down-to-tens"),
        pytest.param(7, 7, (0, 0), id="below-ten-is-zero"),
        pytest.param(30, 30, (30, 30), id="all-correct"),
    ],
)
def test_rounded_counts_never_say_more_correct_than_examples(
    examples: int, correct: int, shown: tuple[int, int]
) -> None:
    evaluation = EVALUATION.model_copy(
        update={"num_examples": examples, "correct": correct, "accuracy": correct / examples}
    )
    released = release_evaluation(evaluation, MetricRelease.ROUNDED)
    assert released is not None
    assert (released.num_examples, released.correct) == shown
    assert released.correct <= released.num_examples


def test_a_failed_evaluation_keeps_its_reason_when_rounded() -> None:
    failed = Evaluation(
        run_id="r", version=1, loss=None, accuracy=0.0, correct=0, num_examples=45, failure="nan"
    )
    released = release_evaluation(failed, MetricRelease.ROUNDED)
    assert released is not None
    assert (released.loss, released.failure, released.num_examples) == (None, "nan", 40)


def test_suppressed_sends_no_evaluation_and_zero_training_metrics() -> None:
    assert release_evaluation(EVALUATION, MetricRelease.SUPPRESSED) is None
    metrics = release_train_metrics(METRICS, MetricRelease.SUPPRESSED)
    assert (metrics.loss, metrics.accuracy, metrics.seconds) == (0.0, 0.0, 1.25)


OWN = [
    pytest.param(None, id="none"),
    pytest.param(PrivacyPolicy(noise_multiplier=0.5, epsilon_budget=20.0, delta=0.5), id="laxer"),
    pytest.param(PrivacyPolicy(noise_multiplier=2.0, epsilon_budget=3.0, delta=1e-6), id="strict"),
    pytest.param(
        PrivacyPolicy(calibrate_versions=50, epsilon_budget=1.0, metrics=MetricRelease.SUPPRESSED),
        id="calibrated-stricter-budget",
    ),
]


@pytest.mark.parametrize("own", OWN)
def test_a_hospitals_own_policy_only_makes_the_runs_stricter(own: PrivacyPolicy | None) -> None:
    """Whatever the hospital configures, it trains at least as privately as the run asks."""
    policy = node_policy(RUN, own)
    assert policy is not None
    assert at_least_as_private_as(policy, RUN)
    if own is not None:
        assert policy.epsilon_budget == min(RUN.epsilon_budget, own.epsilon_budget)
        assert policy.delta == min(RUN.delta, own.delta)


def test_a_hospital_may_ask_for_dp_when_the_run_does_not() -> None:
    own = PrivacyPolicy(noise_multiplier=1.5, epsilon_budget=4.0)
    assert node_policy(None, own) == own
    assert node_policy(None, None) is None


def test_rounded_coarsens_the_personal_models_metrics_too() -> None:
    personal = EVALUATION.model_copy(update={"personal_loss": 0.33333, "personal_accuracy": 0.8666})
    released = release_evaluation(personal, MetricRelease.ROUNDED)
    assert released is not None
    assert (released.personal_loss, released.personal_accuracy) == (0.33, 0.87)
    assert release_evaluation(personal, MetricRelease.SUPPRESSED) is None
    assert release_evaluation(personal, MetricRelease.EXACT) == personal
