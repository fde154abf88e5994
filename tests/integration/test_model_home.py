"""The loop from federation to use: a real demo run, then what a hospital does with its model."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common.provenance import verify_chain
from edge_node.datasets import load_dataset
from healthnet.lifecycle import load_history, load_model_copy

pytestmark = [pytest.mark.slow, pytest.mark.broker]

HOSPITALS = ("cleveland", "hungarian", "switzerland", "va")


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "healthnet", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, "COLUMNS": "160"},
    )


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ten-version heart-disease federation, run as docs/running.md takes a model home."""
    workdir = tmp_path_factory.mktemp("demo")
    ok(cli("demo", "--versions", "10", "--workdir", str(workdir), "--no-dashboard"))
    return workdir


def test_pull_export_predict_reproduces_the_recorded_accuracy(demo: Path, tmp_path: Path) -> None:
    """`model pull best`, `model export` in every format, and `predict` on each hospital's test
    split give exactly the accuracy the hospital reported for that version; ONNX gives torch's
    logits within 1e-5 on every test example."""
    import onnxruntime

    listing = ok(cli("model", "list", "--run", str(demo)))
    history = load_history(demo)
    # The aggregator archived every version it made, v0 included, and sealed every record.
    assert [s.version for s in history.versions] == list(range(11))
    assert all(s.retrievable for s in history.versions)
    verify_chain(list(history.logs.records))
    best = history.resolve("best")
    assert "best" in listing
    recorded = history.summary(best).evaluations
    assert set(recorded) == set(HOSPITALS)  # best is a version every hospital evaluated
    model_dir = tmp_path / "model"
    pulled = ok(cli("model", "pull", "best", "--run", str(demo), "--out", str(model_dir)))
    assert f"pulled v{best} " in pulled.replace("\n", " ")
    for fmt in ("safetensors", "onnx", "torchscript"):
        ok(cli("model", "export", "best", "--run", str(demo), "--format", fmt,
               "--out", str(model_dir)))  # fmt: skip
    assert {p.name for p in model_dir.iterdir()} >= {
        "model.json", "model.blob", "versions.jsonl", "model.safetensors", "model.onnx",
        "model.torchscript.pt",
    }  # fmt: skip
    ok(cli("model", "verify", str(model_dir)))
    _, model = load_model_copy(model_dir)
    session = onnxruntime.InferenceSession(
        str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    for hospital in HOSPITALS:
        out = tmp_path / f"{hospital}.csv"
        printed = ok(cli("predict", "--model", str(model_dir), "--data",
                         f"heart-disease:{hospital}", "--out", str(out)))  # fmt: skip
        with out.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        correct = sum(r["predicted"] == r["label"] for r in rows)
        assert (correct, len(rows)) == recorded[hospital], hospital
        assert f"({correct}/{len(rows)} labelled)" in printed
        x = load_dataset(f"heart-disease:{hospital}").test_x
        (onnx_logits,) = session.run(["logits"], {"input": x})
        with torch.no_grad():
            torch_logits = model(torch.from_numpy(x)).numpy()
        assert np.abs(onnx_logits - torch_logits).max() <= 1e-5, hospital


def test_the_model_card_states_the_numbers_of_the_runs_logs(demo: Path, tmp_path: Path) -> None:
    """`model card best` writes Markdown, JSON and the plot; its accuracies, sizes and digest are
    the logs' own, and it says plainly that no differential privacy was used."""
    ok(cli("model", "card", "best", "--run", str(demo), "--out", str(tmp_path),
           "--intended-use", "decision support", "--limitations", "research only"))  # fmt: skip
    card = json.loads((tmp_path / "card.json").read_text())
    history = load_history(demo)
    best = history.summary(history.resolve("best"))
    assert card["version"] == best.version
    by_node = {h["node"]: h for h in card["hospitals"]}
    evaluations = [e for e in history.logs.evaluations if e.evaluation.version == best.version]
    for entry in evaluations:
        assert by_node[entry.node]["accuracy"] == entry.evaluation.accuracy
        assert by_node[entry.node]["test_examples"] == entry.evaluation.num_examples
    train = {
        c.node: c.num_samples
        for r in history.logs.records
        if r.version <= best.version
        for c in r.contributions
    }
    assert {n: h["train_examples"] for n, h in by_node.items() if n in train} == train
    correct = sum(e.evaluation.correct for e in evaluations)
    examples = sum(e.evaluation.num_examples for e in evaluations)
    assert card["accuracy"]["pooled"] == correct / examples
    record = next(r for r in history.logs.records if r.version == best.version)
    pulled = json.loads((tmp_path / "card.json").read_text())["provenance"]
    assert pulled["model_sha256"] == record.model_sha256
    assert card["model"]["parameters"] == 13 * 2 + 2
    assert card["aggregation"]["buffer_size"] == 3
    assert card["data"]["licence"].startswith("Creative Commons Attribution 4.0")
    markdown = (tmp_path / "card.md").read_text()
    assert "no differential privacy" in markdown.lower()
    assert "decision support" in markdown
    assert (tmp_path / "accuracy.png").stat().st_size > 10_000
