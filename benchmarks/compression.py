"""Compressed deltas on the pneumonia federation: bytes, accuracy and fold cost per setting.

    python -m benchmarks.compression --json OUT [--versions N] [--mode fedbuff|sync] [--quick]

Each setting runs the whole pneumonia federation (8 hospitals, the built-in CNN, real processes on
an embedded Mosquitto) for the same number of global versions, so the same number of folded
updates. It reports the mean size of a folded update on the wire, its ratio against dense
float32, the final test accuracy on the official test split (and the mean of the last five
versions, which is steadier), and the aggregator's decode-and-fold time per update as a ratio
against a plain numpy ``acc += delta`` of the same arrays, timed in this process (process CPU
time, best of alternating runs) for the pneumonia CNN and for a ResNet-18 layout of 11.7 M
parameters. ``--quick`` runs two settings (dense and top-1 % float16) for two versions on one
hospital, with three fold timings each: tests/benchmarks/test_quick.py runs it so the benchmark
cannot rot. It took 54 s at load average 7 on the 2-core development machine, most of it
starting the two processes per setting that import torch; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from benchmarks._report import best_of, number, write_report
from benchmarks.compression_fold import LAYOUTS, fold_pair
from common.compression import compress
from common.messages import Compression, Quantization
from healthnet.demo import DemoConfig, Mode, resolve_mode, run_demo
from healthnet.federations import FEDERATIONS


@dataclass(frozen=True, slots=True)
class Setting:
    name: str
    policy: Compression


SETTINGS: tuple[Setting, ...] = (
    Setting("dense-fp32", Compression()),
    Setting("fp16", Compression(quantization=Quantization.FP16)),
    Setting("int8", Compression(quantization=Quantization.INT8)),
    Setting("top10%-int8-ef", Compression(top_k=0.1, quantization=Quantization.INT8)),
    Setting("top1%-fp16-ef", Compression(top_k=0.01, quantization=Quantization.FP16)),
    Setting(
        "top1%-fp16-no-ef",
        Compression(top_k=0.01, quantization=Quantization.FP16, error_feedback=False),
    ),
)


def fold_ratio(policy: Compression, layout: str, repeats: int) -> float:
    """Decode-and-fold CPU time of one compressed update over a dense add of the same model."""
    rng = np.random.default_rng(0)
    delta = {
        name: (rng.standard_normal(shape) * 1e-3).astype(np.float32)
        for name, shape in LAYOUTS[layout].items()
    }
    dense_add, fold = fold_pair(delta, compress(delta, policy).tensors)
    base, folded = best_of(repeats, dense_add, fold)["cpu"]
    return folded / base


def knobs_of(rows: list[dict[str, object]], mode: Mode) -> dict[str, object]:
    """The federation's knobs these runs used: what a reader needs to compare two reports."""
    federation = FEDERATIONS["pneumonia"]
    knobs = federation.knobs
    return {
        "mode": mode,
        "buffer_size": rows[0]["buffer_size"] if rows else knobs.buffer_size,
        "server_lr": resolve_mode(mode, federation, None)[2],
        "optimizer": knobs.training.optimizer,
        "learning_rate": knobs.training.learning_rate,
        "batch_size": knobs.training.batch_size,
        "epochs": knobs.training.epochs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True, help="write the results here")
    parser.add_argument("--versions", type=int, default=40, help="global versions per setting")
    parser.add_argument("--mode", choices=("fedbuff", "sync"), default="fedbuff")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=30, help="fold timing repeats")
    parser.add_argument("--quick", action="store_true", help="a few seconds' smoke run")
    parser.add_argument(
        "--settings", nargs="+", choices=[s.name for s in SETTINGS], help="run only these"
    )
    args = parser.parse_args()
    console = Console(stderr=True)
    settings = SETTINGS[::4] if args.quick else SETTINGS
    if args.settings:
        settings = tuple(s for s in settings if s.name in args.settings)
    versions = 2 if args.quick else args.versions
    nodes = 1 if args.quick else None
    repeats = 3 if args.quick else args.repeats
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="healthnet-bench-") as tmp:
        for setting in settings:
            console.rule(setting.name)
            result = run_demo(
                DemoConfig(
                    federation="pneumonia",
                    versions=versions,
                    nodes=nodes,
                    mode=args.mode,
                    seed=args.seed,
                    compression=setting.policy,
                    workdir=Path(tmp) / setting.name,
                    timeout=3600,
                ),
                console,
            )
            rows.append(
                {
                    "name": setting.name,
                    "top_k": setting.policy.top_k,
                    "quantization": setting.policy.quantization.value,
                    "error_feedback": setting.policy.error_feedback and not setting.policy.lossless,
                    "bytes_per_update": result.bytes_per_update,
                    "compression_ratio": result.compression_ratio,
                    "accuracy": result.mean_accuracy,
                    "accuracy_last5": result.mean_accuracy_last5,
                    "updates_folded": result.updates_folded,
                    "buffer_size": result.buffer_size,
                    "versions": result.versions,
                    "wall_seconds": result.wall_seconds,
                    "fold_ratio": fold_ratio(setting.policy, "cnn-16", repeats),
                    "fold_ratio_11m": fold_ratio(setting.policy, "resnet18", repeats),
                }
            )
    dense = next((r for r in rows if r["name"] == "dense-fp32"), rows[0])
    for row in rows:
        row["ratio"] = number(dense["bytes_per_update"]) / number(row["bytes_per_update"])
        row["accuracy_vs_dense"] = number(row["accuracy"]) - number(dense["accuracy"])
    table = Table(title=f"pneumonia, {args.mode}, {versions} versions per setting")
    for column in ("setting", "EF", "bytes/update", "ratio", "accuracy", "last 5", "vs dense",
                   "fold/add 105K", "fold/add 11.7M"):  # fmt: skip
        table.add_column(column, justify="left" if column == "setting" else "right")
    for r in rows:
        table.add_row(
            str(r["name"]),
            "yes" if r["error_feedback"] else "no",
            f"{r['bytes_per_update']:,.0f}",
            f"{r['ratio']:.1f}x",
            f"{r['accuracy']:.3f}",
            f"{r['accuracy_last5']:.3f}",
            f"{100 * number(r['accuracy_vs_dense']):+.1f} pt",
            f"{r['fold_ratio']:.2f}",
            f"{r['fold_ratio_11m']:.2f}",
        )
    Console(width=160).print(table)
    params = {
        name: sum(int(np.prod(s)) for s in layout.values()) for name, layout in LAYOUTS.items()
    }
    report = {
        "benchmark": "compression",
        "federation": "pneumonia",
        "mode": args.mode,
        "versions": versions,
        "seed": args.seed,
        "knobs": knobs_of(rows, args.mode),
        "quick": args.quick,
        "fold_models": {"fold_ratio": params["cnn-16"], "fold_ratio_11m": params["resnet18"]},
        "settings": rows,
    }
    write_report(args.json, report)
    console.print(f"written to {args.json}")


if __name__ == "__main__":
    main()
