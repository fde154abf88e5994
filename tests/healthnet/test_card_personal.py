"""Specification of the model card under personalisation: each hospital's personal model beside
the global one, at the card's version."""

from __future__ import annotations

import json
from pathlib import Path

from aggregator.store import StateStore
from common.messages import Evaluation
from healthnet.card import write_card
from tests.healthnet.test_lifecycle import make_run


def personal_evaluation(version: int, accuracy: float, personal: float | None) -> Evaluation:
    return Evaluation(
        run_id="run-1",
        version=version,
        loss=0.5,
        accuracy=accuracy,
        correct=round(accuracy * 100),
        num_examples=100,
        personal_loss=None if personal is None else 0.4,
        personal_accuracy=personal,
    )


def test_the_card_shows_each_hospitals_personal_model_beside_the_global_one(
    tmp_path: Path,
) -> None:
    make_run(tmp_path / "run", versions=3)
    store = StateStore(tmp_path / "run")
    store.open()
    store.append_evaluation("a", personal_evaluation(2, 0.7, 0.9), 1.0)
    store.append_evaluation("a", personal_evaluation(3, 0.75, 0.8), 2.0)
    store.append_evaluation("b", personal_evaluation(3, 0.65, 0.86), 3.0)
    path = write_card(tmp_path / "run", "3", tmp_path / "card")
    card = json.loads((tmp_path / "card" / "card.json").read_text())
    got = {h["node"]: (h["accuracy"], h["personal_accuracy"]) for h in card["hospitals"]}
    assert got == {"a": (0.75, 0.8), "b": (0.65, 0.86)}
    assert card["personalisation"]["reported_by"] == 2
    assert abs(card["personalisation"]["mean_personal_accuracy"] - 0.83) < 1e-9
    text = path.read_text()
    assert "| hospital | train examples | test examples | accuracy | personal model |" in text
    assert "| 0.750 | 0.800 |" in text
    assert "## Personalisation" in text
    assert "never left the hospitals" in text


def test_a_card_without_personal_models_has_no_personal_column(tmp_path: Path) -> None:
    make_run(tmp_path / "run", versions=2, accuracy={2: {"a": 0.7, "b": 0.6}})
    path = write_card(tmp_path / "run", "2", tmp_path / "card")
    card = json.loads((tmp_path / "card" / "card.json").read_text())
    assert card["personalisation"] is None
    assert "personal" not in path.read_text()
