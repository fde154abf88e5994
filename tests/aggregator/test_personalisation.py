"""Specification of the aggregator's side of personalisation: a knob in the manifest, and each
hospital's personal accuracy in its tally beside the global model's."""

from __future__ import annotations

import pytest

from common.errors import ControlError
from common.messages import Evaluation, ModelSpec, Personalisation, PersonalisationMethod
from tests.aggregator.test_core import RUN, make_core

MODEL = ModelSpec(name="logreg", kwargs={"in_features": 2})


def evaluation(version: int, accuracy: float, personal: float | None) -> Evaluation:
    return Evaluation(
        run_id=RUN,
        version=version,
        loss=0.5,
        accuracy=accuracy,
        correct=1,
        num_examples=2,
        personal_loss=None if personal is None else 0.4,
        personal_accuracy=personal,
    )


def test_the_manifest_carries_the_runs_personalisation_policy() -> None:
    policy = Personalisation(method=PersonalisationMethod.DITTO, ditto_lambda=0.3)
    core = make_core(personalisation=policy)
    assert core.broadcast(model=MODEL, chunk_size=64, now=1.0).manifest.personalisation == policy
    assert (
        make_core().broadcast(model=MODEL, chunk_size=64, now=1.0).manifest.personalisation is None
    )


def test_personalisation_is_set_field_by_field_and_turned_off_whole() -> None:
    core = make_core()
    knobs = core.set_knobs({"personalisation.method": "finetune", "personalisation.epochs": 2})
    assert knobs.personalisation == Personalisation(method=PersonalisationMethod.FINETUNE, epochs=2)
    assert core.set_knobs({"personalisation.ditto_lambda": 1.0}).personalisation is not None
    assert core.set_knobs({"personalisation": None}).personalisation is None
    with pytest.raises(ControlError, match="invalid knob value"):
        core.set_knobs({"personalisation.method": "fedprox"})
    with pytest.raises(ControlError, match="unknown knob"):
        core.set_knobs({"personalisation.layers": 2})


def test_a_tally_shows_the_personal_accuracy_of_the_latest_evaluation() -> None:
    core = make_core()
    core.record_evaluation("cleveland", evaluation(2, 0.75, 0.85))
    core.record_evaluation("cleveland", evaluation(1, 0.5, 0.6))  # older: ignored
    core.record_evaluation("va", evaluation(2, 0.7, None))
    tallies = {t.node: t for t in core.status(now=2.0).nodes}
    assert (tallies["cleveland"].eval_accuracy, tallies["cleveland"].eval_personal_accuracy) == (
        0.75,
        0.85,
    )
    assert (tallies["va"].eval_accuracy, tallies["va"].eval_personal_accuracy) == (0.7, None)
