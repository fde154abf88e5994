"""Break a real federation on purpose, then prove from the records that no update was lost.

Theory of operation. :func:`run_chaos` starts Mosquitto (persistence on, in a work folder, on a
port it keeps), the aggregator and one node per hospital as real processes, waits for the first
version, and then for ``seconds`` injects faults at moments drawn from a seeded RNG:

* ``aggregator_kill``: SIGKILL the aggregator (whatever it is doing, start-up included) and start
  it again after up to 1.5 s;
* ``broker_restart``: stop Mosquitto cleanly and start it on the same port and store;
* ``broker_crash``: SIGKILL Mosquitto (it loses what it had not autosaved) and start it again;
* ``node_kill_training``: SIGKILL a node while its status says it is training, restart it;
* ``node_kill_upload``: SIGKILL a node while it holds an update in its outbox that the aggregator
  has not acknowledged (if none does, the aggregator is frozen with SIGSTOP until one does);
* ``node_freeze``: SIGSTOP a node until the broker, past its keep-alive, has dropped it and
  published its Last Will, then SIGCONT.

Each kind recurs every ``every[kind]`` seconds on average (0.5 to 1.5 times that, so kinds drift
against each other) and happens at least once in any run. Afterwards the federation runs without
faults until it has made ``min_versions`` versions, and is drained: pause (nodes stop training,
the aggregator keeps acking), wait until every outbox is empty, stop the nodes, fold what is
buffered with K = 1, stop the run. Then :mod:`devtools.reconcile` compares the nodes' sent logs
with the aggregator's update log and versions log, and the final model is evaluated on every
hospital's test split. :func:`problems` is the verdict: the benchmark's exit status and the
durability tests both read it.

With ``secure_aggregation`` every version is folded by secure aggregation (every hospital a
holder, each hospital's key record signed by a throwaway CA as the demo makes them,
:func:`healthnet.demo.demo_identities`). The drain cannot fold the rest then: a secure sum needs
updates of several hospitals and the hospitals' answers, and resumed hospitals train again, so
no resume leaves the buffer empty. It pauses, waits until every outbox is empty, and stops. The
updates still buffered are acknowledged and in the aggregator's write-ahead log, for the run's
next fold; the reconciliation counts them apart (``buffered_at_stop``) and :func:`problems`
accepts them only in a secure run. How many there are is no verdict: a secure fold takes
longer than a plaintext one, so a buffer may hold a backlog of several folds when the drain
pauses. A run whose folds stalled shows as never reaching ``min_versions``.

Nodes run with a short keep-alive (``node_keepalive``) so that a freeze is noticed within
seconds, a short ``ack_timeout``, and a per-update delay drawn from ``node_delay`` (a slow
hospital, and time in which a node is "training" and can be killed).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import queue
import random
import signal
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import assert_never

from pydantic import SecretStr

from aggregator.settings import AggregatorSettings
from common.broker_url import BrokerEndpoint
from common.codec import DEFAULT_MAX_MESSAGE_BYTES, new_id
from common.errors import ControlError, HealthNetError
from common.inbound import Chunk, Inbound, Refusal, Refused, receive
from common.messages import (
    AggregatorState,
    AggregatorStatus,
    ControlCommand,
    NodeState,
    NodeStatus,
    SecureAggregation,
)
from common.mqtt import Message, MqttClient
from common.settings import ConnectionSettings
from common.topics import Topic, TopicTree
from devtools.reconcile import Reconciliation, load
from healthnet.broker import BrokerConfig, EmbeddedBroker
from healthnet.control import ControlClient
from healthnet.demo import aggregator_settings, demo_identities, node_settings
from healthnet.federations import FEDERATIONS, Federation
from healthnet.processes import ProcessGroup

__all__ = ["DEFAULT_EVERY", "ChaosConfig", "ChaosError", "ChaosResult", "Fault", "run_chaos"]

log = logging.getLogger(__name__)

_FREEZE_CAP = 30.0  # seconds a frozen node waits at most for the broker to give it up


class ChaosError(HealthNetError):
    """The chaos run could not be carried out (a process never started, a drain timed out)."""


class Fault(StrEnum):
    AGGREGATOR_KILL = "aggregator_kill"
    BROKER_RESTART = "broker_restart"
    BROKER_CRASH = "broker_crash"
    NODE_KILL_TRAINING = "node_kill_training"
    NODE_KILL_UPLOAD = "node_kill_upload"
    NODE_FREEZE = "node_freeze"


# Mean seconds between two faults of a kind: a 10-minute run gets about 33 aggregator kills,
# 6 clean broker restarts and 3 broker crashes, 20 + 13 node kills and 10 freezes.
DEFAULT_EVERY: Mapping[Fault, float] = {
    Fault.AGGREGATOR_KILL: 18.0,
    Fault.BROKER_RESTART: 100.0,
    Fault.BROKER_CRASH: 200.0,
    Fault.NODE_KILL_TRAINING: 30.0,
    Fault.NODE_KILL_UPLOAD: 45.0,
    Fault.NODE_FREEZE: 60.0,
}


@dataclass(frozen=True, slots=True)
class ChaosConfig:
    seconds: float = 600.0
    federation: str = "heart-disease"
    seed: int = 0
    faults: frozenset[Fault] = frozenset(Fault)
    every: Mapping[Fault, float] = field(default_factory=lambda: dict(DEFAULT_EVERY))
    min_versions: int = 60
    workdir: Path | None = None
    node_keepalive: int = 2
    ack_timeout: float = 3.0
    node_delay: tuple[float, float] = (0.1, 0.5)
    buffer_size: int | None = None
    max_staleness: int | None = None
    start_timeout: float = 90.0
    drain_timeout: float = 120.0
    secure_aggregation: bool = False
    """Fold every version by secure aggregation, every hospital a holder."""


@dataclass(slots=True)
class ChaosResult:
    counts: dict[str, int]
    reconciliation: Reconciliation
    final_version: int
    final_accuracy: float
    pooled_accuracy: float
    per_node_accuracy: dict[str, float]
    fault_seconds: float
    wall_seconds: float
    unexpected_exits: list[str]
    config: ChaosConfig
    events: list[tuple[float, str]]

    def to_json(self) -> dict[str, object]:
        counts = self.counts
        return {
            "aggregator_kills": counts.get(Fault.AGGREGATOR_KILL, 0),
            "broker_restarts": counts.get(Fault.BROKER_RESTART, 0)
            + counts.get(Fault.BROKER_CRASH, 0),
            "broker_crashes": counts.get(Fault.BROKER_CRASH, 0),
            "node_kills": counts.get(Fault.NODE_KILL_TRAINING, 0)
            + counts.get(Fault.NODE_KILL_UPLOAD, 0),
            "node_kills_training": counts.get(Fault.NODE_KILL_TRAINING, 0),
            "node_kills_holding_unacked_updates": counts.get(Fault.NODE_KILL_UPLOAD, 0),
            "node_freezes": counts.get(Fault.NODE_FREEZE, 0),
            "freezes_seen_offline": counts.get("freeze_seen_offline", 0),
            **self.reconciliation.to_json(),
            "final_version": self.final_version,
            "final_accuracy": self.final_accuracy,
            "pooled_accuracy": self.pooled_accuracy,
            "per_node_accuracy": self.per_node_accuracy,
            "unexpected_exits": self.unexpected_exits,
            "fault_seconds": self.fault_seconds,
            "wall_seconds": self.wall_seconds,
            "federation": self.config.federation,
            "seed": self.config.seed,
            "faults": sorted(self.config.faults),
            "secure_aggregation": self.config.secure_aggregation,
            "events": self.events,
        }


def problems(result: ChaosResult) -> list[str]:
    """What broke the durability contract in a chaos run (empty: nothing), one line each.

    Nothing lost, folded twice, folded unsent, left in an outbox or discarded; no node trained
    twice on one version; the update log and the versions log agree, versions are contiguous, every
    update sent is accounted for as folded, rejected or discarded; no process exited on its own.
    An honest federation discards nothing, so a discarded update is a problem here too.
    """
    r = result.reconciliation
    found = [
        f"{len(ids)} {what}: {ids[:5]}"
        for what, ids in (
            ("lost (sent, never folded, rejected nor discarded)", r.lost),
            ("folded into two versions", r.double_folded),
            ("folded but never sent", r.folded_not_sent),
            ("where the update log and versions.jsonl disagree", r.ledger_disagrees),
            ("left in an outbox", r.still_in_outbox),
            ("(node, run, base) trained on twice", r.same_base_twice),
            ("unexpected exits", result.unexpected_exits),
        )
        if ids
    ]
    if not r.versions_contiguous:
        found.append("versions are not contiguous")
    if r.updates_discarded:
        found.append(f"{r.updates_discarded} updates discarded")
    held = len(r.buffered_at_stop)
    if held and not result.config.secure_aggregation:
        found.append(f"{held} updates still buffered at stop: {r.buffered_at_stop[:5]}")
    accounted = r.updates_folded + r.updates_rejected + r.updates_discarded + held
    if accounted != r.updates_sent:
        found.append(f"{r.updates_sent} updates sent, {accounted} folded, rejected or discarded")
    return found


def _secure_policy(federation: Federation) -> SecureAggregation:
    return SecureAggregation(holders=tuple(site.node_id for site in federation.sites))


def schedule(config: ChaosConfig, rng: random.Random) -> list[tuple[float, Fault]]:
    """Fault times in seconds from the start of the fault window, each kind at least once."""
    events: list[tuple[float, Fault]] = []
    for fault in sorted(config.faults):
        mean = config.every[fault]
        moment = rng.uniform(0.1, 0.8) * min(mean, config.seconds)
        while moment < config.seconds:
            events.append((moment, fault))
            moment += mean * rng.uniform(0.5, 1.5)
    return sorted(events)


class _Monitor:
    """Follows the aggregator's and the nodes' retained statuses over MQTT."""

    def __init__(self, url: str, topics: TopicTree) -> None:
        self.topics = topics
        self.client = MqttClient(BrokerEndpoint.parse(url), f"chaos-{new_id()[:12]}")
        self.client.subscribe(topics.aggregator_status())
        self.client.subscribe(topics.all_node_status())
        self.status: AggregatorStatus | None = None
        self.nodes: dict[str, NodeStatus] = {}
        self.went_offline: set[str] = set()

    def pump(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                item = self.client.inbox.get(timeout=remaining)
            except queue.Empty:
                return
            if isinstance(item, Message):
                self._take(item)

    def _take(self, message: Message) -> None:
        match received := receive(
            message.topic, message.payload, topics=self.topics, max_bytes=DEFAULT_MAX_MESSAGE_BYTES
        ):
            case Inbound(body=AggregatorStatus() as status):
                self.status = status
            case Inbound(topic=Topic(node=str() as node), body=NodeStatus() as node_status):
                self.nodes[node] = node_status
                if node_status.state is NodeState.OFFLINE:
                    self.went_offline.add(node)
            case Refusal(reason=Refused.EMPTY) | Inbound() | Chunk():
                pass  # a cleared status, or a message the monitor does not follow
            case Refusal():
                log.warning("chaos monitor ignored a message: %s", received.detail)
            case _:
                assert_never(received)

    @property
    def version(self) -> int:
        return 0 if self.status is None else self.status.version


class _Chaos:
    """One chaos run; see the module docstring."""

    def __init__(
        self, config: ChaosConfig, federation: Federation, workdir: Path, progress: ProgressFn
    ) -> None:
        self.config = config
        self.progress = progress
        self.federation = federation
        self.workdir = workdir
        self.rng = random.Random(config.seed)
        self.fed_id = f"chaos-{new_id()[:8]}"
        self.topics = TopicTree(self.fed_id)
        self.group = ProcessGroup(workdir / "logs")
        self.broker = EmbeddedBroker(
            BrokerConfig(implementation="mosquitto", persistence=True, workdir=workdir / "broker")
        )
        self.sites = [site.node_id for site in federation.sites]
        self.delays = {node: self.rng.uniform(*config.node_delay) for node in self.sites}
        self.counts: dict[str, int] = {}
        self.events: list[tuple[float, str]] = []
        self.pending: list[tuple[float, str, Callable[[], None]]] = []
        self.frozen: set[str] = set()
        self.expected_down: set[str] = set()
        self.unexpected: list[str] = []
        self.started = time.monotonic()
        self.monitor: _Monitor | None = None
        self.restarts: dict[str, Callable[[], None]] = {"aggregator": self.start_aggregator}
        self.secure = _secure_policy(federation) if config.secure_aggregation else None
        self.identities = (
            demo_identities(workdir / "secagg-pki", self.fed_id, self.sites)
            if self.secure is not None
            else {}
        )
        for node in self.sites:
            self.restarts[node] = functools.partial(self.start_node, node)

    # -- processes

    @property
    def aggregator_dir(self) -> Path:
        return self.workdir / "aggregator"

    def node_dir(self, node: str) -> Path:
        return self.workdir / "nodes" / node

    def aggregator_settings(self) -> AggregatorSettings:
        knobs = self.federation.knobs
        return aggregator_settings(
            broker_url=self.broker.url,
            federation_id=self.fed_id,
            state_dir=self.aggregator_dir,
            federation=self.federation,
            buffer_size=self.config.buffer_size or knobs.buffer_size,
            max_staleness=(
                knobs.max_staleness
                if self.config.max_staleness is None
                else self.config.max_staleness
            ),
            server_lr=knobs.server_lr,
            seed=self.config.seed,
            secure_aggregation=self.secure,
        )

    def start_aggregator(self) -> None:
        self.group.start_service("aggregator", self.aggregator_settings())
        self.expected_down.discard("aggregator")

    def start_node(self, node: str) -> None:
        site = next(s for s in self.federation.sites if s.node_id == node)
        self.group.start_service(
            node,
            node_settings(
                broker_url=self.broker.url,
                federation_id=self.fed_id,
                node_id=node,
                data=site.data,
                state_dir=self.node_dir(node),
                delay=self.delays[node],
                seed=self.config.seed,
                exit_when_stopped=False,
                ack_timeout=self.config.ack_timeout,
                keepalive=self.config.node_keepalive,
                # The identity whose unmask requests a node answers: the aggregator's own.
                aggregator_identity=self.aggregator_settings().mqtt_client_id(),
                **self.identities.get(node, {}),
            ),
        )
        self.expected_down.discard(node)

    def alive(self, name: str) -> bool:
        return name in self.group.processes and self.group[name].poll() is None

    def later(self, delay: float, what: str, action: Callable[[], None]) -> None:
        self.pending.append((time.monotonic() + delay, what, action))

    def note(self, what: str) -> None:
        self.events.append((round(time.monotonic() - self.started, 2), what))
        log.info("chaos: %s", what)

    def count(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    def outbox_holds(self, node: str) -> bool:
        outbox = self.node_dir(node) / "outbox"
        return outbox.is_dir() and any(outbox.glob("*.update"))

    # -- faults

    def inject(self, fault: Fault) -> None:
        match fault:
            case Fault.AGGREGATOR_KILL:
                if self.kill("aggregator", self.rng.uniform(0.0, 1.5)):
                    self.count(fault)
            case Fault.BROKER_RESTART:
                self.broker.restart()
                self.note("broker restarted")
                self.count(fault)
            case Fault.BROKER_CRASH:
                self.broker.kill()
                time.sleep(self.rng.uniform(0.2, 1.5))
                self.broker.start()
                self.note("broker crashed and started")
                self.count(fault)
            case Fault.NODE_KILL_TRAINING:
                node = self.pick(self.training, wait=5.0)
                if node is not None and self.kill(node, self.rng.uniform(0.0, 2.0)):
                    self.count(fault)
            case Fault.NODE_KILL_UPLOAD:
                self.kill_holding_unacked()
            case Fault.NODE_FREEZE:
                node = self.pick(self.alive, wait=0.0)
                if node is not None:
                    self.freeze(node)
                    self.count(fault)

    def kill(self, name: str, delay: float) -> bool:
        """SIGKILL a process and start it again after ``delay`` seconds (False: it was down)."""
        if not self.alive(name):
            return False
        self.group[name].signal(signal.SIGKILL)
        self.group[name].wait(10.0)
        self.expected_down.add(name)
        self.note(f"SIGKILL {name}; restart in {delay:.1f}s")
        self.later(delay, f"restart {name}", self.restarts[name])
        return True

    def training(self, node: str) -> bool:
        monitor = self.monitor
        status = monitor.nodes.get(node) if monitor else None
        return self.alive(node) and status is not None and status.state is NodeState.TRAINING

    def pick(self, wanted: Callable[[str], bool], wait: float) -> str | None:
        """A random unfrozen node for which ``wanted`` holds, waiting up to ``wait`` seconds."""
        deadline = time.monotonic() + wait
        while True:
            nodes = [n for n in self.sites if n not in self.frozen and wanted(n)]
            if nodes:
                return self.rng.choice(nodes)
            if time.monotonic() >= deadline:
                return None
            self.tick(0.05)

    def kill_holding_unacked(self) -> None:
        node = self.pick(lambda n: self.alive(n) and self.outbox_holds(n), wait=0.5)
        frozen_aggregator = False
        if node is None and self.alive("aggregator"):
            # Acks take milliseconds; hold them back the way a hung aggregator would.
            self.group["aggregator"].signal(signal.SIGSTOP)
            frozen_aggregator = True
            self.note("SIGSTOP aggregator until a node holds an unacked update")
            node = self.pick(lambda n: self.alive(n) and self.outbox_holds(n), wait=10.0)
        if node is not None and self.kill(node, self.rng.uniform(0.0, 2.0)):
            self.count(Fault.NODE_KILL_UPLOAD)
        if frozen_aggregator:
            self.group["aggregator"].signal(signal.SIGCONT)
            self.note("SIGCONT aggregator")

    def freeze(self, node: str) -> None:
        """SIGSTOP a node until the broker has given it up (its Last Will is seen), then a little
        longer, then SIGCONT; at most ``_FREEZE_CAP`` seconds."""
        self.group[node].signal(signal.SIGSTOP)
        self.frozen.add(node)
        if self.monitor is not None:
            self.monitor.went_offline.discard(node)
        frozen_at = time.monotonic()
        extra = self.rng.uniform(0.0, 2.0)
        self.note(f"SIGSTOP {node}")

        def thaw() -> None:
            seen = self.monitor is not None and node in self.monitor.went_offline
            waited = time.monotonic() - frozen_at
            if not seen and waited < _FREEZE_CAP:
                self.later(0.2, f"thaw {node}", thaw)  # the broker has not noticed yet
                return
            if seen:
                self.count("freeze_seen_offline")
                self.later(extra, f"thaw {node}", lambda: self.thaw(node, frozen_at))
            else:
                self.thaw(node, frozen_at)

        self.later(1.5 * self.config.node_keepalive, f"thaw {node}", thaw)

    def thaw(self, node: str, frozen_at: float) -> None:
        self.group[node].signal(signal.SIGCONT)
        self.frozen.discard(node)
        self.note(f"SIGCONT {node} after {time.monotonic() - frozen_at:.1f}s")

    # -- the loop

    def tick(self, timeout: float) -> None:
        """Run what is due, notice unexpected exits, follow the statuses."""
        now = time.monotonic()
        due = [p for p in self.pending if p[0] <= now]
        self.pending = [p for p in self.pending if p[0] > now]
        for _, _, action in sorted(due, key=lambda p: p[0]):
            action()
        for name, proc in self.group.processes.items():
            code = proc.poll()
            if code is not None and name not in self.expected_down:
                self.unexpected.append(f"{name} exited with {code}: {proc.tail(15)}")
                self.note(f"{name} exited on its own with {code}; starting it again")
                self.expected_down.add(name)
                self.later(0.5, f"restart {name}", self.restarts[name])
        if self.monitor is not None:
            self.monitor.pump(timeout)
        else:
            time.sleep(timeout)

    def wait_until(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise ChaosError(f"timed out after {timeout:.0f}s waiting for {what}")
            self.progress("drain", 0.0, self.version, self.counts)
            self.tick(0.1)

    def settle(self) -> None:
        """Let every freeze run its course (bounded), then run every pending restart now."""
        deadline = time.monotonic() + _FREEZE_CAP + 5.0
        while self.frozen and time.monotonic() < deadline:
            self.tick(0.1)
        for node in sorted(self.frozen):
            self.thaw(node, time.monotonic())
        pending, self.pending = self.pending, []
        for _, what, action in sorted(pending, key=lambda p: p[0]):
            if not what.startswith("thaw "):
                action()

    def control(
        self,
        command: ControlCommand,
        knobs: dict[str, int | float | str | bool | None] | None = None,
    ) -> None:
        """Send an operator command, retrying while the aggregator restarts."""
        settings = ConnectionSettings(broker_url=SecretStr(self.broker.url), federation=self.fed_id)
        deadline = time.monotonic() + 60.0
        while True:
            try:
                with ControlClient(settings) as client:
                    client.request(command, knobs, timeout=10.0)
                    return
            except (ControlError, HealthNetError) as exc:
                if time.monotonic() > deadline:
                    raise ChaosError(f"{command.value} was not answered: {exc}") from exc
                self.tick(0.5)

    def status(self) -> AggregatorStatus | None:
        return None if self.monitor is None else self.monitor.status

    def run(self) -> ChaosResult:
        config = self.config
        progress = self.progress
        with self.broker, self.group:
            self.monitor = _Monitor(self.broker.url, self.topics)
            with self.monitor.client:
                self.start_aggregator()
                for node in self.sites:
                    self.start_node(node)
                self.wait_until(
                    lambda: self.version >= 1, config.start_timeout, "the first version"
                )
                faults = schedule(config, self.rng)
                begin = time.monotonic()
                self.note(f"fault window of {config.seconds:.0f}s with {len(faults)} faults")
                for at, fault in faults:
                    while time.monotonic() - begin < at:
                        progress("faults", time.monotonic() - begin, self.version, self.counts)
                        self.tick(0.1)
                    self.inject(fault)
                while time.monotonic() - begin < config.seconds:
                    progress("faults", time.monotonic() - begin, self.version, self.counts)
                    self.tick(0.1)
                fault_seconds = time.monotonic() - begin
                self.settle()
                self.note("faults over")
                self.wait_until(
                    lambda: self.version >= config.min_versions,
                    config.drain_timeout * 3,
                    f"{config.min_versions} versions",
                )
                self.drain()
            counts = dict(self.counts)
        reconciliation = load(self.aggregator_dir, {n: self.node_dir(n) for n in self.sites})
        final_version, mean, pooled, per_node = evaluate_final(self.aggregator_dir, self.federation)
        return ChaosResult(
            counts=counts,
            reconciliation=reconciliation,
            final_version=final_version,
            final_accuracy=mean,
            pooled_accuracy=pooled,
            per_node_accuracy=per_node,
            fault_seconds=fault_seconds,
            wall_seconds=time.monotonic() - self.started,
            unexpected_exits=self.unexpected,
            config=config,
            events=self.events,
        )

    @property
    def version(self) -> int:
        return 0 if self.monitor is None else self.monitor.version

    def pause_until_quiet(self) -> None:
        """Pause and wait until no outbox holds an update and no node trains, for a second."""
        self.control(ControlCommand.PAUSE)
        self.note("paused; waiting for every outbox to empty")

        def quiet() -> bool:
            return not any(self.outbox_holds(n) or self.training(n) for n in self.sites)

        stable_since: float | None = None

        def quiet_for_a_second() -> bool:
            nonlocal stable_since
            if not quiet():
                stable_since = None
                return False
            stable_since = stable_since or time.monotonic()
            return time.monotonic() - stable_since >= 1.0

        self.wait_until(quiet_for_a_second, self.config.drain_timeout, "every outbox to empty")

    def stop_nodes(self) -> None:
        for node in self.sites:  # all at once: each takes seconds to say goodbye
            self.expected_down.add(node)
            self.group[node].signal(signal.SIGTERM)
        for node in self.sites:
            self.group[node].stop()
        self.note("nodes stopped")

    def drain(self) -> None:
        """Pause, let every outbox empty, stop the nodes, fold the rest with K = 1, stop.

        Under secure aggregation what is buffered stays buffered (see the module docstring)."""
        timeout = self.config.drain_timeout
        if self.secure is not None:
            self.pause_until_quiet()
            held = buffered(self.aggregator_dir)
            self.note(f"{len(held)} updates of {sorted(set(held.values()))} stay buffered")
            self.stop_nodes()
        else:
            self.pause_until_quiet()
            self.stop_nodes()
            self.control(ControlCommand.SET, {"buffer_size": 1})
            self.control(ControlCommand.RESUME)
            self.wait_until(
                lambda: (
                    (s := self.status()) is not None
                    and s.state is AggregatorState.RUNNING
                    and s.buffer_fill == 0
                ),
                timeout,
                "the buffer to fold",
            )
        self.expected_down.add("aggregator")
        self.control(ControlCommand.STOP)
        if self.group["aggregator"].wait(30.0) is None:
            raise ChaosError("the aggregator did not exit after stop")
        self.note(f"run stopped at v{self.version}")


def buffered(aggregator_dir: Path) -> dict[str, str]:
    """Update id to node of every update the aggregator's update log says it accepted and has
    not yet folded, rejected or discarded."""
    from aggregator.update_log import read_update_log, update_fates

    return {
        uid: fate.node
        for uid, fate in update_fates(read_update_log(aggregator_dir)).items()
        if fate.accepted and not (fate.folded or fate.rejected or fate.discarded)
    }


def evaluate_final(
    aggregator_dir: Path, federation: Federation
) -> tuple[int, float, float, dict[str, float]]:
    """(version, mean accuracy over hospitals, pooled accuracy, per hospital) of the final model."""
    from aggregator.store import StateStore
    from common.models import build_model
    from edge_node.datasets import load_dataset
    from edge_node.training import evaluate, resolve_device

    checkpoint = StateStore(aggregator_dir).load_latest()
    if checkpoint is None:
        raise ChaosError(f"no checkpoint in {aggregator_dir}")
    model = build_model(checkpoint.model)
    device = resolve_device("cpu")
    per_node: dict[str, float] = {}
    correct = total = 0
    for site in federation.sites:
        data = load_dataset(site.data)
        result = evaluate(model, checkpoint.params, data.test_x, data.test_y, device=device)
        per_node[site.node_id] = result.accuracy
        correct += result.correct
        total += result.num_examples
    mean = math.fsum(per_node.values()) / len(per_node)
    return checkpoint.version, mean, correct / max(total, 1), per_node


ProgressFn = Callable[[str, float, int, dict[str, int]], None]


def run_chaos(config: ChaosConfig, progress: ProgressFn | None = None) -> ChaosResult:
    """Run the federation under faults and reconcile; see the module docstring."""
    federation = FEDERATIONS.get(config.federation)
    if federation is None:
        raise ChaosError(f"unknown federation {config.federation!r}; known: {sorted(FEDERATIONS)}")
    unknown = set(config.faults) - set(config.every)
    if unknown:
        raise ChaosError(f"no interval for faults {sorted(unknown)}")
    with _workdir(config.workdir) as workdir:
        return _Chaos(config, federation, workdir, progress or _quiet).run()


def _quiet(phase: str, seconds: float, version: int, counts: dict[str, int]) -> None:
    """The default progress callback: says nothing."""


@contextlib.contextmanager
def _workdir(given: Path | None) -> Iterator[Path]:
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        yield given
        return
    with tempfile.TemporaryDirectory(prefix="healthnet-chaos-") as tmp:
        yield Path(tmp)
