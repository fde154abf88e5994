"""Specification of the node's session: what to evaluate, train and send next, without I/O."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from common.messages import AggregatorState, Manifest, ModelSpec, NodeState, TrainingConfig
from edge_node.session import Job, JobKind, NodeSession
from edge_node.session_state import (
    Delivery,
    DeliveryEvent,
    Gate,
    IllegalTransition,
    Phase,
    WorkEvent,
    advance,
    deliver,
)

PARAMS = {"w": np.zeros((2, 2), dtype=np.float32)}
ACK_TIMEOUT = 60.0
RUNNING, PAUSED, STOPPED, IDLE = (
    AggregatorState.RUNNING,
    AggregatorState.PAUSED,
    AggregatorState.STOPPED,
    AggregatorState.IDLE,
)


def manifest(version: int, run_id: str = "run-a") -> Manifest:
    return Manifest(
        run_id=run_id,
        version=version,
        sha256="0" * 64,
        blob_bytes=10,
        chunk_size=10,
        chunk_count=1,
        model=ModelSpec(name="logreg", kwargs={"in_features": 2}),
        training=TrainingConfig(),
        created_at=0.0,
    )


def session_with(
    version: int | None = 1, state: AggregatorState | None = RUNNING, run_id: str = "run-a"
) -> NodeSession:
    """A session that has seen the given model version and aggregator state."""
    session = NodeSession(ack_timeout=ACK_TIMEOUT)
    if state is not None:
        session.on_status(state, run_id)
    if version is not None:
        session.on_model(manifest(version, run_id), PARAMS)
    return session


def run(session: NodeSession) -> Job | None:
    """Start the next job and finish it at once; return it (None when there is none)."""
    job = session.next_job()
    if job is not None:
        session.job_done(job)
    return job


def run_all(session: NodeSession) -> list[tuple[JobKind, int]]:
    """Run jobs until none is due; return (kind, version) of each."""
    done = []
    while (job := run(session)) is not None:
        done.append((job.kind, job.manifest.version))
        assert len(done) < 10, "the session never runs out of jobs"
    return done


def test_nothing_is_due_before_a_model_arrives() -> None:
    """Without a model there is nothing to evaluate or train, whatever the aggregator says."""
    assert session_with(version=None).next_job() is None
    assert NodeSession(ack_timeout=ACK_TIMEOUT).next_job() is None


def test_a_new_version_is_evaluated_then_trained_once_while_running() -> None:
    """A running node evaluates a new version, trains on it once, then waits."""
    session = session_with(version=1)
    assert run_all(session) == [(JobKind.EVALUATE, 1), (JobKind.TRAIN, 1)]
    assert session.next_job() is None


def test_the_job_carries_the_model_it_is_about() -> None:
    """A job names the manifest and params it must work on."""
    job = session_with(version=4).next_job()
    assert job is not None
    assert (job.manifest.version, job.params) == (4, PARAMS)


def test_every_new_version_is_evaluated_and_trained_on() -> None:
    """Each new version gets one evaluation and one training, never more."""
    session = session_with(version=1)
    run_all(session)
    session.on_model(manifest(2), PARAMS)
    assert sorted(run_all(session)) == [(JobKind.EVALUATE, 2), (JobKind.TRAIN, 2)]
    session.on_model(manifest(2), PARAMS)  # the same version announced again
    assert session.next_job() is None


def test_when_both_are_due_evaluation_and_training_alternate() -> None:
    """Versions arriving during jobs never starve either kind: the kinds alternate."""
    session = session_with(version=1)
    kinds = []
    for version in range(2, 8):
        job = session.next_job()
        assert job is not None
        session.on_model(manifest(version), PARAMS)  # a newer version lands mid-job
        session.job_done(job)
        kinds.append(job.kind)
    assert kinds == [JobKind.EVALUATE, JobKind.TRAIN] * 3


def test_no_job_starts_while_one_is_running() -> None:
    """next_job() returns None while busy, and resumes after job_done."""
    session = session_with(version=1)
    first = session.next_job()
    assert first is not None
    assert session.busy is first.kind
    assert session.next_job() is None
    session.on_model(manifest(2), PARAMS)
    assert session.next_job() is None
    session.job_done(first)
    assert session.busy is None
    assert session.next_job() is not None


def test_a_job_is_not_repeated_for_the_same_version() -> None:
    """Once a job of a version is done (or failed and skipped), it is not due again."""
    session = session_with(version=1)
    job = session.next_job()
    assert job is not None
    session.job_done(job)
    again = session.next_job()
    assert again is None or again.kind is not job.kind


@pytest.mark.parametrize(
    "state",
    [
        pytest.param(PAUSED, id="paused"),
        pytest.param(STOPPED, id="stopped"),
        pytest.param(IDLE, id="idle"),
        pytest.param(None, id="no-status-yet"),
    ],
)
def test_only_a_running_aggregator_gets_training_but_evaluation_goes_on(
    state: AggregatorState | None,
) -> None:
    """Paused, stopped, idle or unknown: new versions are evaluated but never trained on."""
    session = session_with(version=1, state=state)
    assert run_all(session) == [(JobKind.EVALUATE, 1)]


def test_training_resumes_when_the_run_resumes() -> None:
    """A version seen while paused is trained on once the aggregator is running again."""
    session = session_with(version=1, state=PAUSED)
    run_all(session)
    session.on_status(RUNNING, "run-a")
    assert run_all(session) == [(JobKind.TRAIN, 1)]


def test_no_training_on_a_model_of_another_run() -> None:
    """A manifest of a run other than the running one is evaluated, not trained on."""
    session = session_with(version=1, run_id="run-a")
    session.on_status(RUNNING, "run-b")
    assert run_all(session) == [(JobKind.EVALUATE, 1)]


def test_a_new_run_with_the_same_version_number_is_worked_on_again() -> None:
    """Jobs are per (run, version): run-b's v1 is evaluated and trained even after run-a's v1."""
    session = session_with(version=1, run_id="run-a")
    run_all(session)
    session.on_status(RUNNING, "run-b")
    session.on_model(manifest(1, "run-b"), PARAMS)
    assert sorted(run_all(session)) == [(JobKind.EVALUATE, 1), (JobKind.TRAIN, 1)]


@pytest.mark.parametrize(
    ("state", "busy", "expected"),
    [
        pytest.param(RUNNING, None, NodeState.IDLE, id="running-idle"),
        pytest.param(RUNNING, JobKind.TRAIN, NodeState.TRAINING, id="running-training"),
        pytest.param(RUNNING, JobKind.EVALUATE, NodeState.IDLE, id="running-evaluating"),
        pytest.param(PAUSED, None, NodeState.PAUSED, id="paused"),
        pytest.param(STOPPED, None, NodeState.PAUSED, id="stopped"),
        pytest.param(PAUSED, JobKind.EVALUATE, NodeState.PAUSED, id="paused-evaluating"),
        pytest.param(IDLE, None, NodeState.IDLE, id="aggregator-idle"),
        pytest.param(None, None, NodeState.IDLE, id="no-status"),
    ],
)
def test_node_state_reports_training_paused_or_idle(
    state: AggregatorState | None, busy: JobKind | None, expected: NodeState
) -> None:
    """TRAINING while a training job runs, PAUSED while the run is paused or stopped, else IDLE."""
    session = session_with(version=1, state=state)
    if busy is JobKind.EVALUATE:
        assert session.next_job() is not None
    if busy is JobKind.TRAIN:
        run(session)  # the evaluation comes first
        job = session.next_job()
        assert job is not None
        assert job.kind is JobKind.TRAIN
    assert session.busy is busy
    assert session.node_state() is expected


def test_the_version_is_that_of_the_latest_model() -> None:
    """version is None before any model, then the latest manifest's version."""
    session = NodeSession(ack_timeout=ACK_TIMEOUT)
    assert session.version is None
    session.on_model(manifest(3), PARAMS)
    assert session.version == 3


