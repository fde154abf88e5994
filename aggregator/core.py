"""The aggregator's decisions, with no I/O: accept or reject an update, buffer it, fold a version.

Theory of operation. The service shell decodes each message and hands the typed update to
:meth:`AggregatorCore.receive`, with the broker identity it came from and the current time. The
core validates it (DESIGN §7: sender, replay, quarantine, rate, run, staleness, sample count,
privacy spend against the run's privacy policy, shapes, finiteness, norm) and either rejects it
with a reason or adds it to the buffer. An update id is judged once: a resent accepted update is
acknowledged again but never refolded; any other update id seen before is a replay. Versions change
only in :meth:`fold` and :meth:`rollback`, so an update's staleness at arrival is its staleness at
fold. The norm bound (:func:`~aggregator.aggregation.norm_bound`) depends on the norms of the
updates accepted before, which the core keeps, in order, with its checkpoint: recovery replays the
write-ahead log in order and so judges each update as it was judged. The shell asks
:meth:`fold_due` after every accepted update and on a timer (for ``buffer_timeout``), folds,
persists, then publishes what :meth:`broadcast` gives (the version's manifest and chunks, in the
dtype the run asks for when the weights fit it). Time always comes in as an argument; nothing here
reads a clock, a file or the network: the durations the records report (a fold's, an update's
decoding) are measured by the shell and handed in (:meth:`Fold.timed`,
:meth:`AggregatorCore.record_decode_seconds`).

Under a secure aggregation policy (``knobs.secure_aggregation``, docs/secure-aggregation.md) an
update carries its delta masked: the core checks what the clear metadata allows (everything above
but shapes' contents, finiteness and the norm), the policy digest and the element count. A masked
update joins the buffer's foldable part only once ``U`` holders have receipted its share
(:meth:`AggregatorCore.record_receipts`); a due buffer becomes a fold plan
(:meth:`AggregatorCore.plan`, with integer staleness weights), and the plan a version once
enough holders' answers are in (:meth:`AggregatorCore.record_answer`,
:meth:`AggregatorCore.fold_secure`). One plan is open at a time; its updates stay in the buffer
(and so in the checkpoint and the write-ahead log) until its version is made.

A fold becomes a version only if the new weights are finite and, when the shell gave the core a
``probe``, the model's outputs on the probe batch are finite too (weights of 3e38 are finite; the
outputs they give are not, and every node would fail on them). Otherwise the batch is a
:class:`Discard`: its updates count as ``discarded`` (accepted, then dropped; not rejected), the
shell tells their nodes, and the current version stays. An operator's rollback makes a new version
number from an earlier version's weights, so versions stay monotonic for staleness and nodes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, assert_never

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel

from aggregator.aggregation import (
    NormBound,
    Params,
    ServerOptimizer,
    ServerOptimizerState,
    StalenessPolicy,
    buffer_weights,
    decoded_sum,
    densify,
    fold_step,
    global_norm,
    norm_bound,
    robust_buffer_aggregate,
    server_step,
)
from aggregator.fold import squared_norm
from aggregator.memory import VersionMemory
from aggregator.run_state import RunEvent, transition
from aggregator.secure_unmask import FoldPlan, PendingMasked, plan_fold, unmask
from common.blobs import split_blob
from common.broadcast_chain import BroadcastDtype, Step, View, advance, reset, view_blob
from common.codec import sha256_hex
from common.compression import DecodedTensor, all_finite, decode_tensor
from common.compression_policy import admits, keep_count
from common.errors import (
    CompressionError,
    ControlError,
    DecodeError,
    NonFiniteValues,
    ProtocolError,
)
from common.inbound import Refusal, Refused
from common.messages import (
    NORM_HISTORY,
    AggregationRule,
    AggregatorState,
    AggregatorStatus,
    Compression,
    Contribution,
    ControlCommand,
    Counters,
    Evaluation,
    Knobs,
    Manifest,
    ModelDelta,
    ModelSpec,
    NodeState,
    NodeTally,
    NormPolicy,
    Personalisation,
    PrivacyPolicy,
    PrivacySpend,
    RejectReason,
    SecureAggregation,
    SecurePlanStatus,
    ServerOptimizerKind,
    TrainingConfig,
    Update,
    VersionRecord,
)
from common.privacy_policy import at_least_as_private_as, spend_error
from common.secure_aggregation import ClipViolation, FieldVector, from_bytes
from common.secure_aggregation.events import UnmaskAnswer, UnmaskRefusal
from common.secure_aggregation.policy import SecureAggregationPolicy

__all__ = [
    "AggregatorCore",
    "Broadcast",
    "BufferedUpdate",
    "Discard",
    "Fold",
    "FoldReason",
    "Probe",
    "Unreadable",
    "Verdict",
]

FoldReason = Literal["buffer_full", "buffer_timeout", "budgets_spent"]
# Runs a candidate version on a probe batch: None when its outputs are finite, else why not.
Probe = Callable[[Mapping[str, NDArray[np.float32]]], str | None]
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_FLOAT16_MAX = float(np.finfo(np.float16).max)
# Knobs that are records of their own, set field by field as ``<knob>.<field>``. The privacy
# policy may also be set whole, to None: so that turning it off is refused with its reason.
_NESTED_KNOBS: Mapping[str, type[BaseModel]] = {
    "training": TrainingConfig,
    "compression": Compression,
    "broadcast_compression": Compression,
    "privacy": PrivacyPolicy,
    "personalisation": Personalisation,
}
_WHOLE_KNOBS = ("privacy", "broadcast_compression", "personalisation")
# The most update ids whose receipts are kept before their update arrives (secure aggregation).
_MAX_RECEIPTS = 100_000


@dataclass(frozen=True, slots=True)
class Verdict:
    """The answer to one update. ``duplicate`` means it was accepted before and is not refolded."""

    accepted: bool
    reason: RejectReason | None = None
    detail: str = ""
    duplicate: bool = False
    clipped: bool = False


@dataclass(frozen=True, slots=True)
class BufferedUpdate:
    node: str
    update_id: str
    base_version: int
    num_samples: int
    # As sent (sparse, quantized), checked against the model; ``scale`` is the norm clip's factor.
    delta: Mapping[str, DecodedTensor]
    bytes: int
    train_loss: float
    received_at: float
    scale: float = 1.0
    raw_bytes: int = 0
    encode_seconds: float = 0.0
    decode_seconds: float = 0.0
    # The hospital's total privacy loss once this update was trained (None: no DP).
    epsilon: float | None = None
    # Under secure aggregation: the masked delta's field elements (``delta`` is then empty).
    masked: FieldVector | None = field(default=None, repr=False)

    @classmethod
    def of(
        cls,
        node: str,
        update: Update,
        *,
        delta: Mapping[str, DecodedTensor],
        size: int,
        now: float,
        scale: float = 1.0,
        decode_seconds: float = 0.0,
        masked: FieldVector | None = None,
    ) -> BufferedUpdate:
        dense = sum(math.prod(d.shape) for d in delta.values())
        return cls(
            node=node,
            update_id=update.update_id,
            base_version=update.base_version,
            num_samples=update.num_samples,
            delta=delta,
            bytes=size,
            train_loss=update.metrics.loss,
            received_at=now,
            scale=scale,
            raw_bytes=4 * (dense if masked is None else masked.size),
            encode_seconds=update.encode_seconds,
            decode_seconds=decode_seconds,
            epsilon=None if update.privacy is None else update.privacy.epsilon,
            masked=masked,
        )


@dataclass(frozen=True, slots=True)
class Fold:
    """A new version: its weights and its provenance record."""

    version: int
    params: Mapping[str, NDArray[np.float32]]
    record: VersionRecord
    folded_ids: tuple[str, ...]

    def timed(self, seconds: float) -> Fold:
        """This fold, its record saying it took ``seconds`` (the core reads no clock)."""
        return replace(self, record=self.record.model_copy(update={"fold_seconds": seconds}))


@dataclass(frozen=True, slots=True)
class Discard:
    """A batch that was taken out of the buffer and refused, so no version was made.

    ``nodes[i]`` sent ``update_ids[i]``; each is told, with ``detail``.
    """

    update_ids: tuple[str, ...]
    nodes: tuple[str, ...]
    detail: str


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A message on a node's update topic that never became an update: the rejection to record.

    It has no update id, so no node hears of it; the ledger and the node's counters do.
    """

    reason: RejectReason
    detail: str
    size: int


