"""The run's lifecycle: an enum and its transition table; an illegal event changes nothing.

    IDLE ──start──▶ RUNNING ──pause──▶ PAUSED
      │               │  ▲──resume──────┘ │
      │               └──finish──┐        │
      └────stop───────┴──stop────┴────────┴──▶ STOPPED (terminal)

RUNNING folds updates into versions. PAUSED still accepts and buffers updates (work in flight is
never thrown away) but publishes no version. STOPPED rejects updates; a new run needs a new state
directory or run id.

Every change of state goes through :func:`transition`: the operator's commands (start, pause,
resume, stop) and the core's own event, ``finish``, when a fold makes version ``max_versions``
(folds happen only while RUNNING). Refusals list only the commands an operator may send.
"""

from __future__ import annotations

from enum import StrEnum

from common.errors import ControlError
from common.messages import AggregatorState, ControlCommand

__all__ = ["IllegalTransition", "RunEvent", "transition"]


class RunEvent(StrEnum):
    """What the core itself does to the run, beside the operator's commands."""

    # The fold that made version ``max_versions``: the run is over.
    MAX_VERSIONS_REACHED = "finish"


_TABLE: dict[tuple[AggregatorState, ControlCommand | RunEvent], AggregatorState] = {
    (AggregatorState.IDLE, ControlCommand.START): AggregatorState.RUNNING,
    (AggregatorState.IDLE, ControlCommand.STOP): AggregatorState.STOPPED,
    (AggregatorState.RUNNING, ControlCommand.PAUSE): AggregatorState.PAUSED,
    (AggregatorState.RUNNING, ControlCommand.STOP): AggregatorState.STOPPED,
    (AggregatorState.RUNNING, RunEvent.MAX_VERSIONS_REACHED): AggregatorState.STOPPED,
    (AggregatorState.PAUSED, ControlCommand.RESUME): AggregatorState.RUNNING,
    (AggregatorState.PAUSED, ControlCommand.STOP): AggregatorState.STOPPED,
}


class IllegalTransition(ControlError):
    """The command or event is not allowed in the current state."""


def transition(state: AggregatorState, event: ControlCommand | RunEvent) -> AggregatorState:
    """The state after ``event``; raises IllegalTransition when the table has no such pair."""
    try:
        return _TABLE[(state, event)]
    except KeyError:
        allowed = sorted(
            c.value for (s, c) in _TABLE if s is state and isinstance(c, ControlCommand)
        )
        raise IllegalTransition(
            f"cannot {event.value} a run that is {state.value}"
            + (f" (allowed: {', '.join(allowed)})" if allowed else "")
        ) from None
