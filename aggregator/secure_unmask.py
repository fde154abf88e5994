"""The aggregator's part in secure aggregation: plan a fold of masked updates, unmask its sum.

Theory of operation (docs/secure-aggregation.md#message-flow).

- :func:`plan_fold` decides whether the masked updates waiting in the buffer can be folded now:
  enough distinct hospitals, at most ``max_terms`` of them, and at least ``U`` holders that
  receipted every one of them. It fixes the integer weights (from the staleness weights, known
  now) and the scale that turns them back into coefficients, and names the holders to ask.
- :class:`UnmaskLedger` records each plan (fsync) *before* any holder is asked, and refuses a
  plan that names an update an earlier plan named: a mask is asked for in one sum only, ever.
  After a kill, :meth:`UnmaskLedger.open_plans` lists the plans to ask again, unchanged (the
  holders answer a repeated request again); a plan is closed when its version is committed.
  A plan whose version the checkpoint holds but whose close record a crash lost is closed by the
  caller without asking, from the checkpoint's folded update ids. The answers that unmask a
  plan are recorded (:meth:`UnmaskLedger.answered`, fsync) before its version is committed, so a
  version logged after the last checkpoint is made again from them, without asking anyone.
- :class:`ReceiptLog` keeps the holders' receipts (fsync before the broker's PUBACK): an update
  acknowledged before a kill is buffered again from its receipts after the restart.
- :func:`unmask` rebuilds ``Σ ω_i r_i`` from the holders' answers, subtracts it from the
  weighted sum of the masked updates and returns ``Σ coefficient_i Δ_i`` up to quantization.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict

from common.errors import ProtocolError
from common.files import atomic_write
from common.jsonlog import JsonLog, read_json_lines
from common.secure_aggregation import (
    FieldVector,
    Term,
    from_bytes,
    integer_weights,
    unmask_sum,
)
from common.secure_aggregation.events import UnmaskAnswer, UnmaskRequest
from common.secure_aggregation.policy import SecureAggregationPolicy

__all__ = [
    "FoldPlan",
    "PendingMasked",
    "ReceiptLog",
    "UnmaskLedger",
    "plan_fold",
    "unmask",
]

LEDGER_FILE = "unmask.jsonl"
RECEIPT_FILE = "receipts.jsonl"


@dataclass(frozen=True, slots=True)
class PendingMasked:
    """A buffered masked update: who sent it, its staleness-weighted coefficient, its masked
    vector and the holders that receipted its share."""

    update_id: str
    sender: str
    coefficient: float
    masked: FieldVector = field(repr=False)
    receipts: frozenset[str] = frozenset()


class FoldPlan(BaseModel):
    """One fold's sum, fixed before anyone is asked: its terms, scale and holders to ask."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    fold_id: str
    policy_digest: str
    update_ids: tuple[str, ...]
    senders: tuple[str, ...]
    weights: tuple[int, ...]
    scale: float
    holders: tuple[str, ...]
    # Why the buffer was due (core.FoldReason): the version record's reason.
    reason: Literal["buffer_full", "buffer_timeout", "budgets_spent"] = "buffer_full"

    @property
    def terms(self) -> tuple[Term, ...]:
        return tuple(
            Term(u, s, w)
            for u, s, w in zip(self.update_ids, self.senders, self.weights, strict=True)
        )

    def request(self) -> UnmaskRequest:
        return UnmaskRequest(
            fold_id=self.fold_id, policy_digest=self.policy_digest, terms=self.terms
        )


def plan_fold(
    policy: SecureAggregationPolicy,
    fold_id: str,
    pending: Sequence[PendingMasked],
    reason: Literal["buffer_full", "buffer_timeout", "budgets_spent"] = "buffer_full",
) -> FoldPlan | str:
    """The plan that folds ``pending`` now, or why it must wait."""
    senders = {p.sender for p in pending}
    if len(senders) < policy.contributors:
        return f"{len(senders)} distinct hospitals buffered, {policy.contributors} needed"
    if len(pending) > policy.max_terms:
        return f"{len(pending)} updates, above max_terms {policy.max_terms}"
    askable = frozenset(policy.holders).intersection(*(p.receipts for p in pending))
    threshold = policy.scheme.threshold
    if len(askable) < threshold:
        return f"{len(askable)} holders hold every share, {threshold} needed"
    weights, scale = integer_weights([p.coefficient for p in pending], policy.weight_levels)
    return FoldPlan(
        fold_id=fold_id,
        policy_digest=policy.digest(),
        update_ids=tuple(p.update_id for p in pending),
        senders=tuple(p.sender for p in pending),
        weights=tuple(weights),
        scale=scale,
        holders=tuple(h for h in policy.holders if h in askable),
        reason=reason,
    )


def unmask(
    policy: SecureAggregationPolicy,
    plan: FoldPlan,
    masked: Mapping[str, FieldVector],
    answers: Iterable[UnmaskAnswer],
) -> NDArray[np.float64]:
    """``Σ coefficient_i Δ_i`` of the plan's updates, from their masked vectors and at least
    ``U`` holders' answers to the plan's request. An answer from a holder the plan did not ask,
    or of the wrong length, is a :class:`ProtocolError`; answers beyond ``U`` must agree."""
    vectors = [masked[update_id] for update_id in plan.update_ids]
    length = policy.scheme.share_length(vectors[0].size)
    by_holder: dict[int, FieldVector] = {}
    for answer in answers:
        if answer.fold_id != plan.fold_id or answer.holder not in plan.holders:
            raise ProtocolError(f"{answer.holder}: an answer that fold {plan.fold_id} did not ask")
        by_holder[policy.holder_index(answer.holder)] = from_bytes(answer.share_sum, length)
    return unmask_sum(
        vectors,
        plan.weights,
        by_holder,
        plan=policy.plan,
        scheme=policy.scheme,
        scale=plan.scale,
    )