def test_finished_once_stopped_and_the_last_version_is_evaluated() -> None:
    """finished() turns true only when the run is stopped and its last version was evaluated."""
    session = session_with(version=2, state=RUNNING)
    assert not session.finished()
    session.on_status(STOPPED, "run-a")
    assert not session.finished()
    job = session.next_job()
    assert job is not None
    assert job.kind is JobKind.EVALUATE
    assert not session.finished()  # still busy evaluating
    session.job_done(job)
    assert session.finished()


def test_not_finished_while_running_or_paused_even_when_all_is_done() -> None:
    """A run that is not stopped is never finished."""
    for state in (RUNNING, PAUSED, IDLE):
        session = session_with(version=1, state=state)
        run_all(session)
        assert not session.finished(), state


def test_a_stopped_run_without_any_model_is_finished() -> None:
    """With no model ever announced there is nothing left to evaluate."""
    assert session_with(version=None, state=STOPPED).finished()


def test_a_stopped_run_whose_model_is_not_yet_seen_is_not_finished() -> None:
    """Stopped run-b while the node still holds run-a's model: wait for run-b's manifest."""
    session = session_with(version=1, run_id="run-a")
    run_all(session)
    session.on_status(STOPPED, "run-b")
    assert not session.finished()
    session.on_model(manifest(5, "run-b"), PARAMS)
    assert not session.finished()
    assert run_all(session) == [(JobKind.EVALUATE, 5)]
    assert session.finished()


