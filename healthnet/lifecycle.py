"""A run's versions after the federation: list them, pick the best, pull one into a model copy.

Theory of operation. A run's history is in the aggregator's state directory: ``versions.jsonl``
(one sealed record per version, a hash chain, :mod:`common.provenance`), ``evaluations.jsonl``
(every hospital's test accuracy on each version it evaluated), the model archive ``models/`` (the
blob of every version as broadcast, when ``archive_models`` is on, the default) and the last
``keep_checkpoints`` checkpoints. The broker retains only the current version (manifest and
chunks), so a pull from the broker gives that version and nothing older.

A version is *retrievable* from a state directory when its blob is archived or a checkpoint of it
is retained; ``pull`` refuses any other version and names those it could give. ``best`` is the
retrievable version with the highest mean accuracy over the hospitals that evaluated it, among
the versions evaluated by the most hospitals (asynchronous nodes skip versions that arrive while
they train, so a version seen by one lucky hospital must not beat one seen by all); each hospital
counts once (its latest evaluation of the version), every hospital weighs the same, and a tie goes
to the newer version (more updates folded into it).

A pull is verified before anything is written: the blob's sha256 against the version's record
(the manifest's, from the broker), and the records from the first version to this one as an
unbroken chain. The model copy is a directory: ``model.json`` (:class:`ModelCopy`),
``model.blob`` (the tensors, in the codec's format, as broadcast) and ``versions.jsonl`` (the
chain, for anyone to verify again offline with ``healthnet model verify``).

A hospital's *personal* model (under a personalisation policy) is not in the run's history: it
never left the hospital. :func:`pull_personal` reads it from the node's state directory
(:mod:`edge_node.personal_store`) into the same kind of model copy, marked ``personal`` with its
method and without a chain (no version record describes it); export and predict then work on it
as on any copy.
"""

from __future__ import annotations

import logging
import math
import queue
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, assert_never

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict

from aggregator.store import StateStore
from common.blobs import ModelDownload
from common.codec import decode_tensors, encode_tensors, new_id, sha256_hex
from common.errors import ConfigError, DecodeError, HealthNetError, IntegrityError
from common.files import atomic_write
from common.inbound import Chunk, Inbound, Refusal, Refused, receive
from common.jsonlog import append_json_lines, read_json_lines
from common.messages import Manifest, ModelSpec, VersionRecord
from common.mqtt import Message, MqttClient
from common.provenance import verify_chain
from common.settings import ConnectionSettings
from common.topics import Route, Topic, TopicTree
from healthnet.report import RunLogs, load_run

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "ModelCopy",
    "Retrieved",
    "RunHistory",
    "VersionSummary",
    "best_version",
    "input_shape",
    "load_history",
    "load_model_copy",
    "pull_from_broker",
    "pull_from_run",
    "pull_personal",
    "retrieve",
    "verify_model_copy",
]

log = logging.getLogger(__name__)

MODEL_JSON = "model.json"
MODEL_BLOB = "model.blob"
CHAIN_LOG = "versions.jsonl"
_MAX_BLOB_BYTES = 4 << 30
# The built-in image model is drawn for MedMNIST's 28 x 28 pixels.
_IMAGE_SIDE = 28


class ModelCopy(BaseModel):
    """``model.json`` of a pulled version: what it is, where it came from, how to check it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal[1] = 1
    run_id: str
    version: int
    model: ModelSpec
    sha256: str
    blob_bytes: int
    source: str
    pulled_at: float
    # The digest of this version's record when the chain was verified; None when the run's
    # records carry no chain (written before it existed) or the version has no record (v0).
    record_digest: str | None = None
    # A hospital's personal model: its method (finetune, ditto); ``version`` is the global
    # version it was last trained against. None: a global version of the run.
    personal: str | None = None


@dataclass(frozen=True, slots=True)
class VersionSummary:
    """One version of a run, as ``model list`` shows it."""

    version: int
    created_at: float | None
    contributors: tuple[str, ...]
    # hospital -> (correct, examples) of its latest evaluation of this version
    evaluations: Mapping[str, tuple[int, int]]
    retrievable: bool

    @property
    def accuracy(self) -> dict[str, float]:
        return {node: c / n for node, (c, n) in self.evaluations.items() if n > 0}

    @property
    def mean_accuracy(self) -> float | None:
        values = list(self.accuracy.values())
        return math.fsum(values) / len(values) if values else None

    @property
    def pooled_accuracy(self) -> float | None:
        correct = sum(c for c, _ in self.evaluations.values())
        examples = sum(n for _, n in self.evaluations.values())
        return correct / examples if examples else None


@dataclass(frozen=True, slots=True)
class RunHistory:
    """A run's records, evaluations and retrievable versions, read from its state directory."""

    directory: Path
    logs: RunLogs
    versions: tuple[VersionSummary, ...]
    archived: frozenset[int]
    checkpoints: frozenset[int]

    @property
    def run_id(self) -> str | None:
        if self.logs.records:
            return self.logs.records[-1].run_id
        return None

    def summary(self, version: int) -> VersionSummary:
        for summary in self.versions:
            if summary.version == version:
                return summary
        raise ConfigError(f"run in {self.directory} has no version {version}")

    def resolve(self, which: str) -> int:
        """A version number from ``VERSION``, ``latest`` or ``best``."""
        retrievable = [s.version for s in self.versions if s.retrievable]
        match which:
            case "latest":
                if not retrievable:
                    raise ConfigError(f"no version of the run in {self.directory} is retrievable")
                return max(retrievable)
            case "best":
                best = best_version(self.versions)
                if best is None:
                    raise ConfigError(
                        f"no retrievable version of the run in {self.directory} was evaluated "
                        "by any hospital, so none is best"
                    )
                return best.version
            case _:
                return _version_number(which)