@dataclass(frozen=True, slots=True)
class Broadcast:
    """The current version as the nodes receive it: the manifest, the blob and its chunks.

    ``widened``: the run asks for float16, but a weight lies beyond float16's range (it would
    arrive as infinity), so this version travels as float32, as its manifest says. ``delta``: the
    version as a compressed delta from its predecessor (:mod:`common.broadcast_chain`), when the
    chain made it; None for a snapshot-only version.
    """

    manifest: Manifest
    blob: bytes
    chunks: tuple[bytes, ...]
    widened: bool = False
    delta: ModelDelta | None = None


@dataclass(slots=True)
class _NodeTally:
    """The mutable counts behind one node's :class:`~common.messages.NodeTally`."""

    accepted: int = 0
    rejected: int = 0
    folded: int = 0
    discarded: int = 0
    rejections: dict[str, int] = field(default_factory=dict)
    bytes_received: int = 0
    last_seen: float | None = None
    last_base_version: int | None = None
    last_staleness: int | None = None
    eval_version: int | None = None
    eval_accuracy: float | None = None
    eval_failure: str = ""
    eval_personal_accuracy: float | None = None
    quarantined: bool = False
    epsilon: float | None = None
    epsilon_budget: float | None = None
    budget_spent: bool = False

    def report_privacy(self, spend: PrivacySpend | None) -> None:
        """Take the privacy loss the node reported last (a report without one changes nothing)."""
        if spend is not None:
            self.epsilon, self.epsilon_budget = spend.epsilon, spend.epsilon_budget


