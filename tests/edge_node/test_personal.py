"""Specification of personalisation at the node: the methods, and the personal model on disk."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from common.codec import encode_record
from common.messages import (
    Evaluation,
    Manifest,
    ModelSpec,
    Personalisation,
    PersonalisationMethod,
    TrainingConfig,
)
from common.models import build_model, model_params
from edge_node.personal import (
    holdout_split,
    personal_config,
    personalise,
    prefers_personal,
    resumes,
    start_from,
)
from edge_node.personal_store import PersonalModel, PersonalStore, read_personal
from edge_node.service import NodeService, Personalised, _job_seed
from edge_node.session import Job, JobKind
from edge_node.settings import NodeSettings
from edge_node.training import evaluate, train

CPU = torch.device("cpu")
LOGREG = ModelSpec(name="logreg", kwargs={"in_features": 4})
CONFIG = TrainingConfig(epochs=1, batch_size=8, learning_rate=0.1)
FINETUNE = Personalisation(method=PersonalisationMethod.FINETUNE, epochs=3)
DITTO = Personalisation(method=PersonalisationMethod.DITTO, epochs=3, ditto_lambda=0.5)


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    torch.set_num_threads(2)


def shifted(n: int = 96, seed: int = 0, flip: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Two blobs in 4-d; ``flip`` swaps the labels: a site whose patients the others mislabel."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n).astype(np.int64)
    x = rng.normal(0, 0.5, (n, 4)).astype(np.float32) + (2 * y[:, None] - 1) * 1.5
    return x.astype(np.float32), (1 - y if flip else y)


def global_weights() -> dict[str, np.ndarray]:
    """A global model fitted to the unflipped sites."""
    model = build_model(LOGREG, seed=0)
    x, y = shifted(seed=1)
    return train(model, model_params(model), x, y, CONFIG, seed=0, device=CPU).params


def run(policy: Personalisation, start: dict[str, np.ndarray], anchor: dict[str, np.ndarray]):
    x, y = shifted(seed=2, flip=True)
    model = build_model(LOGREG, seed=0)
    return personalise(
        model,
        policy,
        start=start,
        global_params=anchor,
        x=x,
        y=y,
        config=CONFIG,
        seed=7,
        device=CPU,
    )


def accuracy(params: dict[str, np.ndarray], flip: bool) -> float:
    x, y = shifted(seed=3, flip=flip)
    return evaluate(build_model(LOGREG, seed=0), params, x, y, device=CPU).accuracy


@pytest.mark.parametrize("policy", [FINETUNE, DITTO], ids=["finetune", "ditto"])
def test_a_personal_model_fits_the_hospital_the_global_model_does_not(
    policy: Personalisation,
) -> None:
    """A site whose labels are the others' flipped: the global model is wrong there, the
    personal model trained on its own training split learns it."""
    weights = global_weights()
    personal = run(policy, weights, weights).params
    assert accuracy(weights, flip=True) < 0.2
    assert accuracy(personal, flip=True) > 0.9


def test_ditto_with_lambda_zero_is_local_training_from_its_start() -> None:
    weights = global_weights()
    local = Personalisation(method=PersonalisationMethod.DITTO, epochs=3, ditto_lambda=0.0)
    finetuned = run(FINETUNE, weights, weights).params
    ditto = run(local, weights, {n: np.zeros_like(a) for n, a in weights.items()}).params
    for name in weights:
        np.testing.assert_allclose(ditto[name], finetuned[name], rtol=1e-6)


def test_a_strong_ditto_pull_keeps_the_personal_model_near_the_global_one() -> None:
    weights = global_weights()
    strong = Personalisation(method=PersonalisationMethod.DITTO, epochs=3, ditto_lambda=5.0)

    def distance(policy: Personalisation) -> float:
        params = run(policy, weights, weights).params
        return float(sum(np.sum((params[n] - weights[n]) ** 2) for n in weights))

    assert distance(strong) < distance(DITTO) / 3


def test_personal_training_takes_the_policys_epochs_and_learning_rate() -> None:
    policy = Personalisation(method=PersonalisationMethod.FINETUNE, epochs=4, learning_rate=0.01)
    assert (
        personal_config(policy, CONFIG).epochs,
        personal_config(policy, CONFIG).learning_rate,
    ) == (4, 0.01)
    assert personal_config(FINETUNE, CONFIG).learning_rate == CONFIG.learning_rate
    assert personal_config(FINETUNE, CONFIG).batch_size == CONFIG.batch_size


def personal(version: int, method: PersonalisationMethod, run_id: str = "r1") -> PersonalModel:
    params = {
        "linear.weight": np.full((2, 4), version, np.float32),
        "linear.bias": np.zeros(2, np.float32),
    }
    return PersonalModel(
        run_id=run_id, version=version, method=method, model=LOGREG, saved_at=1.0, params=params
    )


def test_ditto_continues_its_personal_model_and_finetuning_starts_from_each_version() -> None:
    saved = personal(4, PersonalisationMethod.DITTO)
    fresh = {n: np.ones_like(a) for n, a in saved.params.items()}
    assert start_from(DITTO, saved, "r1", fresh) is saved.params
    assert start_from(FINETUNE, saved, "r1", fresh) is fresh
    assert start_from(DITTO, saved, "another-run", fresh) is fresh
    assert start_from(DITTO, None, "r1", fresh) is fresh
    reshaped = {"linear.weight": np.ones((2, 5), np.float32), "linear.bias": np.ones(2, np.float32)}
    assert start_from(DITTO, saved, "r1", reshaped) is reshaped


@pytest.mark.parametrize(
    ("run_id", "version", "method", "expected"),
    [
        pytest.param("r1", 4, "ditto", True, id="same-version"),
        pytest.param("r1", 3, "ditto", True, id="older-version"),
        pytest.param("r1", 5, "ditto", False, id="newer-version"),
        pytest.param("r2", 4, "ditto", False, id="another-run"),
        pytest.param("r1", 4, "finetune", False, id="another-method"),
    ],
)
def test_a_restart_evaluates_a_personal_model_trained_against_the_version_already(
    run_id: str, version: int, method: str, expected: bool
) -> None:
    assert resumes(personal(4, PersonalisationMethod.DITTO), run_id, version, method) is expected
    assert resumes(None, run_id, version, method) is False


def test_the_personal_model_survives_a_restart_of_its_store(tmp_path: Path) -> None:
    store = PersonalStore(tmp_path, max_bytes=1 << 20)
    store.open()
    assert store.load() is None
    store.save(personal(3, PersonalisationMethod.DITTO))
    store.save(personal(4, PersonalisationMethod.DITTO))
    again = PersonalStore(tmp_path, max_bytes=1 << 20)
    again.open()
    loaded = again.load()
    assert loaded is not None
    assert (loaded.run_id, loaded.version, loaded.method, loaded.model) == (
        "r1",
        4,
        PersonalisationMethod.DITTO,
        LOGREG,
    )
    np.testing.assert_array_equal(loaded.params["linear.weight"], np.full((2, 4), 4, np.float32))
    assert sorted(p.name for p in (tmp_path / "personal").iterdir()) == ["personal.model"]


def test_a_torn_write_leaves_the_last_personal_model(tmp_path: Path) -> None:
    store = PersonalStore(tmp_path, max_bytes=1 << 20)
    store.open()
    store.save(personal(2, PersonalisationMethod.FINETUNE))
    (tmp_path / "personal" / "personal.model.tmp").write_bytes(b"half a fi")
    store.open()
    loaded = store.load()
    assert loaded is not None
    assert loaded.version == 2
    assert not (tmp_path / "personal" / "personal.model.tmp").exists()


def test_an_unreadable_personal_model_is_logged_and_the_node_starts_afresh(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = PersonalStore(tmp_path, max_bytes=1 << 20)
    store.open()
    store.path.write_bytes(
        encode_record(
            Evaluation(run_id="r", version=1, loss=0.1, accuracy=0.5, correct=1, num_examples=2)
        )
    )
    assert store.load() is None
    assert "unreadable" in caplog.text
    with pytest.raises(FileNotFoundError):
        read_personal(tmp_path / "nothing-here")


def test_an_evaluation_carries_a_personal_loss_and_accuracy_together_or_neither() -> None:
    base = {
        "run_id": "r",
        "version": 1,
        "loss": 0.1,
        "accuracy": 0.5,
        "correct": 1,
        "num_examples": 2,
    }
    Evaluation(**base, personal_loss=0.2, personal_accuracy=1.0)
    assert Evaluation(**base).personal_accuracy is None
    with pytest.raises(ValueError, match="both a loss and an accuracy"):
        Evaluation(**base, personal_accuracy=1.0)


def test_saving_is_safe_to_run_beside_a_reader(tmp_path: Path) -> None:
    """A reader never sees a torn file while the node saves (the write is a rename)."""
    store = PersonalStore(tmp_path, max_bytes=1 << 20)
    store.open()
    store.save(personal(0, PersonalisationMethod.DITTO))
    seen: list[int] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            seen.append(read_personal(store.path).version)

    reader = threading.Thread(target=read)
    reader.start()
    for version in range(1, 30):
        store.save(personal(version, PersonalisationMethod.DITTO))
    done.set()
    reader.join()
    assert seen == sorted(seen)


def heart_node(state_dir: Path) -> NodeService:
    """A heart-disease node with its data, model and personal model loaded, as ``run`` would."""
    from edge_node.datasets import load_dataset

    node = NodeService(
        NodeSettings(node_id="cleveland", data="heart-disease:cleveland", state_dir=state_dir)
    )
    node._dataset = load_dataset(node.settings.data)
    node._device = CPU
    node._ensure_model(HEART)
    node.personal_store.open()
    node._personal = node.personal_store.load()
    return node


HEART = ModelSpec(name="logreg", kwargs={"in_features": 13, "num_classes": 2})


def heart_job(version: int) -> Job:
    manifest = Manifest(
        run_id="r1",
        version=version,
        sha256="0" * 64,
        blob_bytes=10,
        chunk_size=10,
        chunk_count=1,
        model=HEART,
        training=TrainingConfig(epochs=1, batch_size=8, learning_rate=0.05),
        created_at=0.0,
        personalisation=DITTO,
    )
    return Job(JobKind.EVALUATE, manifest, model_params(build_model(HEART, seed=version)))


def test_a_restarted_node_resumes_its_personal_model_from_its_state_dir(tmp_path: Path) -> None:
    """The evaluation job trains and saves the personal model; a new node on the same state dir
    evaluates it again for the same version (no second training) and continues it with Ditto on
    the next one."""
    first = heart_node(tmp_path)
    job = heart_job(1)
    done = first._run_job(job)
    assert isinstance(done, Personalised)
    assert done.personal is not None
    first._keep_personal(done)
    saved = read_personal(tmp_path / "personal" / "personal.model")
    assert (saved.run_id, saved.version, saved.method) == ("r1", 1, PersonalisationMethod.DITTO)

    second = heart_node(tmp_path)
    again = second._run_job(job)
    assert isinstance(again, Personalised)
    assert again.personal is not None
    assert again.personal[0] == done.personal[0]
    for name, array in saved.params.items():
        np.testing.assert_array_equal(again.personal[1].params[name], array)

    later = second._run_job(heart_job(2))
    assert isinstance(later, Personalised)
    assert later.personal is not None
    expected = personalise(
        build_model(HEART),
        DITTO,
        start=saved.params,
        global_params=heart_job(2).params,
        x=second._dataset.train_x,
        y=second._dataset.train_y,
        config=heart_job(2).manifest.training,
        seed=_job_seed(0, "cleveland/personal", 2),
        device=CPU,
    )
    for name, array in expected.params.items():
        np.testing.assert_array_equal(later.personal[1].params[name], array)


@pytest.mark.parametrize(
    ("records", "fraction", "held"),
    [
        pytest.param(100, 0.2, 20, id="a-fifth"),
        pytest.param(100, 0.0, 0, id="off"),
        pytest.param(3, 0.1, 1, id="at-least-one"),
        pytest.param(2, 0.5, 1, id="at-least-one-left"),
        pytest.param(1, 0.5, 0, id="one-record"),
    ],
)
def test_a_holdout_splits_the_training_rows_in_two_the_same_way_every_time(
    records: int, fraction: float, held: int
) -> None:
    fit, out = holdout_split(records, fraction, seed=11)
    assert len(out) == held
    assert sorted([*fit, *out]) == list(range(records))
    again = holdout_split(records, fraction, seed=11)
    np.testing.assert_array_equal(again[1], out)


def test_the_personal_model_is_kept_only_when_it_beats_the_global_one() -> None:
    assert prefers_personal(0.8, 0.7)
    assert not prefers_personal(0.7, 0.7)  # a tie: the model trained on every hospital
    assert not prefers_personal(0.6, 0.7)


def test_a_kept_global_version_is_saved_and_served_beside_the_personal_weights(
    tmp_path: Path,
) -> None:
    store = PersonalStore(tmp_path, max_bytes=1 << 20)
    store.open()
    mine = personal(5, PersonalisationMethod.DITTO)
    theirs = {n: np.full_like(a, 9.0) for n, a in mine.params.items()}
    store.save(
        PersonalModel(
            run_id="r1",
            version=5,
            method=PersonalisationMethod.DITTO,
            model=LOGREG,
            saved_at=1.0,
            params=mine.params,
            kept_global=theirs,
        )
    )
    loaded = store.load()
    assert loaded is not None
    assert loaded.kept_global is not None
    np.testing.assert_array_equal(loaded.served["linear.weight"], theirs["linear.weight"])
    np.testing.assert_array_equal(loaded.params["linear.weight"], mine.params["linear.weight"])
    plain = personal(5, PersonalisationMethod.DITTO)
    assert plain.served is plain.params


def test_a_node_with_a_holdout_keeps_the_global_version_where_it_wins_there(
    tmp_path: Path,
) -> None:
    """A personal model that no training can make better than the global version on the
    held-out rows (zero epochs' worth of learning rate) leaves the hospital with the global one,
    whose test accuracy it reports."""
    node = heart_node(tmp_path)
    policy = Personalisation(
        method=PersonalisationMethod.DITTO, ditto_lambda=0.3, holdout=0.2, learning_rate=1e-9
    )
    job = heart_job(1)
    job = Job(
        JobKind.EVALUATE, job.manifest.model_copy(update={"personalisation": policy}), job.params
    )
    done = node._run_job(job)
    assert isinstance(done, Personalised)
    assert done.personal is not None
    result, kept = done.personal
    assert kept.kept_global is not None
    assert result == done.result  # the global version's own test accuracy
    for name, array in job.params.items():
        np.testing.assert_array_equal(kept.served[name], array)