def _version_number(text: str) -> int:
    digits = text.removeprefix("v")
    if not (digits.isascii() and digits.isdigit()):
        raise ConfigError(f"version {text!r} is not a number, 'latest' or 'best'")
    return int(digits)


def best_version(versions: Sequence[VersionSummary]) -> VersionSummary | None:
    """The retrievable version with the best mean accuracy among those evaluated by the most
    hospitals; a tie goes to the newer version (see the module docstring)."""
    candidates = [s for s in versions if s.retrievable and s.mean_accuracy is not None]
    if not candidates:
        return None
    most = max(len(s.accuracy) for s in candidates)
    covered = [s for s in candidates if len(s.accuracy) == most]
    return max(covered, key=lambda s: (s.mean_accuracy or 0.0, s.version))


def load_history(run_dir: Path) -> RunHistory:
    """Read a run from an aggregator state dir or a demo ``--workdir``."""
    logs = load_run(run_dir)
    store = StateStore(logs.directory)
    archived = frozenset(
        int(p.stem[1:]) for p in store.models.glob("v*.blob") if p.stem[1:].isdigit()
    )
    checkpoints = frozenset(
        store.checkpoint_versions() if (logs.directory / "checkpoints").is_dir() else ()
    )
    latest: dict[tuple[str, int], tuple[float, int, int]] = {}
    for entry in logs.evaluations:
        e = entry.evaluation
        key = (entry.node, e.version)
        if key not in latest or latest[key][0] <= entry.received_at:
            latest[key] = (entry.received_at, e.correct, e.num_examples)
    by_version: dict[int, dict[str, tuple[int, int]]] = {}
    for (node, version), (_, correct, examples) in sorted(latest.items()):
        by_version.setdefault(version, {})[node] = (correct, examples)
    records = {r.version: r for r in logs.records}
    numbers = sorted({0, *records, *by_version})
    summaries = tuple(
        VersionSummary(
            version=v,
            created_at=records[v].created_at if v in records else None,
            contributors=tuple(sorted({c.node for c in records[v].contributions}))
            if v in records
            else (),
            evaluations=by_version.get(v, {}),
            retrievable=v in archived or v in checkpoints,
        )
        for v in numbers
    )
    return RunHistory(logs.directory, logs, summaries, archived, checkpoints)


# -- pulling


@dataclass(frozen=True, slots=True)
class Retrieved:
    """A verified version of a run: its description, blob and chain of records."""

    history: RunHistory
    copy: ModelCopy
    blob: bytes
    chain: tuple[VersionRecord, ...]


def retrieve(run_dir: Path, which: str) -> Retrieved:
    """Version ``which`` (a number, ``latest`` or ``best``) of a run, verified as the module
    docstring says."""
    history = load_history(run_dir)
    version = history.resolve(which)
    history.summary(version)  # refuses a version the run never made
    blob = _stored_blob(history, version)
    sha = sha256_hex(blob)
    chain = _chain_to(history.logs.records, version)
    digest = None
    if chain:
        digest = verify_chain(chain, model_sha256=sha)
    elif version > 0:
        log.warning("run in %s: v%d's record carries no hash chain", history.directory, version)
    copy = ModelCopy(
        run_id=history.run_id or "unknown",
        version=version,
        model=_run_model(history, version),
        sha256=sha,
        blob_bytes=len(blob),
        source=str(history.directory),
        pulled_at=time.time(),
        record_digest=digest,
    )
    return Retrieved(history, copy, blob, tuple(chain))


def pull_from_run(run_dir: Path, which: str, out: Path) -> ModelCopy:
    """Verify version ``which`` of a run and write it to ``out`` as a model copy."""
    retrieved = retrieve(run_dir, which)
    write_model_copy(out, retrieved.copy, retrieved.blob, retrieved.chain)
    return retrieved.copy


