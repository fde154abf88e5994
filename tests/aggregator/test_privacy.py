"""Specification of the aggregator's side of differential privacy: the policy in the manifest,
refusing updates trained with less privacy, the live-knob rule, the epsilon it records, and what
it does when the hospitals' budgets are spent."""

from __future__ import annotations

from typing import Any

import pytest

from aggregator.core import AggregatorCore, Fold
from common.errors import ControlError
from common.messages import (
    AggregatorState,
    MetricRelease,
    ModelSpec,
    NodeState,
    PrivacyPolicy,
    PrivacySpend,
    RejectReason,
    Update,
)
from common.privacy_policy import spend_error
from tests.aggregator.test_core import (
    SIZE,
    make_core,
    make_update,
    send,
    tally_of,
)
from tests.samples import privacy_spend

POLICY = PrivacyPolicy(noise_multiplier=1.0, delta=1e-5, epsilon_budget=3.0)


def spend(**fields: Any) -> PrivacySpend:
    """A node's spend that meets :data:`POLICY`, with ``fields`` changed."""
    return privacy_spend(**fields)


def private(update_id: str = "u1", privacy: PrivacySpend | None = None, **kw: Any) -> Update:
    return make_update(update_id, **kw).model_copy(update={"privacy": privacy or spend()})


def dp_core(policy: PrivacyPolicy = POLICY, **knobs: Any) -> AggregatorCore:
    return make_core(privacy=policy, **knobs)


# -- the policy travels


def test_the_manifest_carries_the_runs_privacy_policy() -> None:
    """Nodes learn the policy from the manifest, as they learn the compression policy."""
    model = ModelSpec(name="logreg", kwargs={"n_features": 3})
    manifest = dp_core().broadcast(model=model, chunk_size=64, now=1.0).manifest
    assert manifest.privacy == POLICY
    assert make_core().broadcast(model=model, chunk_size=64, now=1.0).manifest.privacy is None


# -- refusals


REFUSED = [
    pytest.param(None, 10, "carries no privacy spend", id="no-spend"),
    pytest.param(spend(delta=1e-4), 10, "delta 0.0001 is above", id="delta-above-policy"),
    pytest.param(spend(delta=1e-5), 100_000, "not below 1/n", id="delta-not-below-1-over-n"),
    pytest.param(spend(epsilon_budget=4.0), 10, "budget 4 is above", id="budget-above-policy"),
    pytest.param(spend(epsilon=3.5), 10, "past the budget", id="epsilon-past-budget"),
    pytest.param(spend(noise_multiplier=0.8), 10, "noise multiplier 0.8", id="less-noise"),
]


@pytest.mark.parametrize(("privacy", "num_samples", "words"), REFUSED)
def test_an_update_trained_with_less_privacy_than_the_policy_is_refused(
    privacy: PrivacySpend | None, num_samples: int, words: str
) -> None:
    """The verdict is privacy_policy with spend_error's reason; counted, remembered, not kept."""
    core = dp_core(max_num_samples=None)
    update = make_update(num_samples=num_samples).model_copy(update={"privacy": privacy})
    verdict = send(core, update)
    assert not verdict.accepted
    assert verdict.reason is RejectReason.PRIVACY_POLICY
    assert verdict.detail == spend_error(POLICY, privacy, num_samples)
    assert words in verdict.detail
    assert core.buffer == ()
    assert core.seen["u1"] == "privacy_policy"
    assert core.counters().rejections == {"privacy_policy": 1}
    entry = tally_of(core, "n1")
    assert entry.rejections == {"privacy_policy": 1}
    assert entry.epsilon is None  # a refused update's spend is not recorded


def test_an_update_within_the_policy_is_accepted() -> None:
    """More noise, a smaller budget and delta than asked are all within the policy."""
    core = dp_core()
    stricter = spend(noise_multiplier=2.0, epsilon_budget=2.0, delta=1e-6, epsilon=0.5)
    assert send(core, private(privacy=stricter)).accepted
    assert len(core.buffer) == 1


def test_a_calibrated_policy_admits_any_noise_within_the_budget() -> None:
    """Under calibrate_versions the node picks its noise; the budget is what is judged."""
    core = dp_core(PrivacyPolicy(calibrate_versions=20, epsilon_budget=3.0))
    assert send(core, private(privacy=spend(noise_multiplier=0.6))).accepted


