"""Differential privacy on both federations: accuracy against each hospital's epsilon budget.

    python -m benchmarks.privacy --json OUT [--quick] [--plot PNG] [--seed N]

Each setting runs a whole federation (real processes on an embedded Mosquitto, FedBuff with the
federation's own knobs) for its demo's number of versions: heart disease (FLamby's split, four
hospitals, logistic regression) without DP and at an epsilon budget of 1, 3 and 8 per hospital;
pneumonia (eight hospitals, the built-in CNN, the official test split) without DP and at 3 and 8.
Under DP every hospital trains with DP-SGD (Opacus, RDP accountant) under a policy that calibrates
its noise so that ``versions`` updates would spend the budget (``calibrate_versions`` = the run's
versions, or ``--calibrate-versions``): a hospital that sends an update for every version ends the
run with its budget spent, one that skips versions ends below it. Delta is 1e-3 on heart disease
(Switzerland, the smallest hospital, has 30 training records: 1/n = 0.033) and 1e-5 on pneumonia
(each hospital has at least 100 images). The nodes report their evaluations exactly
(``metrics = exact``): the benchmark measures the model, and the rounding a deployment would use
is not what it measures.

Per setting it reports the final model's mean test accuracy over the hospitals and the pooled one
(every hospital's test set together), the mean over the last five versions, the versions and the
updates folded, the run's wall clock, and ``epsilon``: the largest total epsilon any hospital
reached, read from each node's own ledger after the run (what ``healthnet node privacy`` shows,
and what the node's last status put in the aggregator's tallies), with each hospital's. Beside it,
``epsilon_folded`` is the largest a hospital's folded update carried
(:attr:`~common.messages.Contribution.epsilon` in the run's version records): the privacy loss the
final model was made at. The two differ by an update trained and charged after the last fold.

Under DP each hospital trains as its federation's ``dp_training`` says (pneumonia: SGD at learning
rate 1 where the no-DP run uses Adam; heart disease: as without DP), clipping at ``--max-grad-norm``
(1 unless told); each row records its training.

``train_seconds_ratio`` is one update's DP training time over the no-DP run's update (the
federation's own training), ``train_seconds_ratio_same_training`` over the DP training run
without DP: the cost of DP-SGD alone. Each hospital's update is trained in this process by the
node's own training functions from the initial model (process CPU time, best of alternating
repeats, one torch thread as the nodes use): the runs' updates carry their training time only to
the aggregator, and eight nodes sharing a machine's cores make in-run times mostly a measure of
the sharing. ``--quick`` runs two heart
hospitals for three versions without DP and at epsilon 3 (tests/benchmarks/test_quick.py runs it
so that the benchmark cannot rot); its figures mean nothing. ``--plot`` draws accuracy against
epsilon for both federations (docs/privacy.png).
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from benchmarks._report import best_of, number, write_report
from common.jsonlog import read_json_lines
from common.messages import MetricRelease, PrivacyPolicy, TrainingConfig, VersionRecord
from common.models import build_model, model_params
from edge_node.datasets import load_dataset
from edge_node.privacy import plan_training, train_private
from edge_node.privacy_ledger import read_ledger, spend_of
from edge_node.training import resolve_device, train
from healthnet.demo import DemoConfig, first_sites, run_demo
from healthnet.federations import FEDERATIONS, Federation

DELTAS = {"heart-disease": 1e-3, "pneumonia": 1e-5}


@dataclass(frozen=True, slots=True)
class Setting:
    federation: str
    epsilon_budget: float | None  # None: no differential privacy

    @property
    def name(self) -> str:
        budget = self.epsilon_budget
        return f"{self.federation}/" + ("no-dp" if budget is None else f"eps-{budget:g}")


SETTINGS: tuple[Setting, ...] = (
    Setting("heart-disease", None),
    Setting("heart-disease", 1.0),
    Setting("heart-disease", 3.0),
    Setting("heart-disease", 8.0),
    Setting("pneumonia", None),
    Setting("pneumonia", 3.0),
    Setting("pneumonia", 8.0),
)
QUICK: tuple[Setting, ...] = (Setting("heart-disease", None), Setting("heart-disease", 3.0))


def policy_of(setting: Setting, versions: int, max_grad_norm: float) -> PrivacyPolicy | None:
    """The run's privacy policy: noise calibrated to spend the budget over ``versions``."""
    if setting.epsilon_budget is None:
        return None
    return PrivacyPolicy(
        calibrate_versions=versions,
        max_grad_norm=max_grad_norm,
        delta=DELTAS[setting.federation],
        epsilon_budget=setting.epsilon_budget,
        metrics=MetricRelease.EXACT,
    )


def folded_epsilons(records: Sequence[VersionRecord]) -> dict[str, float]:
    """Each hospital's largest total epsilon among its updates folded into the run's versions."""
    reached: dict[str, float] = {}
    for record in records:
        for c in record.contributions:
            if c.epsilon is not None:
                reached[c.node] = max(reached.get(c.node, 0.0), c.epsilon)
    return reached


