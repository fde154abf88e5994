"""``healthnet report``: PNG plots of a finished (or running) run from the aggregator's logs.

It reads ``versions.jsonl`` (the provenance of every version) and ``evaluations.jsonl`` (every
node's evaluation as the aggregator received it) from an aggregator state dir, or from the
``aggregator/`` folder of a demo ``--workdir``, folds them through the same
:class:`~healthnet.observe.Observer` as the live dashboard, and draws with matplotlib's Agg canvas
(no display, no global pyplot state).

Under personalisation it also writes ``personal.png``: each hospital's global and personal model
accuracy on its own test split by version, one colour per hospital (the personal model dashed),
from the same evaluations.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from aggregator.store import EvaluationLogEntry
from common.errors import ConfigError
from common.messages import VersionRecord
from healthnet.observe import Observer, Snapshot

__all__ = ["RunLogs", "find_logs", "load_run", "plot_personal", "write_report"]

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

_COLOURS = ("#2f6fdb", "#e4572e", "#17a398", "#f2a541", "#8e5ad8", "#c2185b", "#4e8f2f")


@dataclass(frozen=True, slots=True)
class RunLogs:
    """What a run left on disk, parsed."""

    directory: Path
    records: tuple[VersionRecord, ...]
    evaluations: tuple[EvaluationLogEntry, ...]
    skipped_lines: int

    def snapshot(self) -> Snapshot:
        observer = Observer(self.directory.name, max_versions=sys.maxsize)
        for record in self.records:
            observer.on_version(record)
        for entry in self.evaluations:
            observer.on_evaluation(entry.node, entry.evaluation)
        return observer.snapshot(now=0.0)


def find_logs(run_dir: Path) -> Path:
    """The folder holding ``versions.jsonl``: ``run_dir`` itself or its ``aggregator/``."""
    for candidate in (run_dir, run_dir / "aggregator"):
        if (candidate / "versions.jsonl").is_file():
            return candidate
    raise ConfigError(
        f"no versions.jsonl in {run_dir} or {run_dir / 'aggregator'}: give an aggregator "
        "--state-dir or a demo --workdir"
    )


def load_run(run_dir: Path) -> RunLogs:
    directory = find_logs(run_dir)
    skipped = 0

    def read(name: str, model: type[M]) -> Iterator[M]:
        nonlocal skipped
        path = directory / name
        if not path.is_file():
            return
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    yield model.model_validate_json(line)
                except ValidationError as exc:
                    # A crash can cut the last line short; one bad line must not lose the rest.
                    skipped += 1
                    log.warning("%s:%d is not a valid record: %s", path, number, exc)

    records = {r.version: r for r in read("versions.jsonl", VersionRecord)}
    evaluations = tuple(read("evaluations.jsonl", EvaluationLogEntry))
    return RunLogs(
        directory=directory,
        records=tuple(records[v] for v in sorted(records)),
        evaluations=evaluations,
        skipped_lines=skipped,
    )


def write_report(run_dir: Path, out: Path, console: Console | None = None) -> list[Path]:
    """Write accuracy.png, staleness.png and bytes.png (and personal.png when the hospitals
    reported personal models) into ``out``; their paths."""
    console = console or Console(stderr=True)
    plots: list[tuple[str, Callable[[RunLogs, Snapshot], Figure]]] = [
        ("accuracy.png", plot_accuracy),
        ("staleness.png", plot_staleness),
        ("bytes.png", plot_bytes),
    ]
    written = []
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("reading logs", total=len(plots) + 1)
        run = load_run(run_dir)
        if any(e.evaluation.personal_accuracy is not None for e in run.evaluations):
            plots.append(("personal.png", plot_personal))
            progress.update(task, total=len(plots) + 1)
        snapshot = run.snapshot()
        out.mkdir(parents=True, exist_ok=True)
        progress.advance(task)
        for name, plot in plots:
            progress.update(task, description=f"drawing {name}")
            figure = plot(run, snapshot)
            path = out / name
            figure.savefig(path, dpi=120)
            written.append(path)
            progress.advance(task)
        progress.update(task, description="done")
    if run.skipped_lines:
        console.print(f"[yellow]skipped {run.skipped_lines} unreadable log lines")
    return written


def _figure(title: str) -> Figure:
    figure = Figure(figsize=(8, 4.5), layout="constrained")
    figure.suptitle(title)
    return figure


def _colour(index: int) -> str:
    return _COLOURS[index % len(_COLOURS)]


def plot_accuracy(run: RunLogs, snapshot: Snapshot) -> Figure:
    figure = _figure("Test accuracy by global version")
    axes = figure.add_subplot()
    series = snapshot.accuracy
    for index, (node, values) in enumerate(sorted(series.nodes.items())):
        points = [(v, a) for v, a in zip(series.versions, values, strict=True) if a is not None]
        axes.plot(
            [v for v, _ in points],
            [a for _, a in points],
            marker="o",
            markersize=3,
            linewidth=1.5,
            color=_colour(index),
            label=node,
        )
    mean = [(v, m) for v, m in zip(series.versions, series.mean, strict=True) if m is not None]
    if mean:
        axes.plot(
            [v for v, _ in mean],
            [m for _, m in mean],
            color="black",
            linestyle="--",
            linewidth=2,
            label="mean (latest of each hospital)",
        )
    if not series.versions:
        axes.text(0.5, 0.5, "no evaluations recorded", ha="center", transform=axes.transAxes)
    axes.set_xlabel("global version")
    axes.set_ylabel("test accuracy")
    axes.set_ylim(0, 1)
    axes.grid(alpha=0.3)
    if series.versions:
        axes.legend(loc="lower right")
    return figure


def plot_personal(run: RunLogs, snapshot: Snapshot) -> Figure:
    """Each hospital's global model (solid) and personal model (dashed) by version."""
    figure = _figure("Global and personal model, each hospital's own test split")
    axes = figure.add_subplot()
    by_node: dict[str, dict[int, tuple[float, float | None]]] = {}
    for entry in run.evaluations:
        evaluation = entry.evaluation
        if evaluation.failure:
            continue
        by_node.setdefault(entry.node, {})[evaluation.version] = (
            evaluation.accuracy,
            evaluation.personal_accuracy,
        )
    for index, (node, points) in enumerate(sorted(by_node.items())):
        versions = sorted(points)
        colour = _colour(index)
        axes.plot(
            versions, [points[v][0] for v in versions], color=colour, linewidth=1.2, label=node
        )
        personal = [(v, p) for v in versions if (p := points[v][1]) is not None]
        axes.plot(
            [v for v, _ in personal],
            [p for _, p in personal],
            color=colour,
            linestyle="--",
            linewidth=1.8,
            label=f"{node}, personal",
        )
    axes.set_xlabel("global version")
    axes.set_ylabel("test accuracy")
    axes.set_ylim(0, 1)
    axes.grid(alpha=0.3)
    if by_node:
        axes.legend(loc="lower right", fontsize=8, ncols=2)
    return figure


