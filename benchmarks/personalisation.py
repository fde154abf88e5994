"""Personalisation on two federations: each hospital's global, local-only and personal accuracy.

    python -m benchmarks.personalisation --json OUT [--plot PNG] [--seeds N] [--quick] [--real]

Two federations, each hospital testing on its own test split:

- **heart-disease**: UCI Heart Disease at its four hospitals (FLamby's Fed-Heart-Disease split),
  logistic regression, the federation's own training config (SGD, lr 0.05, batch 8, one epoch).
- **pneumonia-shift**: PneumoniaMNIST's official train split divided among four hospitals by a
  Dirichlet(1.0) label skew (seed 0, at least 200 images each); each hospital's test share is cut
  from the official test split with its own class mix (its share of each class of the train
  split), so every hospital tests on patients like its own. A small MLP (784-32-2) on the
  pixels, Adam lr 1e-3, batch 32, one epoch: small enough to run in minutes on two cores.

The federation itself runs in this process (the node's own training and personalisation
functions, :mod:`edge_node.training` and :mod:`edge_node.personal`), as synchronous FedAvg: every
round each hospital trains one epoch from the global model and the weighted mean of their
weights (by training records) becomes the next version. Each hospital also runs the policy's
personalisation as a node does for every version it evaluates: Ditto trains its personal model
against each version; fine-tuning trains the final version for the policy's epochs. Reported
for the final version, per hospital and as the mean over hospitals (no version is picked by test
accuracy):

- ``global``: the final global model;
- ``local``: local-only training, the same number of epochs as the federation has rounds, from
  the same initial weights;
- one entry per method below (``finetune``, ``ditto`` at three lambdas, and ``ditto-holdout``:
  lambda 0.3 trained on 80 % of the training split, the hospital keeping the global version where
  it is as accurate as the personal model on the other 20 %).

``--real`` (``--real-only``: nothing else) runs the heart federation once more through the real
system (an embedded Mosquitto, the aggregator and four node processes, FedBuff K = 3, 60
versions) with the default method's policy, and records what the hospitals reported: the global
and personal accuracy of each on the final version. ``--quick`` runs two rounds of two seeds
(tests/benchmarks/test_quick.py); its figures mean nothing. ``--plot`` draws each hospital's
accuracy per method (docs/personalisation.png).
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray
from rich.console import Console
from rich.table import Table

from benchmarks._report import number, write_report
from common.messages import (
    ModelSpec,
    Personalisation,
    PersonalisationMethod,
    TrainingConfig,
)
from common.models import build_model, model_params
from edge_node.datasets import LocalDataset, load_dataset
from edge_node.datasets._partition import dirichlet_partition
from edge_node.datasets.pneumonia import load_official
from edge_node.personal import holdout_split, personalise, prefers_personal
from edge_node.training import evaluate, train
from healthnet.federations import HEART_DISEASE

CPU = torch.device("cpu")
Params = Mapping[str, NDArray[np.float32]]

# The method the docs and the real run use, then the lambdas around it.
DEFAULT = "ditto"
METHODS: dict[str, Personalisation] = {
    "finetune": Personalisation(method=PersonalisationMethod.FINETUNE, epochs=1),
    "ditto": Personalisation(method=PersonalisationMethod.DITTO, epochs=1, ditto_lambda=0.3),
    "ditto-0.1": Personalisation(method=PersonalisationMethod.DITTO, epochs=1, ditto_lambda=0.1),
    "ditto-1": Personalisation(method=PersonalisationMethod.DITTO, epochs=1, ditto_lambda=1.0),
    "ditto-holdout": Personalisation(
        method=PersonalisationMethod.DITTO, epochs=1, ditto_lambda=0.3, holdout=0.2
    ),
}
SHIFT_ALPHA = 1.0
SHIFT_HOSPITALS = 4
SHIFT_MIN_TRAIN = 200


@dataclass(frozen=True, slots=True)
class Federation:
    name: str
    model: ModelSpec
    training: TrainingConfig
    hospitals: tuple[str, ...]
    sites: tuple[LocalDataset, ...]
    rounds: int


def heart(rounds: int) -> Federation:
    return Federation(
        name="heart-disease",
        model=HEART_DISEASE.model,
        training=HEART_DISEASE.knobs.training,
        hospitals=tuple(s.node_id for s in HEART_DISEASE.sites),
        sites=tuple(load_dataset(s.data) for s in HEART_DISEASE.sites),
        rounds=rounds,
    )


def test_shares(
    train_parts: Sequence[NDArray[np.int64]], train_y: NDArray[np.int64], test_y: NDArray[np.int64]
) -> list[NDArray[np.int64]]:
    """Cut the test split so that each hospital gets of every class the share it has of that
    class in the train split (so its test patients are mixed like its training patients)."""
    shares: list[list[NDArray[np.int64]]] = [[] for _ in train_parts]
    rng = np.random.default_rng(0)
    for label in np.unique(train_y):
        counts = np.array([np.sum(train_y[part] == label) for part in train_parts], float)
        members = rng.permutation(np.flatnonzero(test_y == label))
        cuts = np.round(np.cumsum(counts / counts.sum())[:-1] * len(members)).astype(np.int64)
        for share, chunk in zip(shares, np.split(members, cuts), strict=True):
            share.append(chunk)
    return [np.sort(np.concatenate(share)) for share in shares]


def pneumonia_shift(rounds: int) -> Federation:
    official = load_official()
    parts, _ = dirichlet_partition(
        official.train_y,
        SHIFT_HOSPITALS,
        alpha=SHIFT_ALPHA,
        seed=0,
        min_samples=SHIFT_MIN_TRAIN,
    )
    tests = test_shares(parts, official.train_y, official.test_y)
    hospitals = tuple(f"site-{i}" for i in range(1, SHIFT_HOSPITALS + 1))
    sites = tuple(
        LocalDataset(
            name=f"pneumonia-shift:{name}",
            train_x=official.train_x[part],
            train_y=official.train_y[part],
            test_x=official.test_x[test],
            test_y=official.test_y[test],
            num_classes=2,
        )
        for name, part, test in zip(hospitals, parts, tests, strict=True)
    )
    return Federation(
        name="pneumonia-shift",
        model=ModelSpec(name="mlp", kwargs={"in_features": 784, "hidden": 32, "num_classes": 2}),
        training=TrainingConfig(epochs=1, batch_size=32, learning_rate=1e-3, optimizer="adam"),
        hospitals=hospitals,
        sites=sites,
        rounds=rounds,
    )


def _accuracy(model: torch.nn.Module, params: Params, site: LocalDataset) -> float:
    return evaluate(model, params, site.test_x, site.test_y, device=CPU).accuracy


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def simulate(
    federation: Federation, methods: Mapping[str, Personalisation], seed: int
) -> dict[str, list[float]]:
    """One seed: per hospital, the accuracy of the global, local-only and personal models."""
    model = build_model(federation.model, seed=seed)
    initial = model_params(model)
    weights: Params = initial
    sites, config = federation.sites, federation.training
    samples = np.array([site.num_train for site in sites], dtype=np.float64)
    personal: dict[str, list[Params | None]] = {name: [None] * len(sites) for name in methods}
    splits = {
        name: [
            holdout_split(s.num_train, p.holdout, _seed(seed, i, 4)) for i, s in enumerate(sites)
        ]
        for name, p in methods.items()
    }
    for step in range(federation.rounds):
        trained = [
            train(
                model, weights, s.train_x, s.train_y, config, seed=_seed(seed, step, i), device=CPU
            )
            for i, s in enumerate(sites)
        ]
        weights = {
            name: np.asarray(
                sum(
                    w * t.params[name]
                    for w, t in zip(samples / samples.sum(), trained, strict=True)
                ),
                dtype=np.float32,
            )
            for name in weights
        }
        for name, policy in methods.items():
            if policy.method is not PersonalisationMethod.DITTO:
                continue
            for i, site in enumerate(sites):
                fit = splits[name][i][0]
                personal[name][i] = personalise(
                    model,
                    policy,
                    start=personal[name][i] or weights,
                    global_params=weights,
                    x=site.train_x[fit],
                    y=site.train_y[fit],
                    config=config,
                    seed=_seed(seed, step, i, 1),
                    device=CPU,
                ).params
    out = {"global": [_accuracy(model, weights, s) for s in sites]}
    local = config.model_copy(update={"epochs": federation.rounds})
    out["local"] = [
        _accuracy(
            model,
            train(
                model, initial, s.train_x, s.train_y, local, seed=_seed(seed, i, 2), device=CPU
            ).params,
            s,
        )
        for i, s in enumerate(sites)
    ]
    for name, policy in methods.items():
        accuracies = []
        for i, site in enumerate(sites):
            fit, held = splits[name][i]
            params = personal[name][i]
            if params is None:  # fine-tuning: the final version, trained on
                params = personalise(
                    model,
                    policy,
                    start=weights,
                    global_params=weights,
                    x=site.train_x[fit],
                    y=site.train_y[fit],
                    config=config,
                    seed=_seed(seed, i, 3),
                    device=CPU,
                ).params
            if len(held):
                x, y = site.train_x[held], site.train_y[held]
                mine = evaluate(model, params, x, y, device=CPU).accuracy
                theirs = evaluate(model, weights, x, y, device=CPU).accuracy
                params = params if prefers_personal(mine, theirs) else weights
            accuracies.append(_accuracy(model, params, site))
        out[name] = accuracies
    return out


def summarise(
    federation: Federation, runs: Sequence[Mapping[str, list[float]]]
) -> dict[str, object]:
    """Per model: each seed's per-hospital and mean accuracy, the median of the means, and each
    hospital's worst drop below the global model over the seeds."""
    summary: dict[str, object] = {}
    for name in runs[0]:
        means = [statistics.fmean(run[name]) for run in runs]
        drops = [
            min(run[name][i] - run["global"][i] for run in runs)
            for i in range(len(federation.hospitals))
        ]
        summary[name] = {
            "per_seed_mean": means,
            "median_mean": statistics.median(means),
            "per_hospital_median": dict(
                zip(
                    federation.hospitals,
                    [
                        statistics.median(run[name][i] for run in runs)
                        for i in range(len(federation.hospitals))
                    ],
                    strict=True,
                )
            ),
            "per_seed_per_hospital": [
                dict(zip(federation.hospitals, run[name], strict=True)) for run in runs
            ],
            "worst_drop_below_global": dict(zip(federation.hospitals, drops, strict=True)),
        }
    return summary


