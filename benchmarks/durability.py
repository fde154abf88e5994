"""Durability benchmark: what checkpoints and ledger writes (with fsync) add to a version's cost.

    python -m benchmarks.durability --json durability.json [--versions 23] [--rounds 3] [--quick]

For each model (the pneumonia CNN: ``cnn`` on 1x28x28 images, 2 classes; and an ``mlp`` of more
than 10 M parameters) a real aggregator (AggregatorService in this process) on a real Mosquitto is
fed a backlog of K = 3 dense updates per version by a feeder process, so that it is never idle:
the interval between two versions is the aggregator's whole time per version (receiving and
decoding K updates, validating them, the write-ahead log, folding, checkpoint and ledger, encoding
and publishing the model). Two configurations alternate, ``rounds`` times each:

* ``baseline``: the write-ahead log only (acking an update before it is on disk is not an option
  the system offers), with folded updates deleted from it at once; no checkpoint after the first,
  no ledger, no versions log;
* ``checkpoint-every-version``: as shipped with ``checkpoint_every = 1``: a checkpoint of the whole
  model at every version, plus the ledger, the versions log and the model archive;
* ``checkpoint-every-version-ledger-fsync-per-line``: the same, with every ledger line fsynced
  (the alternative to syncing only rejections and at checkpoints);
* ``checkpoint-every-10``: as shipped (``checkpoint_every = 10``, the default).

The ratio of the median (over runs) of the mean time per version to the baseline's is the
overhead (target <= 1.20). The durable runs also time the checkpoint, ledger and versions-log
writes themselves, which gives a second, less noisy estimate: time per version / (time per
version - time in those writes).

``--quick`` runs each configuration once, on the CNN only, for 5 versions (3 measured):
tests/benchmarks/test_quick.py runs it so the benchmark cannot rot; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import queue
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any, assert_never

import numpy as np
from pydantic import SecretStr

from aggregator.core import AggregatorCore, Fold, Verdict
from aggregator.journal import Journal
from aggregator.service import AggregatorService
from aggregator.settings import AggregatorSettings
from aggregator.store import Checkpoint, StateStore
from aggregator.update_log import UpdateLog, UpdateLogEntry
from benchmarks._report import write_report
from common.broker_url import BrokerEndpoint
from common.codec import DEFAULT_MAX_MESSAGE_BYTES, encode, envelope, new_id
from common.compression import dense_tensor
from common.inbound import Chunk, Inbound, Refusal, receive
from common.messages import Knobs, Manifest, ModelSpec, TrainMetrics, Update, VersionRecord
from common.mqtt import Message, MqttClient
from common.topics import TopicTree
from healthnet.broker import BrokerConfig, EmbeddedBroker

K = 3
LOOKAHEAD = 2  # versions' worth of updates queued ahead of the aggregator
MODELS = {
    "cnn": ModelSpec(name="cnn", kwargs={"in_channels": 1, "num_classes": 2}),
    "mlp-10m": ModelSpec(
        name="mlp", kwargs={"in_features": 3072, "hidden": 3300, "num_classes": 2}
    ),
}
PLACEHOLDER = "f" * 32  # an update id of the same length as new_id(), patched per update


class TimedJournal(Journal):
    """The shipped journal, timing its checkpoint, update-log and versions-log writes."""

    def __init__(self, *args: Any, sync_every_line: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seconds = 0.0
        self.update_log = _TimedUpdateLog(self.update_log.path.parent, self, sync_every_line)
        self.store = _TimedStore(self.store.directory, self)


class _TimedUpdateLog(UpdateLog):
    def __init__(self, directory: Path, owner: TimedJournal, sync_every_line: bool) -> None:
        super().__init__(directory)
        self._owner = owner
        self._sync_every_line = sync_every_line

    def append(self, records: Iterable[UpdateLogEntry]) -> None:
        started = time.perf_counter()
        super().append(records)
        if self._sync_every_line:  # the alternative measured: every update-log line fsynced
            super().sync()
        self._owner.seconds += time.perf_counter() - started

    def sync(self) -> None:
        started = time.perf_counter()
        super().sync()
        self._owner.seconds += time.perf_counter() - started


class _TimedStore(StateStore):
    def __init__(self, directory: Path, owner: TimedJournal) -> None:
        super().__init__(directory)
        self._owner = owner

    def save(self, checkpoint: Checkpoint) -> Path:
        started = time.perf_counter()
        try:
            return super().save(checkpoint)
        finally:
            self._owner.seconds += time.perf_counter() - started

    def append_version(self, record: VersionRecord) -> None:
        started = time.perf_counter()
        super().append_version(record)
        self._owner.seconds += time.perf_counter() - started

    def archive_model(self, version: int, blob: bytes) -> None:
        started = time.perf_counter()
        super().archive_model(version, blob)
        self._owner.seconds += time.perf_counter() - started


class BaselineJournal(Journal):
    """The write-ahead log only, as before the ledger: folded updates leave it at once, and no
    checkpoint (after the first), ledger line or versions line is written."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seconds = 0.0

    def record_update(
        self, core: AggregatorCore, node: str, update: Update, verdict: Verdict, payload: bytes
    ) -> None:
        if verdict.accepted and not verdict.duplicate:
            self.store.append_wal(node, update.update_id, payload)

    def commit_fold(self, core: AggregatorCore, fold: Fold, model_blob: bytes) -> VersionRecord:
        self.store.drop_wal(set(fold.folded_ids))
        return fold.record


