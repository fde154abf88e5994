"""Specification of the aggregator's decisions under secure aggregation (no I/O): which updates
it takes masked, when a masked update may be folded, the fold plan, and the version it unmasks.

Masks, shares and the holders' answers are computed here with the protocol's pure functions
(``mask_update``, ``weighted_sum``): the aggregator's core sees only what it would see on the wire.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from aggregator.core import AggregatorCore, Discard, Fold
from aggregator.secure_unmask import FoldPlan
from common.errors import ControlError, ProtocolError
from common.messages import (
    AggregatorState,
    Knobs,
    MaskedDelta,
    RejectReason,
    SecureAggregation,
    TrainMetrics,
    Update,
)
from common.secure_aggregation import FieldVector, mask_update, to_bytes, weighted_sum
from common.secure_aggregation.events import UnmaskAnswer, UnmaskRefusal
from tests.aggregator.test_core import DELTA, PARAMS, RUN, make_update

HOLDERS = ("a", "b", "c", "d")  # T = 1, U = 3: sums of at least 3 hospitals
SECURE = SecureAggregation(holders=HOLDERS)
POLICY = SECURE.policy()
SIZE = sum(p.size for p in PARAMS.values())
# One quantization level of the default plan, per term: the error bound of an unmasked sum.
LEVEL = POLICY.plan.clip / POLICY.plan.levels


@dataclass
class Sent:
    """A masked update as the aggregator receives it, and the shares its holders keep."""

    update: Update
    shares: list[FieldVector]


def flat(delta: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([delta[name].reshape(-1) for name in PARAMS])


def masked_update(
    update_id: str, delta: dict[str, np.ndarray], *, base_version: int = 0, seed: int = 0
) -> Sent:
    secure = mask_update(
        flat(delta),
        POLICY.plan,
        POLICY.scheme,
        rng=np.random.default_rng(seed),
        random_bytes=np.random.default_rng(seed + 1).bytes,
    )
    update = Update(
        update_id=update_id,
        run_id=RUN,
        base_version=base_version,
        num_samples=100 + 10 * seed,
        metrics=TrainMetrics(loss=0.5, accuracy=0.8, seconds=1.0),
        delta=(),
        masked=MaskedDelta(policy_digest=POLICY.digest(), elements=to_bytes(secure.masked)),
    )
    return Sent(update, secure.shares)


def answers(plan: FoldPlan, sent: dict[str, Sent], holders: tuple[str, ...]) -> list[UnmaskAnswer]:
    """What ``holders`` answer to ``plan``: the weighted sums of the shares they hold."""
    return [
        UnmaskAnswer(
            fold_id=plan.fold_id,
            holder=holder,
            share_sum=to_bytes(
                weighted_sum(
                    [sent[u].shares[POLICY.holder_index(holder)] for u in plan.update_ids],
                    plan.weights,
                )
            ),
        )
        for holder in holders
    ]


def secure_core(version: int = 0, **knobs: Any) -> AggregatorCore:
    knobs = {"buffer_size": 3, "secure_aggregation": SECURE, **knobs}
    return AggregatorCore(
        run_id=RUN,
        params=PARAMS,
        knobs=Knobs(**knobs),
        version=version,
        state=AggregatorState.RUNNING,
    )


def deltas(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(100 + seed)
    return {k: rng.uniform(-0.5, 0.5, v.shape).astype(np.float32) for k, v in PARAMS.items()}


def receive_all(core: AggregatorCore, sent: dict[str, Sent]) -> None:
    for index, item in enumerate(sent.values()):
        node = f"n{index}"
        verdict = core.receive(node, node, item.update, 100, now=float(index))
        assert verdict.accepted, verdict.detail


def receipt_all(core: AggregatorCore, update_ids: list[str], holders: tuple[str, ...]) -> None:
    for holder in holders:
        assert core.record_receipts(holder, POLICY.digest(), update_ids) == ""


def test_a_plaintext_update_under_the_policy_is_refused_and_counted() -> None:
    core = secure_core()
    verdict = core.receive("n0", "n0", make_update("u1"), 100, now=0.0)
    assert not verdict.accepted
    assert verdict.reason is RejectReason.SECURE_AGGREGATION
    assert "plaintext" in verdict.detail
    assert core.counters().rejections == {"secure_aggregation": 1}
    assert core.buffer == ()


def test_a_masked_update_without_the_policy_is_refused() -> None:
    core = AggregatorCore(run_id=RUN, params=PARAMS, knobs=Knobs(), state=AggregatorState.RUNNING)
    verdict = core.receive("n0", "n0", masked_update("u1", DELTA).update, 100, now=0.0)
    assert verdict.reason is RejectReason.SECURE_AGGREGATION
    assert "no secure aggregation policy" in verdict.detail


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        pytest.param(
            {"masked": MaskedDelta(policy_digest="0" * 64, elements=b"\0" * 4 * SIZE)},
            RejectReason.SECURE_AGGREGATION,
            id="another-policy",
        ),
        pytest.param(
            {"masked": MaskedDelta(policy_digest=POLICY.digest(), elements=b"\0" * 4 * (SIZE - 1))},
            RejectReason.SHAPE_MISMATCH,
            id="too-few-elements",
        ),
        pytest.param(
            {"masked": MaskedDelta(policy_digest=POLICY.digest(), elements=b"\xff" * 4 * SIZE)},
            RejectReason.SHAPE_MISMATCH,
            id="element-beyond-the-prime",
        ),
        pytest.param({"run_id": "another-run"}, RejectReason.WRONG_RUN, id="wrong-run"),
        pytest.param({"base_version": 7}, RejectReason.FUTURE_VERSION, id="future-version"),
    ],
)
def test_a_masked_update_is_checked_as_far_as_its_clear_parts_allow(
    change: dict[str, Any], reason: RejectReason
) -> None:
    core = secure_core()
    update = masked_update("u1", DELTA).update.model_copy(update=change)
    verdict = core.receive("n0", "n0", update, 100, now=0.0)
    assert verdict.reason is reason


def test_a_masked_update_waits_for_u_receipts_before_it_can_be_folded() -> None:
    core = secure_core()
    sent = {f"u{i}": masked_update(f"u{i}", deltas(i), seed=i) for i in range(3)}
    receive_all(core, sent)
    assert len(core.buffer) == 3
    assert core.fold_due(now=10.0) is None
    assert core.status(10.0).awaiting_receipts == 3
    receipt_all(core, list(sent), ("a", "b"))  # two holders: one fewer than U
    assert core.fold_due(now=10.0) is None
    receipt_all(core, list(sent), ("c",))
    assert core.status(10.0).awaiting_receipts == 0
    assert core.fold_due(now=10.0) == "buffer_full"


def test_receipts_that_come_before_their_update_count() -> None:
    core = secure_core()
    sent = {f"u{i}": masked_update(f"u{i}", deltas(i), seed=i) for i in range(3)}
    receipt_all(core, list(sent), ("a", "b", "c"))
    receive_all(core, sent)
    assert core.fold_due(now=10.0) == "buffer_full"


@pytest.mark.parametrize(
    ("holder", "digest", "why"),
    [
        pytest.param("e", POLICY.digest(), "not a holder", id="not-a-holder"),
        pytest.param("a", "0" * 64, "not the run's", id="another-policy"),
    ],
)
def test_a_receipt_from_outside_the_policy_is_refused(holder: str, digest: str, why: str) -> None:
    core = secure_core()
    assert why in core.record_receipts(holder, digest, ["u1"])
    assert core.receipts("u1") == frozenset()


def test_the_secure_fold_equals_the_plaintext_staleness_weighted_fold_within_quantization() -> None:
    """Three hospitals at staleness 2, 1 and 0; three of the four holders answer (one is gone)."""
    secure = secure_core(version=2)
    plain = AggregatorCore(
        run_id=RUN,
        params=PARAMS,
        knobs=Knobs(buffer_size=3),
        version=2,
        state=AggregatorState.RUNNING,
    )
    sent = {}
    for i in range(3):
        sent[f"u{i}"] = masked_update(f"u{i}", deltas(i), base_version=i, seed=i)
        clear = make_update(f"u{i}", base_version=i, num_samples=100 + 10 * i, delta=deltas(i))
        assert plain.receive(f"n{i}", f"n{i}", clear, 100, now=float(i)).accepted
    receive_all(secure, sent)
    receipt_all(secure, list(sent), HOLDERS)

    plan = secure.plan("fold-1", now=10.0)
    assert isinstance(plan, FoldPlan)
    assert plan.update_ids == ("u0", "u1", "u2")
    assert plan.holders == HOLDERS
    assert secure.open_plan == plan
    assert secure.fold_due(now=10.0) is None  # one plan at a time
    for answer in answers(plan, sent, ("a", "c", "d")):
        assert secure.record_answer(answer) == ""
    assert secure.answers_complete()
    fold = secure.fold_secure(now=11.0)
    expected = plain.fold(now=11.0)
    assert isinstance(fold, Fold)
    assert isinstance(expected, Fold)

    assert fold.record.secure_fold_id == "fold-1"
    assert expected.record.secure_fold_id is None
    assert [c.update_id for c in fold.record.contributions] == ["u0", "u1", "u2"]
    assert [c.staleness for c in fold.record.contributions] == [2, 1, 0]
    for ours, theirs in zip(fold.record.contributions, expected.record.contributions, strict=True):
        assert ours.weight == pytest.approx(theirs.weight, rel=1e-3)
    for name in PARAMS:
        np.testing.assert_allclose(fold.params[name], expected.params[name], atol=3 * LEVEL)
    assert secure.version == 3
    assert secure.buffer == ()
    assert secure.open_plan is None
    assert secure.counters().folded == 3


def test_the_plan_waits_for_enough_distinct_hospitals() -> None:
    core = secure_core(buffer_timeout=5.0)
    sent = {f"u{i}": masked_update(f"u{i}", deltas(i), seed=i) for i in range(2)}
    receive_all(core, sent)
    receipt_all(core, list(sent), HOLDERS)
    assert core.fold_due(now=10.0) == "buffer_timeout"
    why = core.plan("fold-1", now=10.0)
    assert why == "2 distinct hospitals buffered, 3 needed"
    assert core.open_plan is None
    # Nothing changes until a new update or receipt comes: no fold is due, no deadline set.
    assert core.fold_due(now=11.0) is None
    assert core.next_deadline() is None
    third = masked_update("u2", deltas(2), seed=2)
    assert core.receive("n2", "n2", third.update, 100, now=12.0).accepted
    receipt_all(core, ["u2"], HOLDERS)
    assert core.fold_due(now=12.0) == "buffer_full"


def test_a_plan_reaches_past_a_node_that_sent_twice_for_enough_distinct_hospitals() -> None:
    """K = 3 with n0's two updates oldest: the plan takes the next two hospitals' updates too
    (four terms, three hospitals) rather than wait for ever on the oldest three."""
    core = secure_core()
    sent = {f"u{i}": masked_update(f"u{i}", deltas(i), seed=i) for i in range(4)}
    for index, (node, item) in enumerate(zip(("n0", "n0", "n1", "n2"), sent.values(), strict=True)):
        assert core.receive(node, node, item.update, 100, now=float(index)).accepted
    receipt_all(core, list(sent), HOLDERS)
    plan = core.plan("fold-1", now=10.0)
    assert isinstance(plan, FoldPlan), plan
    assert plan.update_ids == ("u0", "u1", "u2", "u3")


def test_answers_not_asked_for_or_of_the_wrong_length_are_refused_and_refusals_show() -> None:
    core = secure_core()
    sent = {f"u{i}": masked_update(f"u{i}", deltas(i), seed=i) for i in range(3)}
    receive_all(core, sent)
    receipt_all(core, list(sent), ("a", "b", "c"))  # d holds no share: not asked
    plan = core.plan("fold-1", now=10.0)
    assert isinstance(plan, FoldPlan)
    assert plan.holders == ("a", "b", "c")
    good = answers(plan, sent, ("a",))[0]
    assert "not the open plan" in core.record_answer(
        UnmaskAnswer(fold_id="fold-0", holder="a", share_sum=good.share_sum)
    )
    assert "was not asked" in core.record_answer(
        UnmaskAnswer(fold_id="fold-1", holder="d", share_sum=good.share_sum)
    )
    assert "bytes where" in core.record_answer(
        UnmaskAnswer(fold_id="fold-1", holder="b", share_sum=good.share_sum[:-4])
    )
    assert core.record_answer(UnmaskRefusal(fold_id="fold-1", holder="b", reason="no")) == ""
    assert core.record_answer(good) == ""
    assert not core.answers_complete()
    status = core.status(11.0).secure_plan
    assert status is not None
    assert status.fold_id == "fold-1"
    assert status.needed == 3
    assert status.answered == ("a",)
    assert status.refusals == {"b": "no"}


def test_an_answer_that_disagrees_leaves_the_plan_open_and_says_why() -> None:
    core = secure_core()
    sent = {f"u{i}": masked_update(f"u{i}", deltas(i), seed=i) for i in range(3)}
    receive_all(core, sent)
    receipt_all(core, list(sent), HOLDERS)
    plan = core.plan("fold-1", now=10.0)
    assert isinstance(plan, FoldPlan)
    given = answers(plan, sent, HOLDERS)
    wrong = UnmaskAnswer(fold_id="fold-1", holder="d", share_sum=given[0].share_sum)
    for answer in [*given[:3], wrong]:
        core.record_answer(answer)
    with pytest.raises(ProtocolError):
        core.fold_secure(now=11.0)
    assert core.open_plan == plan
    assert core.version == 0
    assert not core.answers_complete()
    status = core.status(11.0).secure_plan
    assert status is not None
    assert status.failure


def test_a_sum_beyond_the_clip_is_discarded() -> None:
    core = secure_core()
    sent = {f"u{i}": masked_update(f"u{i}", deltas(i), seed=i) for i in range(3)}
    # u0's sender skipped its clip: its masked vector carries a value far out of range.
    broken = sent["u0"]
    elements = np.frombuffer(bytes(broken.update.masked.elements), "<u4").astype(np.int64)  # type: ignore[union-attr]
    elements[0] = (elements[0] + 10**8) % (2**31 - 1)
    sent["u0"] = Sent(
        broken.update.model_copy(
            update={
                "masked": MaskedDelta(policy_digest=POLICY.digest(), elements=to_bytes(elements))
            }
        ),
        broken.shares,
    )
    receive_all(core, sent)
    receipt_all(core, list(sent), HOLDERS)
    plan = core.plan("fold-1", now=10.0)
    assert isinstance(plan, FoldPlan)
    for answer in answers(plan, sent, ("a", "b", "c")):
        core.record_answer(answer)
    result = core.fold_secure(now=11.0)
    assert isinstance(result, Discard)
    assert "clip" in result.detail
    assert core.version == 0
    assert core.buffer == ()
    assert core.open_plan is None
    assert core.counters().discarded == 3


def test_a_version_is_made_again_from_its_recorded_answers() -> None:
    """Recovery: the same buffer, plan and answers give the same version, asking no one."""
    core = secure_core()
    sent = {f"u{i}": masked_update(f"u{i}", deltas(i), seed=i) for i in range(3)}
    receive_all(core, sent)
    receipt_all(core, list(sent), HOLDERS)
    plan = core.plan("fold-1", now=10.0)
    assert isinstance(plan, FoldPlan)
    given = answers(plan, sent, ("b", "c", "d"))
    for answer in given:
        core.record_answer(answer)
    fold = core.fold_secure(now=11.0)
    assert isinstance(fold, Fold)

    again = secure_core()
    for index, item in enumerate(sent.values()):
        again.restore_buffered(f"n{index}", item.update, 100, float(index), count=True)
    with pytest.raises(ControlError, match="not recorded"):
        again.refold(fold.record, now=12.0)
    refold = again.refold(fold.record, now=12.0, secure=(plan, given))
    for name in PARAMS:
        np.testing.assert_array_equal(refold.params[name], fold.params[name])
    assert refold.record.contributions == fold.record.contributions


def test_a_restarted_core_takes_its_open_plan_back_and_never_plans_its_updates_again() -> None:
    core = secure_core()
    sent = {f"u{i}": masked_update(f"u{i}", deltas(i), seed=i) for i in range(3)}
    for index, item in enumerate(sent.values()):
        core.restore_buffered(f"n{index}", item.update, 100, float(index), count=True)
    receipt_all(core, list(sent), HOLDERS)
    plan = FoldPlan(
        fold_id="fold-1",
        policy_digest=POLICY.digest(),
        update_ids=("u0", "u1", "u2"),
        senders=("n0", "n1", "n2"),
        weights=(1024, 1000, 990),
        scale=0.0003,
        holders=HOLDERS,
    )
    assert core.adopt_plan(plan)
    assert core.open_plan == plan
    assert core.fold_due(now=10.0) is None
    assert not core.adopt_plan(plan.model_copy(update={"fold_id": "fold-2"}))


def test_an_open_plan_keeps_its_updates_when_their_node_is_quarantined() -> None:
    core = secure_core()
    sent = {f"u{i}": masked_update(f"u{i}", deltas(i), seed=i) for i in range(3)}
    receive_all(core, sent)
    receipt_all(core, list(sent), HOLDERS)
    assert isinstance(core.plan("fold-1", now=10.0), FoldPlan)
    assert core.quarantine("n0") == ()
    assert len(core.buffer) == 3


def test_the_policy_cannot_change_during_a_run() -> None:
    core = secure_core()
    with pytest.raises(ControlError, match="secure_aggregation"):
        core.set_knobs({"secure_aggregation": None})


def test_the_manifest_carries_the_policy() -> None:
    from common.messages import ModelSpec

    broadcast = secure_core().broadcast(model=ModelSpec(name="logreg"), chunk_size=1024, now=0.0)
    assert broadcast.manifest.secure_aggregation == SECURE


def test_a_holder_that_receipts_after_the_plan_is_asked_too_and_its_answer_counts() -> None:
    """The plan names a, b and c; d's receipts come later: d is asked the same request, and
    the sum unmasks from b, c and d when a is gone."""
    core = secure_core()
    sent = {f"u{i}": masked_update(f"u{i}", deltas(i), seed=i) for i in range(3)}
    receive_all(core, sent)
    receipt_all(core, list(sent), ("a", "b", "c"))
    plan = core.plan("fold-1", now=10.0)
    assert isinstance(plan, FoldPlan)
    assert core.take_holders_to_ask() == ("a", "b", "c")
    receipt_all(core, ["u0", "u1"], ("d",))
    assert core.take_holders_to_ask() == ()  # d holds two of the three shares only
    receipt_all(core, ["u2"], ("d",))
    assert core.take_holders_to_ask() == ("d",)
    assert core.take_holders_to_ask() == ()
    for answer in answers(plan, sent, ("b", "c", "d")):
        assert core.record_answer(answer) == ""
    fold = core.fold_secure(now=11.0)
    assert isinstance(fold, Fold)
    status_holders = core.status(12.0).secure_plan
    assert status_holders is None


def test_an_abandoned_plan_drops_its_updates_for_good() -> None:
    core = secure_core()
    sent = {f"u{i}": masked_update(f"u{i}", deltas(i), seed=i) for i in range(3)}
    receive_all(core, sent)
    receipt_all(core, list(sent), HOLDERS)
    assert isinstance(core.plan("fold-1", now=10.0), FoldPlan)
    discard = core.abandon_plan()
    assert discard.update_ids == ("u0", "u1", "u2")
    assert "fold-1 abandoned" in discard.detail
    assert core.open_plan is None
    assert core.buffer == ()
    assert core.counters().discarded == 3
    again = core.receive("n0", "n0", sent["u0"].update, 100, now=11.0)
    assert again.reason is RejectReason.REPLAY
    with pytest.raises(ControlError, match="no fold plan is open"):
        core.abandon_plan()


@pytest.mark.parametrize(
    ("policy", "folded"),
    [pytest.param("reject", False, id="reject"), pytest.param("clip", True, id="clip")],
)
def test_the_unmasked_sum_is_held_to_the_norm_bound(policy: str, folded: bool) -> None:
    """Each update is hidden, so max_update_norm bounds the buffer's weighted sum: beyond it
    the batch is refused (reject) or the sum scaled to the bound (clip)."""
    core = secure_core(max_update_norm=0.01, norm_policy=policy)
    sent = {f"u{i}": masked_update(f"u{i}", deltas(i), seed=i) for i in range(3)}
    receive_all(core, sent)
    receipt_all(core, list(sent), HOLDERS)
    plan = core.plan("fold-1", now=10.0)
    assert isinstance(plan, FoldPlan)
    for answer in answers(plan, sent, ("a", "b", "c")):
        core.record_answer(answer)
    result = core.fold_secure(now=11.0)
    if not folded:
        assert isinstance(result, Discard)
        assert "exceeds the bound 0.01" in result.detail
        assert core.version == 0
        return
    assert isinstance(result, Fold)
    step = np.sqrt(sum(np.sum((result.params[k] - PARAMS[k]) ** 2) for k in PARAMS))
    assert step == pytest.approx(0.01, rel=1e-4)
    assert core.counters().clipped == 1