def test_a_newer_version_after_the_stop_must_be_evaluated_before_finishing() -> None:
    """The last version announced, not an earlier one, must be evaluated."""
    session = session_with(version=1, state=STOPPED)
    run_all(session)
    assert session.finished()
    session.on_model(manifest(2), PARAMS)
    assert not session.finished()
    run_all(session)
    assert session.finished()


def test_a_version_marked_trained_before_a_restart_is_not_trained_again() -> None:
    """mark_trained (from the sent log) stops a restarted node from training that version again."""
    session = NodeSession(ack_timeout=ACK_TIMEOUT)
    session.mark_trained("run-a", 3)
    session.on_status(RUNNING, "run-a")
    session.on_model(manifest(3), PARAMS)
    assert run_all(session) == [(JobKind.EVALUATE, 3)]
    session.on_model(manifest(4), PARAMS)
    assert sorted(run_all(session)) == [(JobKind.EVALUATE, 4), (JobKind.TRAIN, 4)]


def test_an_unusable_version_is_reported_until_the_next_one_and_not_trained_on() -> None:
    """An evaluation that finds v1 unusable: the reason is the session's failure, training on v1
    is skipped, and v2 clears the failure and is worked on as usual."""
    session = session_with(1)
    job = session.next_job()
    assert job is not None
    assert job.kind is JobKind.EVALUATE
    session.job_failed(job, "outputs are not finite")
    assert session.failure == "outputs are not finite"
    assert session.next_job() is None
    session.on_model(manifest(2), PARAMS)
    assert session.failure == ""
    assert sorted(run_all(session)) == [(JobKind.EVALUATE, 2), (JobKind.TRAIN, 2)]


def test_a_failed_training_still_lets_the_version_be_evaluated() -> None:
    """Training that finds the version unusable leaves its evaluation due, which reports it too."""
    session = session_with(1)
    session.on_model(manifest(1), PARAMS)
    first = session.next_job()
    assert first is not None
    session.job_done(first)
    second = session.next_job()
    assert second is not None
    session.job_failed(second, "training loss is nan")
    assert session.failure == "training loss is nan"
    assert run_all(session) == []
    assert {first.kind, second.kind} == {JobKind.EVALUATE, JobKind.TRAIN}


# -- the phases, through the table


def test_the_phase_follows_the_work() -> None:
    """Waiting for a model, ready, evaluating, ready, training, ready: one job at a time."""
    session = NodeSession(ack_timeout=ACK_TIMEOUT)
    session.on_status(RUNNING, "run-a")
    assert session.phase is Phase.WAITING_FOR_MODEL
    session.on_model(manifest(1), PARAMS)
    assert session.phase is Phase.READY
    phases = []
    while (job := session.next_job()) is not None:
        phases.append(session.phase)
        session.on_model(manifest(1), PARAMS)  # a model mid-job does not end the job
        phases.append(session.phase)
        session.job_done(job)
    assert phases == [Phase.EVALUATING] * 2 + [Phase.TRAINING] * 2
    assert session.phase is Phase.READY


