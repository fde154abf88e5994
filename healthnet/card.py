"""``healthnet model card``: what one version of a run is, for a hospital's ethics board.

The card is written twice, as ``card.md`` for people and ``card.json`` for tools, with the run's
accuracy history as ``accuracy.png``. Every number comes from the aggregator's logs
(``versions.jsonl``, ``evaluations.jsonl``) and checkpoints, or from the version's verified blob:
sizes are counts only, never records. What the logs cannot know (the intended use, its limits,
the data's licence for a federation that is not built in) the operator states.

Under personalisation the card describes the global model still, and states beside each
hospital's accuracy its personal model's on the same test split at this version (as the hospital
reported it): the personal models themselves stay at the hospitals.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from aggregator.store import StateStore
from common.errors import DecodeError
from common.messages import Knobs
from healthnet.federations import FEDERATIONS
from healthnet.lifecycle import RunHistory, model_weights, retrieve
from healthnet.report import plot_accuracy

__all__ = ["CardText", "write_card"]

NOT_STATED = "not stated by the operator"
NO_DP = (
    "no differential privacy: updates are neither clipped nor noised for privacy, so no "
    "privacy budget (epsilon) is spent or bounded"
)
# Built-in data sets: where their licence and citations are kept, beside the data.
_DATA_README = {"heart-disease": "heart_disease/README.md", "pneumonia": "pneumonia/README.md"}


@dataclass(frozen=True, slots=True)
class CardText:
    """What the operator states: the logs cannot know it."""

    intended_use: str = NOT_STATED
    limitations: str = NOT_STATED
    data_notes: str = ""


def write_card(run_dir: Path, which: str, out: Path, text: CardText | None = None) -> Path:
    """Write ``card.md``, ``card.json`` and ``accuracy.png`` for a version into ``out``."""
    text = text or CardText()
    retrieved = retrieve(run_dir, which)
    history, copy = retrieved.history, retrieved.copy
    summary = history.summary(copy.version)
    weights = model_weights(retrieved.blob)
    knobs = _knobs_at(history, copy.version)
    train_sizes = _train_sizes(history, copy.version)
    hospitals = sorted({*summary.evaluations, *train_sizes})
    test_sizes = {node: n for node, (_, n) in summary.evaluations.items()}
    test_sizes |= {node: n for node, n in _test_sizes(history).items() if node not in test_sizes}
    data = _data(hospitals, text)
    epsilons = _epsilons(history, copy.version)
    personal = _personal_accuracies(history, copy.version)
    card: dict[str, Any] = {
        "run_id": copy.run_id,
        "version": copy.version,
        "created_at": summary.created_at,
        "provenance": {
            "record_digest": copy.record_digest,
            "model_sha256": copy.sha256,
            "chain_from_version": retrieved.chain[0].version if retrieved.chain else None,
        },
        "intended_use": text.intended_use,
        "limitations": text.limitations,
        "model": {
            "spec": copy.model.model_dump(mode="json"),
            "parameters": sum(int(w.size) for w in weights.values()),
            "tensors": {name: list(w.shape) for name, w in weights.items()},
        },
        "training": None if knobs is None else knobs.training.model_dump(mode="json"),
        "aggregation": None if knobs is None else _aggregation(knobs),
        "compression": None if knobs is None else _compression(knobs),
        "hospitals": [
            {
                "node": node,
                "train_examples": train_sizes.get(node),
                "test_examples": test_sizes.get(node),
                "accuracy": summary.accuracy.get(node),
                "personal_accuracy": personal.get(node),
                "privacy": _hospital_privacy(epsilons.get(node), knobs),
            }
            for node in hospitals
        ],
        "accuracy": {
            "mean": summary.mean_accuracy,
            "pooled": summary.pooled_accuracy,
            "evaluated_by": len(summary.evaluations),
            "history": [
                {"version": s.version, "mean": s.mean_accuracy, "pooled": s.pooled_accuracy}
                for s in history.versions
                if s.evaluations
            ],
        },
        "differential_privacy": _privacy(knobs, epsilons),
        "personalisation": _personalisation(knobs, personal),
        "data": data,
    }
    out.mkdir(parents=True, exist_ok=True)
    figure = plot_accuracy(history.logs, history.logs.snapshot())
    figure.savefig(out / "accuracy.png", dpi=120)
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    path = out / "card.md"
    path.write_text(_markdown(card), encoding="utf-8")
    return path


def _knobs_at(history: RunHistory, version: int) -> Knobs | None:
    """The knobs of the checkpoint nearest ``version`` (at or before it when there is one)."""
    store = StateStore(history.directory)
    order = sorted(history.checkpoints, key=lambda v: (v > version, abs(v - version)))
    for candidate in order:
        try:
            return store.load_checkpoint(candidate).knobs
        except DecodeError:
            continue
    return None


def _train_sizes(history: RunHistory, version: int) -> dict[str, int]:
    """Each hospital's training examples, as its latest update folded up to ``version`` said."""
    sizes: dict[str, int] = {}
    for record in history.logs.records:
        if record.version <= version:
            for c in record.contributions:
                sizes[c.node] = c.num_samples
    return sizes


