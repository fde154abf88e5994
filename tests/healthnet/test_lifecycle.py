"""Specification of a run's versions after the federation: list, best, pull, verify."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from aggregator.core import AggregatorCore, Fold
from aggregator.journal import Journal
from common.blobs import split_blob
from common.broker_url import BrokerEndpoint
from common.codec import encode, encode_tensors, envelope, sha256_hex
from common.compression import dense_tensor
from common.errors import ConfigError, IntegrityError
from common.messages import (
    AggregatorState,
    Evaluation,
    Knobs,
    Manifest,
    ModelSpec,
    TrainingConfig,
    TrainMetrics,
    Update,
    VersionRecord,
)
from common.models import build_model, model_params
from common.mqtt import MqttClient
from common.provenance import contributions_digest
from common.settings import ConnectionSettings
from common.topics import TopicTree
from healthnet.broker import EmbeddedBroker
from healthnet.lifecycle import (
    VersionSummary,
    best_version,
    load_history,
    model_weights,
    pull_from_broker,
    pull_from_run,
    verify_model_copy,
)

MODEL = ModelSpec(name="logreg", kwargs={"in_features": 3, "num_classes": 2})
NODES = ("a", "b")


def make_run(
    directory: Path,
    *,
    versions: int = 4,
    archive: bool = True,
    keep_checkpoints: int = 3,
    accuracy: dict[int, dict[str, float]] | None = None,
) -> dict[int, dict[str, np.ndarray]]:
    """A real state directory, made by the aggregator's journal as the service makes it; returns
    each version's weights."""
    params = model_params(build_model(MODEL, seed=0))
    journal = Journal(
        directory,
        model=MODEL,
        keep_checkpoints=keep_checkpoints,
        archive_models=archive,
        clock=lambda: 5.0,
    )

    def fresh() -> AggregatorCore:
        return AggregatorCore(
            run_id="run-1", params=params, knobs=Knobs(buffer_size=2), state=AggregatorState.RUNNING
        )

    core, _, _ = journal.resume(fresh, max_bytes=1 << 20)
    journal.store.archive_model(0, encode_tensors(core.params))
    weights = {0: {k: v.copy() for k, v in core.params.items()}}
    for version in range(1, versions + 1):
        for node in NODES:
            update = Update(
                update_id=f"{node}{version}",
                run_id="run-1",
                base_version=core.version,
                num_samples=10 if node == "a" else 30,
                metrics=TrainMetrics(loss=0.5, accuracy=0.5, seconds=0.1),
                delta=tuple(
                    dense_tensor(n, np.full(p.shape, 0.01 * version, np.float32))
                    for n, p in params.items()
                ),
            )
            payload = encode(envelope(update, sender=node, sent_at=1.0))
            verdict = core.receive(node, node, update, len(payload), 1.0)
            journal.record_update(core, node, update, verdict, payload)
        fold = core.fold(2.0)
        assert isinstance(fold, Fold)
        journal.commit_fold(core, fold, encode_tensors(fold.params))
        weights[version] = {k: v.copy() for k, v in fold.params.items()}
    for version, by_node in (accuracy or {}).items():
        for node, value in by_node.items():
            evaluation = Evaluation(
                run_id="run-1",
                version=version,
                loss=0.5,
                accuracy=value,
                correct=round(value * 100),
                num_examples=100,
            )
            journal.store.append_evaluation(node, evaluation, received_at=float(version))
    journal.close()
    return weights


def summary(
    version: int, accuracy: dict[str, float], *, retrievable: bool = True
) -> VersionSummary:
    return VersionSummary(
        version=version,
        created_at=None,
        contributors=(),
        evaluations={n: (round(a * 1000), 1000) for n, a in accuracy.items()},
        retrievable=retrievable,
    )


def test_best_prefers_versions_seen_by_the_most_hospitals() -> None:
    """A version evaluated by one lucky hospital does not beat one evaluated by all."""
    versions = [summary(1, {"a": 0.7, "b": 0.7}), summary(2, {"a": 0.95})]
    assert best_version(versions) == versions[0]


def test_best_breaks_a_tie_for_the_newer_version() -> None:
    """Two versions with the same mean: the newer one (more updates folded) is best."""
    versions = [summary(3, {"a": 0.8, "b": 0.6}), summary(4, {"a": 0.6, "b": 0.8})]
    best = best_version(versions)
    assert best is not None
    assert best.version == 4


def test_best_is_chosen_among_retrievable_versions_only() -> None:
    """A better version whose model was not kept cannot be best; none evaluated: no best."""
    versions = [summary(1, {"a": 0.9}, retrievable=False), summary(2, {"a": 0.7})]
    best = best_version(versions)
    assert best is not None
    assert best.version == 2
    assert best_version([summary(1, {})]) is None