def ledger_epsilons(nodes: Path, hospitals: Sequence[str]) -> dict[str, float]:
    """Each hospital's total epsilon as its own ledger has it at the end of the run (what
    ``healthnet node privacy`` shows, and its last status reported to the aggregator's tallies);
    a hospital with no charge is left out."""
    reached: dict[str, float] = {}
    for hospital in hospitals:
        # The node keeps its ledger in ``privacy/`` of its state directory.
        spend = spend_of(read_ledger(nodes / hospital / "privacy"))
        if spend is not None:
            reached[hospital] = spend.epsilon
    return reached


def _returning_none(action: Callable[[], object]) -> Callable[[], None]:
    """``action`` as :func:`~benchmarks._report.best_of` times it, its result dropped."""

    def run() -> None:
        action()

    return run


def train_timings(
    federation: Federation,
    policies: Sequence[PrivacyPolicy],
    dp_training: TrainingConfig,
    repeats: int,
    seed: int,
) -> tuple[float, float, list[float], list[dict[str, float]]]:
    """Mean CPU seconds of one update without DP (the federation's training, then DP's training
    without DP) and under each policy (DP's training), and each policy's noise multiplier at each
    hospital.

    Every hospital trains one update from the initial model with the node's own functions
    (:func:`edge_node.training.train`, :func:`edge_node.privacy.train_private`); the actions
    alternate within each repeat so that a slow moment of a shared machine hits them alike.
    """
    device = resolve_device("cpu")
    training = federation.knobs.training
    plain_total = same_total = 0.0
    private_totals = [0.0] * len(policies)
    noise: list[dict[str, float]] = [{} for _ in policies]
    for site in federation.sites:
        dataset = load_dataset(site.data)
        x, y = dataset.train_x, dataset.train_y
        model = build_model(federation.model, seed=seed)
        base = model_params(model)
        actions: list[Callable[[], None]] = [
            _returning_none(partial(train, model, base, x, y, config, seed=seed, device=device))
            for config in (training, dp_training)
        ]
        for i, policy in enumerate(policies):
            plan = plan_training(policy, len(y), dp_training)
            noise[i][site.node_id] = plan.noise_multiplier
            private = partial(train_private, plan=plan, device=device)
            actions.append(_returning_none(partial(private, model, base, x, y, dp_training)))
        best = best_of(repeats, *actions)["cpu"]
        plain_total += best[0]
        same_total += best[1]
        for i in range(len(policies)):
            private_totals[i] += best[2 + i]
    count = len(federation.sites)
    return plain_total / count, same_total / count, [t / count for t in private_totals], noise


def run_setting(
    setting: Setting,
    policy: PrivacyPolicy | None,
    training: TrainingConfig | None,
    *,
    versions: int,
    nodes: int | None,
    seed: int,
    workdir: Path,
    console: Console,
) -> dict[str, object]:
    """One whole federation run under ``policy``: its accuracy, versions, time and epsilon."""
    result = run_demo(
        DemoConfig(
            federation=setting.federation,
            versions=versions,
            nodes=nodes,
            seed=seed,
            privacy=policy,
            training=training,
            workdir=workdir,
            timeout=3600,
        ),
        console,
    )
    records = list(read_json_lines(workdir / "aggregator" / "versions.jsonl", VersionRecord))
    reached = ledger_epsilons(workdir / "nodes", list(result.per_node))
    folded = folded_epsilons(records)
    return {
        "name": setting.name,
        "federation": setting.federation,
        "epsilon_budget": setting.epsilon_budget,
        "epsilon": max(reached.values()) if reached else None,
        "epsilon_per_hospital": reached,
        "epsilon_folded": max(folded.values()) if folded else None,
        "epsilon_folded_per_hospital": folded,
        "delta": None if policy is None else policy.delta,
        "calibrate_versions": None if policy is None else policy.calibrate_versions,
        "max_grad_norm": None if policy is None else policy.max_grad_norm,
        "training": None if training is None else training.model_dump(mode="json"),
        "mean_accuracy": result.mean_accuracy,
        "pooled_accuracy": result.pooled_accuracy,
        "mean_accuracy_last5": result.mean_accuracy_last5,
        "per_hospital_accuracy": result.per_node,
        "versions": result.versions,
        "updates_folded": result.updates_folded,
        "updates_per_hospital": result.updates_per_node,
        "seconds": result.wall_seconds,
    }