def plot_staleness(run: RunLogs, snapshot: Snapshot) -> Figure:
    counts = snapshot.staleness_counts
    total = sum(counts)
    figure = _figure(f"Staleness of folded updates ({total} updates, {len(run.records)} versions)")
    axes = figure.add_subplot()
    axes.bar(range(len(counts)), counts, color=_colour(0), width=0.7)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("staleness (versions between an update's base and its fold)")
    axes.set_ylabel("updates")
    axes.grid(axis="y", alpha=0.3)
    return figure


def plot_bytes(run: RunLogs, snapshot: Snapshot) -> Figure:
    figure = _figure("Bytes on the wire per folded update")
    axes = figure.add_subplot()
    by_node: dict[str, list[tuple[int, int]]] = {}
    for record in run.records:
        for c in record.contributions:
            by_node.setdefault(c.node, []).append((record.version, c.bytes))
    for index, (node, points) in enumerate(sorted(by_node.items())):
        axes.scatter(
            [v for v, _ in points], [b for _, b in points], s=10, color=_colour(index), label=node
        )
    axes.set_xlabel("global version the update was folded into")
    axes.set_ylabel("bytes")
    largest = max((b for points in by_node.values() for _, b in points), default=1)
    axes.set_ylim(0, largest * 1.15)
    axes.grid(alpha=0.3)
    if by_node:
        axes.legend(loc="lower right")
    return figure