def test_list_shows_each_versions_accuracy_contributors_and_retrievability(
    tmp_path: Path,
) -> None:
    """The history has v0..v3 with their hospitals' latest accuracy and who contributed."""
    make_run(tmp_path, versions=3, accuracy={2: {"a": 0.5, "b": 0.7}, 3: {"a": 0.6}})
    history = load_history(tmp_path)
    assert [s.version for s in history.versions] == [0, 1, 2, 3]
    v2 = history.summary(2)
    assert v2.contributors == NODES
    assert v2.accuracy == {"a": 0.5, "b": 0.7}
    assert v2.mean_accuracy == pytest.approx(0.6)
    assert v2.pooled_accuracy == pytest.approx(0.6)
    assert all(s.retrievable for s in history.versions)
    assert history.resolve("best") == 2
    assert history.resolve("latest") == 3


def test_pull_best_writes_a_verified_copy_of_that_versions_weights(tmp_path: Path) -> None:
    """`pull best` writes the best version's exact weights, its chain and a description that
    verifies offline."""
    run = tmp_path / "run"
    weights = make_run(run, accuracy={2: {"a": 0.9, "b": 0.9}, 4: {"a": 0.5, "b": 0.5}})
    copy = pull_from_run(run, "best", tmp_path / "copy")
    assert copy.version == 2
    assert copy.record_digest is not None
    checked, blob = verify_model_copy(tmp_path / "copy")
    assert checked == copy
    for name, value in model_weights(blob).items():
        assert np.array_equal(value, weights[2][name])


def test_a_tampered_archived_model_is_refused(tmp_path: Path) -> None:
    """A blob that is not the one the version's record names is never written out."""
    make_run(tmp_path / "run")
    path = tmp_path / "run" / "models" / "v00000003.blob"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256"):
        pull_from_run(tmp_path / "run", "3", tmp_path / "copy")
    assert not (tmp_path / "copy").exists()


def test_a_broken_hash_chain_is_refused(tmp_path: Path) -> None:
    """Rewriting an earlier version's record (here how much an update counted) is refused, also
    when the rewrite recomputes that record's updates digest: the next record names its parent."""
    make_run(tmp_path / "run")
    log = tmp_path / "run" / "versions.jsonl"
    lines = log.read_text().splitlines()
    record = VersionRecord.model_validate_json(lines[1])
    contributions = list(record.contributions)
    contributions[0] = contributions[0].model_copy(update={"weight": 2 * contributions[0].weight})
    forged = record.model_copy(update={"contributions": tuple(contributions)})
    for text, message in [
        (forged.model_dump_json(), "v2: its contributions"),
        (
            forged.model_copy(
                update={"updates_digest": contributions_digest(forged.contributions)}
            ).model_dump_json(),
            "v3: its parent digest",
        ),
    ]:
        log.write_text("\n".join([lines[0], text, *lines[2:]]) + "\n")
        with pytest.raises(IntegrityError, match=message):
            pull_from_run(tmp_path / "run", "4", tmp_path / "copy")


def test_a_tampered_model_copy_fails_verification(tmp_path: Path) -> None:
    """Offline verification notices a changed blob and a changed chain in a model copy."""
    make_run(tmp_path / "run")
    pull_from_run(tmp_path / "run", "latest", tmp_path / "copy")
    chain = tmp_path / "copy" / "versions.jsonl"
    chain.write_text(chain.read_text().replace('"train_loss":0.5', '"train_loss":0.25', 1))
    with pytest.raises(IntegrityError):
        verify_model_copy(tmp_path / "copy")
    pull_from_run(tmp_path / "run", "latest", tmp_path / "copy2")
    (tmp_path / "copy2" / "model.blob").write_bytes(b"\x90")
    with pytest.raises(IntegrityError, match="sha256"):
        verify_model_copy(tmp_path / "copy2")


def test_without_the_archive_only_retained_checkpoints_can_be_pulled(tmp_path: Path) -> None:
    """With archive_models off, a retained checkpoint is pulled (and verifies against its
    record); a version whose checkpoint is gone is refused, naming what can be pulled."""
    run = tmp_path / "run"
    weights = make_run(run, archive=False, keep_checkpoints=2)
    for blob in (run / "models").glob("v*.blob"):
        blob.unlink()  # v0 was archived by hand above; a run without the archive has none
    copy = pull_from_run(run, "4", tmp_path / "copy")
    _, blob = verify_model_copy(tmp_path / "copy")
    assert copy.version == 4
    for name, value in model_weights(blob).items():
        assert np.array_equal(value, weights[4][name])
    with pytest.raises(ConfigError, match=r"v1 is not retrievable.*retrievable: v3, v4"):
        pull_from_run(run, "1", tmp_path / "old")