def plot(rows: Sequence[dict[str, object]], path: Path) -> None:
    """Accuracy of the final model against the largest epsilon a hospital reached; no DP as a
    dashed line at the same height across the plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for federation, colour in (("heart-disease", "tab:red"), ("pneumonia", "tab:blue")):
        mine = [r for r in rows if r["federation"] == federation]
        private = sorted(
            (number(r["epsilon"]), number(r["mean_accuracy"]))
            for r in mine
            if r["epsilon"] is not None
        )
        if private:
            xs, ys = zip(*private, strict=True)
            ax.plot(xs, ys, "o-", color=colour, label=f"{federation}, DP-SGD")
        for r in mine:
            if r["epsilon_budget"] is None:
                ax.axhline(
                    number(r["mean_accuracy"]), color=colour, ls="--", lw=1,
                    label=f"{federation}, no DP",
                )  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("largest epsilon a hospital reached (log scale)")
    ax.set_ylabel("mean test accuracy of the final model")
    ax.set_title("Accuracy against each hospital's privacy loss")
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def print_table(rows: Sequence[dict[str, object]]) -> None:
    """The settings' figures as a table on standard output."""
    table = Table(title="accuracy against each hospital's epsilon")
    for column in ("setting", "epsilon", "delta", "mean acc", "pooled", "last 5", "versions",
                   "seconds", "train x"):  # fmt: skip
        table.add_column(column, justify="left" if column == "setting" else "right")
    for r in rows:
        epsilon, delta = r["epsilon"], r["delta"]
        table.add_row(
            str(r["name"]),
            "-" if epsilon is None else f"{number(epsilon):.2f}",
            "-" if delta is None else f"{number(delta):g}",
            f"{number(r['mean_accuracy']):.3f}",
            f"{number(r['pooled_accuracy']):.3f}",
            f"{number(r['mean_accuracy_last5']):.3f}",
            str(r["versions"]),
            f"{number(r['seconds']):.0f}",
            f"{number(r['train_seconds_ratio']):.2f}",
        )
    Console(width=140).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", type=Path, required=True, help="write the results here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="DP-SGD clipping norm C")
    parser.add_argument(
        "--calibrate-versions", type=int, help="calibrate the noise over N versions (the run's)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="training time repeats")
    parser.add_argument("--plot", type=Path, help="accuracy against epsilon (PNG)")
    parser.add_argument("--quick", action="store_true", help="a smoke run of about a minute")
    parser.add_argument(
        "--settings", nargs="+", choices=[s.name for s in SETTINGS], help="run only these"
    )
    args = parser.parse_args()
    console = Console(stderr=True)
    torch.set_num_threads(1)  # as each node trains (DemoConfig.torch_threads)
    settings = QUICK if args.quick else SETTINGS
    if args.settings:
        settings = tuple(s for s in settings if s.name in args.settings)
    nodes = 2 if args.quick else None
    repeats = 2 if args.quick else args.repeats
    rows: list[dict[str, object]] = []
    federations: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="healthnet-bench-") as tmp:
        for name in dict.fromkeys(s.federation for s in settings):
            federation = first_sites(FEDERATIONS[name], nodes, None)
            versions = 3 if args.quick else federation.demo_versions
            mine = [s for s in settings if s.federation == name]
            dp_training = federation.dp_training or federation.knobs.training
            calibrate = args.calibrate_versions or versions
            policies = {s: policy_of(s, calibrate, args.max_grad_norm) for s in mine}
            private = [s for s in mine if policies[s] is not None]
            console.rule(f"{name}: one update's training time, {repeats} repeats")
            plain, same, timed, noise = train_timings(
                federation,
                [p for s in private if (p := policies[s]) is not None],
                dp_training,
                repeats,
                args.seed,
            )
            times = {s: (t, n) for s, t, n in zip(private, timed, noise, strict=True)}
            federations[name] = {
                "hospitals": [s.node_id for s in federation.sites],
                "versions": versions,
                "delta": DELTAS[name],
                "knobs": federation.knobs.model_dump(mode="json", exclude={"privacy"}),
                "dp_training": dp_training.model_dump(mode="json"),
                "train_seconds_no_dp": plain,
                "train_seconds_no_dp_dp_training": same,
            }
            for setting in mine:
                console.rule(setting.name)
                policy = policies[setting]
                row = run_setting(
                    setting,
                    policy,
                    None if policy is None else federation.dp_training,
                    versions=versions,
                    nodes=nodes,
                    seed=args.seed,
                    workdir=Path(tmp) / setting.name,
                    console=console,
                )
                seconds, multipliers = times.get(setting, (plain, {}))
                row["noise_multiplier_per_hospital"] = multipliers
                row["train_seconds"] = seconds
                row["train_seconds_ratio"] = seconds / plain
                row["train_seconds_ratio_same_training"] = 1.0 if policy is None else seconds / same
                rows.append(row)
    print_table(rows)
    if args.plot:
        plot(rows, args.plot)
        console.print(f"plot written to {args.plot}")
    report = {
        "benchmark": "privacy",
        "quick": args.quick,
        "seed": args.seed,
        "mode": "fedbuff",
        "accountant": "rdp",
        "metrics": MetricRelease.EXACT.value,
        "federations": federations,
        "settings": rows,
    }
    write_report(args.json, report)
    console.print(f"written to {args.json}")


if __name__ == "__main__":
    main()