def real_heart(versions: int, console: Console) -> dict[str, object]:
    """The heart federation through the real system with the default method's policy."""
    from healthnet.demo import DemoConfig, run_demo

    with tempfile.TemporaryDirectory(prefix="healthnet-personal-") as tmp:
        result = run_demo(
            DemoConfig(
                federation="heart-disease",
                versions=versions,
                personalisation=METHODS[DEFAULT],
                workdir=Path(tmp),
            ),
            console,
        )
    return {
        "policy": METHODS[DEFAULT].model_dump(mode="json"),
        "versions": result.versions,
        "updates_folded": result.updates_folded,
        "wall_seconds": result.wall_seconds,
        "global_per_hospital": result.per_node,
        "personal_per_hospital": result.personal_per_node,
        "global_mean": result.mean_accuracy,
        "personal_mean": result.personal_mean_accuracy,
    }


def plot(report: Mapping[str, object], path: Path) -> None:
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    federations = report["federations"]
    assert isinstance(federations, dict)
    methods = report["methods"]
    assert isinstance(methods, dict)
    names = ["global", "local", *methods]
    fig, axes = plt.subplots(1, len(federations), figsize=(6 * len(federations), 4), squeeze=False)
    for ax, (fed_name, entry) in zip(axes[0], federations.items(), strict=True):
        hospitals = entry["hospitals"]
        models = entry["models"]
        width = 0.8 / len(names)
        for j, name in enumerate(names):
            medians = models[name]["per_hospital_median"]
            xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(hospitals) + 1)]
            ys = [medians[h] for h in hospitals] + [models[name]["median_mean"]]
            ax.bar(xs, ys, width, label=name)
        ax.set_xticks(range(len(hospitals) + 1), [*hospitals, "mean"])
        low = min(models[n]["per_hospital_median"][h] for n in names for h in hospitals)
        ax.set_ylim(max(0.0, math.floor(low * 10) / 10 - 0.05), 1.0)
        ax.set_ylabel("test accuracy, final version (median of seeds)")
        ax.set_title(f"{fed_name}: each hospital on its own test split")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8, ncols=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", type=Path, required=True, help="write the results here")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--heart-rounds", type=int, default=30)
    parser.add_argument("--shift-rounds", type=int, default=15)
    parser.add_argument("--plot", type=Path, help="each hospital's accuracy per method (PNG)")
    parser.add_argument("--real", action="store_true", help="also run heart through the system")
    parser.add_argument("--real-versions", type=int, default=60)
    parser.add_argument(
        "--real-only", action="store_true", help="only the run through the real system"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run of seconds")
    parser.add_argument(
        "--federations",
        nargs="+",
        choices=["heart-disease", "pneumonia-shift"],
        help="run only these (default: both)",
    )
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), help="only these methods")
    args = parser.parse_args()
    console = Console(stderr=True)
    torch.set_num_threads(1)  # as each node trains (DemoConfig.torch_threads)
    seeds = 2 if args.quick else args.seeds
    federations = (
        [heart(2), pneumonia_shift(1)]
        if args.quick
        else [heart(args.heart_rounds), pneumonia_shift(args.shift_rounds)]
    )
    report: dict[str, object] = {
        "quick": args.quick,
        "seeds": seeds,
        "default_method": DEFAULT,
        "methods": {name: p.model_dump(mode="json") for name, p in METHODS.items()},
        "schedule": "synchronous FedAvg in this process, final version",
    }
    entries: dict[str, object] = {}
    if args.federations:
        federations = [f for f in federations if f.name in args.federations]
    methods = {n: p for n, p in METHODS.items() if not args.methods or n in args.methods}
    report["methods"] = {name: p.model_dump(mode="json") for name, p in methods.items()}
    if args.real_only:
        federations = []
        report["schedule"] = "the real system: FedBuff K = 3 over Mosquitto, final version"
    for federation in federations:
        started = time.perf_counter()
        runs = []
        for seed in range(seeds):
            console.log(f"{federation.name}: seed {seed}")
            runs.append(simulate(federation, methods, seed))
        entries[federation.name] = {
            "hospitals": list(federation.hospitals),
            "train_records": {
                h: s.num_train for h, s in zip(federation.hospitals, federation.sites, strict=True)
            },
            "test_records": {
                h: s.num_test for h, s in zip(federation.hospitals, federation.sites, strict=True)
            },
            "positive_share_train": {
                h: float(np.mean(s.train_y))
                for h, s in zip(federation.hospitals, federation.sites, strict=True)
            },
            "rounds": federation.rounds,
            "model": federation.model.model_dump(mode="json"),
            "training": federation.training.model_dump(mode="json"),
            "seconds": time.perf_counter() - started,
            "models": summarise(federation, runs),
        }
    report["federations"] = entries
    if args.real or args.real_only:
        report["real_heart"] = real_heart(3 if args.quick else args.real_versions, console)
    write_report(args.json, report)
    for name, entry in entries.items():
        assert isinstance(entry, dict)
        table = Table(title=f"{name}: test accuracy per hospital (median of {seeds} seeds)")
        table.add_column("model")
        for hospital in entry["hospitals"]:
            table.add_column(hospital, justify="right")
        table.add_column("mean", justify="right")
        table.add_column("worst drop", justify="right")
        for model_name, row in entry["models"].items():
            table.add_row(
                model_name,
                *(f"{number(row['per_hospital_median'][h]):.3f}" for h in entry["hospitals"]),
                f"{number(row['median_mean']):.3f}",
                f"{min(number(v) for v in row['worst_drop_below_global'].values()):+.3f}",
            )
        Console(width=140).print(table)
    if args.plot and entries:
        plot(report, args.plot)


if __name__ == "__main__":
    main()
