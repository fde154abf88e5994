"""Light hospitals by the thousand: many MQTT connections per event loop, a few processes.

Theory of operation. A light hospital speaks the real protocol and does no training. It follows the
retained manifest and chunks (``common.blobs.ModelDownload``: size and sha256 checked, tensors
decoded), and when it is due sends a real :class:`~common.messages.Update` envelope (the codec's,
with a tiny random dense delta of the model it holds) against the version it holds, at most one
per version, as a node does. Each update stays in the hospital's outbox until the aggregator's
:class:`~common.messages.Ack` for its id arrives; on every (re)connect the hospital resends what
its outbox still holds, the same bytes under the same id, which the aggregator folds at most once.
An update never acked by the end of a run is *lost*.

:class:`LightHospital` is that bookkeeping alone, with no I/O: it takes received messages and the
time, and returns what to publish, so that tests drive it with messages they build. Its outbox is
in memory, not on disk as a node's: a node's durability is measured elsewhere
(``benchmarks.durability``), and an fsync per update for thousands of hospitals on one disk
would measure the simulator's disk instead of the federation. :class:`Swarm` runs many of them,
each on its own :class:`~common.mqtt.LoopClient` connection with its own identity, on one
:class:`~common.mqtt.ClientLoop` (one thread); :func:`worker` is a process of a swarm, steered
by the commands of :class:`Command` on a queue, answering on another.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from multiprocessing.context import SpawnContext
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Self, TypeVar, assert_never

import numpy as np

from common.blobs import ModelDownload
from common.codec import decode_tensors, encode, envelope, new_id
from common.compression import dense_tensor
from common.errors import ProtocolError
from common.inbound import Chunk, Inbound, Received, Refusal, Refused, receive
from common.messages import Ack, Manifest, TrainMetrics, Update
from common.mqtt import ClientLoop, ConnectionEvent, LoopClient, Message
from common.settings import ConnectionSettings
from common.topics import Topic, TopicTree

__all__ = [
    "Command",
    "DecodeCache",
    "LightHospital",
    "Swarm",
    "SwarmProcesses",
    "Tally",
    "process_cpu_seconds",
    "worker",
]

log = logging.getLogger(__name__)

K = TypeVar("K")
V = TypeVar("V")

MAX_BLOB = 64 * 1024 * 1024
DELTA_SCALE = 1e-3  # a tiny delta: the aggregator's norm checks accept it, the model barely moves


@dataclass(slots=True)
class Tally:
    """What hospitals did, summed over hospitals by ``+``."""

    hospitals: int = 0
    holding: int = 0  # hospitals that hold some version
    connected: int = 0
    sent: int = 0  # distinct updates
    resent: int = 0  # resends of an outbox entry on a reconnect
    accepted: int = 0
    rejected: int = 0
    duplicate_acks: int = 0  # an ack for an update no longer in the outbox
    pending: int = 0  # in an outbox, not acked (at the end of a run: lost)
    connects: int = 0
    disconnects: int = 0
    refused: int = 0  # received messages the inbound path refused (not counting cleared ones)
    errors: int = 0  # messages a hospital could not handle (a chunk that failed its checks)

    def __add__(self, other: Tally) -> Tally:
        return Tally(
            **{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)}
        )

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class DecodeCache:
    """The decoded form of the model messages a process's hospitals all receive, decoded once.

    Every hospital of a swarm receives the same manifest and chunk bytes, each on its own
    connection; decoding them (the envelope's validation, the blob's tensors) once per process
    instead of once per hospital keeps the simulator's CPU for what differs between hospitals:
    their connections, their acks, their updates. Only the routes that every hospital receives
    alike are kept, and only the last few of them.
    """

    def __init__(self, topics: TopicTree, size: int = 32) -> None:
        self._topics = topics
        self._size = size
        self._received: dict[tuple[str, bytes], Received] = {}
        self._shapes: dict[str, dict[str, tuple[int, ...]]] = {}
        self._manifest = str(topics.manifest())

    def receive(self, topic: str, payload: bytes) -> Received:
        key = (topic, payload)
        found = self._received.get(key)
        if found is not None:
            return found
        received = receive(topic, payload, topics=self._topics, max_bytes=MAX_BLOB)
        if topic == self._manifest or isinstance(received, Chunk):
            _keep(self._received, key, received, self._size)
        return received

    def shapes(self, manifest: Manifest, blob: bytes) -> dict[str, tuple[int, ...]]:
        """The model's tensor shapes, from a blob whose sha256 its download checked."""
        found = self._shapes.get(manifest.sha256)
        if found is None:
            decoded = decode_tensors(blob, max_bytes=MAX_BLOB)
            found = {name: array.shape for name, array in decoded.items()}
            _keep(self._shapes, manifest.sha256, found, self._size)
        return found


