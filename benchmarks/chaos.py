"""Chaos benchmark: kill and freeze a real federation at random, then count lost updates.

    python -m benchmarks.chaos --minutes 10 --json chaos.json [--seed 0] [--federation NAME]
        [--secure-aggregation]

Runs devtools.chaos (real processes, a real Mosquitto with persistence) and writes its JSON:
aggregator_kills, broker_restarts, node_kills, node_freezes, updates_sent, updates_folded,
lost, double_folded, versions_contiguous, final_accuracy and more. Exit status 1 when
``devtools.chaos.problems`` finds any (lost, folded twice, left in an outbox, trained twice on one
base, discarded, logs that disagree, a process that exited on its own): the same check as
tests/integration/test_durability.py. ``--minutes 0.5`` is the quick mode CI runs.
``--secure-aggregation`` folds every version by secure aggregation (every hospital a holder,
keys signed by a throwaway CA, as ``healthnet demo --secure-aggregation`` makes them); its
drain leaves the rest buffered (devtools.chaos), and the JSON says how many (``buffered_at_stop``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from benchmarks._report import write_report
from devtools.chaos import DEFAULT_EVERY, ChaosConfig, Fault, problems, run_chaos
from healthnet.federations import FEDERATIONS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the fault window")
    parser.add_argument("--json", type=Path, required=True, help="write the result here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--federation", default="heart-disease", choices=sorted(FEDERATIONS))
    parser.add_argument("--workdir", type=Path, help="keep state and logs here")
    parser.add_argument(
        "--faults",
        default=",".join(Fault),
        help=f"comma-separated subset of {', '.join(Fault)}",
    )
    parser.add_argument("--min-versions", type=int, default=60)
    parser.add_argument(
        "--secure-aggregation", action="store_true", help="fold every version securely"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    seconds = args.minutes * 60.0
    # A quick run keeps every fault but spaces them to fit (each kind still happens at least once).
    scale = min(1.0, seconds / 600.0)
    every = {fault: max(8.0, mean * scale) for fault, mean in DEFAULT_EVERY.items()}
    config = ChaosConfig(
        seconds=seconds,
        federation=args.federation,
        seed=args.seed,
        faults=frozenset(Fault(name) for name in args.faults.split(",") if name),
        every=every,
        min_versions=args.min_versions,
        workdir=args.workdir,
        secure_aggregation=args.secure_aggregation,
    )
    console = Console(stderr=True)
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("chaos", total=seconds, detail="starting")

        def report(phase: str, elapsed: float, version: int, counts: dict[str, int]) -> None:
            faults = " ".join(f"{k}={v}" for k, v in sorted(counts.items()))
            progress.update(
                task,
                completed=elapsed if phase == "faults" else seconds,
                description=phase,
                detail=f"v{version} {faults}",
            )

        result = run_chaos(config, report)
    data = result.to_json()
    write_report(args.json, data)
    keys = ("aggregator_kills", "broker_restarts", "node_kills", "node_freezes", "updates_sent",
            "updates_folded", "lost", "double_folded", "buffered_at_stop", "versions",
            "final_accuracy")  # fmt: skip
    console.print(" ".join(f"{key}={data[key]}" for key in keys))
    console.print(f"result written to {args.json}")
    found = problems(result)
    for problem in found:
        console.print(f"[red]problem:[/red] {problem}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
