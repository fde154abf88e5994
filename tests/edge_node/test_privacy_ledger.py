"""Specification of the node's privacy ledger: Opacus' epsilon, durable charges, the budget."""

from __future__ import annotations

from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as privacy_analysis

from edge_node.privacy_ledger import (
    LEDGER_FILE,
    Charge,
    LedgerError,
    PrivacyLedger,
    history_epsilon,
    read_ledger,
    running_epsilon,
    spend_of,
)

DELTA = 1e-3


def charge(version: int, *, run_id: str = "run-a", noise: float = 1.1, rate: float = 0.1,
           steps: int = 10, budget: float = 8.0) -> Charge:  # fmt: skip
    return Charge(
        run_id=run_id,
        base_version=version,
        update_id=f"u{version}{run_id}",
        noise_multiplier=noise,
        sample_rate=rate,
        steps=steps,
        max_grad_norm=1.0,
        delta=DELTA,
        epsilon_budget=budget,
        at=float(version),
    )


HISTORY = (
    charge(0, noise=1.1, rate=0.1, steps=10),
    charge(1, noise=1.1, rate=0.1, steps=10),
    charge(2, noise=0.8, rate=0.25, steps=4),
    charge(0, run_id="run-b", noise=2.0, rate=0.05, steps=40),
)


def opened(tmp_path: Path) -> PrivacyLedger:
    ledger = PrivacyLedger(tmp_path / "privacy")
    ledger.open()
    return ledger


def test_epsilon_equals_opacus_accountant_stepped_through_the_same_training() -> None:
    """The ledger's epsilon is what Opacus' RDPAccountant says after every one of its steps."""
    accountant = RDPAccountant()
    for c in HISTORY:
        for _ in range(c.steps):
            accountant.step(noise_multiplier=c.noise_multiplier, sample_rate=c.sample_rate)
    assert history_epsilon(HISTORY, DELTA) == pytest.approx(accountant.get_epsilon(DELTA))


def test_epsilon_equals_opacus_privacy_analysis_of_the_same_history() -> None:
    """... and what opacus' RDP analysis gives for the composed history at its default orders."""
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = sum(
        privacy_analysis.compute_rdp(
            q=c.sample_rate, noise_multiplier=c.noise_multiplier, steps=c.steps, orders=orders
        )
        for c in HISTORY
    )
    epsilon, _ = privacy_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=DELTA)
    assert history_epsilon(HISTORY, DELTA) == pytest.approx(float(epsilon))


def test_no_charges_spend_nothing(tmp_path: Path) -> None:
    ledger = opened(tmp_path)
    assert ledger.charges == ()
    assert ledger.spend() is None
    assert history_epsilon((), DELTA) == 0.0


def test_a_charge_survives_a_restart(tmp_path: Path) -> None:
    """Committed charges are on disk: a new ledger object (a restarted node) reads them all."""
    ledger = opened(tmp_path)
    for c in HISTORY:
        assert ledger.charge(c)
    reopened = opened(tmp_path)
    assert reopened.charges == HISTORY
    assert read_ledger(tmp_path / "privacy") == HISTORY


def test_a_version_is_charged_once(tmp_path: Path) -> None:
    """Charges are keyed by run and base version: the same version again adds nothing."""
    ledger = opened(tmp_path)
    assert ledger.charge(charge(0))
    again = charge(0).model_copy(update={"update_id": "another"})
    assert not ledger.charge(again)
    assert not opened(tmp_path).charge(again)
    assert len(opened(tmp_path).charges) == 1
    assert ledger.with_charge(again) == ledger.charges


def test_the_spend_is_the_total_at_the_latest_charge() -> None:
    spend = spend_of(HISTORY)
    assert spend is not None
    assert spend.epsilon == pytest.approx(history_epsilon(HISTORY, DELTA))
    assert (spend.versions, spend.steps, spend.noise_multiplier) == (4, 40, 2.0)
    assert running_epsilon(HISTORY, DELTA)[-1] == spend.epsilon
    assert running_epsilon(HISTORY, DELTA) == sorted(running_epsilon(HISTORY, DELTA))


def test_the_ledger_refuses_a_charge_past_the_budget(tmp_path: Path) -> None:
    """Charges that fit are allowed; the first that would pass the budget is refused, with why."""
    ledger = opened(tmp_path)
    budget = history_epsilon(HISTORY[:3], DELTA)  # exactly three of them fit
    refusals = []
    for c in HISTORY:
        planned = c.model_copy(update={"epsilon_budget": budget})
        refusals.append(ledger.budget_refusal(planned))
        if refusals[-1] is None:
            ledger.charge(planned)
    assert refusals[:3] == [None, None, None]
    assert refusals[3] is not None
    assert refusals[3].startswith("privacy budget spent")
    assert len(ledger.charges) == 3


def test_a_charged_version_retrained_after_a_crash_still_fits(tmp_path: Path) -> None:
    """A version charged before a crash costs nothing more when trained again."""
    ledger = opened(tmp_path)
    ledger.charge(charge(0))
    exactly = history_epsilon(ledger.charges, DELTA)
    assert ledger.budget_refusal(charge(0, budget=exactly)) is None
    assert ledger.budget_refusal(charge(1, budget=exactly)) is not None


def test_an_unreadable_ledger_stops_the_node(tmp_path: Path) -> None:
    """Starting from zero would under-count: a damaged ledger is an error, not an empty one."""
    directory = tmp_path / "privacy"
    directory.mkdir()
    (directory / LEDGER_FILE).write_bytes(b"{not json")
    with pytest.raises(LedgerError, match="unreadable"):
        opened(tmp_path)
