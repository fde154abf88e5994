"""Start-up: where the seconds go from launch to the first version, for this tree and another.

    python -m benchmarks.startup --json OUT [--runs N] [--baseline-root DIR] [--quick]

Two parts, each run in fresh processes whose ``PYTHONPATH`` is the tree measured, so that a
baseline checkout (``--baseline-root``, e.g. ``git worktree add /tmp/base main``) is measured by
the same code in the same run, the trees alternating:

- **Imports**, per role: the CPU and wall seconds of a fresh interpreter that imports what the
  ``healthnet`` command imports before it runs the role (the CLI, then the service), and for the
  aggregator also what its service does on a fresh run before its first publish (the initial
  weights, the output probe, v0 encoded), for the heart-disease and the pneumonia model. The
  median of ``--runs``. Whether torch, opacus and scipy were loaded is recorded beside each.
- **Launch**, per federation: ``healthnet demo --versions 1`` as a subprocess (the broker, the
  aggregator and the hospitals as processes: five for heart disease, nine for pneumonia with
  eight hospitals), with the demo's own timestamps: seconds from starting the processes until
  every hospital had evaluated v0 (all imports done, the first model received) and until the
  first folded version (v1) was seen; and the whole command's wall time, broker included.

On a shared 2-core machine the launch figures move with the load: the JSON records the load
average before and after, and each tree's figures are taken in alternation.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from benchmarks._report import write_report

ROOT = Path(__file__).resolve().parents[1]

# What each role's process runs before its service's loop (see healthnet/cli.py): the CLI, the
# service module, and for the aggregator what AggregatorService.run does on a fresh run before its
# first publish (restore: the initial weights and the output probe; the v0 broadcast encoded), for
# the model of a demo federation. The same code measures any tree of this service's shape.
_AGGREGATOR_FIRST_PUBLISH = """
import tempfile
from pathlib import Path
from aggregator.service import AggregatorService
from aggregator.settings import AggregatorSettings
from healthnet.federations import FEDERATIONS
with tempfile.TemporaryDirectory() as state_dir:
    service = AggregatorService(AggregatorSettings(
        state_dir=Path(state_dir), model=FEDERATIONS["{federation}"].model, run_id="startup"))
    service._core = service._restore()
    service._broadcast()
    service.journal.close()
"""
ROLES: dict[str, str] = {
    "cli": "import healthnet.cli",
    "aggregator": "import healthnet.cli, aggregator.service",
    "aggregator to first publish": "import healthnet.cli\n"
    + _AGGREGATOR_FIRST_PUBLISH.format(federation="heart-disease"),
    "aggregator to first publish, cnn": "import healthnet.cli\n"
    + _AGGREGATOR_FIRST_PUBLISH.format(federation="pneumonia"),
    "node": "import healthnet.cli, edge_node.service",
}
_PROBE = """
import json, resource, sys, time
started = time.perf_counter()
{code}
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({{"cpu": usage.ru_utime + usage.ru_stime, "wall": time.perf_counter() - started,
    "loaded": sorted(m for m in ("torch", "opacus", "scipy", "numba") if m in sys.modules)}}))
"""
# The aggregator and the hospitals (the broker besides).
PROCESSES = {"heart-disease": 5, "pneumonia": 9}
FEDERATIONS = {"heart-disease": ["--federation", "heart-disease"],
               "pneumonia": ["--federation", "pneumonia", "--nodes", "8"]}  # fmt: skip


def _env(root: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(root)}


def measure_imports(root: Path, code: str) -> dict[str, object]:
    """One fresh interpreter's CPU and wall seconds for ``code``, and what it loaded."""
    done = subprocess.run(
        [sys.executable, "-c", _PROBE.format(code=code)],
        cwd=root,
        env=_env(root),
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def measure_launch(root: Path, federation: str) -> dict[str, object]:
    """``healthnet demo --versions 1`` of ``federation`` from ``root``: the demo's timestamps."""
    with tempfile.TemporaryDirectory(prefix="startup-") as tmp:
        summary = Path(tmp) / "summary.json"
        command = [sys.executable, "-m", "healthnet", "demo", *FEDERATIONS[federation],
                   "--versions", "1", "--no-dashboard", "--summary", str(summary),
                   "--workdir", str(Path(tmp) / "work")]  # fmt: skip
        started = time.perf_counter()
        done = subprocess.run(
            command, cwd=root, env=_env(root), capture_output=True, text=True, timeout=900,
            check=False,
        )  # fmt: skip
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"demo failed in {root}:\n{done.stderr[-3000:]}")
        result = json.loads(summary.read_text(encoding="utf-8"))
    first = next(p for p in result["timeline"] if p["version"] >= 1)
    return {
        "ready_seconds": result["ready_seconds"],
        "first_version_seconds": first["seconds"],
        "command_seconds": wall,
    }