class AggregatorCore:
    """Global model, buffer, run state and counters of one federation run."""

    def __init__(
        self,
        *,
        run_id: str,
        params: Params,
        knobs: Knobs,
        version: int = 0,
        state: AggregatorState = AggregatorState.IDLE,
        optimizer_state: ServerOptimizerState | None = None,
        seen: Mapping[str, str] | None = None,
        seen_by: Mapping[str, str] | None = None,
        counters: Counters | None = None,
        nodes: tuple[NodeTally, ...] = (),
        norms: Sequence[float] = (),
        initial_norm: float | None = None,
        buffered_scales: Mapping[str, float] | None = None,
        probe: Probe | None = None,
        broadcast_view: View | None = None,
        broadcast_dtype: BroadcastDtype | None = None,
    ) -> None:
        """``norms``, ``initial_norm`` and ``buffered_scales`` come from a checkpoint: the norms
        of the last accepted updates, the L2 norm of the run's initial weights (default: of
        ``params``, right for a new run; for a checkpoint from before it was kept, the best
        stand-in there is), and the norm clip's factor of each buffered update that
        was clipped (None: an older checkpoint, whose clip factors are worked out again).
        ``broadcast_view`` is the current version's broadcast view where a delta chain made it
        differ from the weights rounded to ``broadcast_dtype`` (None: it does not)."""
        self.run_id = run_id
        self._probe = probe
        self._params: dict[str, NDArray[np.float32]] = {
            k: np.array(v, dtype=np.float32) for k, v in params.items()
        }
        for array in self._params.values():
            array.flags.writeable = False
        # Where folds write new versions: the memory of one that nothing holds any more.
        self._memory = VersionMemory({name: p.shape for name, p in self._params.items()})
        self._knobs = knobs
        self._version = version
        self._state = state
        self._opt_state = optimizer_state or ServerOptimizerState()
        # update id -> "accepted" or the rejection reason; persisted so replays are recognised.
        self._seen: dict[str, str] = dict(seen or {})
        # accepted update id -> the node it came from, so another node's replay is told apart.
        self._seen_by: dict[str, str] = dict(seen_by or {})
        self._counters = (counters or Counters()).model_dump()
        self._nodes: dict[str, _NodeTally] = {
            e.node: _NodeTally(**e.model_dump(exclude={"node"})) for e in nodes
        }
        self._buffer: list[BufferedUpdate] = []
        # The clipped norms of the last accepted updates, oldest first, while a bound was set.
        self._norms: list[float] = [float(n) for n in norms][-NORM_HISTORY:]
        self._initial_norm = global_norm(self._params) if initial_norm is None else initial_norm
        self._restored_scales = None if buffered_scales is None else dict(buffered_scales)
        # The current version's broadcast view (common.broadcast_chain), and its blob's sha256
        # once computed: the base the next delta names.
        dtype = broadcast_dtype or knobs.broadcast_dtype
        if broadcast_view is None:
            self._view = reset(self._params, dtype)
        else:
            self._view = Step(dict(reset(broadcast_view, "float32").view), dtype, None)
        self._chained = broadcast_view is not None
        self._view_sha: str | None = None
        self._base_sha: str | None = None
        # Secure aggregation: the holders that receipted each update id (receipts may come
        # before their update), the open fold plan and the answers and refusals it has had.
        self._receipts: dict[str, set[str]] = {}
        self._plan: FoldPlan | None = None
        self._answers: dict[str, UnmaskAnswer] = {}
        self._refusals: dict[str, str] = {}
        self._plan_failure = ""
        self._asked: set[str] = set()
        # A due buffer that could not be planned waits for a new update or receipt (without
        # this the shell, seeing a fold due, would try again in a tight loop).
        self._plan_waits = False
        self._policy: tuple[SecureAggregation, SecureAggregationPolicy] | None = None

    # -- read-only views

    @property
    def version(self) -> int:
        return self._version

    @property
    def state(self) -> AggregatorState:
        return self._state

    @property
    def knobs(self) -> Knobs:
        return self._knobs

    @property
    def params(self) -> Mapping[str, NDArray[np.float32]]:
        return self._params

    @property
    def optimizer_state(self) -> ServerOptimizerState:
        return self._opt_state

    @property
    def broadcast_view(self) -> View | None:
        """The current version's broadcast view where a delta chain made it (None: it is the
        weights rounded to :attr:`broadcast_dtype`, and a checkpoint need not keep it)."""
        return self._view.view if self._chained else None

    @property
    def broadcast_dtype(self) -> BroadcastDtype:
        """The dtype the current version's weights travel as (its manifest's)."""
        return self._view.dtype

    @property
    def seen(self) -> Mapping[str, str]:
        return self._seen

    @property
    def secure_policy(self) -> SecureAggregationPolicy | None:
        """The run's secure aggregation policy (None: updates travel in the clear)."""
        wire = self._knobs.secure_aggregation
        if wire is None:
            return None
        if self._policy is None or self._policy[0] is not wire:
            self._policy = (wire, wire.policy())  # the knobs never change it during a run
        return self._policy[1]

    @property
    def open_plan(self) -> FoldPlan | None:
        """The fold plan whose answers the core waits for (secure aggregation), if any."""
        return self._plan

    @property
    def plan_answers(self) -> tuple[UnmaskAnswer, ...]:
        """The answers the open plan has had, in the order of its holders."""
        plan = self._plan
        if plan is None:
            return ()
        return tuple(self._answers[h] for h in self.askable() if h in self._answers)

    def askable(self) -> tuple[str, ...]:
        """The holders the open plan may ask: those it named, and any holder that has
        receipted all of its updates since (it is asked the same request; the sum, its fold id
        and weights never change), in the policy's order."""
        plan, policy = self._plan, self.secure_policy
        if plan is None or policy is None:
            return ()
        named = set(plan.holders)
        return tuple(
            h
            for h in policy.holders
            if h in named or all(h in self._receipts.get(u, ()) for u in plan.update_ids)
        )

    def take_holders_to_ask(self) -> tuple[str, ...]:
        """The askable holders not asked yet since the plan was opened (or taken back after a
        restart): the shell publishes the plan's request to each, once."""
        fresh = tuple(h for h in self.askable() if h not in self._asked)
        self._asked.update(fresh)
        return fresh

    @property
    def seen_by(self) -> Mapping[str, str]:
        return self._seen_by

    @property
    def buffer(self) -> tuple[BufferedUpdate, ...]:
        return tuple(self._buffer)

    @property
    def norm_history(self) -> tuple[float, ...]:
        """The (clipped) L2 norms of the last accepted updates, oldest first."""
        return tuple(self._norms)

    @property
    def initial_norm(self) -> float:
        """The L2 norm of the run's initial weights: the adaptive bound's warm-up reference."""
        return self._initial_norm

    def norm_bound(self) -> NormBound | None:
        """The largest L2 norm an update may have now (None: no bound is set)."""
        knobs = self._knobs
        return norm_bound(
            ceiling=knobs.max_update_norm,
            multiplier=knobs.norm_multiplier,
            history=self._norms,
            window=knobs.norm_window,
            initial_norm=self._initial_norm,
        )

    def counters(self) -> Counters:
        return Counters.model_validate(self._counters)

    def node_tallies(self) -> tuple[NodeTally, ...]:
        return tuple(
            NodeTally(node=node, **_tally_fields(entry))
            for node, entry in sorted(self._nodes.items())
        )

    def status(self, now: float) -> AggregatorStatus:
        return AggregatorStatus(
            run_id=self.run_id,
            state=self._state,
            version=self._version,
            buffer_fill=len(self._buffer),
            knobs=self._knobs,
            counters=self.counters(),
            nodes=self.node_tallies(),
            updated_at=now,
            budgets_spent=self.budgets_spent(),
            awaiting_receipts=len(self._awaiting_receipts()),
            secure_plan=self._plan_status(),
        )

    def _plan_status(self) -> SecurePlanStatus | None:
        plan, policy = self._plan, self.secure_policy
        if plan is None or policy is None:
            return None
        return SecurePlanStatus(
            fold_id=plan.fold_id,
            update_ids=plan.update_ids,
            holders=self.askable(),
            needed=policy.scheme.threshold,
            answered=tuple(a.holder for a in self.plan_answers),
            refusals={h: r[:500] for h, r in self._refusals.items()},
            failure=self._plan_failure[:500],
        )

    def broadcast(self, *, model: ModelSpec, chunk_size: int, now: float) -> Broadcast:
        """The current version as broadcast: its broadcast view as a blob in chunks of
        ``chunk_size`` bytes, the manifest that announces them, and the delta from the previous
        version when the chain made one."""
        knobs, step = self._knobs, self._view
        blob = view_blob(step.view, step.dtype)
        sha = sha256_hex(blob)
        self._view_sha = sha
        chunks = tuple(split_blob(blob, chunk_size))
        manifest = Manifest(
            run_id=self.run_id,
            version=self._version,
            sha256=sha,
            blob_bytes=len(blob),
            chunk_size=chunk_size,
            chunk_count=len(chunks),
            model=model,
            training=knobs.training,
            created_at=now,
            compression=knobs.compression,
            broadcast_dtype=step.dtype,
            privacy=knobs.privacy,
            broadcast_compression=knobs.broadcast_compression,
            personalisation=knobs.personalisation,
            secure_aggregation=knobs.secure_aggregation,
        )
        delta = None
        if step.tensors is not None and self._base_sha is not None:
            delta = ModelDelta(
                manifest=manifest,
                base_version=self._version - 1,
                base_sha256=self._base_sha,
                tensors=step.tensors,
            )
        return Broadcast(
            manifest=manifest, blob=blob, chunks=chunks, widened=step.widened, delta=delta
        )

    def _next_view(self, params: View, *, reset_view: bool = False) -> None:
        """Make the new version's broadcast view: a delta from the current one when the chain is
        on, else (and for ``reset_view``) the weights rounded (common.broadcast_chain)."""
        knobs, current = self._knobs, self._view
        policy = knobs.broadcast_compression
        if policy is None or reset_view:
            self._view = reset(params, knobs.broadcast_dtype)
            self._chained = False
            self._base_sha = None
        else:
            if self._view_sha is None:
                self._view_sha = sha256_hex(view_blob(current.view, current.dtype))
            self._base_sha = self._view_sha
            self._view = advance(current.view, params, policy, knobs.broadcast_dtype)
            self._chained = self._view.tensors is not None
        self._view_sha = None

    # -- commands

    def command(self, command: ControlCommand) -> AggregatorState:
        """Apply start, pause, resume or stop; raises IllegalTransition and changes nothing."""
        self._state = transition(self._state, command)
        return self._state

    def set_knobs(self, patch: Mapping[str, Any]) -> Knobs:
        """Validate and apply a knob patch (``training.<field>``, ``compression.<field>`` and
        ``privacy.<field>`` reach the training config, the compression and the privacy policy).

        The privacy policy may become stricter during a run, never laxer: the hospitals' patients
        were promised the policy in force, so a patch that would weaken it (or turn it off) is
        refused whole, and says so. A run without one may start one with ``privacy.<field>``s.
        """
        current = self._knobs.model_dump()
        for key, value in patch.items():
            _assign_knob(current, key, value)
        try:
            knobs = Knobs.model_validate(current)
        except ValueError as exc:
            raise ControlError(f"invalid knob value: {exc}") from exc
        problem = _privacy_change_error(self._knobs.privacy, knobs.privacy)
        if problem is not None:
            raise ControlError(problem)
        if knobs.secure_aggregation != self._knobs.secure_aggregation:
            # Buffered masks are shared under the run's policy, and nodes mask under the one
            # they were given: a run keeps the policy (or its absence) it started with.
            raise ControlError("refused: secure_aggregation cannot change during a run")
        self._knobs = knobs
        self._plan_waits = False
        return knobs

    def quarantine(self, node: str) -> tuple[str, ...]:
        """Refuse ``node``'s updates from now on and drop its buffered ones; returns their ids.

        The dropped updates were acknowledged, so they count as accepted, never as folded.
        """
        entry = self._nodes.setdefault(node, _NodeTally())
        if entry.quarantined:
            raise ControlError(f"node {node!r} is already quarantined")
        entry.quarantined = True
        # An update in the open fold plan stays: its mask is bound to that sum, which the
        # holders compute over all of the plan's updates.
        planned = set(self._plan.update_ids) if self._plan is not None else set()
        dropped = tuple(
            u.update_id for u in self._buffer if u.node == node and u.update_id not in planned
        )
        self._buffer = [u for u in self._buffer if u.update_id not in dropped]
        for update_id in dropped:
            self._seen[update_id] = RejectReason.QUARANTINED.value
        return dropped

    def readmit(self, node: str) -> None:
        """Accept ``node``'s updates again."""
        entry = self._nodes.get(node)
        if entry is None or not entry.quarantined:
            raise ControlError(f"node {node!r} is not quarantined")
        entry.quarantined = False

    def record_evaluation(self, node: str, evaluation: Evaluation) -> None:
        if evaluation.run_id != self.run_id:
            return
        entry = self._nodes.setdefault(node, _NodeTally())
        if entry.eval_version is None or evaluation.version >= entry.eval_version:
            entry.eval_version = evaluation.version
            entry.eval_failure = evaluation.failure
            entry.eval_accuracy = None if evaluation.failure else evaluation.accuracy
            entry.eval_personal_accuracy = evaluation.personal_accuracy

    def record_privacy(self, node: str, spend: PrivacySpend | None) -> None:
        """What ``node``'s own status says of its privacy ledger (the shell saw it arrive).

        The node's tally shows the loss it reported last, in its status or an accepted update.
        A status without one (no DP) changes nothing and adds no node to the tallies.
        """
        if spend is not None:
            self._nodes.setdefault(node, _NodeTally()).report_privacy(spend)

    def record_node_state(self, node: str, state: NodeState, version: int | None) -> bool:
        """What ``node``'s own status says of its state at ``version``; True when its tally
        changed.

        BUDGET_SPENT marks the node spent; a later status from the node while online (IDLE,
        TRAINING, PAUSED: a hospital that restarted it under a larger budget of its own, within
        the run's) clears the mark. OFFLINE keeps it: a node's Last Will does not unspend its
        ledger, and a spent node that goes away will still not train. BUDGET_SPENT counts only
        for a version this run has made: the broker may still retain a status from an earlier
        run (the node says it again for this run's version when it sees it). Only BUDGET_SPENT
        adds a node to the tallies, so a run without privacy keeps the tallies it had.
        """
        if state is NodeState.OFFLINE:
            return False
        spent = state is NodeState.BUDGET_SPENT
        if spent and (version is None or version > self._version):
            return False
        entry = self._nodes.setdefault(node, _NodeTally()) if spent else self._nodes.get(node)
        if entry is None or entry.budget_spent is spent:
            return False
        entry.budget_spent = spent
        return True

    def budgets_spent(self) -> bool:
        """Every node the run knows, quarantined ones aside, has spent its privacy budget.

        Once the buffer is folded (see :meth:`fold_due`) no update can come: the status says so
        (``budgets_spent``) and the operator, or the demo, ends the run. The run is not stopped
        here: a hospital restarted under a larger budget of its own, within the run's, may go
        on, and the aggregator's live status and /metrics stay up for the last evaluations.
        """
        able = [e for e in self._nodes.values() if not e.quarantined]
        return bool(able) and all(e.budget_spent for e in able)

    def _buffer_cannot_fill(self) -> bool:
        """No node that could still add an update to the buffer has privacy budget left.

        A node could still add one unless it is quarantined, has spent its budget, or already
        has an update in the buffer (a node trains once per version, and the next version
        needs this fold). An offline node with budget may come back, so it still counts: the
        buffer waits for it as for any node, and ``buffer_timeout`` is the knob for not
        waiting. Only a run in which some node has spent its budget folds for this reason, so
        a buffer larger than the federation, or nodes still joining, are not mistaken for it.
        """
        waiting = {u.node for u in self._buffer}
        able = {n: e for n, e in self._nodes.items() if not e.quarantined}
        return any(e.budget_spent for e in able.values()) and all(
            e.budget_spent for n, e in able.items() if n not in waiting
        )

    # -- updates

    def receive(self, node: str, sender: str, update: Update, size: int, now: float) -> Verdict:
        """Validate an update from broker identity ``node`` and buffer it if it is acceptable."""
        self._counters["received"] += 1
        self._counters["bytes_received"] += size
        entry = self._nodes.setdefault(node, _NodeTally())
        entry.last_seen = now
        entry.bytes_received += size
        if sender != node:
            verdict = Verdict(
                accepted=False,
                reason=RejectReason.WRONG_SENDER,
                detail=f"sent as {sender!r} on {node!r}'s topic",
            )
            self._count_rejection(entry, RejectReason.WRONG_SENDER)
            return verdict  # not remembered: the id may be the rightful node's
        previous = self._seen.get(update.update_id)
        if previous is not None:
            if previous == "accepted" and self._seen_by.get(update.update_id, node) == node:
                self._counters["duplicates"] += 1
                return Verdict(accepted=True, duplicate=True, detail="already accepted")
            self._count_rejection(entry, RejectReason.REPLAY)
            judged = "accepted from another node" if previous == "accepted" else previous
            return Verdict(
                accepted=False,
                reason=RejectReason.REPLAY,
                detail=f"update id already seen ({judged})",
            )  # not remembered: the first verdict on this id stands
        if entry.quarantined:
            return self._reject(
                entry,
                update.update_id,
                Verdict(
                    accepted=False,
                    reason=RejectReason.QUARANTINED,
                    detail="an operator quarantined this node",
                ),
            )
        if (
            self._knobs.one_update_per_version
            and entry.last_base_version is not None
            and update.base_version <= entry.last_base_version
        ):
            return self._reject(
                entry,
                update.update_id,
                Verdict(
                    accepted=False,
                    reason=RejectReason.RATE_LIMITED,
                    detail=f"already accepted an update from base v{entry.last_base_version}; "
                    "one per version",
                ),
            )
        policy = self.secure_policy
        if policy is not None or update.masked is not None:
            verdict, masked = self._validate_masked(update, policy)
            if masked is None:
                return self._reject(entry, update.update_id, verdict)
            buffered = BufferedUpdate.of(node, update, delta={}, size=size, now=now, masked=masked)
            return self._accept(entry, node, update, buffered, verdict)
        verdict, delta, scale, norm = self._validate(node, sender, update)
        if not verdict.accepted:
            return self._reject(entry, update.update_id, verdict)
        if norm is not None:
            self._remember_norm(norm * scale)
        buffered = BufferedUpdate.of(
            node,
            update,
            delta=delta,
            size=size,
            now=now,
            scale=scale,
        )
        return self._accept(entry, node, update, buffered, verdict)

    def _accept(
        self,
        entry: _NodeTally,
        node: str,
        update: Update,
        buffered: BufferedUpdate,
        verdict: Verdict,
    ) -> Verdict:
        staleness = self._version - update.base_version
        self._buffer.append(buffered)
        self._plan_waits = False
        self._counters["bytes_accepted"] += buffered.bytes
        self._counters["raw_bytes_accepted"] += buffered.raw_bytes
        self._seen[update.update_id] = "accepted"
        self._seen_by[update.update_id] = node
        self._counters["accepted"] += 1
        if verdict.clipped:
            self._counters["clipped"] += 1
        entry.accepted += 1
        entry.last_base_version = update.base_version
        entry.last_staleness = staleness
        entry.report_privacy(update.privacy)
        return verdict

    def restore_buffered(
        self, node: str, update: Update, size: int, now: float, *, count: bool = False
    ) -> None:
        """Put back an accepted update from the write-ahead log, without validating it again.

        It was validated when it arrived. One that the checkpoint lists as buffered is already in
        ``seen`` and the counters; one accepted after the checkpoint (``count=True``) is added to
        them as :meth:`receive` did.
        """
        if update.masked is not None:
            self._restore_masked(node, update, size, now, count=count)
            return
        tensors = {t.name: t for t in update.delta}
        if tensors.keys() != self._params.keys():
            raise ValueError(f"logged update {update.update_id} does not fit the model")
        try:
            delta = {
                name: decode_tensor(tensors[name], p.shape) for name, p in self._params.items()
            }
        except CompressionError as exc:
            raise ValueError(f"logged update {update.update_id} does not decode: {exc}") from exc
        if count:
            # Accepted after the checkpoint: judged again against the same history, in order.
            scale, norm = self._clip_scale(delta, self.norm_bound())
            if self._knobs.norm_policy is not NormPolicy.CLIP:
                scale = 1.0
            if norm is not None:
                self._remember_norm(norm * scale)
        elif self._restored_scales is not None:
            scale = self._restored_scales.get(update.update_id, 1.0)
        elif self._knobs.norm_policy is NormPolicy.CLIP and self._knobs.max_update_norm:
            bound = NormBound(self._knobs.max_update_norm, "max_update_norm")
            scale = self._clip_scale(delta, bound)[0]  # a checkpoint from before the history
        else:
            scale = 1.0
        self._buffer.append(
            BufferedUpdate.of(node, update, delta=delta, size=size, now=now, scale=scale)
        )
        if count:
            self._count_restored(node, update, size, now)

    def _restore_masked(
        self, node: str, update: Update, size: int, now: float, *, count: bool
    ) -> None:
        """Put back a masked update from the write-ahead log (it has no norm to judge)."""
        elements = bytes(update.masked.elements) if update.masked is not None else b""
        try:
            masked = from_bytes(elements, self.parameter_count)
        except DecodeError as exc:
            raise ValueError(f"logged update {update.update_id} does not fit: {exc}") from exc
        self._buffer.append(
            BufferedUpdate.of(node, update, delta={}, size=size, now=now, masked=masked)
        )
        if count:
            self._count_restored(node, update, size, now)

    def _count_restored(self, node: str, update: Update, size: int, now: float) -> None:
        """Count an update restored from the write-ahead log as :meth:`receive` counted it."""
        self._seen[update.update_id] = "accepted"
        self._seen_by[update.update_id] = node
        self._counters["received"] += 1
        self._counters["accepted"] += 1
        self._counters["bytes_received"] += size
        self._counters["bytes_accepted"] += size
        self._counters["raw_bytes_accepted"] += self._buffer[-1].raw_bytes
        entry = self._nodes.setdefault(node, _NodeTally())
        entry.accepted += 1
        entry.last_seen = now
        entry.last_base_version = update.base_version
        entry.bytes_received += size
        entry.report_privacy(update.privacy)

    def refuse(self, node: str, refusal: Refusal, now: float) -> Unreadable:
        """Judge and count a message on ``node``'s update topic that did not decode to an
        update (:func:`common.inbound.receive` refused it); the shell records what it returns."""
        match refusal.reason:
            case Refused.TOO_LARGE:  # never decoded: its bytes say nothing
                unreadable = Unreadable(
                    RejectReason.TOO_LARGE, "over max_update_bytes", refusal.size
                )
            case Refused.MALFORMED | Refused.WRONG_KIND | Refused.EMPTY | Refused.UNKNOWN_TOPIC:
                unreadable = Unreadable(RejectReason.MALFORMED, refusal.detail[:200], refusal.size)
            case _:
                assert_never(refusal.reason)
        self.note_malformed(node, unreadable.reason, now, unreadable.size)
        return unreadable

    def record_decode_seconds(self, update_id: str, seconds: float) -> None:
        """How long the shell saw :meth:`receive` take to accept ``update_id`` (decoding and
        validating it), for its contribution's record; the core reads no clock. An update no
        longer buffered is not recorded."""
        for index in range(len(self._buffer) - 1, -1, -1):
            if self._buffer[index].update_id == update_id:
                self._buffer[index] = replace(self._buffer[index], decode_seconds=seconds)
                return

    def note_malformed(self, node: str, reason: RejectReason, now: float, size: int) -> None:
        """Count a message that never reached validation (it has no update id to answer)."""
        self._counters["received"] += 1
        self._counters["bytes_received"] += size
        entry = self._nodes.setdefault(node, _NodeTally())
        entry.last_seen = now
        entry.bytes_received += size
        self._count_rejection(entry, reason)

    def _validate(
        self, node: str, sender: str, update: Update
    ) -> tuple[Verdict, dict[str, DecodedTensor], float, float | None]:
        """The verdict, the decoded delta, the factor that clips it to the norm bound and its
        norm (None when no bound is set: then it is not worth a pass over the delta)."""

        def no(reason: RejectReason, detail: str) -> tuple[Verdict, dict[str, Any], float, None]:
            return Verdict(accepted=False, reason=reason, detail=detail), {}, 1.0, None

        refused = self._screen(update)
        if refused is not None:
            return refused, {}, 1.0, None
        refused, delta = self._decode(update)
        if refused is not None:
            return refused, {}, 1.0, None
        bound = self.norm_bound()
        scale, norm = self._clip_scale(delta, bound)
        if bound is None or norm is None or not norm > bound.value:
            return Verdict(accepted=True), delta, 1.0, norm
        if self._knobs.norm_policy is NormPolicy.REJECT:
            return no(
                RejectReason.NORM_BOUND,
                f"update norm {norm:.4g} exceeds the bound {bound.value:.4g} ({bound.source})",
            )
        detail = f"clipped from norm {norm:.4g} to {bound.value:.4g} ({bound.source})"
        return Verdict(accepted=True, detail=detail, clipped=True), delta, scale, norm

    def _validate_masked(
        self, update: Update, policy: SecureAggregationPolicy | None
    ) -> tuple[Verdict, FieldVector | None]:
        """The verdict on an update under (or sent as if under) secure aggregation, and its
        masked vector when accepted. What the clear metadata allows is checked as for any
        update; the delta's norm, finiteness and robust rules cannot be, the field elements'
        count and range can (docs/secure-aggregation.md#validation-on-masked-updates)."""

        def no(reason: RejectReason, detail: str) -> tuple[Verdict, None]:
            return Verdict(accepted=False, reason=reason, detail=detail), None

        refused = self._screen(update)
        if refused is not None:
            return refused, None
        if policy is None:
            return no(
                RejectReason.SECURE_AGGREGATION,
                "a masked update, but the run has no secure aggregation policy",
            )
        if update.masked is None:
            return no(
                RejectReason.SECURE_AGGREGATION,
                "a plaintext delta under the run's secure aggregation policy: mask it",
            )
        digest = policy.digest()
        if update.masked.policy_digest != digest:
            return no(
                RejectReason.SECURE_AGGREGATION,
                f"masked under policy {update.masked.policy_digest[:12]}, the run's is "
                f"{digest[:12]}",
            )
        try:
            masked = from_bytes(bytes(update.masked.elements), self.parameter_count)
        except DecodeError as exc:
            return no(RejectReason.SHAPE_MISMATCH, f"masked delta: {exc}")
        return Verdict(accepted=True), masked

    @property
    def parameter_count(self) -> int:
        """The model's parameter count: the length of a flattened (and so a masked) delta."""
        return sum(p.size for p in self._params.values())

    def _screen(self, update: Update) -> Verdict | None:
        """Why ``update`` is refused on what it says of itself (run, version, staleness, sample
        count, privacy spend), or None: checks that cost no decoding, so they come first."""

        def no(reason: RejectReason, detail: str) -> Verdict:
            return Verdict(accepted=False, reason=reason, detail=detail)

        knobs = self._knobs
        if self._state is AggregatorState.STOPPED:
            return no(RejectReason.RUN_STOPPED, "the run is stopped")
        if update.run_id != self.run_id:
            return no(RejectReason.WRONG_RUN, f"run {update.run_id!r} is not {self.run_id!r}")
        if update.base_version > self._version:
            return no(
                RejectReason.FUTURE_VERSION,
                f"base version {update.base_version} is ahead of {self._version}",
            )
        staleness = self._version - update.base_version
        if staleness > knobs.max_staleness:
            return no(
                RejectReason.STALE,
                f"staleness {staleness} exceeds max_staleness {knobs.max_staleness}",
            )
        if knobs.max_num_samples is not None and update.num_samples > knobs.max_num_samples:
            return no(
                RejectReason.SAMPLE_COUNT,
                f"{update.num_samples} samples exceed max_num_samples {knobs.max_num_samples}",
            )
        if knobs.privacy is not None:
            problem = spend_error(knobs.privacy, update.privacy, update.num_samples)
            if problem is not None:
                return no(RejectReason.PRIVACY_POLICY, problem)
        return None

    def _decode(self, update: Update) -> tuple[Verdict | None, dict[str, DecodedTensor]]:
        """Check each tensor against the model and the run's compression policy, and decode it."""

        def no(reason: RejectReason, detail: str) -> tuple[Verdict, dict[str, DecodedTensor]]:
            return Verdict(accepted=False, reason=reason, detail=detail), {}

        tensors = {t.name: t for t in update.delta}
        if len(tensors) != len(update.delta) or tensors.keys() != self._params.keys():
            return no(RejectReason.SHAPE_MISMATCH, "delta does not name the model's tensors")
        policy = self._knobs.compression
        delta: dict[str, DecodedTensor] = {}
        for name, reference in self._params.items():
            tensor = tensors[name]
            if tensor.shape != reference.shape:
                return no(
                    RejectReason.SHAPE_MISMATCH,
                    f"{name}: got {list(tensor.shape)}, model has {list(reference.shape)}",
                )
            if not admits(policy, tensor):
                return no(
                    RejectReason.COMPRESSION_POLICY,
                    f"{name}: {tensor.count} of {tensor.size} entries as {tensor.values_dtype}; "
                    f"the run asks for at most {keep_count(policy, tensor.size)} as "
                    f"{policy.quantization.values_dtype} or narrower",
                )
            try:
                delta[name] = decode_tensor(tensor, reference.shape)
            except NonFiniteValues as exc:
                return no(RejectReason.NON_FINITE, str(exc))
            except CompressionError as exc:
                return no(RejectReason.MALFORMED, str(exc))
        return None, delta

    def _clip_scale(
        self, delta: Mapping[str, DecodedTensor], bound: NormBound | None
    ) -> tuple[float, float | None]:
        """The factor that brings ``delta`` within ``bound`` (or 1), and its norm: None, and not
        computed, when there is no bound and no adaptive bound is kept (an adaptive bound with
        nothing to go by yet, as for a model initialised to zeros, still learns the norms)."""
        if bound is None and self._knobs.norm_multiplier is None:
            return 1.0, None
        norm = math.sqrt(math.fsum(squared_norm(d) for d in delta.values()))
        if bound is None or not norm > bound.value:
            return 1.0, norm
        return bound.value / norm, norm

    def _remember_norm(self, norm: float) -> None:
        self._norms.append(norm)
        del self._norms[:-NORM_HISTORY]

    def _reject(self, entry: _NodeTally, update_id: str, verdict: Verdict) -> Verdict:
        reason = verdict.reason or RejectReason.MALFORMED
        self._seen[update_id] = reason.value
        self._count_rejection(entry, reason)
        return verdict

    def _count_rejection(self, entry: _NodeTally, reason: RejectReason) -> None:
        self._counters["rejected"] += 1
        rejections = self._counters["rejections"]
        rejections[reason.value] = rejections.get(reason.value, 0) + 1
        entry.rejected += 1
        entry.rejections[reason.value] = entry.rejections.get(reason.value, 0) + 1

    # -- folding

    def follow(self, version: int) -> None:
        """Take ``version`` as the current one without folding anything.

        A regional aggregator validates its hospitals' updates against the core's versions,
        which it does not make (:mod:`aggregator.regional`); a version never goes back.
        """
        if version < self._version:
            raise ControlError(f"v{version} is older than the current v{self._version}")
        self._version = version

    def take(self, count: int) -> tuple[BufferedUpdate, ...]:
        """Remove and return the ``count`` oldest buffered updates, to combine them elsewhere."""
        if not 0 < count <= len(self._buffer):
            raise ControlError(f"cannot take {count} of {len(self._buffer)} buffered updates")
        taken, self._buffer = tuple(self._buffer[:count]), self._buffer[count:]
        return taken

    def fold_due(self, now: float) -> FoldReason | None:
        """Why the buffer should be folded now, or None: ``buffer_full``; ``buffer_timeout``;
        ``budgets_spent``, a partial buffer that no node with privacy budget left could fill
        (its updates were charged to their hospitals' ledgers, so they must count)."""
        pool = self._foldable()
        if self._state is not AggregatorState.RUNNING or not pool:
            return None
        if len(pool) >= self._knobs.buffer_size:
            return "buffer_full"
        timeout = self._knobs.buffer_timeout
        if timeout > 0 and now - pool[0].received_at >= timeout:
            return "buffer_timeout"
        if self._buffer_cannot_fill():
            return "budgets_spent"
        return None

    def next_deadline(self) -> float | None:
        """When the buffer timeout would fire, for the shell's timer."""
        pool = self._foldable()
        if not pool or self._knobs.buffer_timeout <= 0:
            return None
        return pool[0].received_at + self._knobs.buffer_timeout

    def _foldable(self) -> list[BufferedUpdate]:
        """The buffered updates a fold may take now, oldest first: all of them in the clear;
        under secure aggregation, none while a plan is open, else those with enough receipts."""
        policy = self.secure_policy
        if policy is None:
            return self._buffer
        if self._plan is not None or self._plan_waits:
            return []
        threshold, holders = policy.scheme.threshold, set(policy.holders)
        return [
            u
            for u in self._buffer
            if len(self._receipts.get(u.update_id, set()) & holders) >= threshold
        ]

    def _awaiting_receipts(self) -> list[BufferedUpdate]:
        """Masked updates accepted and buffered, still short of ``U`` holders' receipts."""
        policy = self.secure_policy
        if policy is None:
            return []
        planned = set(self._plan.update_ids) if self._plan is not None else set()
        threshold, holders = policy.scheme.threshold, set(policy.holders)
        return [
            u
            for u in self._buffer
            if u.update_id not in planned
            and len(self._receipts.get(u.update_id, set()) & holders) < threshold
        ]

    def fold(self, now: float) -> Fold | Discard:
        """Fold the buffer into a new version (at most ``buffer_size`` updates, oldest first).

        Returns :class:`Discard` instead, and keeps the version, when the batch would make the
        model non-finite.
        """
        if self.secure_policy is not None:
            raise ControlError("under secure aggregation a fold is planned first: see plan")
        reason = self.fold_due(now)
        if reason is None:
            raise ControlError("nothing to fold")
        return self._fold(self._buffer[: self._knobs.buffer_size], reason, now)

    # -- secure aggregation

    def record_receipts(self, holder: str, policy_digest: str, update_ids: Sequence[str]) -> str:
        """Take ``holder``'s receipts of ``update_ids``; returns why they are refused, or ''.

        A receipt may come before its update (a node shares its mask before it sends), so an
        update id not seen yet is remembered; one already folded, rejected or discarded is not.
        """
        policy = self.secure_policy
        if policy is None:
            return "the run has no secure aggregation policy"
        if policy_digest != policy.digest():
            return f"receipts under policy {policy_digest[:12]}, not the run's"
        if holder not in policy.holders:
            return f"{holder!r} is not a holder of the run's policy"
        buffered = {u.update_id for u in self._buffer}
        for update_id in update_ids:
            judged = self._seen.get(update_id)
            if judged is not None and update_id not in buffered:
                continue  # folded, rejected or discarded: nothing left to count towards
            self._receipts.setdefault(update_id, set()).add(holder)
            self._plan_waits = False
        # Receipts of updates that never come (a node that died before sending) must not
        # grow without bound: the oldest of them go first, never a buffered update's.
        excess = len(self._receipts) - _MAX_RECEIPTS
        if excess > 0:
            stale = [u for u in self._receipts if u not in buffered][:excess]
            for update_id in stale:
                del self._receipts[update_id]
        return ""

    def receipts(self, update_id: str) -> frozenset[str]:
        """The holders that receipted ``update_id``'s share."""
        return frozenset(self._receipts.get(update_id, ()))

    def plan(self, fold_id: str, now: float) -> FoldPlan | str:
        """Plan the fold of the due buffer (secure aggregation): its integer staleness weights
        and the holders to ask. Returns why it must wait instead (too few distinct hospitals,
        too few holders hold every share); the plan is open once returned, and the shell makes
        it durable before it asks anyone (aggregator.secure_unmask.UnmaskLedger)."""
        policy = self.secure_policy
        if policy is None:
            raise ControlError("the run has no secure aggregation policy")
        if self._plan is not None:
            raise ControlError(f"fold {self._plan.fold_id} is still open")
        reason = self.fold_due(now)
        if reason is None:
            raise ControlError("nothing to fold")
        batch = _distinct_batch(
            self._foldable(), self._knobs.buffer_size, policy.contributors, policy.max_terms
        )
        coefficients = self._coefficients(batch)
        pending = []
        for u, coefficient in zip(batch, coefficients, strict=True):
            if u.masked is None:
                raise ControlError(f"update {u.update_id} is not masked")
            receipts = frozenset(self._receipts.get(u.update_id, ()))
            pending.append(PendingMasked(u.update_id, u.node, coefficient, u.masked, receipts))
        planned = plan_fold(policy, fold_id, pending, reason)
        if isinstance(planned, FoldPlan):
            self._open_plan(planned)
        else:
            self._plan_waits = True
        return planned

    def adopt_plan(self, plan: FoldPlan) -> bool:
        """Take an open plan back after a restart (never re-plan it); False when its updates
        are no longer all buffered (its version was made, or its batch discarded)."""
        masked = {u.update_id for u in self._buffer if u.masked is not None}
        if self._plan is not None or not set(plan.update_ids) <= masked:
            return False
        self._open_plan(plan)
        return True

    def record_answer(self, answer: UnmaskAnswer | UnmaskRefusal) -> str:
        """Take a holder's answer (or refusal) to the open plan; returns why it is not taken, or
        '' (an answer from a holder not asked, to another fold, or of the wrong length)."""
        plan, policy = self._plan, self.secure_policy
        if plan is None or policy is None or answer.fold_id != plan.fold_id:
            return f"fold {answer.fold_id} is not the open plan"
        if answer.holder not in self.askable():
            return f"{answer.holder!r} was not asked for fold {plan.fold_id}"
        if isinstance(answer, UnmaskRefusal):
            self._refusals[answer.holder] = answer.reason
            return ""
        try:
            from_bytes(answer.share_sum, policy.scheme.share_length(self.parameter_count))
        except DecodeError as exc:
            return f"{answer.holder}'s answer to fold {plan.fold_id}: {exc}"
        self._answers[answer.holder] = answer
        self._refusals.pop(answer.holder, None)
        self._plan_failure = ""
        return ""

    def answers_complete(self) -> bool:
        """The open plan has the ``U`` answers that unmask it (and they have not failed)."""
        policy = self.secure_policy
        return (
            self._plan is not None
            and policy is not None
            and not self._plan_failure
            and len(self._answers) >= policy.scheme.threshold
        )

    def fold_secure(self, now: float) -> Fold | Discard:
        """Unmask the open plan's sum from its answers and fold it into a new version.

        A sum that leaves what clipped updates can reach (a contributor broke its clip) is a
        :class:`Discard`; answers that do not agree raise ProtocolError and leave the plan open
        (its status says why), to be folded when answers that agree come.
        """
        plan = self._plan
        if plan is None:
            raise ControlError("no fold plan is open")
        batch = self._planned_batch(plan)
        try:
            flat = self._unmask(plan, batch, self.plan_answers)
        except ClipViolation as exc:
            self._close_plan(plan)
            taken = set(plan.update_ids)
            self._buffer = [u for u in self._buffer if u.update_id not in taken]
            self._forget_receipts(plan.update_ids)
            return self._discard(batch, str(exc))
        except ProtocolError as exc:
            self._plan_failure = str(exc)
            raise
        return self._fold(batch, plan.reason, now, unmasked=(plan, flat))

    def abandon_plan(self) -> Discard:
        """Give up the open plan: its updates are dropped (their masks stay bound to it)."""
        plan = self._plan
        if plan is None:
            raise ControlError("no fold plan is open")
        batch = [u for u in self._buffer if u.update_id in set(plan.update_ids)]
        self._close_plan(plan)
        self._buffer = [u for u in self._buffer if u.update_id not in set(plan.update_ids)]
        self._forget_receipts(plan.update_ids)
        return self._discard(batch, f"fold plan {plan.fold_id} abandoned")

    def _open_plan(self, plan: FoldPlan) -> None:
        self._plan = plan
        self._answers, self._refusals, self._plan_failure = {}, {}, ""
        self._asked = set()

    def _close_plan(self, plan: FoldPlan) -> None:
        if self._plan is not None and self._plan.fold_id == plan.fold_id:
            self._plan = None
            self._answers, self._refusals, self._plan_failure = {}, {}, ""
            self._asked = set()

    def _planned_batch(self, plan: FoldPlan) -> list[BufferedUpdate]:
        by_id = {u.update_id: u for u in self._buffer}
        missing = [u for u in plan.update_ids if u not in by_id]
        if missing:
            raise ControlError(f"fold {plan.fold_id}: updates {missing} are not buffered")
        return [by_id[u] for u in plan.update_ids]

    def _unmask(
        self, plan: FoldPlan, batch: Sequence[BufferedUpdate], answers: Sequence[UnmaskAnswer]
    ) -> NDArray[np.float64]:
        policy = self.secure_policy
        if policy is None:
            raise ControlError("the run has no secure aggregation policy")
        masked = {u.update_id: u.masked for u in batch if u.masked is not None}
        if len(masked) != len(batch):
            raise ControlError(f"fold {plan.fold_id} names an update that is not masked")
        # A holder that receipted every update after the plan was made may answer it too.
        answered = set(plan.holders) | {a.holder for a in answers}
        holders = tuple(h for h in policy.holders if h in answered)
        return unmask(policy, plan.model_copy(update={"holders": holders}), masked, answers)

    def _unflatten(self, flat: NDArray[np.float64]) -> dict[str, NDArray[np.float32]]:
        """A flattened delta (the model's tensors in their order, each row-major) as tensors."""
        out, offset = {}, 0
        for name, p in self._params.items():
            out[name] = flat[offset : offset + p.size].reshape(p.shape).astype(np.float32)
            offset += p.size
        return out

    def _forget_receipts(self, update_ids: Sequence[str]) -> None:
        for update_id in update_ids:
            self._receipts.pop(update_id, None)

    def _coefficients(self, batch: Sequence[BufferedUpdate]) -> list[float]:
        """Each update's staleness-weighted coefficient if the batch were folded now."""
        knobs = self._knobs
        policy = StalenessPolicy(knobs.staleness, knobs.staleness_a, knobs.staleness_b)
        return buffer_weights(
            [u.num_samples for u in batch],
            [self._version - u.base_version for u in batch],
            policy,
            knobs.sample_exponent,
        )

    def refold(
        self,
        record: VersionRecord,
        now: float,
        *,
        secure: tuple[FoldPlan, Sequence[UnmaskAnswer]] | None = None,
    ) -> Fold:
        """Fold again a securely aggregated version from its plan and the answers recorded
        for it (``secure``); see the plaintext form below."""
        if record.secure_fold_id is None:
            return self._refold_plain(record, now)
        if secure is None or secure[0].fold_id != record.secure_fold_id or not secure[1]:
            raise ControlError(
                f"v{record.version}: the answers of fold {record.secure_fold_id} are not recorded"
            )
        if record.version != self._version + 1 or record.run_id != self.run_id:
            raise ControlError(f"cannot refold v{record.version} of {record.run_id} now")
        plan, answers = secure
        batch = self._planned_batch(plan)
        try:
            flat = self._unmask(plan, batch, answers)
        except ProtocolError as exc:
            raise ControlError(f"v{record.version} does not unmask again: {exc}") from exc
        result = self._fold(batch, plan.reason, now, probe=False, unmasked=(plan, flat))
        if not isinstance(result, Fold):
            raise ControlError(f"v{record.version} does not fold again: {result.detail}")
        return result

    def _refold_plain(self, record: VersionRecord, now: float) -> Fold:
        """Fold again the batch that ``record`` names, after a crash lost the version it made.

        Recovery between checkpoints: the same updates, in the same order, on the same weights
        give the same version (numpy is deterministic), so nodes that trained on it are right.
        """
        if record.version != self._version + 1 or record.run_id != self.run_id:
            raise ControlError(f"cannot refold v{record.version} of {record.run_id} now")
        if record.reason == "rollback":
            raise ControlError(f"v{record.version} is a rollback: see redo_rollback")
        by_id = {u.update_id: u for u in self._buffer}
        missing = [c.update_id for c in record.contributions if c.update_id not in by_id]
        if missing:
            raise ControlError(f"v{record.version}: updates {missing} are not buffered")
        batch = [by_id[c.update_id] for c in record.contributions]
        # No probe: this version was published and nodes hold it; it must come back as it was.
        result = self._fold(batch, record.reason, now, probe=False)
        if not isinstance(result, Fold):
            raise ControlError(f"v{record.version} does not fold again: {result.detail}")
        return result

    def _fold(
        self,
        batch: list[BufferedUpdate],
        reason: FoldReason,
        now: float,
        *,
        probe: bool = True,
        unmasked: tuple[FoldPlan, NDArray[np.float64]] | None = None,
    ) -> Fold | Discard:
        """Fold ``batch``; ``unmasked``: a secure fold's plan and its unmasked weighted sum
        ``Σ coefficient_i Δ_i`` (flattened), whose coefficients are the plan's weights."""
        knobs = self._knobs
        # Any state change a new version brings is judged first: if illegal, nothing changes.
        state = self._state_after(self._version + 1)
        policy = StalenessPolicy(knobs.staleness, knobs.staleness_a, knobs.staleness_b)
        # Staleness counts the versions published since each update's base, up to this fold:
        # an update left in the buffer by an earlier fold is staler now than when it arrived.
        stalenesses = [self._version - u.base_version for u in batch]
        optimizer = ServerOptimizer(
            kind=knobs.server_optimizer,
            lr=knobs.server_lr,
            momentum=knobs.server_momentum,
            beta1=knobs.server_beta1,
            beta2=knobs.server_beta2,
            tau=knobs.server_tau,
        )
        opt_state = ServerOptimizerState(step=self._opt_state.step + 1)
        refused = ""
        if unmasked is not None:
            plan, flat = unmasked
            weights = [w * plan.scale for w in plan.weights]
            flat, refused = self._bound_sum(flat)
            params, opt_state, norm, finite = self._step(self._unflatten(flat), optimizer)
        elif knobs.aggregation is AggregationRule.MEAN:
            weights = buffer_weights(
                [u.num_samples for u in batch], stalenesses, policy, knobs.sample_exponent
            )
            deltas = [u.delta for u in batch]
            coefficients = [w * u.scale for u, w in zip(batch, weights, strict=True)]
            if optimizer.kind is ServerOptimizerKind.SGD:
                # The hot path: the weighted sum and the step in one pass over memory.
                params, norm, finite = fold_step(
                    self._params, deltas, coefficients, optimizer.lr, out=self._memory.take()
                )
            else:
                shapes = {name: p.shape for name, p in self._params.items()}
                aggregate = decoded_sum(deltas, coefficients, shapes, out=self._memory.take())
                params, opt_state, norm, finite = self._step(aggregate, optimizer)
        else:
            aggregate, weights = robust_buffer_aggregate(
                [densify(u.delta, u.scale) for u in batch],
                stalenesses,
                policy,
                knobs.aggregation,
                knobs.trim_fraction,
            )
            params, opt_state, norm, finite = self._step(aggregate, optimizer)
        folded_ids = tuple(u.update_id for u in batch)
        taken = set(folded_ids)
        self._buffer = [u for u in self._buffer if u.update_id not in taken]
        if unmasked is not None:
            self._close_plan(unmasked[0])
            self._forget_receipts(folded_ids)
        if refused:
            return self._discard(batch, refused)
        if not math.isfinite(norm) or not finite:
            # Each update was finite, but together they overflow float32: refuse the batch
            # rather than publish a model of infinities.
            return self._discard(batch, "the aggregate of these updates is not finite")
        failure = self._probe(params) if probe and self._probe is not None else None
        if failure is not None:
            # Finite weights can still give infinite outputs (3e38 times anything): a version
            # that no node could evaluate or train on would stop the federation.
            self._counters["probe_failures"] += 1
            return self._discard(batch, f"the version they make fails the probe: {failure}")
        contributions = tuple(
            Contribution(
                node=u.node,
                update_id=u.update_id,
                base_version=u.base_version,
                staleness=s,
                num_samples=u.num_samples,
                staleness_factor=policy.factor(s),
                weight=w,
                bytes=u.bytes,
                train_loss=u.train_loss,
                raw_bytes=u.raw_bytes,
                encode_seconds=u.encode_seconds,
                decode_seconds=u.decode_seconds,
                epsilon=u.epsilon,
            )
            for u, s, w in zip(batch, stalenesses, weights, strict=True)
        )
        record = VersionRecord(
            run_id=self.run_id,
            version=self._version + 1,
            created_at=now,
            contributions=contributions,
            update_norm=norm,
            train_loss=math.fsum(c.weight * c.train_loss for c in contributions),
            fold_seconds=0.0,  # the shell times the fold: see Fold.timed
            reason=reason,
            secure_fold_id=None if unmasked is None else unmasked[0].fold_id,
        )
        for array in params.values():
            array.flags.writeable = False  # versions are immutable; Fold shares these arrays
        self._next_view(params)
        self._version += 1
        self._params = params
        self._opt_state = opt_state
        self._state = state
        self._counters["folded"] += len(batch)
        for u in batch:
            self._nodes[u.node].folded += 1
        return Fold(version=self._version, params=params, record=record, folded_ids=folded_ids)

    def _bound_sum(self, flat: NDArray[np.float64]) -> tuple[NDArray[np.float64], str]:
        """An unmasked sum held to the norm bound, or why it is refused (secure aggregation).

        Each update is hidden, so the bound applies to the buffer's weighted sum: its weights
        add up to at most 1, so updates within the bound make a sum within it. Beyond it, the
        norm policy decides as for one update: ``clip`` scales the sum to the bound, ``reject``
        refuses the batch. The adaptive bound learns from the norms of the sums taken, as it
        learns from updates' norms in the clear.
        """
        bound = self.norm_bound()
        norm = float(np.linalg.norm(flat))
        if bound is None or not norm > bound.value:
            if bound is not None or self._knobs.norm_multiplier is not None:
                self._remember_norm(norm)
            return flat, ""
        if self._knobs.norm_policy is NormPolicy.REJECT:
            return flat, (
                f"the unmasked sum's norm {norm:.4g} exceeds the bound {bound.value:.4g} "
                f"({bound.source})"
            )
        self._counters["clipped"] += 1
        self._remember_norm(bound.value)
        scaled: NDArray[np.float64] = flat * (bound.value / norm)
        return scaled, ""

    def _state_after(self, version: int) -> AggregatorState:
        """The run's state once ``version`` is folded: over at ``max_versions``."""
        limit = self._knobs.max_versions
        if limit is not None and version >= limit:
            return transition(self._state, RunEvent.MAX_VERSIONS_REACHED)
        return self._state

    def _discard(self, batch: list[BufferedUpdate], detail: str) -> Discard:
        """Drop a batch that cannot become a version: accepted, never folded, not rejected."""
        for u in batch:
            self._seen[u.update_id] = RejectReason.DISCARDED.value
            self._counters["discarded"] += 1
            self._nodes.setdefault(u.node, _NodeTally()).discarded += 1
        return Discard(tuple(u.update_id for u in batch), tuple(u.node for u in batch), detail)

    # -- rollback

    def rollback(
        self,
        target: int,
        params: Mapping[str, NDArray[np.float32]],
        optimizer_state: ServerOptimizerState,
        now: float,
    ) -> Fold:
        """Make version ``version + 1`` from ``target``'s weights (the shell found them).

        The number moves on, never back: nodes' base versions and the staleness of buffered
        updates stay sound. The server optimizer goes back to its state at ``target`` too, since
        its moments carry the history that led away from it. Refuses (ControlError, nothing
        changed) a target that is not an earlier version, a stopped run, weights that do not fit
        the model, and weights whose outputs fail the probe.
        """
        if self._state is AggregatorState.STOPPED:
            raise ControlError("the run is stopped")
        if not 0 <= target < self._version:
            raise ControlError(f"v{target} is not an earlier version (current: v{self._version})")
        if params.keys() != self._params.keys() or any(
            np.shape(params[k]) != p.shape for k, p in self._params.items()
        ):
            raise ControlError(f"the weights found for v{target} do not fit the model")
        new = {k: np.array(params[k], dtype=np.float32) for k in self._params}
        if not all(all_finite(p) for p in new.values()):
            raise ControlError(f"v{target}'s weights are not finite")
        failure = self._probe(new) if self._probe is not None else None
        if failure is not None:
            raise ControlError(f"v{target} fails the probe: {failure}")
        # In float64: the step away from a huge version must not overflow the record's norm.
        norm = math.sqrt(
            math.fsum(
                float(np.sum(np.square(new[k].astype(np.float64) - p), dtype=np.float64))
                for k, p in self._params.items()
            )
        )
        for array in new.values():
            array.flags.writeable = False
        record = VersionRecord(
            run_id=self.run_id,
            version=self._version + 1,
            created_at=now,
            contributions=(),
            update_norm=norm if math.isfinite(norm) else _FLOAT32_MAX,
            train_loss=0.0,
            fold_seconds=0.0,
            reason="rollback",
            rollback_of=target,
        )
        # A rollback is a reset of the broadcast chain: every node takes its snapshot.
        self._next_view(new, reset_view=True)
        self._version += 1
        self._params = new
        self._opt_state = optimizer_state
        self._counters["rollbacks"] += 1
        return Fold(version=self._version, params=new, record=record, folded_ids=())

    def redo_rollback(
        self,
        record: VersionRecord,
        params: Mapping[str, NDArray[np.float32]],
        optimizer_state: ServerOptimizerState,
    ) -> Fold:
        """Make again the rollback that ``record`` logged, after a crash lost the version."""
        if (
            record.rollback_of is None
            or record.version != self._version + 1
            or record.run_id != self.run_id
        ):
            raise ControlError(f"v{record.version} of {record.run_id} is not the next rollback")
        return self.rollback(record.rollback_of, params, optimizer_state, record.created_at)

    def _step(
        self, aggregate: dict[str, NDArray[np.float32]], optimizer: ServerOptimizer
    ) -> tuple[dict[str, NDArray[np.float32]], ServerOptimizerState, float, bool]:
        """The server optimizer's step from this fold's own aggregate, written over it in place;
        with the aggregate's norm and whether the new weights are all finite."""
        norm = global_norm(aggregate)  # before the step overwrites it
        params, opt_state = server_step(
            self._params, aggregate, self._opt_state, optimizer, reuse_delta=True
        )
        return params, opt_state, norm, all(all_finite(p) for p in params.values())


