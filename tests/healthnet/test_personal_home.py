"""Specification of taking a hospital's personal model home: pull, export and predict read it
from the node's state directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from common.messages import ModelSpec, Personalisation, PersonalisationMethod, TrainingConfig
from common.models import build_model, model_params
from edge_node.datasets import load_dataset
from edge_node.personal import personalise
from edge_node.personal_store import PersonalModel, PersonalStore
from edge_node.training import evaluate
from healthnet.cli import app
from healthnet.lifecycle import load_model_copy
from tests.healthnet.test_cli import runner

__all__ = ["runner"]  # the fixture this module uses

HEART = ModelSpec(name="logreg", kwargs={"in_features": 13, "num_classes": 2})
CPU = torch.device("cpu")


@pytest.fixture
def node_state(tmp_path: Path) -> tuple[Path, PersonalModel]:
    """A Cleveland node's state dir holding a personal model trained on its training split."""
    data = load_dataset("heart-disease:cleveland")
    start = model_params(build_model(HEART, seed=0))
    trained = personalise(
        build_model(HEART),
        Personalisation(method=PersonalisationMethod.DITTO, epochs=5),
        start=start,
        global_params=start,
        x=data.train_x,
        y=data.train_y,
        config=TrainingConfig(batch_size=8, learning_rate=0.05),
        seed=0,
        device=CPU,
    )
    personal = PersonalModel(
        run_id="run-7",
        version=12,
        method=PersonalisationMethod.DITTO,
        model=HEART,
        saved_at=1.0,
        params=trained.params,
    )
    store = PersonalStore(tmp_path / "node", max_bytes=1 << 20)
    store.open()
    store.save(personal)
    return tmp_path / "node", personal


def test_pull_export_and_predict_take_the_personal_model_home(
    runner: CliRunner, tmp_path: Path, node_state: tuple[Path, PersonalModel]
) -> None:
    """The copy holds the personal weights; predict on the test split gives their accuracy."""
    state, personal = node_state
    out = tmp_path / "mine"
    args = ["--personal", "--state-dir", str(state), "--out", str(out)]
    pulled = runner.invoke(
        app, ["model", "pull", "latest", *args, "--data", "heart-disease:cleveland"]
    )
    assert pulled.exit_code == 0, pulled.output
    assert "personal model (ditto, trained against v12 of run run-7)" in " ".join(
        pulled.stdout.split()
    )
    copy, model = load_model_copy(out)
    assert (copy.personal, copy.version, copy.run_id, copy.record_digest) == (
        "ditto",
        12,
        "run-7",
        None,
    )
    for name, value in model_params(model).items():
        assert (value == personal.params[name]).all()

    data = load_dataset("heart-disease:cleveland")
    expected = evaluate(build_model(HEART), personal.params, data.test_x, data.test_y, device=CPU)
    predictions = tmp_path / "predictions.csv"
    predicted = runner.invoke(
        app,
        [
            "predict",
            "--model",
            str(out),
            "--data",
            "heart-disease:cleveland",
            "--out",
            str(predictions),
        ],
    )
    assert predicted.exit_code == 0, predicted.output
    assert f"accuracy {expected.accuracy:.4f}" in " ".join(predicted.stdout.split())

    exported = runner.invoke(app, ["model", "export", "12", *args[:-1], str(tmp_path / "exported")])
    assert exported.exit_code == 0, exported.output
    from safetensors import safe_open

    with safe_open(str(tmp_path / "exported" / "model.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
    assert (metadata["healthnet_personal"], metadata["healthnet_version"]) == ("ditto", "12")


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        pytest.param(["latest", "--personal"], "needs the node's --state-dir", id="no-state-dir"),
        pytest.param(["latest", "--state-dir", "{state}"], "it needs --personal", id="no-flag"),
        pytest.param(
            ["11", "--personal", "--state-dir", "{state}"], "ask for latest or 12", id="old"
        ),
        pytest.param(
            ["latest", "--personal", "--state-dir", "{empty}"], "no personal model in", id="none"
        ),
    ],
)
def test_a_personal_pull_that_cannot_be_served_says_why(
    runner: CliRunner,
    tmp_path: Path,
    node_state: tuple[Path, PersonalModel],
    flags: list[str],
    expected: str,
) -> None:
    state, _ = node_state
    (tmp_path / "empty").mkdir()
    args = [f.format(state=state, empty=tmp_path / "empty") for f in flags]
    result = runner.invoke(app, ["model", "pull", *args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert expected in " ".join(result.stderr.split())
    assert not (tmp_path / "out").exists()
