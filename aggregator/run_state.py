"""The run's lifecycle: an enum and its transition table; an illegal command changes nothing.

    IDLE ──start──▶ RUNNING ──pause──▶ PAUSED
      │               │  ▲──resume──────┘ │
      └────stop───────┴──stop─────────────┴──▶ STOPPED (terminal)

RUNNING folds updates into versions. PAUSED still accepts and buffers updates (work in flight is
never thrown away) but publishes no version. STOPPED rejects updates; a new run needs a new state
directory or run id.
"""

from __future__ import annotations

from common.errors import ControlError
from common.messages import AggregatorState, ControlCommand

__all__ = ["IllegalTransition", "transition"]

_TABLE: dict[tuple[AggregatorState, ControlCommand], AggregatorState] = {
    (AggregatorState.IDLE, ControlCommand.START): AggregatorState.RUNNING,
    (AggregatorState.IDLE, ControlCommand.STOP): AggregatorState.STOPPED,
    (AggregatorState.RUNNING, ControlCommand.PAUSE): AggregatorState.PAUSED,
    (AggregatorState.RUNNING, ControlCommand.STOP): AggregatorState.STOPPED,
    (AggregatorState.PAUSED, ControlCommand.RESUME): AggregatorState.RUNNING,
    (AggregatorState.PAUSED, ControlCommand.STOP): AggregatorState.STOPPED,
}


class IllegalTransition(ControlError):
    """The command is not allowed in the current state."""


def transition(state: AggregatorState, command: ControlCommand) -> AggregatorState:
    try:
        return _TABLE[(state, command)]
    except KeyError:
        allowed = sorted(c.value for (s, c) in _TABLE if s is state)
        raise IllegalTransition(
            f"cannot {command.value} a run that is {state.value}"
            + (f" (allowed: {', '.join(allowed)})" if allowed else "")
        ) from None