def _epsilons(history: RunHistory, version: int) -> dict[str, float]:
    """Each hospital's privacy loss as its latest update folded up to ``version`` stated it."""
    spent: dict[str, float] = {}
    for record in history.logs.records:
        if record.version <= version:
            for c in record.contributions:
                if c.epsilon is not None:
                    spent[c.node] = c.epsilon
    return spent


def _personal_accuracies(history: RunHistory, version: int) -> dict[str, float]:
    """Each hospital's personal model at ``version``, from its latest evaluation of it."""
    personal: dict[str, float] = {}
    for entry in history.logs.evaluations:
        evaluation = entry.evaluation
        if evaluation.version == version and evaluation.run_id == history.run_id:
            if evaluation.personal_accuracy is None:
                personal.pop(entry.node, None)
            else:
                personal[entry.node] = evaluation.personal_accuracy
    return personal


def _personalisation(knobs: Knobs | None, personal: dict[str, float]) -> dict[str, Any] | None:
    """The run's personalisation policy and the personal models' mean; None: there was none."""
    policy = None if knobs is None else knobs.personalisation
    if policy is None and not personal:
        return None
    return {
        "policy": None if policy is None else policy.model_dump(mode="json"),
        "mean_personal_accuracy": math.fsum(personal.values()) / len(personal)
        if personal
        else None,
        "reported_by": len(personal),
    }


def _privacy(knobs: Knobs | None, epsilons: dict[str, float]) -> str:
    """The run's differential privacy in words: its policy, or that there was none."""
    policy = None if knobs is None else knobs.privacy
    if policy is None:
        return NO_DP if not epsilons else "differential privacy (DP-SGD); policy unknown"
    return (
        f"record-level differential privacy (DP-SGD at each hospital): each hospital's budget "
        f"epsilon = {policy.epsilon_budget:g} at delta = {policy.delta:g}, clipping norm "
        f"{policy.max_grad_norm:g}; the model is post-processing of the hospitals' private "
        "updates (see docs/privacy.md for what is and is not covered)"
    )


def _hospital_privacy(epsilon: float | None, knobs: Knobs | None) -> str:
    if epsilon is None:
        return NO_DP if knobs is None or knobs.privacy is None else "no private update folded"
    budget = None if knobs is None or knobs.privacy is None else knobs.privacy.epsilon_budget
    return f"epsilon {epsilon:.2f}" + ("" if budget is None else f" of {budget:g}")


def _test_sizes(history: RunHistory) -> dict[str, int]:
    return {e.node: e.evaluation.num_examples for e in history.logs.evaluations}


def _aggregation(knobs: Knobs) -> dict[str, Any]:
    return {
        "rule": f"FedBuff (a buffer of K updates, staleness-weighted), {knobs.aggregation.value}",
        "buffer_size": knobs.buffer_size,
        "max_staleness": knobs.max_staleness,
        "staleness": knobs.staleness.value,
        "staleness_a": knobs.staleness_a,
        "sample_exponent": knobs.sample_exponent,
        "aggregation": knobs.aggregation.value,
        "server_optimizer": knobs.server_optimizer.value,
        "server_lr": knobs.server_lr,
        "max_update_norm": knobs.max_update_norm,
    }


def _compression(knobs: Knobs) -> dict[str, Any]:
    c = knobs.compression
    return {
        "top_k": c.top_k,
        "quantization": c.quantization.value,
        "error_feedback": c.error_feedback,
        "broadcast_dtype": knobs.broadcast_dtype,
    }


def _data(hospitals: list[str], text: CardText) -> dict[str, Any]:
    """The built-in federation whose sites are these hospitals, with its data's licence."""
    for name, federation in FEDERATIONS.items():
        sites = {s.node_id: s.data for s in federation.sites}
        if hospitals and set(hospitals) <= set(sites):
            licence, citations = _readme_sections(name)
            return {
                "federation": name,
                "description": federation.description,
                "datasets": {node: sites[node] for node in hospitals},
                "licence": licence,
                "citations": citations,
                "notes": text.data_notes,
            }
    return {
        "federation": None,
        "licence": text.data_notes or NOT_STATED,
        "citations": [],
        "notes": text.data_notes,
    }


