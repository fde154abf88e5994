"""Aggregator throughput: decode, validate and fold updates as the service does, in one process.

    python -m benchmarks.fold --json OUT [--repeats R] [--warmup W] [--quick]

For models of about 100 K, 1 M and 11.7 M parameters (the built-in CNN at widths 16 and 128, a
ResNet-18 layout) and for dense float32 and compressed deltas (float16; top 10 % as int8), it
compresses K = 4 deltas as nodes do, then, round after round, sends them as new updates (fresh
ids, against the current version, one message each) to one running ``AggregatorCore`` and times
the aggregator's own path: :func:`common.inbound.receive` of each message on its node's update
topic (the envelope decode and the body's type, as the service's ``_on_message`` takes it),
``AggregatorCore.receive`` (validation, compression policy, decode of every tensor, buffering)
and ``AggregatorCore.fold`` (staleness weights, the weighted sum, the server step that makes
the next version, in the memory of a version gone by, as a running aggregator does). The floor
is numpy's ``acc += delta`` over the same dense arrays, K times (the memory-bandwidth floor of
folding K updates), timed alternately with the path in each round of the same process. Each
figure is the median of the rounds (five by default) of the path's process CPU time over the
floor's, after untimed warm-up rounds (the first folds fault in the memory that later versions
reuse, and compile the fold's loops); the range of the rounds' ratios and wall time are beside
it (the machine may be shared). ``--quick`` runs the 100 K model only: CI runs it so the
benchmark cannot rot.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from aggregator.core import AggregatorCore
from benchmarks._report import rounds_of, write_report
from benchmarks.compression_fold import LAYOUTS, Layout
from common.codec import encode, envelope, new_id
from common.compression import compress
from common.inbound import Inbound, receive
from common.messages import (
    AggregatorState,
    CompressedTensor,
    Compression,
    Knobs,
    Quantization,
    TrainMetrics,
    Update,
)
from common.topics import TopicTree

MODELS = {"cnn-16": "~100 K", "cnn-128": "~1 M", "resnet18": "~11.7 M"}
# Not run by default: 12 M parameters, nearly all in one 48 MB tensor (as an embedding table
# holds them), beyond the size glibc recycles freed memory at (32 MB).
EXTRA_LAYOUTS: dict[str, Layout] = {"embedding": {"embedding": (100_000, 120), "head": (120, 10)}}
SETTINGS: dict[str, Compression] = {
    "dense-fp32": Compression(),
    "fp16": Compression(quantization=Quantization.FP16),
    "top10%-int8": Compression(top_k=0.1, quantization=Quantization.INT8),
}
MAX_MESSAGE = 256 * 1024 * 1024


def deltas(layout: Layout, policy: Compression, count: int) -> list[tuple[CompressedTensor, ...]]:
    """``count`` nodes' deltas, compressed as each node would send it."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        delta = {
            name: (rng.standard_normal(shape) * 1e-3).astype(np.float32)
            for name, shape in layout.items()
        }
        out.append(compress(delta, policy).tensors)
    return out


def payloads(
    tensors: list[tuple[CompressedTensor, ...]], run_id: str, base_version: int
) -> list[bytes]:
    """One update per node against ``base_version``, each with a fresh id, on the wire."""
    out = []
    for i, delta in enumerate(tensors):
        update = Update(
            update_id=new_id(),
            run_id=run_id,
            base_version=base_version,
            num_samples=100 + i,
            metrics=TrainMetrics(loss=0.5, accuracy=0.8, seconds=1.0),
            delta=delta,
        )
        out.append(encode(envelope(update, sender=f"node-{i}", sent_at=time.time())))
    return out