def _keep(cache: dict[K, V], key: K, value: V, size: int) -> None:
    if len(cache) >= size:
        del cache[next(iter(cache))]  # the oldest
    cache[key] = value


@dataclass(slots=True)
class LightHospital:
    """One simulated hospital's protocol state: the version it holds, its outbox, its tallies."""

    name: str
    topics: TopicTree
    seed: int
    cache: DecodeCache | None = None  # shared by a process's hospitals; None: decode alone
    download: ModelDownload = field(init=False)
    held: tuple[Manifest, dict[str, tuple[int, ...]]] | None = field(default=None, init=False)
    # Seconds from each version's creation (its manifest's created_at) until this hospital held it.
    held_after: dict[int, float] = field(default_factory=dict, init=False)
    outbox: dict[str, bytes] = field(
        default_factory=dict, init=False
    )  # insertion order: oldest first
    last_base: int = field(default=-1, init=False)  # the version of the last update sent
    due_at: float | None = field(default=None, init=False)  # None: not sending
    tally: Tally = field(default_factory=Tally, init=False)
    rng: random.Random = field(init=False)
    nprng: np.random.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.download = ModelDownload(max_blob_bytes=MAX_BLOB)
        self.rng = random.Random(self.seed)
        self.nprng = np.random.default_rng(self.seed)

    def on_connection(self, event: ConnectionEvent) -> list[bytes]:
        """A (re)connect resends every update still in the outbox, oldest first."""
        if not event.connected:
            self.tally.disconnects += 1
            return []
        self.tally.connects += 1
        self.tally.resent += len(self.outbox)
        return list(self.outbox.values())

    def on_message(self, topic: str, payload: bytes, now: float) -> None:
        """Take one delivered message: a manifest or chunk of the model, or an ack."""
        cache = self.cache
        received = (
            receive(topic, payload, topics=self.topics, max_bytes=MAX_BLOB)
            if cache is None
            else cache.receive(topic, payload)
        )
        match received:
            case Chunk():
                self.download.on_chunk(received.version, received.index, received.data)
            case Inbound(body=Manifest() as manifest):
                self.download.on_manifest(manifest)
            case Inbound(body=Ack() as ack):
                self._on_ack(ack)
            case Refusal(reason=Refused.EMPTY):
                pass  # a cleared retained chunk of an old version
            case Inbound():
                pass  # a route a hospital does not act on
            case Refusal():
                self.tally.refused += 1
                log.warning("%s: refused %s: %s", self.name, topic, received.detail)
            case _:
                assert_never(received)
        got = self.download.take()
        if got is not None:
            manifest, blob = got
            if cache is None:
                decoded = decode_tensors(blob, max_bytes=MAX_BLOB)
                shapes = {name: array.shape for name, array in decoded.items()}
            else:
                shapes = cache.shapes(manifest, blob)
            self.held = (manifest, shapes)
            self.held_after[manifest.version] = now - manifest.created_at

    def _on_ack(self, ack: Ack) -> None:
        if self.outbox.pop(ack.update_id, None) is None:
            self.tally.duplicate_acks += 1
        elif ack.accepted:
            self.tally.accepted += 1
        else:
            self.tally.rejected += 1

    def start_sending(self, now: float, think: float) -> None:
        """Send from now on, a first update within ``think`` seconds (0: stop sending)."""
        self.due_at = now + self.rng.uniform(0, think) if think > 0 else None

    def send_now(self, now: float) -> None:
        """Send one update as soon as a version not yet trained on is held."""
        self.due_at = now

    def due_update(self, now: float, think: float) -> tuple[str, bytes] | None:
        """The update to publish now, if one is due: kept in the outbox until its ack.

        After it, the next is due after a think time uniform around ``think`` seconds (never,
        when ``think`` is 0), and never on the same version.
        """
        if self.due_at is None or now < self.due_at or self.held is None:
            return None
        manifest, shapes = self.held
        if manifest.version <= self.last_base:
            return None  # one update per version, as a node
        delta = tuple(
            dense_tensor(name, (self.nprng.standard_normal(shape) * DELTA_SCALE).astype(np.float32))
            for name, shape in shapes.items()
        )
        update = Update(
            update_id=new_id(),
            run_id=manifest.run_id,
            base_version=manifest.version,
            num_samples=self.rng.randint(50, 300),
            metrics=TrainMetrics(loss=0.5, accuracy=0.75, seconds=think),
            delta=delta,
        )
        payload = encode(envelope(update, sender=self.name, sent_at=time.time()))
        self.outbox[update.update_id] = payload
        self.last_base = manifest.version
        self.tally.sent += 1
        self.due_at = now + self.rng.uniform(0.5 * think, 1.5 * think) if think > 0 else None
        return update.update_id, payload

    def snapshot(self, *, connected: bool) -> Tally:
        """This hospital's tallies with its present state (holding, connected, pending)."""
        tally = Tally(**self.tally.as_dict())
        tally.hospitals = 1
        tally.holding = int(self.held is not None)
        tally.connected = int(connected)
        tally.pending = len(self.outbox)
        return tally