def _readme_sections(name: str) -> tuple[str, list[str]]:
    readme = (resources.files("edge_node.datasets") / _DATA_README[name]).read_text("utf-8")
    licence = " ".join(_section(readme, "Licence").split())
    citations = [
        " ".join(item.split())
        for item in re.split(r"^\* ", _section(readme, "Citation"), flags=re.MULTILINE)
        if item.strip()
    ]
    return licence, citations


def _section(markdown: str, title: str) -> str:
    match = re.search(rf"^## {title}\n(.*?)(?=^## |\Z)", markdown, flags=re.MULTILINE | re.DOTALL)
    return match.group(1).strip() if match else ""


def _pct(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.3f}"


def _personal_lines(personalisation: dict[str, Any] | None) -> list[str]:
    if personalisation is None:
        return []
    policy = personalisation["policy"]
    how = (
        "policy unknown (no readable checkpoint)"
        if policy is None
        else ", ".join(f"{k} = {v}" for k, v in policy.items() if v is not None)
    )
    return [
        "## Personalisation",
        "",
        (
            f"Each hospital also trained a personal model on its own training split ({how}). "
            "This card describes the global model; the personal models never left the "
            "hospitals. The personal model column is each hospital's own model on its own test "
            f"split at this version; their mean over the {personalisation['reported_by']} "
            f"hospitals that reported one: {_pct(personalisation['mean_personal_accuracy'])}."
        ),
        "",
    ]


def _markdown(card: dict[str, Any]) -> str:
    model, accuracy, data = card["model"], card["accuracy"], card["data"]
    lines = [
        f"# Model card: run {card['run_id']}, version {card['version']}",
        "",
        "## Intended use",
        "",
        card["intended_use"],
        "",
        "## Limitations",
        "",
        card["limitations"],
        "",
        "## Model",
        "",
        f"- spec: `{json.dumps(model['spec'], sort_keys=True)}`",
        f"- parameters: {model['parameters']:,}",
        "",
        "## Training and aggregation",
        "",
    ]
    for title in ("training", "aggregation", "compression"):
        values = card[title]
        shown = (
            "unknown (no readable checkpoint)"
            if values is None
            else ", ".join(f"{k} = {v}" for k, v in values.items())
        )
        lines.append(f"- {title}: {shown}")
    personalised = card["personalisation"] is not None
    lines += [
        "",
        "## Hospitals at this version",
        "",
        "| hospital | train examples | test examples | accuracy "
        + ("| personal model " if personalised else "")
        + "| privacy |",
        "|---|---:|---:|---:|" + ("---:|" if personalised else "") + "---|",
    ]
    for h in card["hospitals"]:
        lines.append(
            f"| {h['node']} | {h['train_examples'] or 'n/a'} | {h['test_examples'] or 'n/a'} "
            f"| {_pct(h['accuracy'])} "
            + (f"| {_pct(h['personal_accuracy'])} " if personalised else "")
            + f"| {h['privacy']} |"
        )
    lines += [
        "",
        (
            f"Mean accuracy over the {accuracy['evaluated_by']} hospitals that evaluated this "
            f"version: {_pct(accuracy['mean'])}; pooled over their test examples: "
            f"{_pct(accuracy['pooled'])}."
        ),
        "",
        "![accuracy by version](accuracy.png)",
        "",
        *_personal_lines(card["personalisation"]),
        "## Privacy",
        "",
        card["differential_privacy"].capitalize() + ".",
        "",
        "## Data",
        "",
    ]
    if data["federation"]:
        lines.append(f"{data['description']}.")
        lines.append("")
    lines.append(f"Licence: {data['licence']}")
    if data["citations"]:
        lines += ["", "Citations:", ""] + [f"- {c}" for c in data["citations"]]
    if data["notes"] and data["federation"]:
        lines += ["", data["notes"]]
    prov = card["provenance"]
    lines += [
        "",
        "## Provenance",
        "",
        f"- record digest (hash chain): `{prov['record_digest'] or 'none (no chain)'}`",
        f"- model sha256: `{prov['model_sha256']}`",
        f"- chain verified from version {prov['chain_from_version']}",
        "",
    ]
    return "\n".join(lines)