def measure(model: str, setting: str, k: int, repeats: int, warmup: int) -> dict[str, object]:
    layout = {**LAYOUTS, **EXTRA_LAYOUTS}[model]
    policy = SETTINGS[setting]
    run_id = "bench"
    rng = np.random.default_rng(1)
    params = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in layout.items()}
    knobs = Knobs(buffer_size=k, max_staleness=20, compression=policy)
    tensors = deltas(layout, policy, k)
    dense = [
        {name: rng.standard_normal(shape).astype(np.float32) for name, shape in layout.items()}
        for _ in range(k)
    ]
    acc = {name: np.zeros(shape, dtype=np.float32) for name, shape in layout.items()}

    def numpy_floor() -> None:
        for delta in dense:
            for name, value in delta.items():
                acc[name] += value

    # One core for every round, as a running aggregator folds version after version into the
    # memory of versions gone by; each round sends new updates against its current version.
    core = AggregatorCore(run_id=run_id, params=params, knobs=knobs, state=AggregatorState.RUNNING)
    topics = TopicTree("bench")
    wire: list[tuple[str, bytes]] = []

    def next_round() -> None:
        sent = payloads(tensors, run_id, core.version)
        wire[:] = [(str(topics.update(f"node-{i}")), data) for i, data in enumerate(sent)]

    def service_path() -> None:
        for name, data in wire:
            inbound = receive(name, data, topics=topics, max_bytes=MAX_MESSAGE)
            if not isinstance(inbound, Inbound) or not isinstance(inbound.body, Update):
                raise SystemExit(f"a benchmark update did not decode: {inbound}")
            node = inbound.topic.node or ""
            verdict = core.receive(node, inbound.sender, inbound.body, len(data), time.time())
            if not verdict.accepted:
                raise SystemExit(f"the core refused a benchmark update: {verdict.detail}")
        core.fold(time.time())

    timings = rounds_of(repeats, numpy_floor, service_path, setup=next_round, warmup=warmup)
    ratios = [path / floor for floor, path in timings["cpu"]]
    wall_ratios = [path / floor for floor, path in timings["wall"]]
    floor = statistics.median(floor for floor, _ in timings["cpu"])
    path = statistics.median(path for _, path in timings["cpu"])
    best_floor = min(floor for floor, _ in timings["cpu"])
    best_path = min(path for _, path in timings["cpu"])
    return {
        "model": model,
        "params": sum(math.prod(s) for s in layout.values()),
        "setting": setting,
        "k": k,
        "bytes_per_update": sum(len(data) for _, data in wire) / k,
        "updates_per_second": k / path,
        "numpy_add_updates_per_second": k / floor,
        "ratio_to_numpy_add": statistics.median(ratios),
        "ratio_to_numpy_add_range": [min(ratios), max(ratios)],
        "round_ratios": ratios,
        "best_ratio_to_numpy_add": best_path / best_floor,
        "ms_per_update": path / k * 1e3,
        "numpy_add_ms_per_update": floor / k * 1e3,
        "wall_ratio_to_numpy_add": statistics.median(wall_ratios),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", type=Path, required=True, help="write the results here")
    parser.add_argument("--k", type=int, default=4, help="updates per fold (buffer size)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per row")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--quick", action="store_true", help="a few seconds' smoke run")
    parser.add_argument(
        "--models",
        nargs="+",
        choices=[*MODELS, *EXTRA_LAYOUTS],
        default=list(MODELS),
        help="model layouts to measure (default: %(default)s)",
    )
    args = parser.parse_args()
    console = Console(stderr=True)
    models = ["cnn-16"] if args.quick else args.models
    repeats = 3 if args.quick else args.repeats
    load_before = list(os.getloadavg())
    rows = []
    for model in models:
        for setting in SETTINGS:
            console.print(f"{model} {setting} ...")
            rows.append(measure(model, setting, args.k, repeats, args.warmup))
    table = Table(
        title=f"decode + validate + fold, K = {args.k}, median of {repeats} rounds (CPU time)"
    )
    for column in ("model", "params", "setting", "bytes/update", "updates/s", "numpy add/s",
                   "ratio to numpy add", "wall ratio"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("model", "setting") else "right")
    for r in rows:
        table.add_row(
            str(r["model"]),
            f"{r['params']:,}",
            str(r["setting"]),
            f"{r['bytes_per_update']:,.0f}",
            f"{r['updates_per_second']:,.1f}",
            f"{r['numpy_add_updates_per_second']:,.1f}",
            f"{r['ratio_to_numpy_add']:.2f}x",
            f"{r['wall_ratio_to_numpy_add']:.2f}x",
        )
    Console(width=140).print(table)
    write_report(
        args.json,
        {
            "benchmark": "fold",
            "quick": args.quick,
            "k": args.k,
            "repeats": repeats,
            "warmup": args.warmup,
            "load_average_before": load_before,
            "command": " ".join(["python -m benchmarks.fold", *sys.argv[1:]]),
            "results": rows,
        },
    )
    console.print(f"written to {args.json}")


if __name__ == "__main__":
    main()