class Swarm:
    """Light hospitals, one connection each, all on one :class:`ClientLoop`.

    It is the connections' :class:`~common.mqtt.LoopHandler`: a message goes to the hospital of
    the connection it came on, and a reconnect publishes what that hospital's outbox holds.
    """

    def __init__(
        self, federation: str, settings: Mapping[str, ConnectionSettings], *, seed: int = 0
    ) -> None:
        self.topics = TopicTree(federation)
        self.loop = ClientLoop()
        cache = DecodeCache(self.topics)
        self.think = 0.0
        self.hospitals: dict[str, LightHospital] = {}
        self.clients: dict[str, LoopClient] = {}
        for i, (name, connection) in enumerate(sorted(settings.items())):
            hospital = LightHospital(name, self.topics, seed=seed * 100_003 + i, cache=cache)
            subscriptions = (
                self.topics.manifest(),
                self.topics.all_chunks(),
                self.topics.ack(name),
            )
            client = LoopClient.from_settings(connection, name, self, subscriptions=subscriptions)
            self.hospitals[name] = hospital
            self.clients[name] = client
            self.loop.add(client)

    def on_connection(self, client: LoopClient, event: ConnectionEvent) -> None:
        for payload in self.hospitals[client.client_id].on_connection(event):
            client.publish(self._update_topic(client.client_id), payload)

    def on_message(self, client: LoopClient, message: Message) -> None:
        hospital = self.hospitals[client.client_id]
        try:
            hospital.on_message(message.topic, message.payload, time.time())
        except ProtocolError as exc:  # a chunk or manifest that failed its checks: counted
            hospital.tally.errors += 1
            log.warning("%s: %s: %s", hospital.name, message.topic, exc)

    def set_think(self, think: float) -> None:
        """Every hospital sends with a mean of ``think`` seconds between updates (0: none)."""
        self.think = think
        now = time.time()
        for hospital in self.hospitals.values():
            hospital.start_sending(now, think)

    def send_one(self, count: int) -> int:
        """``count`` hospitals that hold a version each send one update now; how many will."""
        chosen = [h for h in self.hospitals.values() if h.held is not None][:count]
        now = time.time()
        for hospital in chosen:
            hospital.send_now(now)
        return len(chosen)

    def send_due(self) -> None:
        now = time.time()
        for name, hospital in self.hospitals.items():
            client = self.clients[name]
            if not client.connected:
                continue  # its update is sent on the connect, from the outbox
            due = hospital.due_update(now, self.think)
            if due is not None:
                client.publish(self._update_topic(name), due[1])

    def tally(self) -> Tally:
        total = Tally()
        for name, hospital in self.hospitals.items():
            total += hospital.snapshot(connected=self.clients[name].connected)
        return total

    def held_after(self, version: int) -> tuple[list[float], int]:
        """Seconds until each hospital held ``version``, and how many do not hold it."""
        seconds = [
            h.held_after[version] for h in self.hospitals.values() if version in h.held_after
        ]
        return seconds, len(self.hospitals) - len(seconds)

    def run_for(self, seconds: float, *, until_settled: bool = False) -> None:
        """Run the loop for ``seconds``, or less once nothing is pending (``until_settled``)."""
        deadline = time.monotonic() + seconds
        next_send = 0.0
        while time.monotonic() < deadline:
            self.loop.run_once(0.02)
            if time.monotonic() >= next_send:
                self.send_due()
                next_send = time.monotonic() + 0.05
            if until_settled and not any(h.outbox for h in self.hospitals.values()):
                return

    def _update_topic(self, name: str) -> Topic:
        return self.topics.update(name)


