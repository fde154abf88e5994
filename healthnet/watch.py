"""``healthnet watch``: the dashboard's picture in the terminal, redrawn live with rich."""

from __future__ import annotations

import threading

from rich.console import Console, Group, JustifyMethod, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from common.settings import ConnectionSettings
from healthnet.feed import FederationFeed
from healthnet.observe import NodeRow, Snapshot

__all__ = ["render", "sparkline", "watch"]

_BARS = " ▁▂▃▄▅▆▇█"
_STATE_STYLE = {
    "running": "green",
    "training": "cyan",
    "idle": "yellow",
    "paused": "yellow",
    "stopped": "red",
    "offline": "red",
    "budget_spent": "magenta",
}


def sparkline(values: list[float | None], low: float = 0.0, high: float = 1.0) -> str:
    """One character per value, its height scaled between ``low`` and ``high``; gaps as spaces."""
    span = high - low or 1.0
    chars = []
    for value in values:
        if value is None:
            chars.append(" ")
            continue
        level = round((min(max(value, low), high) - low) / span * (len(_BARS) - 2)) + 1
        chars.append(_BARS[level])
    return "".join(chars)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 90:
        return f"{seconds:.0f}s"
    return f"{seconds / 60:.0f}m" if seconds < 5400 else f"{seconds / 3600:.1f}h"


def _bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def _personal(accuracy: float | None) -> str:
    return "-" if accuracy is None else f"{accuracy:.3f}"


def _epsilon(row: NodeRow) -> Text:
    """``1.23/3``: the epsilon a hospital spent of its budget; red once it is spent."""
    if row.epsilon is None:
        return Text("-")
    if row.epsilon_budget is None:
        return Text(f"{row.epsilon:.2f}")
    spent = row.epsilon >= row.epsilon_budget or row.state == "budget_spent"
    return Text(f"{row.epsilon:.2f}/{row.epsilon_budget:g}", style="red" if spent else "")


def render(snapshot: Snapshot, *, width: int = 40) -> RenderableType:
    """The whole picture: headline, hospitals with accuracy sparklines, staleness and knobs."""
    s = snapshot
    state = s.state or "no status yet"
    age = "" if s.status_age_seconds is None else f"  status {_age(s.status_age_seconds)} old"
    head = Text.assemble(
        ("federation ", "dim"),
        (s.federation, "bold"),
        ("  run ", "dim"),
        (s.run_id or "-", "bold"),
        "  ",
        (state, _STATE_STYLE.get(state, "")),
        (age, "dim"),
        ("" if s.connected else "  (broker lost)", "red"),
    )
    c = s.counters
    rate = "-" if s.versions_per_minute is None else f"{s.versions_per_minute:.1f}/min"
    mean = "-" if s.latest_mean_accuracy is None else f"{s.latest_mean_accuracy:.3f}"
    line = Text.assemble(
        ("version ", "dim"),
        ("-" if s.version is None else f"v{s.version}", "bold"),
        ("  rate ", "dim"),
        rate,
        ("  buffer ", "dim"),
        f"{s.buffer_fill}/{s.buffer_size if s.buffer_size is not None else '-'}",
        ("  mean accuracy ", "dim"),
        (mean, "bold"),
        ("  updates ", "dim"),
        f"{c.received} received, {c.accepted} accepted, {c.rejected} rejected, "
        f"{_bytes(c.bytes_received)}",
    )
    nodes = Table(expand=False, box=None, pad_edge=False, header_style="dim")
    # Under DP, a column of each hospital's epsilon spent of its budget.
    private = any(row.epsilon is not None for row in s.nodes)
    columns: list[tuple[str, JustifyMethod]] = [
        ("node", "left"),
        ("state", "left"),
        ("version", "right"),
        ("lag", "right"),
        ("last update", "right"),
        ("accepted", "right"),
        ("rejected", "right"),
        ("bytes sent", "right"),
        ("accuracy", "right"),
        ("by version", "left"),
    ]
    # Under personalisation, each hospital's personal model beside the global one.
    personal = any(row.personal_accuracy is not None for row in s.nodes)
    if private:
        columns.insert(-2, ("epsilon", "right"))
    if personal:
        columns.insert(-1, ("personal", "right"))
    for column, justify in columns:
        nodes.add_column(column, justify=justify)
    for row in s.nodes:
        series = list(s.accuracy.nodes.get(row.node, ()))[-width:]
        nodes.add_row(
            row.node,
            Text(row.state, style=_STATE_STYLE.get(row.state, "")),
            "-" if row.version is None else f"v{row.version}",
            "-" if row.lag is None else str(row.lag),
            _age(row.last_seen_seconds),
            str(row.accepted),
            Text(str(row.rejected), style="red" if row.rejected else ""),
            _bytes(row.bytes_sent),
            *((_epsilon(row),) if private else ()),
            "-" if row.accuracy is None else f"{row.accuracy:.3f}",
            *((_personal(row.personal_accuracy),) if personal else ()),
            sparkline(series),
        )
    if s.accuracy.mean:
        blanks = [""] * (8 if private else 7)
        nodes.add_row(
            "[bold]mean",
            *blanks,
            mean,
            *((_personal(s.latest_mean_personal_accuracy),) if personal else ()),
            sparkline(list(s.accuracy.mean)[-width:]),
        )
    counts = s.staleness_counts
    top = max(counts, default=0)
    staleness = Text.assemble(
        ("staleness of folded updates ", "dim"),
        " ".join(f"{i}:{n}" for i, n in enumerate(counts)) or "-",
        "  ",
        sparkline([n / top for n in counts]) if top else "",
    )
    size = Text.assemble(("per update ", "dim"), s.update_size or "-")
    knobs = Text.assemble(
        ("knobs ", "dim"),
        ", ".join(f"{k}={v}" for k, v in s.knobs.items() if k != "training" and v is not None),
    )
    return Group(head, line, Text(), nodes, Text(), staleness, size, knobs)


def watch(
    settings: ConnectionSettings,
    console: Console,
    stop: threading.Event,
    *,
    refresh: float = 1.0,
) -> None:
    """Redraw the federation's picture on every change (and every ``refresh`` s) until ``stop``."""
    with (
        FederationFeed(settings) as feed,
        Live(render(feed.snapshot()), console=console, auto_refresh=False) as live,
    ):
        generation = feed.generation
        while not stop.is_set():
            generation = feed.wait_for_change(generation, refresh)
            live.update(render(feed.snapshot()), refresh=True)
            stop.wait(0.2)  # at most five redraws a second however busy the run
