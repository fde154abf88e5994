"""Scale: hundreds of simulated hospitals against one real aggregator and one Mosquitto.

    python -m benchmarks.swarm --json OUT [--nodes 200] [--seconds 180] [--think 10] [--quick]

The aggregator is the real service (``healthnet aggregator run``, the heart-disease logistic
regression, FedBuff K = ``--buffer-size``) in its own process; the hospitals are light clients,
many per process (``--procs``), each one ``MqttClient`` built from the protocol's own parts: it
follows the retained manifest and chunks (``common.blobs.ModelDownload``), and after a think time
drawn around ``--think`` seconds sends a random dense delta (``compression.dense_tensor``, the
codec's envelope) against the version it holds, at most one per version, and counts the acks.
After ``--seconds`` the clients stop sending and wait for the acks still due. It reports versions
per minute, updates folded per second, updates sent, accepted, rejected and never acknowledged
(lost), and the aggregator's resident memory (VmRSS sampled from /proc every second, VmHWM at
the end) with its growth from the first to the last third of the run. ``--quick`` runs 20
hospitals for a few seconds: CI runs it so the benchmark cannot rot.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import queue
import random
import shutil
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
from rich.console import Console
from rich.table import Table

from benchmarks._report import write_report
from common.blobs import ModelDownload
from common.broker_url import BrokerEndpoint
from common.codec import decode_tensors, encode, envelope, new_id
from common.compression import dense_tensor
from common.errors import ProtocolError
from common.inbound import Chunk, Inbound, Refusal, Refused, receive
from common.messages import Ack, AggregatorStatus, Manifest, TrainMetrics, Update
from common.mqtt import ConnectionEvent, Message, MqttClient
from common.topics import TopicTree
from healthnet.broker import BrokerConfig, EmbeddedBroker
from healthnet.demo import aggregator_settings
from healthnet.federations import HEART_DISEASE
from healthnet.processes import ProcessGroup

MAX_BLOB = 64 * 1024 * 1024


class _Hospital:
    """One simulated hospital: a connection, the model it holds, and its own tallies."""

    def __init__(self, url: str, federation: str, name: str, think: float, seed: int) -> None:
        self.name = name
        self.topics = TopicTree(federation)
        self.client = MqttClient(BrokerEndpoint.parse(url), name)
        self.download = ModelDownload(max_blob_bytes=MAX_BLOB)
        self.rng = random.Random(seed)
        self.nprng = np.random.default_rng(seed)
        self.think = think
        self.held: tuple[Manifest, dict[str, np.ndarray]] | None = None
        self.sent_base = -1
        self.due_at = time.monotonic() + self.rng.uniform(0, think)
        self.pending: set[str] = set()
        self.tally = {"sent": 0, "accepted": 0, "rejected": 0}

    def run(self, sending: threading.Event, stop: threading.Event) -> None:
        topics = self.topics
        with self.client as client:
            client.subscribe(topics.manifest())
            client.subscribe(topics.all_chunks())
            client.subscribe(topics.ack(self.name))
            while not stop.is_set():
                try:
                    item = client.inbox.get(timeout=0.1)
                except queue.Empty:
                    item = None
                if isinstance(item, Message):
                    try:
                        self._on_message(item)
                    except Exception as exc:  # noqa: BLE001 - counted and named, never silent
                        # A message this light client cannot handle must not end its thread,
                        # which would leave its last update looking unacknowledged.
                        self.tally["errors"] = self.tally.get("errors", 0) + 1
                        print(f"{self.name}: {item.topic}: {exc!r}", file=sys.stderr, flush=True)
                elif isinstance(item, ConnectionEvent) and not item.connected:
                    self.tally["disconnects"] = self.tally.get("disconnects", 0) + 1
                if sending.is_set():
                    self._maybe_send(client)

    def _on_message(self, item: Message) -> None:
        match received := receive(item.topic, item.payload, topics=self.topics, max_bytes=MAX_BLOB):
            case Chunk():
                self.download.on_chunk(received.version, received.index, received.data)
            case Inbound(body=Manifest() as manifest):
                self.download.on_manifest(manifest)
            case Inbound(body=Ack() as ack) if ack.update_id in self.pending:
                self._on_ack(ack)
            case Refusal(reason=Refused.EMPTY) | Inbound():
                pass  # a cleared retained chunk, another's ack, or a resent one's
            case Refusal():
                raise ProtocolError(f"{received.reason.value}: {received.detail}")
            case _:
                assert_never(received)
        got = self.download.take()
        if got is not None:
            manifest, blob = got
            self.held = (manifest, dict(decode_tensors(blob, max_bytes=MAX_BLOB)))

    def _on_ack(self, ack: Ack) -> None:
        self.pending.discard(ack.update_id)
        self.tally["accepted" if ack.accepted else "rejected"] += 1
        if not ack.accepted:
            self.tally[f"rejected_{ack.reason}"] = self.tally.get(f"rejected_{ack.reason}", 0) + 1

    def _maybe_send(self, client: MqttClient) -> None:
        if self.held is None or time.monotonic() < self.due_at:
            return
        manifest, params = self.held
        if manifest.version <= self.sent_base:
            return  # one update per version, as a real node
        delta = tuple(
            dense_tensor(name, (self.nprng.standard_normal(p.shape) * 1e-3).astype(np.float32))
            for name, p in params.items()
        )
        update = Update(
            update_id=new_id(),
            run_id=manifest.run_id,
            base_version=manifest.version,
            num_samples=self.rng.randint(50, 300),
            metrics=TrainMetrics(loss=0.5, accuracy=0.75, seconds=self.think),
            delta=delta,
        )
        payload = encode(envelope(update, sender=self.name, sent_at=time.time()))
        client.publish(self.topics.update(self.name), payload)
        self.pending.add(update.update_id)
        self.sent_base = manifest.version
        self.tally["sent"] += 1
        self.due_at = time.monotonic() + self.rng.uniform(0.5 * self.think, 1.5 * self.think)


def _worker(  # noqa: PLR0917 - a process target, called with args
    url: str, federation: str, names: list[str], think: float,
            out: mp.Queue[dict[str, int]], ready: mp.Queue[str],
            sending: MpEvent, stop: MpEvent) -> None:  # fmt: skip
    local_send, local_stop = threading.Event(), threading.Event()
    hospitals = [_Hospital(url, federation, n, think, seed=i) for i, n in enumerate(names)]
    threads = [threading.Thread(target=h.run, args=(local_send, local_stop), daemon=True)
               for h in hospitals]  # fmt: skip
    for t in threads:
        t.start()
    while any(h.held is None for h in hospitals):
        time.sleep(0.1)
    ready.put(str(len(hospitals)))
    sending.wait()
    local_send.set()
    while not stop.is_set():
        time.sleep(0.1)
        if not sending.is_set():
            local_send.clear()
    # drain: wait for the acks still due, up to the stop signal's grace
    local_send.clear()
    deadline = time.monotonic() + 30
    while any(h.pending for h in hospitals) and time.monotonic() < deadline:
        time.sleep(0.2)
    local_stop.set()
    for t in threads:
        t.join(timeout=10)
    out.put(_tally(hospitals))


def _tally(hospitals: list[_Hospital]) -> dict[str, int]:
    """The hospitals' tallies summed, with the updates still unacknowledged as ``lost``."""
    total: dict[str, int] = {"lost": sum(len(h.pending) for h in hospitals)}
    for h in hospitals:
        for update_id in sorted(h.pending):  # named, so that the logs can tell what became of it
            print(f"{h.name}: no ack for update {update_id}", file=sys.stderr, flush=True)
    for h in hospitals:
        for key, value in h.tally.items():
            total[key] = total.get(key, 0) + value
    return total