def _assign_knob(current: dict[str, Any], key: str, value: Any) -> None:
    """Set ``key`` (``knob`` or ``knob.field``) in the dumped knobs ``current``, or refuse it."""
    target, _, leaf = key.partition(".")
    if not leaf:
        if key not in current or (key in _NESTED_KNOBS and key not in _WHOLE_KNOBS):
            raise ControlError(f"unknown knob {key!r}")
        current[key] = value
        return
    model = _NESTED_KNOBS.get(target)
    if model is None or leaf not in model.model_fields:
        raise ControlError(f"unknown knob {key!r}")
    # An optional record not set yet (None) is started by its fields.
    current[target] = {**(current[target] or {}), leaf: value}


def _privacy_change_error(
    current: PrivacyPolicy | None, proposed: PrivacyPolicy | None
) -> str | None:
    """Why the run's privacy policy may not go from ``current`` to ``proposed``, or None."""
    if current is None or proposed == current:
        return None
    if proposed is None:
        return (
            "refused: the run's privacy policy cannot be turned off; the hospitals' patients "
            "were promised it (a stricter policy may be set)"
        )
    if not at_least_as_private_as(proposed, current):
        return (
            "refused: the privacy policy may become stricter during a run, never laxer (no "
            "larger budget or delta, no less noise, no less guarded metrics); the hospitals' "
            "patients were promised the current one"
        )
    return None


def _tally_fields(entry: _NodeTally) -> dict[str, Any]:
    return {name: getattr(entry, name) for name in _NodeTally.__slots__}


def _distinct_batch(
    foldable: Sequence[BufferedUpdate], size: int, contributors: int, max_terms: int
) -> list[BufferedUpdate]:
    """The oldest foldable updates, at least ``size`` of them and from at least ``contributors``
    distinct hospitals where the buffer has them (at most ``max_terms``): a buffer whose oldest
    ``size`` updates come from too few hospitals (one node sent twice while another was slow)
    would otherwise wait for ever, the newer updates that make it foldable never planned."""
    batch: list[BufferedUpdate] = []
    nodes: set[str] = set()
    for update in foldable:
        if len(batch) >= max_terms or (len(batch) >= size and len(nodes) >= contributors):
            break
        batch.append(update)
        nodes.add(update.node)
    return batch
