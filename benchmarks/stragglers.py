"""Time to accuracy under stragglers: synchronous FedAvg against FedBuff and FedAsync.

    python -m benchmarks.stragglers --json OUT [--budget S] [--seeds 0 1 2] [--plot PNG] [--quick]

Every hospital's update is delayed (a sleep on the node, after training) by a fixed amount drawn
once per hospital from a log-normal distribution, median 0.5 s, sigma 1, with a fixed seed
(``--delay-seed``), the same delays for every mode and seed. Each run is a whole federation with
real processes on an embedded Mosquitto (``healthnet.demo.run_demo``), stopped after a fixed
wall-clock budget counted from the moment every hospital was ready (see below). Modes:
synchronous FedAvg (K = all
hospitals, max staleness 0), FedBuff (K in 2, 3, 4, polynomial staleness) and FedAsync (K = 1).

Seconds to an accuracy are counted from the moment every hospital has evaluated v0 (all processes
up and the data loaded, which takes the same time in every mode) to the moment the aggregator
published the first version whose test accuracy reaches it; updates to an accuracy are the
updates folded into that version and all before it. Pneumonia's hospitals all test on the
official test split, so one hospital's evaluation of a version is that version's accuracy; a
heart-disease version counts only once all four hospitals (each with its own test split) have
evaluated it. ``--quick`` runs heart-disease, synchronous and FedBuff K = 2, one seed, a few
seconds' budget: CI runs it so the benchmark cannot rot.

``--broadcast-compare`` runs pneumonia FedBuff K = 4 with whole-model broadcasts and with the
compressed broadcast chain (``--chain-top-k``, ``--chain-quantization``; see
:mod:`common.broadcast_chain`), alternating, in the same process: the downlink is measured where
it lands, as the model bytes (manifests, snapshot chunks, deltas) each hospital reports with its
evaluations, summed over hospitals, to the first version at 85 % and in all.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from benchmarks._report import number, write_report
from common.messages import Compression, Quantization
from healthnet.demo import DemoConfig, DemoResult, Mode, TimelinePoint, run_demo
from healthnet.federations import FEDERATIONS

TARGETS = (0.85, 0.88)
HEART_TARGETS = (0.75, 0.78)
ALL_TARGETS = (*HEART_TARGETS, *TARGETS)
ORDER = {"sync": 0, "fedbuff": 1, "fedasync": 2}


@dataclass(frozen=True, slots=True)
class Setting:
    mode: Mode
    k: int
    # "full": every version to every hospital whole; "chain": compressed deltas between them.
    broadcast: str = "full"

    @property
    def name(self) -> str:
        name = {"sync": "sync FedAvg", "fedasync": "FedAsync"}.get(self.mode, "FedBuff")
        chain = ", delta chain" if self.broadcast == "chain" else ""
        return f"{name} K={self.k}{chain}"

    @classmethod
    def of(cls, row: Mapping[str, object]) -> Setting:
        """The setting a run's row, or a summary's entry, was measured at."""
        mode = row["mode"]
        broadcast = str(row.get("broadcast", "full"))
        match mode:
            case "sync" | "fedbuff" | "fedasync":
                return cls(mode, int(number(row["k"])), broadcast)
        raise ValueError(f"a row of mode {mode!r}, which no setting has")


def settings(sites: int) -> tuple[Setting, ...]:
    return (
        Setting("sync", sites),
        Setting("fedbuff", 2),
        Setting("fedbuff", 3),
        Setting("fedbuff", 4),
        Setting("fedasync", 1),
    )


def draw_delays(nodes: list[str], seed: int, median: float, sigma: float) -> dict[str, float]:
    """One delay per hospital, log-normal: the same hospitals are slow in every run."""
    draws = np.random.default_rng(seed).lognormal(math.log(median), sigma, len(nodes))
    return {node: round(float(d), 3) for node, d in zip(nodes, draws, strict=True)}


def first_at(result: DemoResult, target: float, min_evaluations: int) -> TimelinePoint | None:
    """The first version whose accuracy reaches ``target``."""
    for point in result.timeline:
        if point.evaluations >= min_evaluations and point.mean_accuracy >= target:
            return point
    return None


def to_target(
    result: DemoResult, target: float, min_evaluations: int
) -> tuple[float | None, int | None]:
    """(seconds after all hospitals were ready, updates folded) to the first version at target."""
    point = first_at(result, target, min_evaluations)
    if point is None:
        return None, None
    return max(0.0, point.seconds - result.ready_seconds), point.updates_folded


def run_one(  # noqa: PLR0917 - one call site, each argument named there
    federation: str,
    setting: Setting,
    seed: int,
    delays: dict[str, float],
    budget: float,
    workdir: Path,
    console: Console,
    chain: Compression | None = None,
) -> dict[str, object]:
    sites = len(FEDERATIONS[federation].sites)
    result = run_demo(
        DemoConfig(
            federation=federation,
            versions=100_000,
            mode=setting.mode,
            buffer_size=setting.k if setting.mode == "fedbuff" else None,
            delays=delays,
            seed=seed,
            budget_seconds=budget,
            timeout=budget + 300,
            workdir=workdir,
            broadcast_compression=chain if setting.broadcast == "chain" else None,
        ),
        console,
    )
    # Pneumonia: one shared test split, so any evaluation is the version's accuracy.
    needed = 1 if federation == "pneumonia" else sites
    row: dict[str, object] = {
        "federation": federation,
        "mode": setting.mode,
        "k": setting.k,
        "seed": seed,
        "budget_seconds": budget,
        "broadcast": setting.broadcast,
        "broadcast_compression": (
            chain.model_dump(mode="json") if chain and setting.broadcast == "chain" else None
        ),
    }
    for target in ALL_TARGETS:  # every run has every key; null where not reached
        seconds, updates = to_target(result, target, needed)
        label = f"{round(target * 100)}"
        row[f"seconds_to_{label}"] = seconds
        row[f"updates_to_{label}"] = updates
        point = first_at(result, target, needed)
        row[f"bytes_down_to_{label}"] = None if point is None else point.model_bytes
    # Measured where it lands: the model bytes each hospital reports with its evaluations.
    downlink = result.model_bytes
    uplink = result.timeline[-1].update_bytes if result.timeline else 0
    row.update(
        {
            "final_accuracy": result.mean_accuracy,
            "final_accuracy_last5": result.mean_accuracy_last5,
            "versions": result.versions,
            "updates_folded": result.updates_folded,
            "ready_seconds": result.ready_seconds,
            "wall_seconds": result.wall_seconds,
            "bytes_up": uplink,
            "bytes_down": downlink,
            # What whole-model broadcasts would have moved: every version to every hospital.
            "bytes_down_full_estimate": result.blob_bytes * sites * result.versions,
            "bytes_moved": uplink + downlink,
            "timeline": [
                {
                    "seconds": round(max(0.0, p.seconds - result.ready_seconds), 3),
                    "version": p.version,
                    "accuracy": p.mean_accuracy,
                    "evaluations": p.evaluations,
                    "updates_folded": p.updates_folded,
                    "model_bytes": p.model_bytes,
                }
                for p in result.timeline
            ],
        }
    )
    return row


def _reached(value: object) -> float | None:
    """A run's time or count to a target, None where it never reached it."""
    return None if value is None else number(value)