def feed(url: str, federation: str, shapes: dict[str, tuple[int, ...]], count: int) -> None:
    """Publish ``count`` updates from v0, staying LOOKAHEAD versions ahead of the aggregator."""
    topics = TopicTree(federation)
    client = MqttClient(BrokerEndpoint.parse(url), f"feeder-{uuid.uuid4().hex[:8]}")
    client.subscribe(topics.manifest())
    rng = np.random.default_rng(0)
    delta = tuple(
        dense_tensor(name, rng.normal(0, 1e-3, shape).astype(np.float32))
        for name, shape in shapes.items()
    )
    with client:
        run_id, version = "", 0
        sent = 0
        template = b""
        while sent < count:
            try:
                item = client.inbox.get(timeout=0.05)
            except queue.Empty:
                item = None
            if isinstance(item, Message):
                match received := receive(
                    item.topic, item.payload, topics=topics, max_bytes=DEFAULT_MAX_MESSAGE_BYTES
                ):
                    case Inbound(body=Manifest() as manifest):
                        run_id, version = manifest.run_id, manifest.version
                    case Inbound() | Chunk() | Refusal():
                        pass
                    case _:
                        assert_never(received)
            if not run_id:
                continue
            if not template:
                update = Update(
                    update_id=PLACEHOLDER,
                    run_id=run_id,
                    base_version=0,
                    num_samples=100,
                    metrics=TrainMetrics(loss=0.5, accuracy=0.5, seconds=0.1),
                    delta=delta,
                )
                template = encode(envelope(update, sender="feeder", sent_at=time.time()))
            while sent < count and sent < K * (version + LOOKAHEAD):
                payload = template.replace(PLACEHOLDER.encode(), new_id().encode(), 1)
                client.publish(topics.update("feeder"), payload)
                sent += 1
        client.flush(60.0)


# name -> (checkpoint_every, fsync every ledger line); 0 is the baseline.
MODES = {
    "baseline": (0, False),
    "checkpoint-every-version": (1, False),
    "checkpoint-every-version-ledger-fsync-per-line": (1, True),
    "checkpoint-every-10": (10, False),
}