def test_the_phase_is_finished_once_the_run_is_over_and_leaves_it_for_another_run() -> None:
    """FINISHED after the stopped run's last version is evaluated; another run's live status
    makes the node wait for that run's model."""
    session = session_with(version=1, state=STOPPED)
    run_all(session)
    assert session.phase is Phase.FINISHED
    session.on_status(RUNNING, "run-b")
    assert (session.phase, session.finished()) == (Phase.WAITING_FOR_MODEL, False)
    assert session.next_job() is None
    session.on_model(manifest(1, "run-b"), PARAMS)
    assert sorted(run_all(session)) == [(JobKind.EVALUATE, 1), (JobKind.TRAIN, 1)]


def test_a_job_done_with_no_job_running_is_refused() -> None:
    """Ending a job that never started is the shell's bug: it raises and changes nothing."""
    session = session_with(version=1)
    job = session.next_job()
    assert job is not None
    session.job_done(job)
    with pytest.raises(IllegalTransition, match="cannot job_done while ready"):
        session.job_done(job)
    assert session.phase is Phase.READY


WORK = {
    (Phase.WAITING_FOR_MODEL, WorkEvent.MODEL): Phase.READY,
    (Phase.WAITING_FOR_MODEL, WorkEvent.RUN_OVER): Phase.FINISHED,
    (Phase.READY, WorkEvent.MODEL): Phase.READY,
    (Phase.READY, WorkEvent.EVALUATE): Phase.EVALUATING,
    (Phase.READY, WorkEvent.TRAIN): Phase.TRAINING,
    (Phase.READY, WorkEvent.RUN_OVER): Phase.FINISHED,
    (Phase.EVALUATING, WorkEvent.MODEL): Phase.EVALUATING,
    (Phase.EVALUATING, WorkEvent.JOB_DONE): Phase.READY,
    (Phase.TRAINING, WorkEvent.MODEL): Phase.TRAINING,
    (Phase.TRAINING, WorkEvent.JOB_DONE): Phase.READY,
    (Phase.FINISHED, WorkEvent.MODEL): Phase.READY,
    (Phase.FINISHED, WorkEvent.RUN_REOPENED): Phase.WAITING_FOR_MODEL,
}


@pytest.mark.parametrize(
    ("phase", "event"),
    [
        pytest.param(phase, event, id=f"{phase.value}-{event.value}")
        for phase, event in itertools.product(Phase, WorkEvent)
    ],
)
def test_the_work_table_is_exactly_this(phase: Phase, event: WorkEvent) -> None:
    """Each pair in WORK leads to its one next phase; every other pair raises."""
    if (phase, event) in WORK:
        assert advance(phase, event) is WORK[(phase, event)]
    else:
        with pytest.raises(IllegalTransition, match=f"^cannot {event.value} while {phase.value}$"):
            advance(phase, event)


# -- the outbox: what to send, and when


def test_a_queued_update_is_due_at_once_then_again_only_after_ack_timeout() -> None:
    """Queued: due now. Sent: not due until ack_timeout has passed since, then due again."""
    session = NodeSession(ack_timeout=10.0)
    session.queue("u1")
    assert session.sends_due(now=100.0) == ("u1",)
    session.sent("u1", now=100.0)
    assert session.delivery("u1") is Delivery.AWAITING_ACK
    assert session.sends_due(now=109.9) == ()
    assert session.sends_due(now=110.0) == ("u1",)
    session.sent("u1", now=110.0)
    assert session.sends_due(now=115.0) == ()


def test_a_reconnect_makes_every_unacked_update_due() -> None:
    """The broker may have lost what was sent with the connection: all is sent again."""
    session = NodeSession(ack_timeout=ACK_TIMEOUT)
    for update_id in ("u1", "u2"):
        session.queue(update_id)
        session.sent(update_id, now=0.0)
    session.queue("u3")
    session.reconnected()
    assert session.sends_due(now=1.0) == ("u1", "u2", "u3")
    assert {session.delivery(u) for u in ("u1", "u2", "u3")} == {Delivery.QUEUED}


