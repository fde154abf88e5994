"""Specification of the run's lifecycle: the whole transition table, and nothing outside it."""

from __future__ import annotations

import itertools

import pytest

from aggregator.run_state import IllegalTransition, RunEvent, transition
from common.errors import ControlError
from common.messages import AggregatorState, ControlCommand

IDLE, RUNNING, PAUSED, STOPPED = (
    AggregatorState.IDLE,
    AggregatorState.RUNNING,
    AggregatorState.PAUSED,
    AggregatorState.STOPPED,
)
START, PAUSE, RESUME, STOP = (
    ControlCommand.START,
    ControlCommand.PAUSE,
    ControlCommand.RESUME,
    ControlCommand.STOP,
)
FINISH = RunEvent.MAX_VERSIONS_REACHED

LEGAL = {
    (IDLE, START): RUNNING,
    (IDLE, STOP): STOPPED,
    (RUNNING, PAUSE): PAUSED,
    (RUNNING, STOP): STOPPED,
    (RUNNING, FINISH): STOPPED,
    (PAUSED, RESUME): RUNNING,
    (PAUSED, STOP): STOPPED,
}

EVENTS: list[ControlCommand | RunEvent] = [*ControlCommand, *RunEvent]
ILLEGAL = [pair for pair in itertools.product(AggregatorState, EVENTS) if pair not in LEGAL]


@pytest.mark.parametrize(
    ("state", "command", "expected"),
    [
        pytest.param(state, command, after, id=f"{state.value}-{command.value}")
        for (state, command), after in LEGAL.items()
    ],
)
def test_legal_transition(
    state: AggregatorState, command: ControlCommand | RunEvent, expected: AggregatorState
) -> None:
    """Each legal (state, command) pair leads to exactly one next state."""
    assert transition(state, command) is expected


@pytest.mark.parametrize(
    ("state", "command"),
    [
        pytest.param(state, command, id=f"{state.value}-{command.value}")
        for state, command in ILLEGAL
    ],
)
def test_illegal_transition_raises_naming_the_state(
    state: AggregatorState, command: ControlCommand | RunEvent
) -> None:
    """Any other pair raises IllegalTransition, a ControlError whose message names the state."""
    with pytest.raises(IllegalTransition, match=state.value) as caught:
        transition(state, command)
    assert isinstance(caught.value, ControlError)
    assert command.value in str(caught.value)


@pytest.mark.parametrize("command", [pytest.param(command, id=command.value) for command in EVENTS])
def test_stopped_is_terminal(command: ControlCommand | RunEvent) -> None:
    """No command or event at all leaves STOPPED."""
    with pytest.raises(IllegalTransition, match=f"^cannot {command.value} a run that is stopped$"):
        transition(STOPPED, command)


def test_set_and_status_are_never_transitions() -> None:
    """SET and STATUS change knobs or read state: no state accepts them as a transition."""
    for state in AggregatorState:
        for command in (ControlCommand.SET, ControlCommand.STATUS):
            with pytest.raises(
                IllegalTransition, match=f"^cannot {command.value} a run that is {state.value}"
            ):
                transition(state, command)


@pytest.mark.parametrize(
    ("state", "allowed"),
    [
        pytest.param(IDLE, ("start", "stop"), id="idle"),
        pytest.param(RUNNING, ("pause", "stop"), id="running"),
        pytest.param(PAUSED, ("resume", "stop"), id="paused"),
    ],
)
def test_refusal_lists_the_allowed_commands(
    state: AggregatorState, allowed: tuple[str, ...]
) -> None:
    """The message of a refusal tells the operator what the state does allow."""
    with pytest.raises(IllegalTransition, match=f"allowed: {', '.join(allowed)}"):
        transition(state, ControlCommand.SET)


def test_reaching_max_versions_finishes_only_a_running_run() -> None:
    """The core's own event stops a running run; folds happen only while running, so an idle or
    paused run refuses it and stays as it was."""
    assert transition(RUNNING, FINISH) is STOPPED
    for state in (IDLE, PAUSED):
        with pytest.raises(IllegalTransition, match=f"^cannot finish a run that is {state.value}"):
            transition(state, FINISH)


def test_the_core_event_is_never_offered_to_the_operator() -> None:
    """A refusal lists what an operator may send: a running run allows pause and stop, not the
    core's own finish."""
    with pytest.raises(IllegalTransition, match=r"\(allowed: pause, stop\)$"):
        transition(RUNNING, ControlCommand.RESUME)