def test_a_run_without_a_policy_takes_updates_with_or_without_a_spend() -> None:
    core = make_core()
    assert send(core, make_update("plain")).accepted
    assert send(core, private("dp")).accepted


# -- what is recorded


def test_contributions_say_at_what_epsilon_each_hospital_contributed() -> None:
    """The version record is the provenance: per hospital, its total epsilon once trained."""
    core = dp_core(buffer_size=2)
    send(core, private("a1", spend(epsilon=0.7)), node="a")
    send(core, private("b1", spend(epsilon=1.9, epsilon_budget=2.0)), node="b")
    fold = core.fold(now=1.0)
    assert isinstance(fold, Fold)
    epsilons = {c.node: c.epsilon for c in fold.record.contributions}
    assert epsilons == {"a": 0.7, "b": 1.9}


def test_a_contribution_without_dp_has_no_epsilon() -> None:
    core = make_core(buffer_size=1)
    send(core, make_update())
    fold = core.fold(now=1.0)
    assert isinstance(fold, Fold)
    assert [c.epsilon for c in fold.record.contributions] == [None]


def test_the_tally_shows_the_latest_epsilon_reported_by_update_or_status() -> None:
    """Accepted updates and the node's own statuses both carry its ledger; the latest wins."""
    core = dp_core()
    send(core, private("u1", spend(epsilon=0.4)))
    assert (tally_of(core, "n1").epsilon, tally_of(core, "n1").epsilon_budget) == (0.4, 3.0)
    core.record_privacy("n1", spend(epsilon=0.9, epsilon_budget=2.5))
    assert (tally_of(core, "n1").epsilon, tally_of(core, "n1").epsilon_budget) == (0.9, 2.5)
    send(core, private("u2", spend(epsilon=1.3, epsilon_budget=2.5), base_version=0), node="n1")
    assert tally_of(core, "n1").epsilon == 1.3


def test_a_status_without_privacy_changes_nothing() -> None:
    """No ledger reported: the last known epsilon stays, and no node is added to the tallies."""
    core = dp_core()
    core.record_privacy("quiet", None)
    assert core.node_tallies() == ()
    core.record_privacy("n1", spend(epsilon=0.5))
    core.record_privacy("n1", None)
    assert tally_of(core, "n1").epsilon == 0.5


def test_a_node_known_only_by_its_status_has_a_tally_with_its_epsilon() -> None:
    core = dp_core()
    core.record_privacy("h", spend(epsilon=2.9))
    (entry,) = core.node_tallies()
    assert (entry.node, entry.epsilon, entry.epsilon_budget, entry.accepted) == ("h", 2.9, 3.0, 0)


def test_a_checkpointed_core_keeps_the_nodes_epsilon() -> None:
    """The tallies are the checkpoint's: epsilon and budget come back with them."""
    core = dp_core()
    send(core, private("u1", spend(epsilon=1.1)))
    core.record_privacy("other", spend(epsilon=0.3, epsilon_budget=1.0))
    resumed = AggregatorCore(
        run_id=core.run_id,
        params=core.params,
        knobs=core.knobs,
        version=core.version,
        state=core.state,
        seen=core.seen,
        counters=core.counters(),
        nodes=core.node_tallies(),
    )
    assert resumed.node_tallies() == core.node_tallies()
    assert [(e.node, e.epsilon, e.epsilon_budget) for e in resumed.node_tallies()] == [
        ("n1", 1.1, 3.0),
        ("other", 0.3, 1.0),
    ]


def test_an_update_replayed_from_the_log_brings_back_its_epsilon() -> None:
    """Accepted after the last checkpoint: recovery counts it again, its spend too."""
    core = dp_core(buffer_size=1)
    core.restore_buffered("n1", private(privacy=spend(epsilon=2.2)), SIZE, now=1.0, count=True)
    assert tally_of(core, "n1").epsilon == 2.2
    fold = core.fold(now=2.0)
    assert isinstance(fold, Fold)
    assert [c.epsilon for c in fold.record.contributions] == [2.2]


# -- the policy set live


def test_a_stricter_policy_may_be_set_during_a_run() -> None:
    core = dp_core()
    knobs = core.set_knobs(
        {"privacy.epsilon_budget": 2.0, "privacy.noise_multiplier": 1.5, "privacy.delta": 1e-6}
    )
    assert knobs.privacy == PrivacyPolicy(noise_multiplier=1.5, delta=1e-6, epsilon_budget=2.0)
    assert core.knobs.privacy == knobs.privacy


