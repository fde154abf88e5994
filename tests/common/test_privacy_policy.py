"""The privacy policy's rules: who is stricter, what a node trains under, what is admitted."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from common.messages import Manifest, MetricRelease, PrivacyPolicy, PrivacySpend
from common.privacy_policy import (
    at_least_as_private_as,
    delta_error,
    effective_privacy,
    spend_error,
)

RUN = PrivacyPolicy(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-3, epsilon_budget=3.0)


def spend(**changes: object) -> PrivacySpend:
    fields: dict[str, object] = {
        "epsilon": 1.5,
        "delta": 1e-3,
        "epsilon_budget": 3.0,
        "noise_multiplier": 1.0,
        "max_grad_norm": 1.0,
        "sample_rate": 0.1,
        "steps": 10,
        "versions": 1,
    }
    return PrivacySpend.model_validate(fields | changes)


def test_a_policy_sets_noise_or_calibration_never_both_nor_neither() -> None:
    with pytest.raises(ValidationError, match="exactly one"):
        PrivacyPolicy(epsilon_budget=3.0)
    with pytest.raises(ValidationError, match="exactly one"):
        PrivacyPolicy(noise_multiplier=1.0, calibrate_versions=10, epsilon_budget=3.0)
    assert PrivacyPolicy(calibrate_versions=10, epsilon_budget=3.0).noise_multiplier is None


def test_the_policy_travels_in_the_manifest_and_old_manifests_have_none() -> None:
    fields = {
        "run_id": "r",
        "version": 0,
        "sha256": "0" * 64,
        "blob_bytes": 1,
        "chunk_size": 1,
        "chunk_count": 1,
        "model": {"name": "logreg"},
        "training": {},
        "created_at": 0.0,
    }
    assert Manifest.model_validate(fields).privacy is None
    manifest = Manifest.model_validate(fields | {"privacy": RUN.model_dump()})
    assert manifest.privacy == RUN


@pytest.mark.parametrize(
    ("own", "stricter"),
    [
        (RUN, True),
        (RUN.model_copy(update={"noise_multiplier": 2.0}), True),
        (RUN.model_copy(update={"noise_multiplier": 0.5}), False),
        (RUN.model_copy(update={"epsilon_budget": 1.0}), True),
        (RUN.model_copy(update={"epsilon_budget": 8.0}), False),
        (RUN.model_copy(update={"delta": 1e-4}), True),
        (RUN.model_copy(update={"delta": 1e-2}), False),
        (RUN.model_copy(update={"metrics": MetricRelease.EXACT}), False),
        (RUN.model_copy(update={"metrics": MetricRelease.SUPPRESSED}), True),
        (PrivacyPolicy(calibrate_versions=5, delta=1e-3, epsilon_budget=3.0), False),
    ],
)
def test_stricter_means_no_less_noise_budget_delta_or_release(
    own: PrivacyPolicy, stricter: bool
) -> None:
    assert at_least_as_private_as(own, RUN) is stricter


def test_a_hospital_tightens_the_run_policy_and_never_loosens_it() -> None:
    own = PrivacyPolicy(noise_multiplier=0.5, delta=1e-4, epsilon_budget=8.0)
    merged = effective_privacy(RUN, own)
    assert (merged.noise_multiplier, merged.delta, merged.epsilon_budget) == (1.0, 1e-4, 3.0)
    assert at_least_as_private_as(merged, RUN)
    assert at_least_as_private_as(merged, own)
    assert effective_privacy(RUN, None) == RUN
    louder = effective_privacy(RUN, RUN.model_copy(update={"noise_multiplier": 2.0}))
    assert louder.noise_multiplier == 2.0


def test_calibrated_policies_plan_the_longer_run() -> None:
    run = PrivacyPolicy(calibrate_versions=20, delta=1e-3, epsilon_budget=3.0)
    own = PrivacyPolicy(calibrate_versions=50, delta=1e-3, epsilon_budget=3.0)
    assert effective_privacy(run, own).calibrate_versions == 50
    fixed = effective_privacy(run, PrivacyPolicy(noise_multiplier=1.5, epsilon_budget=3.0))
    assert (fixed.noise_multiplier, fixed.calibrate_versions) == (1.5, None)


def test_delta_must_be_below_one_over_n() -> None:
    # Switzerland's heart-disease split has 30 training patients.
    assert delta_error(RUN, 30) is None
    message = delta_error(RUN.model_copy(update={"delta": 0.05}), 30)
    assert message is not None
    assert "1/n" in message
    assert delta_error(RUN, 0) == "no training records"


@pytest.mark.parametrize(
    ("update", "fragment"),
    [
        ({}, None),
        ({"delta": 1e-2}, "delta"),
        ({"epsilon_budget": 8.0}, "budget"),
        ({"epsilon": 3.5}, "past the budget"),
        ({"noise_multiplier": 0.5}, "noise multiplier"),
    ],
)
def test_an_update_is_admitted_only_at_the_policy(
    update: dict[str, object], fragment: str | None
) -> None:
    error = spend_error(RUN, spend(**update), 200)
    if fragment is None:
        assert error is None
    else:
        assert error is not None
        assert fragment in error


def test_an_update_without_a_spend_or_with_a_large_delta_for_its_count_is_refused() -> None:
    assert spend_error(RUN, None, 200) is not None
    message = spend_error(RUN, spend(), 500)  # 1e-3 * 500 < 1: fine
    assert message is None
    assert "1/n" in (spend_error(RUN, spend(), 1000) or "")
