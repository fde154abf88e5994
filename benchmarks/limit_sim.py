"""Screen sample-efficiency levers on the pneumonia federation in one process, in minutes.

    python -m benchmarks.limit_sim --json OUT [--levers NAME ...] [--seeds 0 1] [--examples N]

:mod:`benchmarks.limit` measures the real federation (processes, Mosquitto, wall clock); each of
its runs costs a minute of two cores, too slow to try a dozen settings over seeds. This is the
same federation simulated: the same eight hospitals' rows (``edge_node.datasets``), the same CNN
(``common.models``), the same local training (``edge_node.training.train``), the same buffer
weights, staleness discount and server optimizers (``aggregator.aggregation``), evaluated on the
official test split after every version, as :mod:`benchmarks.limit` counts examples (the rows
every folded update trained on). What it does not have is the real clock: a hospital's update
takes simulated time proportional to the examples it trains on (times a log-normal jitter of
sigma 0.2, seeded), every hospital trains in parallel, and a hospital that finishes trains again
at once if a newer version exists, else when the next one is published (as a node trains each
version at most once). Its rankings are what it is for; the real benchmark confirms a winner.

Each lever is a set of knobs (``LEVERS``): the server optimizer and its step, local training,
the buffer, the staleness function, FedProx's proximal term (``training.proximal``) and
SCAFFOLD-style control variates. ``--pooled`` adds pooled-training recipes (the reference of
:mod:`benchmarks.limit` and a few others), to see whether this CNN reaches 88 % at all.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import math
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray
from rich.console import Console
from rich.table import Table
from torch import nn

from aggregator.aggregation import (
    ServerOptimizer,
    ServerOptimizerState,
    StalenessPolicy,
    buffer_weights,
    server_step,
    weighted_average,
)
from benchmarks._report import number, write_report
from benchmarks.limit import TARGETS, Point, crossings
from common.messages import Knobs, ServerOptimizerKind, StalenessKind, TrainingConfig
from common.models import build_model, model_params
from edge_node.datasets import LocalDataset, load_dataset
from edge_node.training import evaluate, resolve_device, train
from healthnet.federations import PNEUMONIA, Federation

Array = NDArray[np.float32]
Params = Mapping[str, Array]

JITTER_SIGMA = 0.2


@dataclass(frozen=True, slots=True)
class Lever:
    """A federation setting to screen: knobs, and whether nodes keep SCAFFOLD control variates."""

    knobs: Knobs
    scaffold: bool = False
    # FedProx's mu: each local loss gains mu / 2 * ||w - base||^2 (edge_node.training's anchor).
    proximal: float = 0.0
    note: str = ""


_BASE = PNEUMONIA.knobs


def _with(training: Mapping[str, object] | None = None, **knobs: object) -> Knobs:
    update = dict(knobs)
    if training is not None:
        update["training"] = _BASE.training.model_copy(update=dict(training))
    return _BASE.model_copy(update=update)


LEVERS: Mapping[str, Lever] = {
    "default": Lever(_BASE, note="the pneumonia federation's knobs"),
    "epoch": Lever(_with({"logit_adjustment": 0.0}), note="plain cross-entropy"),
    "local-lr-2e-3": Lever(_with({"learning_rate": 2e-3})),
    "local-lr-5e-4": Lever(_with({"learning_rate": 5e-4})),
    "local-lr-3e-3": Lever(_with({"learning_rate": 3e-3})),
    "local-lr-2e-3-k2": Lever(_with({"learning_rate": 2e-3}, buffer_size=2)),
    "local-lr-2e-3-k3": Lever(_with({"learning_rate": 2e-3}, buffer_size=3)),
    "local-lr-2e-3-server-lr-1.5": Lever(_with({"learning_rate": 2e-3}, server_lr=1.5)),
    "k2-server-lr-1.5": Lever(_with(buffer_size=2, server_lr=1.5)),
    "k3": Lever(_with(buffer_size=3)),
    "local-lr-2e-3-steps-10-k8": Lever(_with({"learning_rate": 2e-3, "steps": 10}, buffer_size=8)),
    "epochs-2": Lever(_with({"epochs": 2})),
    "server-lr-2": Lever(_with(server_lr=2.0)),
    "fedavgm-0.5": Lever(_with(server_optimizer=ServerOptimizerKind.FEDAVGM, server_momentum=0.5)),
    "fedadam-1e-3": Lever(
        _with(server_optimizer=ServerOptimizerKind.FEDADAM, server_lr=1e-3, server_tau=1e-3)
    ),
    "fedadam-3e-3": Lever(
        _with(server_optimizer=ServerOptimizerKind.FEDADAM, server_lr=3e-3, server_tau=1e-3)
    ),
    "fedyogi-3e-3": Lever(
        _with(server_optimizer=ServerOptimizerKind.FEDYOGI, server_lr=3e-3, server_tau=1e-3)
    ),
    "fedadam-sgd": Lever(
        _with(
            {"optimizer": "sgd", "learning_rate": 0.05, "momentum": 0.0},
            server_optimizer=ServerOptimizerKind.FEDADAM,
            server_lr=3e-3,
            server_tau=1e-3,
        ),
        note="local SGD, server Adam (Reddi et al.)",
    ),
    "k2": Lever(_with(buffer_size=2)),
    "k8": Lever(_with(buffer_size=8)),
    "constant-staleness": Lever(_with(staleness=StalenessKind.CONSTANT)),
    "hinge-staleness": Lever(_with(staleness=StalenessKind.HINGE, staleness_a=0.5, staleness_b=2)),
    "steps-5-k8": Lever(_with({"steps": 5}, buffer_size=8)),
    "steps-10-k8": Lever(_with({"steps": 10}, buffer_size=8)),
    "sample-exp-0": Lever(_with(sample_exponent=0.0)),
    "sample-exp-0.5": Lever(_with(sample_exponent=0.5)),
    "prox-0.01": Lever(_with(), proximal=0.01, note="FedProx"),
    "prox-0.1": Lever(_with(), proximal=0.1, note="FedProx"),
    "scaffold": Lever(_with(), scaffold=True, note="SCAFFOLD, asynchronous"),
}


@dataclass(slots=True)
class _Hospital:
    node_id: str
    data: LocalDataset
    control: dict[str, Array] = field(default_factory=dict)
    trained_on: int = -1
    busy: bool = False


@dataclass(frozen=True, slots=True)
class _Update:
    node: int
    base: int
    delta: dict[str, Array]
    num_samples: int
    control_delta: dict[str, Array] | None


def _seed(seed: int, node_id: str, version: int) -> int:
    digest = hashlib.sha256(f"{seed}/{node_id}/{version}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def train_scaffold(  # noqa: PLR0917 - the simulator's one call site
    model: nn.Module,
    base: Params,
    data: LocalDataset,
    config: TrainingConfig,
    correction: Params,
    seed: int,
) -> tuple[dict[str, Array], dict[str, Array]]:
    """Local training with each gradient corrected by ``c - c_i`` (``correction``); returns the
    new weights and the mean raw gradient over the pass (the node's next ``c_i``)."""
    from common.models import load_params
    from edge_node.training import batches, label_adjustment

    load_params(model, base)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.from_numpy(data.train_x), torch.from_numpy(data.train_y)
    named = [(n, p) for n, p in model.named_parameters() if n in correction]
    shift = {n: torch.from_numpy(np.asarray(correction[n])) for n, _ in named}
    sums = {n: torch.zeros_like(p) for n, p in named}
    adjustment = None
    if config.logit_adjustment:
        adjustment = label_adjustment(data.train_y, 2, config.logit_adjustment)
    steps = 0
    for rows in batches(len(y), config, torch.Generator().manual_seed(seed)):
        logits = model(x[rows])
        loss = loss_fn(logits if adjustment is None else logits + adjustment, y[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for n, p in named:
            assert p.grad is not None
            sums[n] += p.grad
            p.grad += shift[n]
        optimizer.step()
        steps += 1
    mean = {n: (s / max(steps, 1)).numpy().astype(np.float32) for n, s in sums.items()}
    return model_params(model), mean


def simulate(  # noqa: C901, PLR0915 - one event loop, read whole
    federation: Federation, lever: Lever, seed: int, max_examples: int
) -> list[Point]:
    """One simulated asynchronous run under ``lever``: a point per version."""
    knobs = lever.knobs
    training = knobs.training
    device = resolve_device("cpu")
    hospitals = [_Hospital(s.node_id, load_dataset(s.data)) for s in federation.sites]
    test_x, test_y = hospitals[0].data.test_x, hospitals[0].data.test_y
    model = build_model(federation.model, seed=seed)
    probe = build_model(federation.model, seed=seed)
    params: dict[str, Array] = model_params(model)
    trainable = {n for n, _ in model.named_parameters()}
    versions: dict[int, dict[str, Array]] = {0: params}
    optimizer = ServerOptimizer(
        kind=knobs.server_optimizer,
        lr=knobs.server_lr,
        momentum=knobs.server_momentum,
        beta1=knobs.server_beta1,
        beta2=knobs.server_beta2,
        tau=knobs.server_tau,
    )
    policy = StalenessPolicy(knobs.staleness, knobs.staleness_a, knobs.staleness_b)
    opt_state = ServerOptimizerState()
    control = {n: np.zeros_like(a) for n, a in params.items() if n in trainable}
    for h in hospitals:
        h.control = {n: np.zeros_like(a) for n, a in control.items()}
    rng = np.random.default_rng(seed)
    events: list[tuple[float, int, int, _Update]] = []
    counter = 0
    proximal = lever.proximal

    def start(i: int, now: float, version: int) -> None:
        nonlocal counter
        h = hospitals[i]
        base = versions[version]
        job_seed = _seed(seed, h.node_id, version)
        control_delta = None
        if lever.scaffold:
            correction = {n: control[n] - h.control[n] for n in control}
            new, mean = train_scaffold(model, base, h.data, training, correction, job_seed)
            control_delta = {n: mean[n] - h.control[n] for n in control}
            h.control = mean
        else:
            new = train(
                model, base, h.data.train_x, h.data.train_y, training, seed=job_seed,
                device=device, anchor=base if proximal else None, proximal=proximal,
            ).params  # fmt: skip
        delta = {n: new[n] - base[n] for n in base}
        samples = h.data.num_train
        cost = training.examples_for(samples) * float(rng.lognormal(0.0, JITTER_SIGMA))
        h.trained_on, h.busy = version, True
        counter += 1
        update = _Update(i, version, delta, samples, control_delta)
        heapq.heappush(events, (now + cost, counter, i, update))

    version, examples, folded = 0, 0, 0
    accuracy = evaluate(probe, params, test_x, test_y, device=device).accuracy
    points = [Point(0, 0, 0, 0.0, accuracy)]
    buffer: list[_Update] = []
    for i in range(len(hospitals)):
        start(i, 0.0, 0)
    while events and examples < max_examples:
        now, _, i, update = heapq.heappop(events)
        hospitals[i].busy = False
        if version - update.base <= knobs.max_staleness:
            buffer.append(update)
        if len(buffer) >= knobs.buffer_size:
            stalenesses = [version - u.base for u in buffer]
            samples = [u.num_samples for u in buffer]
            coefficients = buffer_weights(samples, stalenesses, policy, knobs.sample_exponent)
            aggregate = weighted_average([u.delta for u in buffer], coefficients, 1.0)
            params, opt_state = server_step(params, aggregate, opt_state, optimizer)
            if lever.scaffold:
                for u in buffer:
                    assert u.control_delta is not None
                    for n, c in control.items():
                        control[n] = c + u.control_delta[n] / np.float32(len(hospitals))
            examples += sum(training.examples_for(u.num_samples) for u in buffer)
            folded += len(buffer)
            buffer = []
            version += 1
            versions[version] = params
            versions.pop(version - knobs.max_staleness - 2, None)
            accuracy = evaluate(probe, params, test_x, test_y, device=device).accuracy
            points.append(Point(examples, folded, version, now, accuracy))
            for j, h in enumerate(hospitals):
                if not h.busy and h.trained_on < version:
                    start(j, now, version)
        if not hospitals[i].busy and hospitals[i].trained_on < version:
            start(i, now, version)
    return points


POOLED: Mapping[str, tuple[TrainingConfig, str]] = {
    "adam-1e-3": (TrainingConfig(batch_size=32, learning_rate=1e-3, optimizer="adam"), "none"),
    "adam-1e-3-cosine": (
        TrainingConfig(batch_size=32, learning_rate=1e-3, optimizer="adam"),
        "cosine",
    ),
    "adam-3e-3-cosine": (
        TrainingConfig(batch_size=32, learning_rate=3e-3, optimizer="adam"),
        "cosine",
    ),
    "adam-1e-3-wd": (
        TrainingConfig(batch_size=32, learning_rate=1e-3, optimizer="adam", weight_decay=1e-4),
        "none",
    ),
    "adam-1e-3-b128-cosine": (
        TrainingConfig(batch_size=128, learning_rate=2e-3, optimizer="adam"),
        "cosine",
    ),
}


def pooled(federation: Federation, recipe: str, seed: int, epochs: int) -> list[Point]:
    """Pooled training under one of :data:`POOLED`'s recipes, evaluated every 8 batches."""
    config, schedule = POOLED[recipe]
    device = resolve_device("cpu")
    data = [load_dataset(s.data) for s in federation.sites]
    x = torch.from_numpy(np.concatenate([d.train_x for d in data]))
    y = torch.from_numpy(np.concatenate([d.train_y for d in data]))
    model = build_model(federation.model, seed=seed)
    probe = build_model(federation.model, seed=seed)
    opt = torch.optim.Adam(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    total = epochs * math.ceil(len(y) / config.batch_size)

    def factor(step: int) -> float:
        return 0.5 * (1 + math.cos(math.pi * step / total)) if schedule == "cosine" else 1.0

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)
    test_x, test_y = data[0].test_x, data[0].test_y
    points = [Point(0, 0, 0, 0.0, evaluate(probe, model_params(model), test_x, test_y,
                                            device=device).accuracy)]  # fmt: skip
    steps = examples = 0
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for begin in range(0, len(y), config.batch_size):
            rows = order[begin : begin + config.batch_size]
            model.train()
            loss = loss_fn(model(x[rows]), y[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            steps += 1
            examples += len(rows)
            if steps % 8 == 0:
                acc = evaluate(probe, model_params(model), test_x, test_y, device=device).accuracy
                points.append(Point(examples, steps, len(points), 0.0, acc))
    return points


def summary_of(points: Sequence[Point]) -> dict[str, object]:
    row: dict[str, object] = {}
    for target in TARGETS:
        found = crossings(points, target)
        row[f"to_{round(target * 100)}"] = {
            k: (None if v is None else v["examples"]) for k, v in found.items()
        }
    tail = [p.accuracy for p in points[-10:]]
    row["best"] = max(p.accuracy for p in points)
    row["last10_mean"] = round(statistics.fmean(tail), 4)
    row["examples"] = points[-1].examples
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", type=Path, required=True, help="write the results here")
    parser.add_argument("--levers", nargs="*", choices=sorted(LEVERS), default=["default"])
    parser.add_argument("--pooled", nargs="*", choices=sorted(POOLED), default=[])
    parser.add_argument("--pooled-epochs", type=int, default=6)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--examples", type=int, default=20_000,
                        help="stop a simulated run once this many examples are folded")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="a smoke run of seconds")
    args = parser.parse_args()
    if args.quick:
        args.levers, args.pooled, args.seeds = ["default", "scaffold"], ["adam-1e-3"], [0]
        args.examples, args.pooled_epochs = 2_000, 1
    torch.set_num_threads(1)
    console = Console(stderr=True)
    runs: list[dict[str, object]] = []
    report: dict[str, object] = {
        "benchmark": "limit_sim",
        "quick": args.quick,
        "command": " ".join(sys.argv),
        "seeds": args.seeds,
        "max_examples": args.examples,
        "levers": {
            n: {
                "knobs": LEVERS[n].knobs.model_dump(mode="json", exclude={"privacy"}),
                "scaffold": LEVERS[n].scaffold,
                "proximal": LEVERS[n].proximal,
                "note": LEVERS[n].note,
            }
            for n in args.levers
        },
        "runs": runs,
    }
    for seed in args.seeds:
        for recipe in args.pooled:
            began = time.perf_counter()
            points = pooled(PNEUMONIA, recipe, seed, args.pooled_epochs)
            runs.append({"setting": f"pooled/{recipe}", "seed": seed, **summary_of(points),
                         "seconds": round(time.perf_counter() - began, 1)})  # fmt: skip
            console.print(runs[-1])
            write_report(args.json, report)
        for name in args.levers:
            began = time.perf_counter()
            points = simulate(PNEUMONIA, LEVERS[name], seed, args.examples)
            trajectory = [[p.examples, round(p.accuracy, 4)] for p in points]
            runs.append({"setting": name, "seed": seed, **summary_of(points),
                         "seconds": round(time.perf_counter() - began, 1),
                         "trajectory": trajectory})  # fmt: skip
            console.print({k: v for k, v in runs[-1].items() if k != "trajectory"})
            write_report(args.json, report)
    report["summary"] = summarise(runs)
    write_report(args.json, report)
    render(report["summary"])
    console.print(f"written to {args.json}")


def summarise(runs: Sequence[Mapping[str, object]]) -> list[dict[str, object]]:
    """Per setting, over its seeds: the median examples to each target's first crossing and
    last-5 mean (a missed target counting as slower than any reached), how many seeds reached
    it, and the median best and last-ten-versions accuracy."""
    out: list[dict[str, object]] = []
    for setting in dict.fromkeys(str(r["setting"]) for r in runs):
        mine = [r for r in runs if r["setting"] == setting]
        entry: dict[str, object] = {"setting": setting, "seeds": [r["seed"] for r in mine]}
        for target in TARGETS:
            label = f"to_{round(target * 100)}"
            for kind in ("first", "steady"):
                found = [_reached(r, label, kind) for r in mine]
                median = statistics.median(sorted(math.inf if v is None else v for v in found))
                entry[f"{label}_{kind}"] = {
                    "examples": None if math.isinf(median) else median,
                    "reached": f"{sum(v is not None for v in found)}/{len(found)}",
                }
        for key in ("best", "last10_mean"):
            entry[key] = round(statistics.median(number(r[key]) for r in mine), 4)
        out.append(entry)
    return out


def _reached(run: Mapping[str, object], label: str, kind: str) -> float | None:
    crossing = run[label]
    assert isinstance(crossing, dict)
    value = crossing[kind]
    return None if value is None else number(value)


def render(summary: object) -> None:
    assert isinstance(summary, list)
    table = Table(title="median over seeds: examples to each target (first / last-5 mean)")
    for column in ("setting", "85 % first", "85 % steady", "88 % first", "best", "last 10"):
        table.add_column(column, justify="left" if column == "setting" else "right")
    for entry in summary:
        cells = [str(entry["setting"])]
        for key in ("to_85_first", "to_85_steady", "to_88_first"):
            spread = entry[key]
            value = spread["examples"]
            cells.append("-" if value is None else f"{value:,.0f} ({spread['reached']})")
        cells += [f"{entry['best']:.3f}", f"{entry['last10_mean']:.3f}"]
        table.add_row(*cells)
    Console(width=150).print(table)


if __name__ == "__main__":
    main()