def _median(rows: list[dict[str, object]], key: str) -> float:
    return statistics.median(float(r[key]) for r in rows)  # type: ignore[arg-type]


Samples = dict[str, dict[str, list[dict[str, object]]]]


def _measure(
    trees: dict[str, Path], runs: int, launches: int, federations: list[str], console: Console
) -> tuple[Samples, Samples]:
    """Each tree's import samples per role and launch samples per federation, alternating."""
    imports: Samples = {t: {} for t in trees}
    for _ in range(runs):
        for role, code in ROLES.items():
            for tree, root in trees.items():
                console.print(f"imports: {role} ({tree}) ...")
                imports[tree].setdefault(role, []).append(measure_imports(root, code))
    launched: Samples = {t: {} for t in trees}
    for _ in range(launches):
        for federation in federations:
            for tree, root in trees.items():
                console.print(f"launch: {federation} ({tree}) ...")
                launched[tree].setdefault(federation, []).append(measure_launch(root, federation))
    return imports, launched


def _show(rows: list[dict[str, object]], launch_rows: list[dict[str, object]], runs: int) -> None:
    table = Table(title=f"imports, median of {runs} fresh interpreters")
    for column in ("tree", "role", "CPU s", "wall s", "loaded"):
        table.add_column(column)
    for r in rows:
        loaded = r["loaded"]
        assert isinstance(loaded, list)
        table.add_row(str(r["tree"]), str(r["role"]), f"{r['cpu_seconds']:.2f}",
                      f"{r['wall_seconds']:.2f}", ", ".join(loaded))  # fmt: skip
    Console(width=140).print(table)
    if not launch_rows:
        return
    table = Table(title="launch: healthnet demo --versions 1")
    for column in ("tree", "federation", "hospitals ready s", "first version s", "command s"):
        table.add_column(column)
    for r in launch_rows:
        table.add_row(str(r["tree"]), str(r["federation"]), f"{r['ready_seconds']:.1f}",
                      f"{r['first_version_seconds']:.1f}",
                      f"{r['command_seconds']:.1f}")  # fmt: skip
    Console(width=140).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", type=Path, required=True, help="write the results here")
    parser.add_argument("--runs", type=int, default=3, help="fresh interpreters per import row")
    parser.add_argument("--launches", type=int, default=1, help="demo launches per federation")
    parser.add_argument("--baseline-root", type=Path, help="a checkout to measure alongside")
    parser.add_argument("--baseline-revision", help="the revision that checkout is of")
    parser.add_argument(
        "--federations",
        nargs="+",
        choices=list(FEDERATIONS),
        default=list(FEDERATIONS),
        help="demos to launch (default: %(default)s)",
    )
    parser.add_argument("--quick", action="store_true", help="imports only, one run each")
    parser.add_argument("--note", help="what else loaded the machine, recorded in the JSON")
    args = parser.parse_args()
    console = Console(stderr=True)
    trees = {"this": ROOT}
    if args.baseline_root is not None:
        trees["baseline"] = args.baseline_root.resolve()
    runs = 1 if args.quick else args.runs
    launches = 0 if args.quick else args.launches
    load_before = list(os.getloadavg())
    imports, launched = _measure(trees, runs, launches, args.federations, console)
    load_after = list(os.getloadavg())
    rows: list[dict[str, object]] = [
        {
            "tree": tree,
            "role": role,
            "cpu_seconds": _median(samples, "cpu"),
            "wall_seconds": _median(samples, "wall"),
            "loaded": samples[-1]["loaded"],
            "runs": samples,
        }
        for tree, by_role in imports.items()
        for role, samples in by_role.items()
    ]
    launch_rows: list[dict[str, object]] = [
        {
            "tree": tree,
            "federation": federation,
            "processes": PROCESSES[federation],
            "ready_seconds": _median(samples, "ready_seconds"),
            "first_version_seconds": _median(samples, "first_version_seconds"),
            "command_seconds": _median(samples, "command_seconds"),
            "runs": samples,
        }
        for tree, by_federation in launched.items()
        for federation, samples in by_federation.items()
    ]
    _show(rows, launch_rows, runs)
    write_report(
        args.json,
        {
            "benchmark": "startup",
            "quick": args.quick,
            "runs": runs,
            "launches": launches,
            "baseline_revision": args.baseline_revision,
            "load_average_before": load_before,
            "load_average_after": load_after,
            "note": args.note,
            "command": " ".join(["python -m benchmarks.startup", *sys.argv[1:]]),
            "imports": rows,
            "launch": launch_rows,
        },
    )
    console.print(f"written to {args.json}")


if __name__ == "__main__":
    main()