class Command(StrEnum):
    """What a :func:`worker` is told, each with one argument (a number)."""

    THINK = "think"  # send with this mean think time from now on (0: stop)
    SEND_ONE = "send_one"  # this many hospitals send one update now
    HELD = "held"  # answer the seconds until each hospital held this version
    TALLY = "tally"  # answer the tallies
    DRAIN = "drain"  # stop sending, wait up to this many seconds for the acks due, answer tallies
    STOP = "stop"  # disconnect and end


Reply = tuple[str, object]


def worker(
    federation: str, env_files: dict[str, str], index: int,
    commands: mp.Queue[tuple[Command, float]], replies: mp.Queue[tuple[int, Reply]],
) -> None:  # fmt: skip
    """A process of a swarm: connect, report ``ready`` once every hospital holds a version, obey."""
    logging.basicConfig(level=logging.WARNING, format=f"sim{index} %(levelname)s %(message)s")
    settings = {name: ConnectionSettings(_env_file=env) for name, env in env_files.items()}
    swarm = Swarm(federation, settings, seed=index)
    ready = False
    with swarm.loop:
        while True:
            swarm.run_for(0.1)
            if not ready and all(h.held is not None for h in swarm.hospitals.values()):
                ready = True
                replies.put((index, ("ready", len(swarm.hospitals))))
            for command, argument in _take_all(commands):
                answer = _obey(swarm, command, argument)
                if command is Command.STOP:
                    return
                if answer is not None:
                    replies.put((index, answer))


def _take_all(commands: mp.Queue[tuple[Command, float]]) -> Iterable[tuple[Command, float]]:
    while not commands.empty():
        try:
            yield commands.get_nowait()
        except queue.Empty:  # raced with empty(): nothing to take
            return


def _obey(swarm: Swarm, command: Command, argument: float) -> Reply | None:
    match command:
        case Command.THINK:
            swarm.set_think(argument)
            return None
        case Command.SEND_ONE:
            return ("sending", swarm.send_one(int(argument)))
        case Command.HELD:
            seconds, missing = swarm.held_after(int(argument))
            return ("held", (seconds, missing))
        case Command.TALLY:
            return ("tally", swarm.tally().as_dict())
        case Command.DRAIN:
            swarm.set_think(0.0)
            swarm.run_for(argument, until_settled=True)
            return ("tally", swarm.tally().as_dict())
        case Command.STOP:
            return None
        case _:
            assert_never(command)


