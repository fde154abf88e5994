"""The node session's two state machines, as enums and transition tables; an illegal step raises.

Work: what the node itself is doing. One job runs at a time, off the MQTT thread.

    WAITING_FOR_MODEL ──model──▶ READY ──evaluate──▶ EVALUATING ──job_done──▶ READY
            │                     │  ──train─────▶ TRAINING ────job_done──▶ READY
            │                     │
            └──run_over──▶ FINISHED ◀──run_over──┘
                             │──model──▶ READY
                             └──run_reopened──▶ WAITING_FOR_MODEL

A model that arrives during a job changes what comes next, never the running job (``model``
keeps EVALUATING and TRAINING as they are). FINISHED: the run is stopped and the last version it
announced is evaluated (or it never announced one); a later version, or another run going live
(whose model the node has yet to see), takes the node out of it. The run's own state is not a
phase of the node: it gates training (only a RUNNING run gets updates), and the status the node
publishes says PAUSED while the run is paused or stopped.

Delivery: each update, from the outbox until the aggregator answers it.

    QUEUED ──sent──▶ AWAITING_ACK ──sent (no ack within ack_timeout: resent)──▶ AWAITING_ACK
       ▲──────reconnected───┘
    QUEUED, AWAITING_ACK ──acked──▶ ACKED (forgotten)

QUEUED updates are sent at once: a new one, one found in the outbox at start, and every unacked
one after a reconnect (the broker may have lost it with the connection). The aggregator folds an
update id at most once, so a resend is always safe.

Gate: whether the node may train on a version at all, decided by the shell when the version
arrives and held by the session until the next one.

    OPEN           train as usual (no privacy policy, or one this node can meet within budget)
    REFUSED        the policy cannot be met here (delta not below 1/n, a model Opacus cannot
                   make private): the node never trains without privacy; its status says why
    BUDGET_SPENT   training on it would take the node's epsilon past its budget; the node
                   reports NodeState.BUDGET_SPENT and keeps evaluating every version

Every event here comes from the node's own shell, so an illegal one is our bug, never a peer's.
"""

from __future__ import annotations

from enum import StrEnum

from common.errors import HealthNetError

__all__ = [
    "Delivery",
    "DeliveryEvent",
    "Gate",
    "IllegalTransition",
    "Phase",
    "WorkEvent",
    "advance",
    "deliver",
]


class Phase(StrEnum):
    WAITING_FOR_MODEL = "waiting_for_model"
    READY = "ready"
    EVALUATING = "evaluating"
    TRAINING = "training"
    FINISHED = "finished"


class Gate(StrEnum):
    OPEN = "open"
    REFUSED = "refused"
    BUDGET_SPENT = "budget_spent"


class WorkEvent(StrEnum):
    MODEL = "model"
    EVALUATE = "evaluate"
    TRAIN = "train"
    JOB_DONE = "job_done"
    RUN_OVER = "run_over"
    RUN_REOPENED = "run_reopened"


class Delivery(StrEnum):
    QUEUED = "queued"
    AWAITING_ACK = "awaiting_ack"
    ACKED = "acked"


class DeliveryEvent(StrEnum):
    SENT = "sent"
    RECONNECTED = "reconnected"
    ACKED = "acked"


_WORK: dict[tuple[Phase, WorkEvent], Phase] = {
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

_DELIVERY: dict[tuple[Delivery, DeliveryEvent], Delivery] = {
    (Delivery.QUEUED, DeliveryEvent.SENT): Delivery.AWAITING_ACK,
    (Delivery.QUEUED, DeliveryEvent.RECONNECTED): Delivery.QUEUED,
    (Delivery.QUEUED, DeliveryEvent.ACKED): Delivery.ACKED,
    (Delivery.AWAITING_ACK, DeliveryEvent.SENT): Delivery.AWAITING_ACK,
    (Delivery.AWAITING_ACK, DeliveryEvent.RECONNECTED): Delivery.QUEUED,
    (Delivery.AWAITING_ACK, DeliveryEvent.ACKED): Delivery.ACKED,
}


class IllegalTransition(HealthNetError):
    """The node's shell asked the session for a step its state does not allow (our bug)."""


def advance(phase: Phase, event: WorkEvent) -> Phase:
    """The work phase after ``event``; raises IllegalTransition when the table has no such pair."""
    try:
        return _WORK[(phase, event)]
    except KeyError:
        raise IllegalTransition(f"cannot {event.value} while {phase.value}") from None


def deliver(delivery: Delivery, event: DeliveryEvent) -> Delivery:
    """An update's delivery state after ``event``; raises IllegalTransition likewise."""
    try:
        return _DELIVERY[(delivery, event)]
    except KeyError:
        raise IllegalTransition(f"an update {delivery.value} cannot be {event.value}") from None
