"""Model broadcast: from a version's creation to every node holding it, on a real Mosquitto.

    python -m benchmarks.broadcast --json OUT [--nodes 8 32] [--versions N] [--quick]

The publisher does what the aggregator does for a new version (``encode_tensors`` of the
parameters, ``split_blob`` into 1 MiB retained chunks, the chunks then the manifest, over
``MqttClient``); the clock starts when it begins encoding. Subscribers are light nodes, many per
process (``--procs`` processes, one ``MqttClient`` and one ``common.blobs.ModelDownload`` each): a
node holds the version when ``ModelDownload.take`` hands it the reassembled blob, size and
sha256 verified, and decoded with ``decode_tensors`` as a node does before training. For each
model size (about 100 K, 1 M and 11.7 M float32 parameters) and node count it publishes
``--versions`` versions one after another, each once every node holds the previous one, and
reports the median over versions of the median node and of the worst node. ``--quick`` runs the
100 K model to 4 nodes: CI runs it so the benchmark cannot rot.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import queue
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import assert_never

import numpy as np
from numpy.typing import NDArray
from rich.console import Console
from rich.table import Table

from benchmarks._report import number, write_report
from benchmarks.compression_fold import LAYOUTS
from common.blobs import ModelDownload, split_blob
from common.broker_url import BrokerEndpoint
from common.codec import decode_tensors, encode, encode_tensors, envelope, sha256_hex
from common.errors import ProtocolError
from common.inbound import Chunk, Inbound, Received, Refusal, Refused, receive
from common.messages import Manifest, ModelSpec, TrainingConfig
from common.mqtt import ConnectionEvent, Message, MqttClient
from common.topics import TopicTree
from healthnet.broker import BrokerConfig, EmbeddedBroker

CHUNK = 1024 * 1024
MAX_BLOB = 1024**3


def _node(  # noqa: PLR0917 - a process target, called with args
    url: str, federation: str, name: str, report: mp.Queue[tuple[str, int, float]],
          ready: mp.Queue[str], stop: threading.Event) -> None:  # fmt: skip
    """One light node: follow the manifest and chunks, report when each version is held."""
    topics = TopicTree(federation)
    download = ModelDownload(max_blob_bytes=MAX_BLOB)
    with MqttClient(BrokerEndpoint.parse(url), name) as client:
        client.subscribe(topics.manifest())
        client.subscribe(topics.all_chunks())
        announced = False
        while not stop.is_set():
            try:
                item = client.inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            if isinstance(item, ConnectionEvent):
                if item.connected and not announced:
                    ready.put(name)
                    announced = True
                continue
            if not isinstance(item, Message):
                continue
            _take(download, receive(item.topic, item.payload, topics=topics, max_bytes=MAX_BLOB))
            held = download.take()
            if held is not None:
                decode_tensors(held[1], max_bytes=MAX_BLOB)
                report.put((name, held[0].version, time.time()))


def _take(download: ModelDownload, received: Received) -> None:
    match received:
        case Inbound(body=Manifest() as manifest):
            download.on_manifest(manifest)
        case Chunk():
            download.on_chunk(received.version, received.index, received.data)
        case Refusal(reason=Refused.EMPTY) | Inbound():
            pass  # a cleared retained chunk
        case Refusal():
            raise ProtocolError(f"{received.name}: {received.reason.value}: {received.detail}")
        case _:
            assert_never(received)


def _worker(  # noqa: PLR0917 - a process target, called with args
    url: str, federation: str, names: list[str], report: mp.Queue[tuple[str, int, float]],
            ready: mp.Queue[str], done: MpEvent) -> None:  # fmt: skip
    stop = threading.Event()
    threads = [
        threading.Thread(target=_node, args=(url, federation, n, report, ready, stop), daemon=True)
        for n in names
    ]
    for t in threads:
        t.start()
    done.wait()
    stop.set()
    for t in threads:
        t.join(timeout=10)


def measure(url: str, model: str, nodes: int, versions: int, procs: int) -> dict[str, object]:
    federation = f"bcast-{model}-{nodes}".replace("_", "-")
    topics = TopicTree(federation)
    ctx = mp.get_context("spawn")
    report: mp.Queue[tuple[str, int, float]] = ctx.Queue()
    ready: mp.Queue[str] = ctx.Queue()
    done = ctx.Event()
    names = [f"node-{i}" for i in range(nodes)]
    workers = [
        ctx.Process(target=_worker, args=(url, federation, names[p::procs], report, ready, done))
        for p in range(min(procs, nodes))
    ]
    for w in workers:
        w.start()
    for _ in range(nodes):
        ready.get(timeout=120)
    rng = np.random.default_rng(0)
    layout = LAYOUTS[model]
    params = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in layout.items()}
    spec = ModelSpec(name="cnn", kwargs={})
    per_version: list[list[float]] = []
    blob_bytes = 0
    with MqttClient(BrokerEndpoint.parse(url), f"{federation}-publisher") as client:
        for version in range(1, versions + 1):
            params = {k: v + np.float32(1e-3) for k, v in params.items()}  # a new version
            created = time.time()
            blob_bytes, chunk_count = _publish(
                client, topics, version, params, spec=spec, created=created
            )
            per_version.append(_held_seconds(report, version, nodes, created))
            if version > 1:
                for index in range(chunk_count):  # as the aggregator does: clear the old ones
                    client.clear_retained(topics.chunk(version - 1, index))
    _stop(done, workers)
    medians = [statistics.median(v) for v in per_version]
    worsts = [v[-1] for v in per_version]
    return {
        "model": model,
        "params": sum(int(np.prod(s)) for s in layout.values()),
        "blob_bytes": blob_bytes,
        "nodes": nodes,
        "versions": versions,
        "median_node_seconds": statistics.median(medians),
        "worst_node_seconds": statistics.median(worsts),
        "worst_node_seconds_max": max(worsts),
        "first_node_seconds": statistics.median(v[0] for v in per_version),
        "per_version": per_version,
    }


def _publish(
    client: MqttClient,
    topics: TopicTree,
    version: int,
    params: dict[str, NDArray[np.float32]],
    *,
    spec: ModelSpec,
    created: float,
) -> tuple[int, int]:
    """Publish ``params`` as ``version``, its chunks then its manifest: blob bytes, chunk count."""
    blob = encode_tensors(params)
    chunks = split_blob(blob, CHUNK)
    for index, chunk in enumerate(chunks):
        client.publish(topics.chunk(version, index), chunk)
    manifest = Manifest(run_id="bench", version=version, sha256=sha256_hex(blob),
                        blob_bytes=len(blob), chunk_size=CHUNK, chunk_count=len(chunks),
                        model=spec, training=TrainingConfig(),
                        created_at=created)  # fmt: skip
    client.publish(topics.manifest(), encode(envelope(manifest, sender="publisher",
                                                      sent_at=created)))  # fmt: skip
    return len(blob), len(chunks)


def _held_seconds(
    report: mp.Queue[tuple[str, int, float]], version: int, nodes: int, created: float
) -> list[float]:
    """Seconds from ``created`` until each of ``nodes`` nodes held ``version``, in order."""
    held: dict[str, float] = {}
    deadline = time.monotonic() + 300
    while len(held) < nodes:
        name, got, at = report.get(timeout=max(1.0, deadline - time.monotonic()))
        if got == version:
            held[name] = at - created
    return sorted(held.values())


def _stop(done: MpEvent, workers: Sequence[BaseProcess]) -> None:
    """Tell the subscriber processes to end, and kill any that outlive their grace."""
    done.set()
    for w in workers:
        w.join(timeout=30)
        if w.is_alive():
            w.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", type=Path, required=True, help="write the results here")
    parser.add_argument("--nodes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--versions", type=int, default=5, help="versions per model and size")
    parser.add_argument("--procs", type=int, default=4, help="subscriber processes")
    parser.add_argument("--quick", action="store_true", help="a few seconds' smoke run")
    args = parser.parse_args()
    console = Console(stderr=True)
    models = ["cnn-16"] if args.quick else ["cnn-16", "cnn-128", "resnet18"]
    node_counts = [4] if args.quick else args.nodes
    versions = 2 if args.quick else args.versions
    procs = 2 if args.quick else args.procs
    rows = []
    with (
        tempfile.TemporaryDirectory(prefix="healthnet-broadcast-") as tmp,
        EmbeddedBroker(BrokerConfig(implementation="mosquitto", workdir=Path(tmp))) as broker,
    ):
        for model in models:
            for nodes in node_counts:
                console.print(f"{model} to {nodes} nodes ...")
                rows.append(measure(broker.url, model, nodes, versions, procs))
    table = Table(title=f"creation to held and verified, median over {versions} versions")
    for column in ("model", "params", "blob MB", "nodes", "first node s", "median node s",
                   "worst node s", "worst ever s"):  # fmt: skip
        table.add_column(column, justify="left" if column == "model" else "right")
    for r in rows:
        table.add_row(
            str(r["model"]),
            f"{r['params']:,}",
            f"{number(r['blob_bytes']) / 1e6:.1f}",
            str(r["nodes"]),
            f"{r['first_node_seconds']:.3f}",
            f"{r['median_node_seconds']:.3f}",
            f"{r['worst_node_seconds']:.3f}",
            f"{r['worst_node_seconds_max']:.3f}",
        )
    Console(width=140).print(table)
    write_report(
        args.json,
        {
            "benchmark": "broadcast",
            "quick": args.quick,
            "chunk_bytes": CHUNK,
            "subscriber_processes": procs,
            "command": " ".join(sys.argv),
            "results": rows,
        },
    )
    console.print(f"written to {args.json}")


if __name__ == "__main__":
    main()