def pull_personal(state_dir: Path, which: str, out: Path) -> ModelCopy:
    """A hospital's personal model from its node's ``state_dir``, written to ``out`` as a model
    copy; ``which`` is ``latest`` or the global version it was trained against (the node keeps
    only its latest personal model)."""
    from edge_node.personal_store import PERSONAL_DIR, PERSONAL_FILE, read_personal

    path = state_dir / PERSONAL_DIR / PERSONAL_FILE
    try:
        personal = read_personal(path, max_bytes=_MAX_BLOB_BYTES)
    except FileNotFoundError:
        raise ConfigError(
            f"no personal model in {state_dir} (no {PERSONAL_DIR}/{PERSONAL_FILE}): give a "
            "node's --state-dir from a run with a personalisation policy"
        ) from None
    except DecodeError as exc:
        raise ConfigError(f"{path} is not a personal model: {exc}") from exc
    if which not in ("latest", str(personal.version)):
        raise ConfigError(
            f"the node keeps only its latest personal model, trained against v{personal.version} "
            f"of run {personal.run_id}: ask for latest or {personal.version}"
        )
    blob = encode_tensors(personal.served)
    copy = ModelCopy(
        run_id=personal.run_id,
        version=personal.version,
        model=personal.model,
        sha256=sha256_hex(blob),
        blob_bytes=len(blob),
        source=str(state_dir),
        pulled_at=time.time(),
        personal=personal.method.value
        + ("" if personal.kept_global is None else ", global version kept"),
    )
    write_model_copy(out, copy, blob, ())
    return copy


def _stored_blob(history: RunHistory, version: int) -> bytes:
    store = StateStore(history.directory)
    archived = store.archived_model(version)
    if archived is not None:
        return archived.read_bytes()
    if version in history.checkpoints:
        try:
            checkpoint = store.load_checkpoint(version)
        except DecodeError as exc:
            raise IntegrityError(f"the checkpoint of v{version} is damaged: {exc}") from exc
        return _checkpoint_blob(checkpoint.params, _record(history, version))
    retrievable = sorted(history.archived | history.checkpoints)
    shown = ", ".join(f"v{v}" for v in retrievable[-12:]) or "none"
    raise ConfigError(
        f"v{version} is not retrievable from {history.directory}: its model was neither archived "
        f"(models/, the aggregator's archive_models) nor kept in a checkpoint; retrievable: {shown}"
    )


def _checkpoint_blob(
    params: Mapping[str, NDArray[np.float32]], record: VersionRecord | None
) -> bytes:
    """The blob as it was broadcast: float32, or float16 when the record's sha256 says so."""
    blob = encode_tensors(params)
    if record is None or record.model_sha256 in (None, sha256_hex(blob)):
        return blob
    return encode_tensors({name: p.astype(np.float16) for name, p in params.items()})


def _record(history: RunHistory, version: int) -> VersionRecord | None:
    return next((r for r in history.logs.records if r.version == version), None)


def _chain_to(records: Sequence[VersionRecord], version: int) -> list[VersionRecord]:
    """The records up to ``version`` from the first one that carries the chain (none for v0, or
    for a run logged before the chain existed)."""
    upto = [r for r in records if r.version <= version]
    if version > 0 and (not upto or upto[-1].version != version):
        raise IntegrityError(f"versions.jsonl has no record of v{version}: it cannot be verified")
    first = next((i for i, r in enumerate(upto) if r.updates_digest is not None), None)
    return [] if first is None else upto[first:]


def _run_model(history: RunHistory, version: int) -> ModelSpec:
    store = StateStore(history.directory)
    for candidate in sorted(history.checkpoints, key=lambda v: abs(v - version)):
        try:
            return store.load_checkpoint(candidate).model
        except DecodeError:
            continue
    raise ConfigError(f"no readable checkpoint in {history.directory} names the run's model")


def pull_from_broker(
    settings: ConnectionSettings, which: str, out: Path, *, timeout: float = 30.0
) -> ModelCopy:
    """Fetch the retained current version from the broker, verify it and write it to ``out``."""
    if which == "best":
        raise ConfigError(
            "the broker keeps only the current version and no evaluations: pull 'best' from "
            "the aggregator's state directory (--run)"
        )
    manifest, blob = _download(settings, timeout)
    if which != "latest" and _version_number(which) != manifest.version:
        raise ConfigError(
            f"the broker retains only v{manifest.version} of run {manifest.run_id}; pull "
            f"v{_version_number(which)} from the aggregator's state directory (--run)"
        )
    copy = ModelCopy(
        run_id=manifest.run_id,
        version=manifest.version,
        model=manifest.model,
        sha256=manifest.sha256,
        blob_bytes=manifest.blob_bytes,
        source=f"{settings.broker_url.redacted()} federation {settings.federation}",
        pulled_at=time.time(),
    )
    write_model_copy(out, copy, blob, [])
    return copy