def test_the_clipping_norm_may_change_it_does_not_change_the_guarantee() -> None:
    core = dp_core()
    assert core.set_knobs({"privacy.max_grad_norm": 5.0}).privacy == POLICY.model_copy(
        update={"max_grad_norm": 5.0}
    )


LAXER = [
    pytest.param({"privacy.epsilon_budget": 8.0}, id="larger-budget"),
    pytest.param({"privacy.noise_multiplier": 0.5}, id="less-noise"),
    pytest.param({"privacy.delta": 1e-4}, id="larger-delta"),
    pytest.param({"privacy.metrics": MetricRelease.EXACT.value}, id="exact-metrics"),
    pytest.param(
        {"privacy.noise_multiplier": None, "privacy.calibrate_versions": 50},
        id="fixed-noise-to-calibrated",
    ),
    pytest.param({"privacy": None}, id="turned-off"),
    pytest.param({"privacy.epsilon_budget": 8.0, "buffer_size": 5}, id="with-other-knobs"),
]


@pytest.mark.parametrize("patch", LAXER)
def test_a_laxer_policy_is_refused_and_changes_nothing(patch: dict[str, Any]) -> None:
    """The patients were promised the policy in force: the refusal says so; no knob moves."""
    core = dp_core()
    before = core.knobs
    with pytest.raises(ControlError, match="patients were promised"):
        core.set_knobs(patch)
    assert core.knobs == before


def test_a_run_without_dp_may_start_a_policy_field_by_field() -> None:
    core = make_core()
    knobs = core.set_knobs({"privacy.epsilon_budget": 4.0, "privacy.calibrate_versions": 30})
    assert knobs.privacy == PrivacyPolicy(calibrate_versions=30, epsilon_budget=4.0)
    assert make_core().set_knobs({"privacy": None}).privacy is None


@pytest.mark.parametrize(
    ("patch", "words"),
    [
        pytest.param({"privacy.epsilon": 1.0}, "unknown knob", id="unknown-field"),
        pytest.param({"privacy.epsilon_budget": -1.0}, "invalid knob value", id="bad-value"),
        pytest.param(
            {"privacy.noise_multiplier": 2.0}, "invalid knob value", id="incomplete-policy"
        ),
    ],
)
def test_a_privacy_patch_that_is_no_policy_is_refused(patch: dict[str, Any], words: str) -> None:
    core = make_core()
    with pytest.raises(ControlError, match=words):
        core.set_knobs(patch)
    assert core.knobs.privacy is None


def test_an_update_judged_after_a_stricter_policy_meets_the_new_one() -> None:
    """Set live, the stricter policy applies to the next update at once."""
    core = dp_core()
    core.set_knobs({"privacy.epsilon_budget": 1.0})
    verdict = send(core, private(privacy=spend(epsilon=0.5)))
    assert verdict.reason is RejectReason.PRIVACY_POLICY
    assert "budget 3 is above the run's 1" in verdict.detail


# -- when the budgets are spent


def spent(core: AggregatorCore, node: str, version: int | None = None) -> bool:
    """``node``'s status says BUDGET_SPENT at the current version (or ``version``)."""
    at = core.version if version is None else version
    return core.record_node_state(node, NodeState.BUDGET_SPENT, at)


def three_hospitals(**knobs: Any) -> AggregatorCore:
    """A DP run with K = 3 that knows hospitals a, b and c from one update each, folded."""
    core = dp_core(buffer_size=3, **knobs)
    for node in ("a", "b", "c"):
        send(core, private(f"{node}0"), node=node)
    assert isinstance(core.fold(now=1.0), Fold)
    return core


def test_a_partial_buffer_folds_when_the_last_other_hospital_spends_its_budget() -> None:
    """a's and b's updates were charged to their ledgers; once c, the only hospital that could
    fill the buffer, says BUDGET_SPENT, the two fold, weighted as a full buffer would be."""
    core = three_hospitals()
    send(core, private("a1", base_version=1, num_samples=10), node="a")
    send(core, private("b1", base_version=1, num_samples=30), node="b")
    assert core.fold_due(now=2.0) is None
    assert spent(core, "c")
    assert core.fold_due(now=2.0) == "budgets_spent"
    fold = core.fold(now=2.0)
    assert isinstance(fold, Fold)
    assert fold.record.reason == "budgets_spent"
    assert fold.folded_ids == ("a1", "b1")
    assert [c.weight for c in fold.record.contributions] == pytest.approx([0.25, 0.75])
    assert core.buffer == ()