def test_a_version_the_run_never_made_is_refused(tmp_path: Path) -> None:
    """Asking for v9 of a four-version run names the problem; so does a malformed version."""
    make_run(tmp_path / "run")
    with pytest.raises(ConfigError, match="no version 9"):
        pull_from_run(tmp_path / "run", "9", tmp_path / "copy")
    with pytest.raises(ConfigError, match="not a number"):
        pull_from_run(tmp_path / "run", "newest", tmp_path / "copy")


# -- from the broker


def publish_model(url: str, federation: str, blob: bytes, *, tamper: bool = False) -> Manifest:
    """Publish a version as the aggregator does: retained chunks, then the retained manifest."""
    topics = TopicTree(federation)
    chunks = split_blob(blob, 64)
    manifest = Manifest(
        run_id="run-1",
        version=7,
        sha256=sha256_hex(blob),
        blob_bytes=len(blob),
        chunk_size=64,
        chunk_count=len(chunks),
        model=MODEL,
        training=TrainingConfig(),
        created_at=time.time(),
    )
    if tamper:
        chunks[1] = bytes([chunks[1][0] ^ 1]) + chunks[1][1:]
    with MqttClient(BrokerEndpoint.parse(url), f"agg-{uuid.uuid4().hex[:8]}") as client:
        for index, chunk in enumerate(chunks):
            client.publish(topics.chunk(7, index), chunk, wait=5)
        client.publish(
            topics.manifest(), encode(envelope(manifest, sender="agg", sent_at=1.0)), wait=5
        )
    return manifest


@pytest.mark.broker
def test_pull_latest_from_the_broker_verifies_the_retained_chunks(
    mosquitto: EmbeddedBroker, tmp_path: Path
) -> None:
    """An operator or hospital identity pulls the retained current version, sha256-verified;
    an older version or `best` is refused with where to get it instead."""
    federation = f"pull-{uuid.uuid4().hex[:8]}"
    blob = encode_tensors(model_params(build_model(MODEL, seed=1)))
    publish_model(mosquitto.url, federation, blob)
    settings = ConnectionSettings(broker_url=mosquitto.url, federation=federation)
    copy = pull_from_broker(settings, "latest", tmp_path / "copy", timeout=10)
    assert (copy.version, copy.sha256) == (7, sha256_hex(blob))
    assert verify_model_copy(tmp_path / "copy")[1] == blob
    with pytest.raises(ConfigError, match="retains only v7"):
        pull_from_broker(settings, "3", tmp_path / "old", timeout=10)
    with pytest.raises(ConfigError, match="state directory"):
        pull_from_broker(settings, "best", tmp_path / "best", timeout=10)


@pytest.mark.broker
def test_a_tampered_chunk_on_the_broker_is_refused(
    mosquitto: EmbeddedBroker, tmp_path: Path
) -> None:
    """A retained chunk that does not match the manifest's sha256 makes the pull fail, and
    nothing is written."""
    federation = f"pull-{uuid.uuid4().hex[:8]}"
    blob = encode_tensors(model_params(build_model(MODEL, seed=1)))
    publish_model(mosquitto.url, federation, blob, tamper=True)
    settings = ConnectionSettings(broker_url=mosquitto.url, federation=federation)
    with pytest.raises(IntegrityError, match="do not match the manifest"):
        pull_from_broker(settings, "latest", tmp_path / "copy", timeout=10)
    assert not (tmp_path / "copy").exists()


def test_model_list_and_verify_commands(tmp_path: Path) -> None:
    """`model list` marks the best version and each contributor; `model verify` of a tampered
    copy exits with an error that says what is wrong."""
    from typer.testing import CliRunner

    from healthnet.cli import app

    run = tmp_path / "run"
    make_run(run, accuracy={2: {"a": 0.9, "b": 0.8}})
    runner = CliRunner(env={"COLUMNS": "120"})
    listing = runner.invoke(app, ["model", "list", "--run", str(run)])
    assert listing.exit_code == 0, listing.output
    best_row = next(line for line in listing.output.splitlines() if "best" in line)
    assert "0.900 +" in best_row
    assert "0.850" in best_row
    pull_from_run(run, "2", tmp_path / "copy")
    (tmp_path / "copy" / "model.blob").write_bytes(b"\x90")
    verified = runner.invoke(app, ["model", "verify", str(tmp_path / "copy")])
    assert verified.exit_code == 1
    assert "sha256" in verified.output


def test_a_version_whose_record_is_missing_is_refused(tmp_path: Path) -> None:
    """A version that has a model but no record in versions.jsonl cannot be verified: refused."""
    make_run(tmp_path / "run", accuracy={3: {"a": 0.5}})
    log = tmp_path / "run" / "versions.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:2] + lines[3:]) + "\n")  # v3's record is gone
    with pytest.raises(IntegrityError, match="no record of v3"):
        pull_from_run(tmp_path / "run", "3", tmp_path / "copy")