def _memory(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def _drain_status(
    watch: MqttClient, topics: TopicTree, latest: AggregatorStatus | None
) -> AggregatorStatus | None:
    """The newest aggregator status on ``watch``'s inbox, or ``latest`` if none came."""
    while True:
        try:
            item = watch.inbox.get_nowait()
        except queue.Empty:
            return latest
        if not isinstance(item, Message):
            continue
        match received := receive(item.topic, item.payload, topics=topics, max_bytes=MAX_BLOB):
            case Inbound(body=AggregatorStatus() as status):
                latest = status
            case Inbound() | Chunk() | Refusal():
                pass
            case _:
                assert_never(received)


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", type=Path, required=True, help="write the results here")
    parser.add_argument("--nodes", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=180.0, help="sending time")
    parser.add_argument("--think", type=float, default=10.0, help="mean seconds between updates")
    parser.add_argument("--buffer-size", type=int, default=10)
    parser.add_argument("--max-staleness", type=int, default=1000)
    parser.add_argument("--procs", type=int, default=4, help="client processes")
    parser.add_argument("--quick", action="store_true", help="a few seconds' smoke run")
    args = parser.parse_args()
    if args.quick:
        args.nodes, args.seconds, args.think, args.procs, args.buffer_size = 20, 5.0, 1.0, 2, 4
    return args


def _collect(out: mp.Queue[dict[str, int]], workers: Sequence[BaseProcess]) -> dict[str, int]:
    """Every worker process's tally, summed; then the processes are joined."""
    totals: dict[str, int] = {}
    for _ in workers:
        for key, value in out.get(timeout=120).items():
            totals[key] = totals.get(key, 0) + value
    for w in workers:
        w.join(timeout=30)
    return totals


def main() -> None:  # noqa: PLR0915 - one script, read top to bottom
    args = _arguments()
    console = Console(stderr=True)
    federation = f"swarm-{new_id()[:8]}"
    topics = TopicTree(federation)
    ctx = mp.get_context("spawn")
    out: mp.Queue[dict[str, int]] = ctx.Queue()
    ready: mp.Queue[str] = ctx.Queue()
    sending, stop = ctx.Event(), ctx.Event()
    names = [f"h{i:04d}" for i in range(args.nodes)]
    samples: list[tuple[float, int]] = []
    with (
        tempfile.TemporaryDirectory(prefix="healthnet-swarm-") as tmp,
        EmbeddedBroker(BrokerConfig(implementation="mosquitto", workdir=Path(tmp) / "broker"))
        as broker,
        ProcessGroup(Path(tmp) / "logs") as group,
        MqttClient(BrokerEndpoint.parse(broker.url), f"{federation}-watch") as watch,
    ):  # fmt: skip
        watch.subscribe(topics.aggregator_status())
        aggregator = group.start_service(
            "aggregator",
            aggregator_settings(
                broker_url=broker.url,
                federation_id=federation,
                state_dir=Path(tmp) / "aggregator",
                federation=HEART_DISEASE,
                buffer_size=args.buffer_size,
                max_staleness=args.max_staleness,
            ),
        )
        workers = [
            ctx.Process(target=_worker, args=(broker.url, federation, names[p::args.procs],
                                              args.think, out, ready, sending, stop))
            for p in range(args.procs)
        ]  # fmt: skip
        for w in workers:
            w.start()
        for _ in workers:
            ready.get(timeout=300)
        pid = aggregator.pid
        assert pid is not None
        status = _drain_status(watch, topics, None)
        start_version = 0 if status is None else status.version
        start_folded = 0 if status is None else status.counters.folded
        console.print(f"{args.nodes} hospitals hold the model; sending for {args.seconds:.0f}s")
        started = time.monotonic()
        sending.set()
        while time.monotonic() - started < args.seconds:
            samples.append((time.monotonic() - started, _memory(pid)["VmRSS"]))
            status = _drain_status(watch, topics, status)
            if aggregator.poll() is not None:
                raise SystemExit(f"the aggregator exited:\n{aggregator.tail()}")
            time.sleep(1.0)
        sending.clear()
        sent_for = time.monotonic() - started
        status = _drain_status(watch, topics, status)
        mid_version = 0 if status is None else status.version
        mid_folded = 0 if status is None else status.counters.folded
        stop.set()
        totals = _collect(out, workers)
        time.sleep(2.0)  # one more status heartbeat
        status = _drain_status(watch, topics, status)
        hwm = _memory(pid)["VmHWM"]
        if totals.get("lost", 0):  # keep the evidence: the aggregator's and the broker's logs
            kept = args.json.with_name(args.json.stem + "-logs")
            shutil.copytree(Path(tmp) / "logs", kept / "processes", dirs_exist_ok=True)
            shutil.copytree(Path(tmp) / "broker", kept / "broker", dirs_exist_ok=True)
            console.print(f"[red]{totals['lost']} updates never acknowledged; logs kept in {kept}")
    assert status is not None
    third = max(1, len(samples) // 3)
    first = statistics.median(r for _, r in samples[:third])
    last = statistics.median(r for _, r in samples[-third:])
    counters = status.counters
    result = {
        "nodes": args.nodes,
        "sending_seconds": sent_for,
        "versions": mid_version - start_version,
        "versions_per_minute": (mid_version - start_version) / sent_for * 60,
        "updates_folded_per_second": (mid_folded - start_folded) / sent_for,
        "sent": totals.get("sent", 0),
        "accepted": totals.get("accepted", 0),
        "rejected": totals.get("rejected", 0),
        "lost": totals.get("lost", 0),
        "client_errors": totals.get("errors", 0),
        "client_tallies": totals,
        "aggregator_counters": counters.model_dump(),
        "aggregator_rss_first_third_bytes": first,
        "aggregator_rss_last_third_bytes": last,
        "aggregator_rss_growth": last / first - 1,
        "aggregator_peak_rss_bytes": hwm,
        "rss_samples": samples,
    }
    table = Table(title=f"{args.nodes} hospitals, {sent_for:.0f}s, K = {args.buffer_size}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    rows: tuple[tuple[str, str], ...] = (
        ("versions per minute", f"{result['versions_per_minute']:.1f}"),
        ("updates folded per second", f"{result['updates_folded_per_second']:.2f}"),
        ("updates sent / accepted", f"{result['sent']} / {result['accepted']}"),
        ("rejected / lost", f"{result['rejected']} / {result['lost']}"),
        ("messages a hospital could not handle", str(result["client_errors"])),
        ("aggregator rejected (its counter)", str(counters.rejected)),
        ("aggregator RSS first / last third", f"{first / 2**20:.1f} / {last / 2**20:.1f} MiB"),
        ("aggregator peak RSS (VmHWM)", f"{hwm / 2**20:.1f} MiB"),
    )
    for label, text in rows:
        table.add_row(label, text)
    Console(width=120).print(table)
    write_report(
        args.json,
        {
            "benchmark": "swarm",
            "quick": args.quick,
            "settings": {
                "nodes": args.nodes,
                "seconds": args.seconds,
                "think": args.think,
                "buffer_size": args.buffer_size,
                "max_staleness": args.max_staleness,
                "procs": args.procs,
                "model": HEART_DISEASE.model.model_dump(),
            },
            "command": " ".join(sys.argv),
            "result": result,
        },
    )
    console.print(f"written to {args.json}")


if __name__ == "__main__":
    main()
