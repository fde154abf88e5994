"""What every benchmark writes beside its figures: the machine, the git revision, a JSON file."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["CLOCKS", "best_of", "machine", "number", "rounds_of", "write_report"]


def machine() -> dict[str, object]:
    """Cores, CPU model, Python version and the git revision these figures were measured at."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        revision = subprocess.run(
            ["git", "rev-parse", "HEAD"],  # noqa: S607 - whichever git is on PATH, read-only
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        revision = "unknown"
    try:
        load = list(os.getloadavg())
    except OSError:
        load = []
    return {"cores": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "git_revision": revision, "load_average": load,
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip


def number(value: object) -> float:
    """A number read back from a benchmark's JSON-shaped row (``dict[str, object]``), checked."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {value!r}")
    return value


def write_report(path: Path, report: dict[str, object]) -> None:
    """Write ``report`` with the machine added, atomically (a partial run leaves a whole file)."""
    text = json.dumps({**report, "machine": machine()}, indent=2) + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def best_of(
    repeats: int, *actions: Callable[[], None], setup: Callable[[], None] | None = None
) -> dict[str, list[float]]:
    """Per clock, the best time of each action over ``repeats`` alternating rounds.

    ``setup`` runs untimed before each round. Process CPU time leaves out the slices other
    processes take on a shared machine, which inflate a long operation more than a short one;
    wall time is reported beside it.
    """
    best = {clock: [math.inf] * len(actions) for clock in CLOCKS}
    for _ in range(repeats):
        if setup is not None:
            setup()
        for i, action in enumerate(actions):
            starts = {clock: read() for clock, read in CLOCKS.items()}
            action()
            for clock, read in CLOCKS.items():
                best[clock][i] = min(best[clock][i], read() - starts[clock])
    return best


def rounds_of(
    repeats: int,
    *actions: Callable[[], None],
    setup: Callable[[], None] | None = None,
    warmup: int = 0,
) -> dict[str, list[list[float]]]:
    """Per clock, each round's time of each action (``[round][action]``), over ``repeats``
    rounds in which the actions alternate, after ``warmup`` untimed rounds.

    ``setup`` runs untimed before each round. A ratio of two actions taken round by round
    compares them under the same load, which a shared machine changes from second to second.
    """
    times: dict[str, list[list[float]]] = {clock: [] for clock in CLOCKS}
    for round_ in range(warmup + repeats):
        if setup is not None:
            setup()
        spent = {clock: [0.0] * len(actions) for clock in CLOCKS}
        for i, action in enumerate(actions):
            starts = {clock: read() for clock, read in CLOCKS.items()}
            action()
            for clock, read in CLOCKS.items():
                spent[clock][i] = read() - starts[clock]
        if round_ >= warmup:
            for clock in CLOCKS:
                times[clock].append(spent[clock])
    return times
