"""The model card says what differential privacy a run used, per hospital and in all."""

from __future__ import annotations

from common.messages import Knobs, PrivacyPolicy
from healthnet.card import NO_DP, _hospital_privacy, _privacy

POLICY = PrivacyPolicy(calibrate_versions=40, epsilon_budget=3.0, delta=1e-3)


def test_a_run_without_a_policy_says_so_plainly() -> None:
    assert _privacy(Knobs(), {}) == NO_DP
    assert _hospital_privacy(None, Knobs()) == NO_DP


def test_a_private_run_states_its_budget_and_each_hospitals_epsilon() -> None:
    knobs = Knobs(privacy=POLICY)
    text = _privacy(knobs, {"cleveland": 2.5})
    assert "epsilon = 3" in text
    assert "delta = 0.001" in text
    assert "no differential privacy" not in text
    assert _hospital_privacy(2.5, knobs) == "epsilon 2.50 of 3"
    assert _hospital_privacy(None, knobs) == "no private update folded"


def test_epsilons_without_readable_knobs_still_say_dp_was_used() -> None:
    assert "differential privacy (DP-SGD)" in _privacy(None, {"va": 1.0})
    assert _hospital_privacy(1.0, None) == "epsilon 1.00"