def test_an_ack_ends_the_delivery_and_a_second_is_told_apart() -> None:
    """acked() is True once, for an update the outbox held; after it the update is never due."""
    session = NodeSession(ack_timeout=1.0)
    session.queue("u1")
    session.queue("u2")
    session.sent("u1", now=0.0)
    assert session.acked("u1")
    assert not session.acked("u1")
    assert not session.acked("never-sent")
    assert session.acked("u2")  # an ack may race a queued update's first send
    assert (session.unacked, session.sends_due(now=99.0)) == ((), ())
    assert session.delivery("u1") is None


def test_sending_an_update_that_is_not_in_the_outbox_is_refused() -> None:
    """Only a queued update can be sent: anything else is the shell's bug."""
    session = NodeSession(ack_timeout=ACK_TIMEOUT)
    with pytest.raises(IllegalTransition, match="not in the outbox"):
        session.sent("u1", now=0.0)


DELIVERY = {
    (Delivery.QUEUED, DeliveryEvent.SENT): Delivery.AWAITING_ACK,
    (Delivery.QUEUED, DeliveryEvent.RECONNECTED): Delivery.QUEUED,
    (Delivery.QUEUED, DeliveryEvent.ACKED): Delivery.ACKED,
    (Delivery.AWAITING_ACK, DeliveryEvent.SENT): Delivery.AWAITING_ACK,
    (Delivery.AWAITING_ACK, DeliveryEvent.RECONNECTED): Delivery.QUEUED,
    (Delivery.AWAITING_ACK, DeliveryEvent.ACKED): Delivery.ACKED,
}


@pytest.mark.parametrize(
    ("delivery", "event"),
    [
        pytest.param(delivery, event, id=f"{delivery.value}-{event.value}")
        for delivery, event in itertools.product(Delivery, DeliveryEvent)
    ],
)
def test_the_delivery_table_is_exactly_this(delivery: Delivery, event: DeliveryEvent) -> None:
    """Each pair in DELIVERY leads to its one next state; an acked update takes no event."""
    if (delivery, event) in DELIVERY:
        assert deliver(delivery, event) is DELIVERY[(delivery, event)]
    else:
        with pytest.raises(IllegalTransition, match=delivery.value):
            deliver(delivery, event)


# -- the privacy gate


def test_a_version_past_the_budget_is_evaluated_and_not_trained() -> None:
    """BUDGET_SPENT: the node evaluates every version, trains on none, and its status says so."""
    session = session_with(1)
    session.close_gate("run-a", 1, Gate.BUDGET_SPENT, "privacy budget spent")
    assert session.node_state() is NodeState.BUDGET_SPENT
    assert session.gate is Gate.BUDGET_SPENT
    job = run(session)
    assert job is not None
    assert job.kind is JobKind.EVALUATE
    assert run(session) is None
    assert session.failure == ""  # the state says it; nothing about the version failed


def test_a_refused_version_says_why_in_the_failure_and_is_not_trained() -> None:
    """REFUSED (delta too large, a model Opacus cannot protect): the reason is the failure."""
    session = session_with(1)
    session.close_gate("run-a", 1, Gate.REFUSED, "delta 0.1 is not below 1/n")
    assert session.failure == "delta 0.1 is not below 1/n"
    assert session.node_state() is NodeState.IDLE
    kinds = [job.kind for job in iter(lambda: run(session), None)]
    assert kinds == [JobKind.EVALUATE]


def test_the_gate_holds_for_its_version_only() -> None:
    """A new version is judged afresh (a new run's larger budget may reopen training)."""
    session = session_with(1)
    session.close_gate("run-a", 1, Gate.BUDGET_SPENT, "spent")
    session.on_model(manifest(2), PARAMS)
    assert session.gate is Gate.OPEN
    assert session.node_state() is NodeState.IDLE
    job = session.next_job()
    assert job is not None


def test_closing_the_gate_open_is_refused() -> None:
    session = session_with(1)
    with pytest.raises(IllegalTransition):
        session.close_gate("run-a", 1, Gate.OPEN, "")