class SwarmProcesses:
    """A swarm split over processes (one :func:`worker` each), steered as one.

    Processes start one at a time (:meth:`start_next`), so that a benchmark can measure the
    broker with each more share of the hospitals connected.
    """

    def __init__(self, federation: str, env_files: Mapping[str, Path], procs: int) -> None:
        names = sorted(env_files)
        self._shares = [
            {n: str(env_files[n]) for n in names[p::procs]} for p in range(min(procs, len(names)))
        ]
        self._federation = federation
        self._ctx = mp_context()
        self._replies: mp.Queue[tuple[int, Reply]] = self._ctx.Queue()
        self._commands: list[mp.Queue[tuple[Command, float]]] = []
        self.processes: list[BaseProcess] = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def started(self) -> int:
        """Hospitals in the processes started so far."""
        return sum(len(share) for share in self._shares[: len(self.processes)])

    @property
    def complete(self) -> bool:
        return len(self.processes) == len(self._shares)

    def start_next(self, timeout: float) -> None:
        """Start the next process and wait until each of its hospitals holds a version."""
        index = len(self.processes)
        commands: mp.Queue[tuple[Command, float]] = self._ctx.Queue()
        process = self._ctx.Process(
            target=worker, args=(self._federation, self._shares[index], index, commands,
                                 self._replies),
            name=f"light-hospitals-{index}", daemon=True,
        )  # fmt: skip
        process.start()
        self._commands.append(commands)
        self.processes.append(process)
        self._gather("ready", timeout, only=index)

    def think(self, seconds: float) -> None:
        self._tell(Command.THINK, seconds)

    def send_one(self, count: int) -> int:
        """``count`` hospitals, spread over the processes, each send one update now."""
        per = [count // len(self._commands) + (i < count % len(self._commands))
               for i in range(len(self._commands))]  # fmt: skip
        for commands, n in zip(self._commands, per, strict=True):
            commands.put((Command.SEND_ONE, float(n)))
        return sum(int(_number(r)) for r in self._gather("sending", 60))

    def held(self, version: int) -> tuple[list[float], int]:
        """Seconds until each hospital held ``version`` (sorted), and how many do not yet."""
        self._tell(Command.HELD, float(version))
        seconds: list[float] = []
        missing = 0
        for reply in self._gather("held", 60):
            if not isinstance(reply, tuple):
                raise TypeError(f"a held reply is not a pair: {reply!r}")
            got, lacking = reply
            seconds += [_number(s) for s in got]
            missing += int(_number(lacking))
        return sorted(seconds), missing

    def tally(self) -> Tally:
        self._tell(Command.TALLY, 0.0)
        return self._sum(self._gather("tally", 60))

    def drain(self, seconds: float) -> Tally:
        """Stop sending; wait up to ``seconds`` for the acks still due; the final tallies."""
        self._tell(Command.DRAIN, seconds)
        return self._sum(self._gather("tally", seconds + 60))

    def cpu_seconds(self) -> float:
        """CPU time the hospital processes have used so far (from /proc)."""
        return sum(process_cpu_seconds(p.pid) for p in self.processes if p.pid is not None)

    def close(self) -> None:
        self._tell(Command.STOP, 0.0)
        for process in self.processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join(timeout=5)

    def _tell(self, command: Command, argument: float) -> None:
        for commands in self._commands:
            commands.put((command, argument))

    def _gather(self, kind: str, timeout: float, *, only: int | None = None) -> list[object]:
        """One ``kind`` reply from each process (or from process ``only``)."""
        waiting = {only} if only is not None else set(range(len(self._commands)))
        got: dict[int, object] = {}
        deadline = time.monotonic() + timeout
        while waiting:
            for i in waiting:
                if not self.processes[i].is_alive():
                    raise RuntimeError(f"light-hospital process {i} exited while awaited")
            try:
                wait = min(5.0, max(0.1, deadline - time.monotonic()))
                index, (what, payload) = self._replies.get(timeout=wait)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no {kind!r} from processes {sorted(waiting)}") from None
                continue
            if what == kind and index in waiting:
                waiting.discard(index)
                got[index] = payload
        return [got[i] for i in sorted(got)]

    @staticmethod
    def _sum(replies: Iterable[object]) -> Tally:
        total = Tally()
        for reply in replies:
            total += Tally(**reply)  # type: ignore[arg-type]
        return total


def mp_context() -> SpawnContext:
    return mp.get_context("spawn")


def process_cpu_seconds(pid: int) -> float:
    """User and system CPU seconds a process has used (``/proc/PID/stat``), 0 once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields_after_name = stat.rsplit(")", 1)[1].split()
    utime, stime = int(fields_after_name[11]), int(fields_after_name[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def _number(value: object) -> float:
    if not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {value!r}")
    return value