class _Answer(BaseModel):
    model_config = ConfigDict(
        frozen=True, extra="forbid", ser_json_bytes="base64", val_json_bytes="base64"
    )

    holder: str
    share_sum: bytes


class _Entry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    event: Literal["planned", "answered", "closed", "abandoned"]
    fold_id: str
    plan: FoldPlan | None = None
    version: int | None = None
    answers: tuple[_Answer, ...] = ()


class UnmaskLedger:
    """The aggregator's durable record of its fold plans (``unmask.jsonl`` in ``directory``)."""

    def __init__(self, directory: Path) -> None:
        self._log = JsonLog(directory / LEDGER_FILE, _Entry)
        self._open: dict[str, FoldPlan] = {}
        self._planned: dict[str, str] = {}  # update id -> the fold id that named it
        self._answers: dict[str, tuple[UnmaskAnswer, ...]] = {}  # of open plans only

    def __enter__(self) -> Self:
        entries = list(read_json_lines(self._log.path, _Entry)) if self._log.path.exists() else []
        for entry in entries:
            if entry.plan is not None:
                self._remember(entry.plan)
            elif entry.event == "answered":
                self._answers[entry.fold_id] = tuple(
                    UnmaskAnswer(entry.fold_id, a.holder, a.share_sum) for a in entry.answers
                )
            else:
                self._open.pop(entry.fold_id, None)
                self._answers.pop(entry.fold_id, None)
        # The answers of a closed plan are never read again (its version is checkpointed) and
        # are its largest lines: keep the file to the plans, their ends and open plans' answers.
        kept = [e for e in entries if e.event != "answered" or e.fold_id in self._open]
        if len(kept) < len(entries):
            atomic_write(self._log.path, [e.model_dump_json().encode() + b"\n" for e in kept])
        self._log.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._log.close()

    def open_plans(self) -> list[FoldPlan]:
        """Plans recorded and neither closed nor abandoned, oldest first: ask them again."""
        return list(self._open.values())

    def record(self, plan: FoldPlan) -> None:
        """Make ``plan`` durable; refuse one that names an update an earlier plan named."""
        if plan.fold_id in self._open or any(u in self._planned for u in plan.update_ids):
            taken = sorted(u for u in plan.update_ids if u in self._planned)
            raise ValueError(f"fold {plan.fold_id}: already planned: {', '.join(taken)}")
        self._log.write([_Entry(event="planned", fold_id=plan.fold_id, plan=plan)])
        self._remember(plan)

    def planned(self, update_id: str) -> str | None:
        """The fold id of the plan that named ``update_id``, if one did: its mask is bound to it."""
        return self._planned.get(update_id)

    def answered(self, fold_id: str, answers: Sequence[UnmaskAnswer]) -> None:
        """Make the answers that unmask an open plan durable, before its version is committed."""
        if fold_id not in self._open:
            raise ValueError(f"fold {fold_id} is not an open plan")
        entry = _Entry(
            event="answered",
            fold_id=fold_id,
            answers=tuple(_Answer(holder=a.holder, share_sum=a.share_sum) for a in answers),
        )
        self._log.write([entry])
        self._answers[fold_id] = tuple(answers)

    def answers(self, fold_id: str) -> tuple[UnmaskAnswer, ...]:
        """The answers recorded for an open plan (empty: none recorded)."""
        return self._answers.get(fold_id, ())

    def close(self, fold_id: str, version: int) -> None:
        """The plan's version is committed: never ask for it again."""
        self._log.write([_Entry(event="closed", fold_id=fold_id, version=version)])
        self._open.pop(fold_id, None)
        self._answers.pop(fold_id, None)

    def abandon(self, fold_id: str) -> None:
        """Give up a plan that cannot complete; its updates are dropped, never re-planned."""
        self._log.write([_Entry(event="abandoned", fold_id=fold_id)])
        self._open.pop(fold_id, None)
        self._answers.pop(fold_id, None)

    def _remember(self, plan: FoldPlan) -> None:
        self._open[plan.fold_id] = plan
        self._planned.update(dict.fromkeys(plan.update_ids, plan.fold_id))


class _Receipts(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    holder: str
    update_ids: tuple[str, ...]


class ReceiptLog:
    """The holders' receipts the aggregator took (``receipts.jsonl`` in ``directory``).

    A receipt is written and synced before the broker's PUBACK: a holder publishes it once, so
    one that only lived in memory would be lost with the process, and the update it counts
    towards, acknowledged already, would never be buffered.
    """

    def __init__(self, directory: Path) -> None:
        self._log = JsonLog(directory / RECEIPT_FILE, _Receipts)

    def __enter__(self) -> Self:
        self._log.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._log.close()

    def read(self) -> list[tuple[str, tuple[str, ...]]]:
        """Every receipt recorded, as (holder, update ids), oldest first."""
        return [(r.holder, r.update_ids) for r in read_json_lines(self._log.path, _Receipts)]

    def write(self, holder: str, update_ids: Sequence[str]) -> None:
        """Record ``holder``'s receipt of ``update_ids`` durably (fsync)."""
        self._log.write([_Receipts(holder=holder, update_ids=tuple(update_ids))])