def measure(
    broker: EmbeddedBroker,
    spec: ModelSpec,
    *,
    mode: tuple[int, bool],
    versions: int,
    workdir: Path,
) -> dict[str, float]:
    """One run: (median seconds per version, seconds in durable writes per version)."""
    from common.models import build_model, model_params

    shapes = {n: a.shape for n, a in model_params(build_model(spec, seed=0)).items()}
    federation = f"bench-{uuid.uuid4().hex[:8]}"
    settings = AggregatorSettings(
        broker_url=SecretStr(broker.url),
        federation=federation,
        state_dir=workdir / federation,
        model=spec,
        knobs=Knobs(buffer_size=K, max_staleness=100_000),
        max_update_bytes=256 * 1024 * 1024,
        status_interval=1.0,  # also how long a stop may take to be noticed
    )
    service = AggregatorService(settings)
    journal: TimedJournal | BaselineJournal
    every, sync_every_line = mode
    if every:
        journal = TimedJournal(
            settings.state_dir,
            model=spec,
            checkpoint_every=every,
            sync_every_line=sync_every_line,
        )
    else:
        journal = BaselineJournal(settings.state_dir, model=spec)
    service.journal = journal
    topics = TopicTree(federation)
    watcher = MqttClient(BrokerEndpoint.parse(broker.url), f"watch-{uuid.uuid4().hex[:8]}")
    watcher.subscribe(topics.versions())
    stop = threading.Event()
    thread = threading.Thread(target=service.run, args=(stop,), name="aggregator")
    context = multiprocessing.get_context("spawn")
    feeder = context.Process(
        target=feed, args=(broker.url, federation, shapes, K * versions), name="feeder"
    )
    created: list[float] = []
    seconds_at: list[float] = []
    with watcher:
        thread.start()
        feeder.start()
        deadline = time.monotonic() + 60.0 + 20.0 * versions
        # A dead aggregator thread (its exception is printed) ends the wait at once.
        while len(created) < versions and time.monotonic() < deadline and thread.is_alive():
            try:
                item = watcher.inbox.get(timeout=1.0)
            except queue.Empty:
                continue
            if not isinstance(item, Message):
                continue
            match received := receive(
                item.topic, item.payload, topics=topics, max_bytes=DEFAULT_MAX_MESSAGE_BYTES
            ):
                case Inbound(body=VersionRecord()):
                    created.append(time.perf_counter())
                    seconds_at.append(journal.seconds)
                case Inbound() | Chunk() | Refusal():
                    pass
                case _:
                    assert_never(received)
        stop.set()
        thread.join(60.0)
        feeder.join(60.0)
        if feeder.is_alive():
            feeder.terminate()
    if len(created) < versions:
        raise RuntimeError(
            f"only {len(created)} of {versions} versions in time (or the aggregator died)"
        )
    skip = 2  # warm-up: the backlog builds up and caches fill
    measured = len(created) - 1 - skip
    # The mean, not the median: a checkpoint every N versions is a spike the median would hide.
    return {
        "per_version": (created[-1] - created[skip]) / measured,
        "writes": (seconds_at[-1] - seconds_at[skip]) / measured,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--versions", type=int, default=23, help="versions per run (2 warm up)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each configuration")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset")
    parser.add_argument("--quick", action="store_true", help="a few seconds' smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.versions, args.rounds, args.models = 5, 1, "cnn"
    results: dict[str, Any] = {
        "benchmark": "durability",
        "quick": args.quick,
        "target_ratio": 1.2,
        "buffer_size": K,
        "versions_per_run": args.versions,
        "rounds": args.rounds,
        "cpus": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "models": {},
    }
    from common.models import build_model, model_params

    with (
        tempfile.TemporaryDirectory(prefix="healthnet-bench-", dir=Path.cwd()) as tmp,
        EmbeddedBroker(BrokerConfig(implementation="mosquitto")) as broker,
    ):
        for name in args.models.split(","):
            spec = MODELS[name]
            params = sum(a.size for a in model_params(build_model(spec, seed=0)).values())
            runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
            for round_ in range(args.rounds):
                order = list(MODES) if round_ % 2 == 0 else list(MODES)[::-1]
                for mode in order:
                    run = measure(
                        broker, spec, mode=MODES[mode], versions=args.versions, workdir=Path(tmp)
                    )
                    runs[mode].append(run)
                    print(f"{name} {mode}: {run['per_version'] * 1e3:.1f} ms/version",
                          file=sys.stderr)  # fmt: skip
            base = statistics.median(r["per_version"] for r in runs["baseline"])
            summary: dict[str, Any] = {
                "parameters": int(params),
                "update_bytes": int(params) * 4,
                "baseline_ms_per_version": base * 1e3,
            }
            for mode in list(MODES)[1:]:
                per_version = statistics.median(r["per_version"] for r in runs[mode])
                writes = statistics.median(r["writes"] for r in runs[mode])
                summary[mode] = {
                    "ms_per_version": per_version * 1e3,
                    "ratio": per_version / base,
                    "checkpoint_and_ledger_ms_per_version": writes * 1e3,
                    "instrumented_ratio": per_version / (per_version - writes),
                }
                print(
                    f"{name} ({params / 1e6:.2f} M params) {mode}: {per_version * 1e3:.1f} vs "
                    f"{base * 1e3:.1f} ms per version, ratio {per_version / base:.3f}; "
                    f"checkpoint+ledger {writes * 1e3:.1f} ms, instrumented ratio "
                    f"{per_version / (per_version - writes):.3f}",
                    file=sys.stderr,
                )
            summary["runs"] = runs
            results["models"][name] = summary
    write_report(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
