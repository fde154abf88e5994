"""The node's privacy budget ledger: every version it trained on under DP, durable across crashes.

Theory of operation. Each DP training is a *charge*: the noise multiplier, Poisson sample rate
and steps it took, keyed by (run id, base version). The hospital's privacy loss is the Opacus RDP
accountant's epsilon for the whole history (:func:`history_epsilon`), at the policy's delta; the
ledger spans runs, since the same patients are in every run.

One rule keeps the ledger honest across crashes: **a charge is committed before its update can
leave**. The shell writes the ledger (one JSON file, replaced atomically: temp file, fsync,
rename) before it puts the update in the outbox, whose entries are resent after a restart.

- A crash before the charge: the update was never in the outbox, it never left; nothing to charge.
- A crash between the charge and the outbox: the charge stays, the update never leaves. That is
  an over-count, on the safe side (the patients are promised no more than the ledger says). If
  the restarted node trains on the same version again, the charge is not repeated: charges are
  idempotent by key, and only that one update from the version can leave.
- A crash after the outbox: the update is resent with the charge it was trained under.

So no update leaves uncharged and no version is charged twice; the price is at most one charge
per crash for an update that never left. (The residual's stage-then-commit, in
:mod:`edge_node.residual`, would undo that charge on restart; for a privacy ledger we prefer the
over-count to any path that can forget.) An unreadable ledger stops the node: starting from
zero would under-count.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

from pydantic import Field, ValidationError

from common.errors import ConfigError
from common.files import atomic_write
from common.messages import Frozen, Identifier, NonNegative, PrivacySpend
from common.privacy_policy import EPSILON_SLACK

__all__ = [
    "LEDGER_FILE",
    "Charge",
    "LedgerError",
    "PrivacyLedger",
    "history_epsilon",
    "read_ledger",
    "running_epsilon",
    "spend_of",
]

log = logging.getLogger(__name__)

LEDGER_FILE = "ledger.json"


class LedgerError(ConfigError):
    """The ledger on disk cannot be read: the node must not train as if nothing had been spent."""


class Charge(Frozen):
    """One version's DP training, as the accountant needs it, and the policy it was under."""

    run_id: Identifier
    base_version: NonNegative
    update_id: Identifier
    noise_multiplier: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    sample_rate: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
    steps: NonNegative
    max_grad_norm: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    delta: Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)]
    epsilon_budget: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    at: Annotated[float, Field(ge=0, allow_inf_nan=False)]

    @property
    def key(self) -> tuple[str, int]:
        return (self.run_id, self.base_version)


class _LedgerRecord(Frozen):
    charges: tuple[Charge, ...] = ()


def history_epsilon(charges: Sequence[Charge], delta: float) -> float:
    """The RDP accountant's epsilon at ``delta`` for ``charges``, composed (0 for none).

    Charges of the same noise and sample rate are merged into one entry of their summed steps
    before the accountant sees them: RDP is linear in the steps, and a run's charges share both,
    so a ledger of hundreds of versions costs one RDP evaluation, not hundreds.
    """
    steps: dict[tuple[float, float], int] = {}
    for c in charges:
        key = (c.noise_multiplier, c.sample_rate)
        steps[key] = steps.get(key, 0) + c.steps
    return _epsilon(tuple((noise, rate, n) for (noise, rate), n in steps.items()), delta)


@functools.lru_cache(maxsize=256)
def _epsilon(history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    if not history:
        return 0.0
    # Imported here, not with the module: opacus (with scipy) costs a node about 2 s of CPU at
    # start-up, and only a node that trains under a privacy policy ever has a history to count.
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = list(history)
    with warnings.catch_warnings():
        # "Optimal order is the largest alpha": a tighter bound exists at a higher order; the
        # epsilon given is still an upper bound, so the ledger over-counts, on the safe side.
        warnings.filterwarnings("ignore", message="Optimal order", category=UserWarning)
        return float(accountant.get_epsilon(delta=delta))


class PrivacyLedger:
    """The charges in ``directory``/ledger.json; read by :meth:`open`, written by :meth:`charge`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._charges: tuple[Charge, ...] = ()

    @property
    def path(self) -> Path:
        return self.directory / LEDGER_FILE

    @property
    def charges(self) -> tuple[Charge, ...]:
        return self._charges

    def open(self) -> None:
        """Create the directory and read the committed charges (none if there is no ledger)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob("*.tmp"):
            stale.unlink()
        self._charges = read_ledger(self.directory)

    def charged(self, run_id: str, base_version: int) -> bool:
        return any(c.key == (run_id, base_version) for c in self._charges)

    def with_charge(self, charge: Charge) -> tuple[Charge, ...]:
        """The history once ``charge`` is committed (unchanged if its version is charged)."""
        if self.charged(*charge.key):
            return self._charges
        return (*self._charges, charge)

    def budget_refusal(self, planned: Charge) -> str | None:
        """Why ``planned`` may not be trained (it would take epsilon, at its delta, past its
        budget), or None when it fits."""
        after = history_epsilon(self.with_charge(planned), planned.delta)
        if after <= planned.epsilon_budget * (1 + EPSILON_SLACK):
            return None
        spent = history_epsilon(self._charges, planned.delta)
        return (
            f"privacy budget spent: epsilon {spent:.3g} of {planned.epsilon_budget:g} at delta "
            f"{planned.delta:g}; training on v{planned.base_version} would bring it to {after:.3g}"
        )

    def charge(self, charge: Charge) -> bool:
        """Commit ``charge`` to disk before its update may leave; False if charged already."""
        if self.charged(*charge.key):
            return False
        charges = (*self._charges, charge)
        atomic_write(self.path, _LedgerRecord(charges=charges).model_dump_json(indent=1).encode())
        self._charges = charges
        log.info(
            "ledger: charged v%d of run %s (noise %.3g, rate %.3g, %d steps)",
            charge.base_version,
            charge.run_id,
            charge.noise_multiplier,
            charge.sample_rate,
            charge.steps,
        )
        return True

    def spend(self, charges: Sequence[Charge] | None = None) -> PrivacySpend | None:
        """The spend after ``charges`` (default: the committed ones), at the latest charge's
        delta and budget; None before any charge."""
        history = self._charges if charges is None else charges
        return spend_of(history)


def spend_of(charges: Sequence[Charge]) -> PrivacySpend | None:
    """What ``charges`` cost, at the latest charge's delta and budget; None for no charges."""
    if not charges:
        return None
    last = charges[-1]
    return PrivacySpend(
        epsilon=history_epsilon(charges, last.delta),
        delta=last.delta,
        epsilon_budget=last.epsilon_budget,
        noise_multiplier=last.noise_multiplier,
        max_grad_norm=last.max_grad_norm,
        sample_rate=last.sample_rate,
        steps=last.steps,
        versions=len(charges),
    )


def running_epsilon(charges: Sequence[Charge], delta: float) -> list[float]:
    """The accountant's epsilon at ``delta`` after each charge in turn (for a readable ledger)."""
    return [history_epsilon(charges[: i + 1], delta) for i in range(len(charges))]


def read_ledger(directory: Path) -> tuple[Charge, ...]:
    """The committed charges in ``directory`` (none if there is no ledger); raises LedgerError."""
    path = directory / LEDGER_FILE
    if not path.exists():
        return ()
    try:
        return _LedgerRecord.model_validate_json(path.read_bytes()).charges
    except (OSError, ValidationError) as exc:
        raise LedgerError(
            f"privacy ledger {path} is unreadable ({exc}); the node will not train as if "
            "nothing had been spent: restore it from a backup"
        ) from exc