def _median(spread: object) -> float | None:
    """The median of a :func:`_spread`, None where half the seeds or more missed the target."""
    assert isinstance(spread, dict)
    return _reached(spread["median"])


def _spread(values: list[float | None]) -> dict[str, object]:
    """Median and range over seeds; a seed that never reached a target makes the median None
    when half or more of them missed it (a missed target is slower than any reached one)."""
    reached = sorted(v for v in values if v is not None)
    missed = len(values) - len(reached)
    ordered: list[float] = reached + [math.inf] * missed
    median = statistics.median(ordered) if ordered else math.inf
    return {
        "median": None if math.isinf(median) else median,
        "min": reached[0] if reached else None,
        "max": None if missed or not reached else reached[-1],
        "reached": f"{len(reached)}/{len(values)}",
    }


def _key(row: Mapping[str, object]) -> tuple[object, ...]:
    return (row["federation"], row["mode"], row["k"], row.get("broadcast", "full"))


def summarise(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    keys = sorted({(str(r["federation"]), str(r["mode"]), int(number(r["k"])),
                    str(r.get("broadcast", "full"))) for r in rows},
                  key=lambda t: (t[0], ORDER[t[1]], t[2], t[3]))  # fmt: skip
    for federation, mode, k, broadcast in keys:
        key = (federation, mode, k, broadcast)
        runs = [r for r in rows if _key(r) == key]
        entry: dict[str, object] = {"federation": federation, "mode": mode, "k": k,
                                    "broadcast": broadcast,
                                    "seeds": [r["seed"] for r in runs]}  # fmt: skip
        for target in ALL_TARGETS:
            label = f"{round(target * 100)}"
            entry[f"seconds_to_{label}"] = _spread(
                [_reached(r[f"seconds_to_{label}"]) for r in runs]
            )
            entry[f"updates_to_{label}"] = _spread(
                [_reached(r[f"updates_to_{label}"]) for r in runs]
            )
            entry[f"bytes_down_to_{label}"] = _spread(
                [_reached(r.get(f"bytes_down_to_{label}")) for r in runs]
            )
        entry["final_accuracy"] = _spread([number(r["final_accuracy"]) for r in runs])
        entry["bytes_moved"] = statistics.median(int(number(r["bytes_moved"])) for r in runs)
        entry["bytes_down"] = statistics.median(int(number(r["bytes_down"])) for r in runs)
        entry["versions"] = statistics.median(int(number(r["versions"])) for r in runs)
        out.append(entry)
    for federation in {str(e["federation"]) for e in out}:
        label = f"{round((TARGETS if federation == 'pneumonia' else HEART_TARGETS)[0] * 100)}"
        group = [e for e in out if e["federation"] == federation]
        sync = next((e for e in group if e["mode"] == "sync"), None)
        sync = sync or next((e for e in group if e.get("broadcast") == "full"), None)
        base = None if sync is None else _median(sync[f"seconds_to_{label}"])
        for e in group:
            mine = _median(e[f"seconds_to_{label}"])
            e[f"speedup_to_{label}"] = base / mine if base is not None and mine else None
    return out


def _fmt(spread: object, unit: str = "s") -> str:
    s = spread if isinstance(spread, dict) else {}
    if s.get("median") is None:
        return f"- ({s.get('reached', '')})"
    lo = s.get("min")
    hi = s.get("max")
    rng = f" [{lo:.0f}-{hi:.0f}]" if hi is not None and lo is not None else f" [{lo:.0f}-...]"
    return f"{s['median']:.0f}{unit}{rng}"


def _megabytes(spread: object) -> str:
    median = _median(spread) if isinstance(spread, dict) else None
    return "-" if median is None else f"{median / 1e6:.1f}"


def render(summary: list[dict[str, object]], console: Console) -> None:
    for federation in sorted({str(e["federation"]) for e in summary}):
        targets = TARGETS if federation == "pneumonia" else HEART_TARGETS
        a, b = (f"{round(t * 100)}" for t in targets)
        table = Table(title=f"{federation}: median [min-max] over seeds")
        for column in ("setting", f"s to {a}%", f"updates to {a}%", f"s to {b}%",
                       f"updates to {b}%", "final acc", "versions", "MB moved",
                       f"MB down to {a}%", "MB down", "speedup"):  # fmt: skip
            table.add_column(column, justify="left" if column == "setting" else "right")
        for e in (e for e in summary if e["federation"] == federation):
            acc = e["final_accuracy"]
            assert isinstance(acc, dict)
            speed = e.get(f"speedup_to_{a}")
            table.add_row(
                Setting.of(e).name,
                _fmt(e[f"seconds_to_{a}"]),
                _fmt(e[f"updates_to_{a}"], ""),
                _fmt(e[f"seconds_to_{b}"]),
                _fmt(e[f"updates_to_{b}"], ""),
                f"{acc['median']:.3f} [{acc['min']:.3f}-{acc['max']:.3f}]",
                f"{e['versions']:.0f}",
                f"{number(e['bytes_moved']) / 1e6:.0f}",
                _megabytes(e.get(f"bytes_down_to_{a}")),
                f"{number(e.get('bytes_down', 0)) / 1e6:.1f}",
                "-" if speed is None else f"{speed:.2f}x",
            )
        Console(width=170).print(table)


def plot(rows: list[dict[str, object]], path: Path, federation: str, seed: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for r in rows:
        if r["federation"] != federation or r["seed"] != seed:
            continue
        points = r["timeline"]
        assert isinstance(points, list)
        # Every evaluated version, not the running best, which would hide the swings.
        best = [(p["seconds"], p["accuracy"]) for p in points]
        xs, ys = zip(*best, strict=True) if best else ((), ())
        name = Setting.of(r).name
        ax.plot(xs, ys, label=name, lw=1.4 if r["mode"] == "sync" else 1.0,
                color="black" if r["mode"] == "sync" else None)  # fmt: skip
    for target in TARGETS if federation == "pneumonia" else HEART_TARGETS:
        ax.axhline(target, color="grey", ls=":", lw=0.8)
    ax.set_xlabel("seconds since every hospital was ready")
    ax.set_ylabel("test accuracy of the global model")
    ax.set_title(f"{federation}, log-normal straggler delays (median 0.5 s, sigma 1), seed {seed}")
    ax.set_ylim(0.4, 1.0)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", type=Path, required=True, help="write the results here")
    parser.add_argument("--budget", type=float, default=60.0,
                        help="seconds per pneumonia run, from all hospitals ready")  # fmt: skip
    parser.add_argument("--heart-budget", type=float, default=10.0,
                        help="wall-clock seconds per heart-disease run")  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--delay-seed", type=int, default=0)
    parser.add_argument("--delay-median", type=float, default=0.5)
    parser.add_argument("--delay-sigma", type=float, default=1.0)
    parser.add_argument("--skip-heart", action="store_true")
    parser.add_argument("--plot", type=Path, help="accuracy against wall clock, first seed (PNG)")
    parser.add_argument("--quick", action="store_true", help="a few seconds' smoke run")
    parser.add_argument("--broadcast-compare", action="store_true",
                        help="pneumonia FedBuff K=4: whole models, then the chain")  # fmt: skip
    parser.add_argument("--chain-top-k", type=float, default=0.1,
                        help="the chain's kept fraction per tensor")  # fmt: skip
    parser.add_argument("--chain-quantization", choices=[q.value for q in Quantization],
                        default=Quantization.INT8.value)  # fmt: skip
    args = parser.parse_args()
    chain = Compression(top_k=args.chain_top_k, quantization=Quantization(args.chain_quantization))
    console = Console(stderr=True)
    plan: list[tuple[str, Setting, float, tuple[float, float]]] = []
    if args.broadcast_compare:
        seeds = args.seeds
        plan += [("pneumonia", Setting("fedbuff", 4, broadcast), args.budget, TARGETS)
                 for broadcast in ("full", "chain")]  # fmt: skip
    elif args.quick:
        seeds = args.seeds[:1]
        plan += [("heart-disease", s, 4.0, HEART_TARGETS)
                 for s in (Setting("sync", 4), Setting("fedbuff", 2))]  # fmt: skip
    else:
        seeds = args.seeds
        plan += [("pneumonia", s, args.budget, TARGETS) for s in settings(8)]
        if not args.skip_heart:
            plan += [("heart-disease", s, args.heart_budget, HEART_TARGETS)
                     for s in (Setting("sync", 4), Setting("fedbuff", 3),
                               Setting("fedasync", 1))]  # fmt: skip
    delays = {
        name: draw_delays(
            [s.node_id for s in FEDERATIONS[name].sites],
            args.delay_seed,
            args.delay_median,
            args.delay_sigma,
        )
        for name in {p[0] for p in plan}
    }
    rows: list[dict[str, object]] = []
    report: dict[str, object] = {
        "benchmark": "stragglers",
        "quick": args.quick,
        "seeds": seeds,
        "delay_model": {
            "distribution": "lognormal",
            "median": args.delay_median,
            "sigma": args.delay_sigma,
            "seed": args.delay_seed,
        },
        "delays": delays,
        "targets": {"pneumonia": TARGETS, "heart-disease": HEART_TARGETS},
        "budget_seconds": {"pneumonia": args.budget, "heart-disease": args.heart_budget},
        "command": " ".join(sys.argv),
        "broadcast_compression": chain.model_dump(mode="json"),
        "runs": rows,
    }
    with tempfile.TemporaryDirectory(prefix="healthnet-stragglers-") as tmp:
        for seed in seeds:  # seeds outermost: a cut-short run still compares every mode
            for federation, setting, budget, _targets in plan:
                console.rule(f"{federation} {setting.name} seed {seed}")
                rows.append(
                    run_one(
                        federation,
                        setting,
                        seed,
                        delays[federation],
                        budget,
                        Path(tmp) / f"{federation}-{setting.mode}-{setting.k}-"
                        f"{setting.broadcast}-{seed}",
                        console,
                        chain,
                    )
                )
                summary = summarise(rows)
                report["summary"] = summary
                write_report(args.json, report)  # after every run: partial results survive
    summary = summarise(rows)
    render(summary, console)
    report["summary"] = summary
    write_report(args.json, report)
    if args.plot:
        plot(rows, args.plot, "heart-disease" if args.quick else "pneumonia", seeds[0])
    console.print(f"written to {args.json}")


if __name__ == "__main__":
    main()