def test_no_partial_fold_while_a_hospital_with_budget_remains() -> None:
    """One hospital still able to train (b), with budget left, is worth waiting for."""
    core = three_hospitals()
    send(core, private("a1", base_version=1), node="a")
    assert spent(core, "c")
    assert core.fold_due(now=2.0) is None
    assert spent(core, "b")
    assert core.fold_due(now=2.0) == "budgets_spent"
    # b restarted under a larger budget of its own (within the run's): worth waiting for again.
    assert core.record_node_state("b", NodeState.IDLE, core.version)
    assert core.fold_due(now=2.0) is None


def test_an_offline_hospital_with_budget_is_waited_for_and_an_offline_spent_one_is_not() -> None:
    """Going offline changes nothing: an offline node may come back with its budget (the buffer
    timeout is the knob for not waiting), and a spent one that leaves is still spent."""
    core = three_hospitals()
    send(core, private("a1", base_version=1), node="a")
    assert spent(core, "c")
    assert not core.record_node_state("b", NodeState.OFFLINE, None)
    assert core.fold_due(now=2.0) is None
    assert spent(core, "b")
    assert not core.record_node_state("b", NodeState.OFFLINE, None)
    assert core.fold_due(now=2.0) == "budgets_spent"


def test_a_quarantined_hospital_is_not_waited_for() -> None:
    """A quarantined node's updates are refused, so it cannot fill the buffer."""
    core = three_hospitals()
    send(core, private("a1", base_version=1), node="a")
    assert spent(core, "c")
    core.quarantine("b")
    assert core.fold_due(now=2.0) == "budgets_spent"


def test_without_a_spent_hospital_a_buffer_larger_than_the_federation_waits() -> None:
    """Every known node in the buffer, none spent: nodes may still be joining, so no fold."""
    core = dp_core(buffer_size=3)
    send(core, private("a0"), node="a")
    send(core, private("b0"), node="b")
    assert core.fold_due(now=2.0) is None


def test_a_spent_status_from_an_earlier_run_does_not_count() -> None:
    """The broker may retain a node's BUDGET_SPENT from a run that reached further; it names a
    version this run has not made, and is ignored."""
    core = three_hospitals()
    send(core, private("a1", base_version=1), node="a")
    assert not spent(core, "c", version=40)
    assert not spent(core, "new", version=40)
    assert core.fold_due(now=2.0) is None
    assert "new" not in [e.node for e in core.node_tallies()]


def test_the_status_says_when_every_hospital_is_spent() -> None:
    """The run's natural end under DP: every known hospital spent. The status says so; the run
    is not stopped here (the operator or the demo stops it, once the last evaluations are in)."""
    core = three_hospitals()
    send(core, private("a1", base_version=1), node="a")
    for node in ("b", "c"):
        assert spent(core, node)
    assert core.status(now=2.0).budgets_spent is False  # a has not said so yet
    assert spent(core, "a")
    status = core.status(now=2.0)
    assert status.budgets_spent is True
    assert [e.budget_spent for e in status.nodes] == [True, True, True]
    assert core.fold_due(now=2.0) == "budgets_spent"  # a1 still folds
    assert isinstance(core.fold(now=2.0), Fold)
    assert core.state is AggregatorState.RUNNING
    assert core.fold_due(now=3.0) is None


def test_a_quarantined_hospital_does_not_hold_up_the_end() -> None:
    """A quarantined node cannot train here, spent or not."""
    core = three_hospitals()
    spent(core, "a")
    spent(core, "b")
    core.quarantine("c")
    assert core.budgets_spent()


def test_a_run_without_privacy_never_says_budgets_spent() -> None:
    """No node says BUDGET_SPENT without a policy; IDLE statuses add no tally."""
    core = make_core(buffer_size=1)
    assert not core.record_node_state("n1", NodeState.IDLE, 0)
    assert core.node_tallies() == ()
    assert core.status(now=0.0).budgets_spent is False


def test_a_checkpointed_core_remembers_which_hospitals_are_spent() -> None:
    """The mark is in the tallies, which the checkpoint keeps."""
    core = three_hospitals()
    spent(core, "c")
    resumed = AggregatorCore(
        run_id=core.run_id,
        params=core.params,
        knobs=core.knobs,
        version=core.version,
        state=core.state,
        nodes=core.node_tallies(),
    )
    assert [e.budget_spent for e in resumed.node_tallies()] == [False, False, True]