def _download(settings: ConnectionSettings, timeout: float) -> tuple[Manifest, bytes]:
    topics = TopicTree(settings.federation)
    download = ModelDownload(max_blob_bytes=_MAX_BLOB_BYTES)
    client = MqttClient.from_settings(settings, f"model-pull-{new_id()[:12]}")
    client.subscribe(topics.manifest())
    client.subscribe(topics.all_chunks())
    deadline = time.monotonic() + timeout
    with client:
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                item = client.inbox.get(timeout=remaining)
            except queue.Empty:
                break
            if not isinstance(item, Message):
                continue
            _feed(download, topics, item)
            taken = download.take()  # IntegrityError when the chunks do not match the manifest
            if taken is not None:
                return taken
    raise HealthNetError(
        f"no complete model of federation {settings.federation!r} on "
        f"{settings.broker_url.redacted()} within {timeout:.0f}s"
    )


def _feed(download: ModelDownload, topics: TopicTree, message: Message) -> None:
    match received := receive(
        message.topic, message.payload, topics=topics, max_bytes=_MAX_BLOB_BYTES
    ):
        case Inbound(body=Manifest() as manifest):
            download.on_manifest(manifest)
        case Chunk():
            download.on_chunk(received.version, received.index, received.data)
        case Refusal(reason=Refused.EMPTY) | Inbound():
            pass  # a cleared retained chunk, or a message this download does not need
        case Refusal(topic=Topic(route=Route.MANIFEST)):
            raise IntegrityError(f"the retained manifest does not decode: {received.detail}")
        case Refusal():
            raise IntegrityError(f"{received.name}: {received.detail}")
        case _:
            assert_never(received)


# -- the model copy on disk


def write_model_copy(
    out: Path, copy: ModelCopy, blob: bytes, chain: Sequence[VersionRecord]
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / MODEL_BLOB, blob)
    (out / CHAIN_LOG).unlink(missing_ok=True)
    if chain:
        append_json_lines(out / CHAIN_LOG, chain)
    atomic_write(out / MODEL_JSON, (copy.model_dump_json(indent=2) + "\n").encode())


def verify_model_copy(directory: Path) -> tuple[ModelCopy, bytes]:
    """Read a model copy and check it again: the blob's sha256, and its chain when it has one."""
    try:
        copy = ModelCopy.model_validate_json((directory / MODEL_JSON).read_bytes())
        blob = (directory / MODEL_BLOB).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{directory} is not a model copy (healthnet model pull): {exc}") from exc
    except ValueError as exc:
        raise ConfigError(f"{directory / MODEL_JSON} is not a model description: {exc}") from exc
    sha = sha256_hex(blob)
    if sha != copy.sha256 or len(blob) != copy.blob_bytes:
        raise IntegrityError(
            f"{directory / MODEL_BLOB}: sha256 {sha[:12]}… is not the {copy.sha256[:12]}… "
            "that model.json names"
        )
    chain_path = directory / CHAIN_LOG
    if copy.record_digest is not None:
        chain = list(read_json_lines(chain_path, VersionRecord)) if chain_path.is_file() else []
        if not chain or chain[-1].version != copy.version:
            raise IntegrityError(f"{chain_path} does not end at v{copy.version}")
        if verify_chain(chain, model_sha256=sha) != copy.record_digest:
            raise IntegrityError(f"v{copy.version}'s record is not the one model.json names")
    return copy, blob


def load_model_copy(directory: Path) -> tuple[ModelCopy, nn.Module]:
    """A verified model copy as a torch module in eval mode, on the CPU, in float32."""
    from common.models import build_model, load_params

    copy, blob = verify_model_copy(directory)
    model = build_model(copy.model)
    load_params(model, model_weights(blob))
    model.eval()
    return copy, model


def model_weights(blob: bytes) -> dict[str, NDArray[np.float32]]:
    """The blob's tensors as float32, as a node trains and evaluates from them."""
    return {
        name: np.asarray(array, dtype=np.float32)
        for name, array in decode_tensors(blob, max_bytes=_MAX_BLOB_BYTES).items()
    }


def input_shape(spec: ModelSpec) -> tuple[int, ...] | None:
    """One example's shape for a built-in model; None for a plug-in (the caller must say)."""
    kwargs: dict[str, Any] = dict(spec.kwargs)
    match spec.name:
        case "logreg" | "mlp":
            return (int(kwargs["in_features"]),)
        case "cnn":
            return (int(kwargs.get("in_channels", 1)), _IMAGE_SIDE, _IMAGE_SIDE)
    return None
