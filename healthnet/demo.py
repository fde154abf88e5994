"""``healthnet demo``: a whole federation on one machine, as separate processes, to a summary.

It starts a broker (embedded unless one is given), the aggregator and one node per hospital as
child processes, follows the run over MQTT like any operator would (status, versions, the nodes'
evaluations), stops it after N versions or at a target accuracy, and reports the test accuracy of
the final global model at every hospital and, under differential privacy, the epsilon each
hospital's ledger reached. Each child gets the settings object built here whole
(:meth:`healthnet.processes.ProcessGroup.start_service`), never a list of flags.

With ``secure_aggregation`` the run's knobs carry the policy (every hospital a holder) and each
hospital signs its key-agreement key with a client certificate of a throwaway CA made in the
work dir (:func:`demo_identities`). The embedded broker speaks plain MQTT with no ACL: the
certificates are used only where secure aggregation checks them, in the application (each
hospital verifies its peers' key records against that CA), never for the connection. So the
demo shows the protocol and what it costs, not the broker's half of its guarantees (that only
the aggregator writes unmask requests, that a share reaches only its recipient): a deployment
gets those from ``healthnet deploy init --auth mtls``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import queue
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, assert_never

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from aggregator.settings import AggregatorSettings
from common.codec import DEFAULT_MAX_MESSAGE_BYTES, encode, envelope, new_id
from common.errors import HealthNetError
from common.inbound import Chunk, Inbound, Refusal, Refused, receive
from common.messages import (
    Ack,
    AggregatorState,
    AggregatorStatus,
    Compression,
    ControlCommand,
    ControlReply,
    ControlRequest,
    Evaluation,
    Knobs,
    Manifest,
    ModelDelta,
    NodeStatus,
    Personalisation,
    PrivacyPolicy,
    PrivacySpend,
    SecAggAnswer,
    SecAggKey,
    SecAggReceipt,
    SecAggShare,
    SecAggUnmask,
    SecureAggregation,
    TrainingConfig,
    Update,
    VersionRecord,
)
from common.mqtt import Message, MqttClient
from common.settings import ConnectionSettings
from common.topics import TopicTree
from common.wire_size import describe_wire_size
from edge_node.settings import NodeSettings
from healthnet.broker import BrokerConfig, BrokerImplementation, EmbeddedBroker
from healthnet.dashboard import DEFAULT_PORT, demo_dashboard
from healthnet.deploy.pki import CertificateAuthority
from healthnet.federations import FEDERATIONS, Federation
from healthnet.processes import ProcessGroup

__all__ = [
    "DemoConfig",
    "DemoError",
    "DemoResult",
    "TimelinePoint",
    "aggregator_settings",
    "first_sites",
    "node_settings",
    "run_demo",
]

log = logging.getLogger(__name__)

Mode = Literal["fedbuff", "sync", "fedasync"]


class DemoError(HealthNetError):
    """The demo federation failed: a process died or the run did not finish in time."""


@dataclass(frozen=True, slots=True)
class DemoConfig:
    federation: str = "heart-disease"
    versions: int | None = None
    """Stop after this many versions; None: the federation's ``demo_versions``."""
    nodes: int | None = None
    """Run only the federation's first N sites; None: all of them."""
    target_accuracy: float | None = None
    mode: Mode = "fedbuff"
    buffer_size: int | None = None
    broker: BrokerImplementation = "auto"
    broker_url: str | None = None
    workdir: Path | None = None
    delays: dict[str, float] = field(default_factory=dict)
    timeout: float = 600.0
    seed: int = 0
    torch_threads: int = 1
    dashboard: bool = False  # serve the web dashboard while the run lasts
    dashboard_port: int = DEFAULT_PORT
    compression: Compression | None = None
    """How hospitals compress their deltas; None: the federation's."""
    broadcast_dtype: Literal["float32", "float16"] | None = None
    broadcast_compression: Compression | None = None
    """Each version also as a compressed delta from the last (common.broadcast_chain); None:
    the federation's (off)."""
    budget_seconds: float | None = None
    """Stop the run (gracefully, like a target) this many seconds after every hospital was ready
    (had evaluated v0), so that process start-up does not eat into it."""
    privacy: PrivacyPolicy | None = None
    """Differential privacy every hospital trains under (the run's policy); None: the
    federation's (none)."""
    training: TrainingConfig | None = None
    """How every hospital trains on each version; None: the federation's (its ``dp_training``
    under a privacy policy, where it has one)."""
    personalisation: Personalisation | None = None
    """Each hospital's personal model beside the global one; None: the federation's (none)."""
    secure_aggregation: bool = False
    """Fold every version by secure aggregation, every hospital a holder
    (docs/secure-aggregation.md)."""


@dataclass(frozen=True, slots=True)
class TimelinePoint:
    """One global version as the monitor saw it: when it appeared and how good it was."""

    version: int
    seconds: float
    """Since the demo started its processes, when the monitor saw the version's record."""
    mean_accuracy: float
    """Mean test accuracy over the hospitals that evaluated this version."""
    evaluations: int
    """How many hospitals evaluated it (async nodes may skip versions that arrive mid-job)."""
    updates_folded: int
    """Updates folded into this version and all before it."""
    update_bytes: int
    """Wire bytes of those updates."""
    model_bytes: int = 0
    """Model bytes the hospitals had received (manifests, snapshot chunks, deltas) by their
    latest evaluation of this version or an earlier one, summed over hospitals."""

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class DemoResult:
    mean_accuracy: float
    pooled_accuracy: float
    per_node: dict[str, float]
    versions: int
    updates_folded: int
    wall_seconds: float
    mode: Mode
    buffer_size: int
    federation: str
    broker: str
    min_staleness_factor: dict[str, float]
    updates_per_node: dict[str, int]
    bytes_per_update: float = 0.0
    """Mean size of a folded update on the wire (the whole message)."""
    dense_bytes_per_update: float = 0.0
    """Mean size of the same deltas as dense float32."""
    compression_ratio: float = 1.0
    """Dense float32 bytes of the folded deltas over their bytes on the wire."""
    mean_accuracy_last5: float = 0.0
    """Mean test accuracy over the last five versions (each hospital's evaluation of each)."""
    timeline: tuple[TimelinePoint, ...] = ()
    """Every version with at least one evaluation, v0 included, in version order."""
    ready_seconds: float = 0.0
    """When every hospital had evaluated v0 (all processes up), since the demo started them."""
    blob_bytes: int = 0
    """Size of one broadcast model blob (the last manifest seen)."""
    model_bytes: int = 0
    """Model bytes the hospitals received in all, as their last evaluations reported."""
    epsilon: dict[str, float] = field(default_factory=dict)
    """Under differential privacy: each hospital's privacy loss at the end, as it reported it."""
    epsilon_budget: dict[str, float] = field(default_factory=dict)
    """And the budget each hospital trained under."""
    personal_per_node: dict[str, float] = field(default_factory=dict)
    """Under personalisation: each hospital's personal model on its test split, final version."""
    secure_versions: int = 0
    """Versions whose record says they were securely aggregated (named a fold plan)."""

    @property
    def personal_mean_accuracy(self) -> float | None:
        """The personal models' mean over the hospitals (None: no personal model reported)."""
        return _mean(list(self.personal_per_node.values())) if self.personal_per_node else None

    def to_json(self) -> dict[str, object]:
        return {
            "mean_accuracy": self.mean_accuracy,
            "pooled_accuracy": self.pooled_accuracy,
            "per_node": self.per_node,
            "versions": self.versions,
            "updates_folded": self.updates_folded,
            "wall_seconds": self.wall_seconds,
            "mode": self.mode,
            "buffer_size": self.buffer_size,
            "federation": self.federation,
            "broker": self.broker,
            "bytes_per_update": self.bytes_per_update,
            "dense_bytes_per_update": self.dense_bytes_per_update,
            "compression_ratio": self.compression_ratio,
            "mean_accuracy_last5": self.mean_accuracy_last5,
            "timeline": [point.to_json() for point in self.timeline],
            "ready_seconds": self.ready_seconds,
            "blob_bytes": self.blob_bytes,
            "model_bytes": self.model_bytes,
            "epsilon": self.epsilon,
            "epsilon_budget": self.epsilon_budget,
            "personal_per_node": self.personal_per_node,
            "personal_mean_accuracy": self.personal_mean_accuracy,
            "secure_versions": self.secure_versions,
        }


def aggregator_settings(
    *,
    broker_url: str,
    federation_id: str,
    state_dir: Path,
    federation: Federation,
    buffer_size: int,
    max_staleness: int,
    server_lr: float = 1.0,
    max_versions: int | None = None,
    seed: int = 0,
    compression: Compression | None = None,
    broadcast_dtype: Literal["float32", "float16"] | None = None,
    broadcast_compression: Compression | None = None,
    status_interval: float = 1.0,
    privacy: PrivacyPolicy | None = None,
    training: TrainingConfig | None = None,
    personalisation: Personalisation | None = None,
    secure_aggregation: SecureAggregation | None = None,
    **fields: Any,
) -> AggregatorSettings:
    """The settings of a federation's aggregator: every knob of ``federation``, then the mode's.

    ``fields`` sets any other :class:`AggregatorSettings` field (``autostart=False``, ...).
    Under a privacy policy the hospitals train as the federation's ``dp_training`` says, unless
    ``training`` is given.
    """
    knobs = federation.knobs
    private_training = federation.dp_training if (privacy or knobs.privacy) else None
    # Validated again as a whole: a combination the knobs refuse is refused here, not in the child.
    merged = Knobs.model_validate(
        {
            **knobs.model_dump(),
            "buffer_size": buffer_size,
            "max_staleness": max_staleness,
            "server_lr": server_lr,
            "max_versions": max_versions,
            "compression": compression or knobs.compression,
            "broadcast_dtype": broadcast_dtype or knobs.broadcast_dtype,
            "broadcast_compression": broadcast_compression or knobs.broadcast_compression,
            "privacy": privacy or knobs.privacy,
            "training": training or private_training or knobs.training,
            "personalisation": personalisation or knobs.personalisation,
            "secure_aggregation": secure_aggregation or knobs.secure_aggregation,
        }
    )
    return AggregatorSettings(
        broker_url=broker_url,
        federation=federation_id,
        state_dir=state_dir,
        model=federation.model,
        seed=seed,
        knobs=merged,
        status_interval=status_interval,
        **fields,
    )


def node_settings(
    *,
    broker_url: str,
    federation_id: str,
    node_id: str,
    data: str,
    state_dir: Path,
    delay: float = 0.0,
    seed: int = 0,
    torch_threads: int = 1,
    exit_when_stopped: bool = True,
    ack_timeout: float = 10.0,
    **fields: Any,
) -> NodeSettings:
    """The settings of one hospital's node; ``fields`` sets any other NodeSettings field."""
    return NodeSettings(
        broker_url=broker_url,
        federation=federation_id,
        node_id=node_id,
        data=data,
        state_dir=state_dir,
        seed=seed,
        delay_seconds=delay,
        torch_threads=torch_threads,
        exit_when_stopped=exit_when_stopped,
        ack_timeout=ack_timeout,
        **fields,
    )


def demo_identities(directory: Path, federation_id: str, hospitals: list[str]) -> dict[str, Any]:
    """A throwaway CA and a client certificate for each hospital in ``directory``: the
    NodeSettings fields (``cert_file``, ``key_file``, ``ca_file``) each hospital signs its secure
    aggregation key record with, by node id. Over a plain ``mqtt://`` URL they never touch the
    connection."""
    ca = CertificateAuthority.create(federation_id, days=2)
    directory.mkdir(parents=True, exist_ok=True)
    ca_file = directory / "ca.crt"
    ca_file.write_bytes(ca.certificate_pem)
    files: dict[str, Any] = {}
    for hospital in hospitals:
        issued = ca.issue_client(hospital, federation=federation_id, days=2)
        cert_file, key_file = directory / f"{hospital}.crt", directory / f"{hospital}.key"
        cert_file.write_bytes(issued.certificate)
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(issued.private_key)
        files[hospital] = {
            "cert_file": str(cert_file),
            "key_file": str(key_file),
            "ca_file": str(ca_file),
        }
    return files


def resolve_mode(
    mode: Mode, federation: Federation, buffer_size: int | None
) -> tuple[int, int, float]:
    """(buffer size K, max staleness, server lr) for a mode: sync FedAvg, FedBuff or FedAsync."""
    knobs = federation.knobs
    match mode:
        case "sync":
            return len(federation.sites), 0, 1.0
        case "fedasync":
            return 1, knobs.max_staleness, knobs.server_lr
        case "fedbuff":
            return buffer_size or knobs.buffer_size, knobs.max_staleness, knobs.server_lr


def first_sites(federation: Federation, nodes: int | None, buffer_size: int | None) -> Federation:
    """The federation cut to its first ``nodes`` sites, its own K lowered to at most ``nodes``.

    An explicit ``buffer_size`` above ``nodes`` is refused: no version could ever be folded.
    """
    total = len(federation.sites)
    count = total if nodes is None else nodes
    if not 1 <= count <= total:
        raise DemoError(f"{federation.name} has {total} sites; --nodes must be 1..{total}")
    if buffer_size is not None and buffer_size > count:
        raise DemoError(
            f"--buffer-size {buffer_size} exceeds the {count} nodes: no version could be folded"
        )
    if count == total:
        return federation
    knobs = federation.knobs
    return dataclasses.replace(
        federation,
        sites=federation.sites[:count],
        knobs=knobs.model_copy(update={"buffer_size": min(knobs.buffer_size, count)}),
    )


@contextlib.contextmanager
def _broker(config: DemoConfig, workdir: Path) -> Iterator[tuple[str, str]]:
    if config.broker_url is not None:
        yield config.broker_url, "external"
        return
    with EmbeddedBroker(
        BrokerConfig(implementation=config.broker, workdir=workdir / "broker")
    ) as broker:
        yield broker.url, broker.implementation


def run_demo(config: DemoConfig, console: Console | None = None) -> DemoResult:
    """Run a whole federation to completion and return its summary."""
    console = console or Console(stderr=True)
    federation = FEDERATIONS.get(config.federation)
    if federation is None:
        raise DemoError(f"unknown federation {config.federation!r}; known: {sorted(FEDERATIONS)}")
    federation = first_sites(federation, config.nodes, config.buffer_size)
    with contextlib.ExitStack() as stack:
        if config.workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="healthnet-")))
        else:
            workdir = config.workdir
            workdir.mkdir(parents=True, exist_ok=True)
        url, implementation = stack.enter_context(_broker(config, workdir))
        kept = f"logs in {workdir / 'logs'}" if config.workdir else "--workdir DIR keeps the logs"
        console.print(f"broker: {implementation} at {url}; {kept}")
        return _run(
            config=config,
            federation=federation,
            url=url,
            implementation=implementation,
            workdir=workdir,
            console=console,
        )
    raise AssertionError("unreachable")  # pragma: no cover


def _secure_aggregation(
    config: DemoConfig, holders: list[str], fed_id: str, workdir: Path
) -> tuple[SecureAggregation | None, dict[str, Any]]:
    """The run's secure aggregation policy (None: off) and each hospital's signing files."""
    if not config.secure_aggregation:
        return None, {}
    try:
        secure = SecureAggregation(holders=tuple(holders))
    except ValueError as exc:
        raise DemoError(f"--secure-aggregation with {len(holders)} hospitals: {exc}") from exc
    return secure, demo_identities(workdir / "secagg-pki", fed_id, holders)


def _run(
    *,
    config: DemoConfig,
    federation: Federation,
    url: str,
    implementation: str,
    workdir: Path,
    console: Console,
) -> DemoResult:
    fed_id = f"demo-{new_id()[:8]}"
    sites = federation.sites
    k, max_staleness, server_lr = resolve_mode(config.mode, federation, config.buffer_size)
    versions = federation.demo_versions if config.versions is None else config.versions
    topics = TopicTree(fed_id)
    started = time.monotonic()
    monitor = MqttClient.from_settings(
        ConnectionSettings(broker_url=url, federation=fed_id),
        f"{fed_id}-monitor",
    )
    dashboard = (
        demo_dashboard(url, fed_id, console, port=config.dashboard_port)
        if config.dashboard
        else contextlib.nullcontext()
    )
    secure, identities = _secure_aggregation(config, [s.node_id for s in sites], fed_id, workdir)
    try:
        aggregator = aggregator_settings(
            broker_url=url,
            federation_id=fed_id,
            state_dir=workdir / "aggregator",
            federation=federation,
            buffer_size=k,
            max_staleness=max_staleness,
            server_lr=server_lr,
            max_versions=versions,
            seed=config.seed,
            compression=config.compression,
            broadcast_dtype=config.broadcast_dtype,
            broadcast_compression=config.broadcast_compression,
            privacy=config.privacy,
            training=config.training,
            personalisation=config.personalisation,
            secure_aggregation=secure,
        )
    except ValueError as exc:
        if secure is None:
            raise
        raise DemoError(f"--secure-aggregation: {exc}") from exc
    with ProcessGroup(workdir / "logs") as group, monitor, dashboard:
        for topic_filter in (
            topics.aggregator_status(),
            topics.versions(),
            topics.all_node_evals(),
            topics.all_node_status(),
            topics.manifest(),
        ):
            monitor.subscribe(topic_filter)
        group.start_service("aggregator", aggregator)
        for site in sites:
            group.start_service(
                site.node_id,
                node_settings(
                    broker_url=url,
                    federation_id=fed_id,
                    node_id=site.node_id,
                    data=site.data,
                    state_dir=workdir / "nodes" / site.node_id,
                    delay=config.delays.get(site.node_id, 0.0),
                    seed=config.seed,
                    torch_threads=config.torch_threads,
                    # The identity whose unmask requests a node answers: the aggregator's own.
                    aggregator_identity=aggregator.mqtt_client_id(),
                    **identities.get(site.node_id, {}),
                ),
            )
        watch = _Watch(topics, [s.node_id for s in sites], started)
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("v{task.completed:.0f}/{task.total:.0f}"),
            TextColumn("{task.fields[accuracy]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        ) as progress:
            task = progress.add_task(
                f"{federation.name} ({config.mode}, K={k})", total=versions, accuracy=""
            )
            stop_sent = False
            watchdog = _Watchdog(group, started=started, timeout=config.timeout)
            while not watch.finished():
                watchdog.check()
                try:
                    item = monitor.inbox.get(timeout=0.2)
                except queue.Empty:
                    continue
                if isinstance(item, Message):
                    watch.on_message(item)
                mean = watch.latest_mean()
                progress.update(
                    task,
                    completed=watch.version,
                    accuracy="" if mean is None else f"mean acc {mean[1]:.3f} @v{mean[0]}",
                )
                if not stop_sent and _time_to_stop(config, watch, mean):
                    _send_stop(monitor, topics, fed_id)
                    stop_sent = True
        if not group.wait_all(timeout=30):
            log.warning("some processes did not exit on their own; stopping them")
    return watch.result(config, k, implementation, time.monotonic() - started, federation.name)


class _Watchdog:
    """Raises DemoError when the run cannot finish: past the deadline, a child failed, or the
    aggregator exited and the hospitals did not report on its final version soon after."""

    def __init__(
        self, group: ProcessGroup, *, started: float, timeout: float, grace: float = 30.0
    ) -> None:
        self.group = group
        self.timeout = timeout
        self.deadline = started + timeout
        self.grace = grace
        self.aggregator_gone: float | None = None

    def check(self) -> None:
        now = time.monotonic()
        if now > self.deadline:
            raise DemoError(f"the run did not finish within {self.timeout:.0f}s")
        for proc in self.group.failed():
            raise DemoError(f"{proc.name} exited with {proc.poll()}:\n{proc.tail()}")
        aggregator = self.group["aggregator"]
        if self.aggregator_gone is None and aggregator.poll() is not None:
            self.aggregator_gone = now
        if self.aggregator_gone is not None and now - self.aggregator_gone > self.grace:
            raise DemoError(
                "the aggregator exited but the hospitals never reported on the final "
                f"version:\n{aggregator.tail()}"
            )


def _time_to_stop(config: DemoConfig, watch: _Watch, mean: tuple[int, float] | None) -> bool:
    """The target accuracy reached, the time budget spent since every hospital was ready, or
    every hospital's privacy budget spent with nothing left in the buffer (no version can come)."""
    status = watch.status
    if status is not None and status.budgets_spent and status.buffer_fill == 0:
        return True
    target, budget, ready = config.target_accuracy, config.budget_seconds, watch.ready_seconds
    if target is not None and mean is not None and mean[1] >= target:
        return True
    return budget is not None and ready > 0 and time.monotonic() - watch.started > ready + budget


def _send_stop(monitor: MqttClient, topics: TopicTree, fed_id: str) -> None:
    request = ControlRequest(request_id=new_id(), command=ControlCommand.STOP)
    sender = f"{fed_id}-monitor"
    monitor.publish(
        topics.control_requests(), encode(envelope(request, sender=sender, sent_at=time.time()))
    )


class _Watch:
    """What the demo has seen of the run so far."""

    def __init__(self, topics: TopicTree, nodes: list[str], started: float = 0.0) -> None:
        self.topics = topics
        self.nodes = nodes
        self.started = started
        self.status: AggregatorStatus | None = None
        self.records: dict[int, VersionRecord] = {}
        self.evals: dict[int, dict[str, Evaluation]] = {}
        self.seen_at: dict[int, float] = {0: 0.0}  # version -> seconds since start
        self.ready_seconds = 0.0
        self.blob_bytes = 0
        # Each hospital's privacy ledger, as its own latest status that carried one said.
        self.ledgers: dict[str, PrivacySpend] = {}

    @property
    def version(self) -> int:
        return 0 if self.status is None else self.status.version

    def on_message(self, message: Message) -> None:
        match received := receive(
            message.topic, message.payload, topics=self.topics, max_bytes=DEFAULT_MAX_MESSAGE_BYTES
        ):
            case Inbound():
                self._take(received)
            case Refusal(reason=Refused.EMPTY) | Chunk():
                pass  # a cleared retained message; chunks are not followed
            case Refusal():
                log.warning("demo monitor ignored a message: %s", received.detail)
            case _:
                assert_never(received)

    def _take(self, inbound: Inbound) -> None:
        body = inbound.body
        match body:
            case AggregatorStatus(state=AggregatorState.OFFLINE) if self.status is not None:
                # The aggregator is gone. Its Last Will was fixed when it connected, so it does not
                # say what the run did since: keep the last status it published itself.
                pass
            case AggregatorStatus():
                self.status = body
            case VersionRecord():
                self.records[body.version] = body
                self.seen_at.setdefault(body.version, time.monotonic() - self.started)
            case Manifest():
                self.blob_bytes = body.blob_bytes
            case Evaluation() if inbound.topic.node:
                self.evals.setdefault(body.version, {})[inbound.topic.node] = body
                if body.version == 0 and not self.ready_seconds and self.complete(0):
                    self.ready_seconds = time.monotonic() - self.started
            case Evaluation():
                pass  # every evaluation topic names its node: unreachable
            case NodeStatus(privacy=PrivacySpend() as ledger) if (
                inbound.topic.node == inbound.sender
            ):
                self.ledgers[inbound.sender] = ledger
            case (
                Update()
                | Ack()
                | NodeStatus()
                | ControlRequest()
                | ControlReply()
                | ModelDelta()
                # The monitor subscribes to none of secure aggregation's routes.
                | SecAggKey()
                | SecAggShare()
                | SecAggReceipt()
                | SecAggUnmask()
                | SecAggAnswer()
            ):
                pass
            case _:
                assert_never(body)

    def complete(self, version: int) -> bool:
        return set(self.nodes) <= set(self.evals.get(version, {}))

    def latest_mean(self) -> tuple[int, float] | None:
        done = [v for v in self.evals if self.complete(v)]
        if not done:
            return None
        version = max(done)
        return version, _mean(e.accuracy for e in self.evals[version].values())

    def timeline(self) -> tuple[TimelinePoint, ...]:
        points: list[TimelinePoint] = []
        folded = wire = 0
        received: dict[str, int] = {}  # node -> model bytes by its latest evaluation so far
        for version in sorted(set(self.records) | set(self.evals) | {0}):
            record = self.records.get(version)
            if record is not None:
                folded += len(record.contributions)
                wire += sum(c.bytes for c in record.contributions)
            evals = self.evals.get(version, {})
            for node, evaluation in evals.items():
                received[node] = max(received.get(node, 0), evaluation.model_bytes)
            if not evals or version not in self.seen_at:
                continue
            points.append(
                TimelinePoint(
                    version=version,
                    seconds=self.seen_at[version],
                    mean_accuracy=_mean(e.accuracy for e in evals.values()),
                    evaluations=len(evals),
                    updates_folded=folded,
                    update_bytes=wire,
                    model_bytes=sum(received.values()),
                )
            )
        return tuple(points)

    def finished(self) -> bool:
        status = self.status
        return (
            status is not None
            and status.state is AggregatorState.STOPPED
            and self.complete(status.version)
        )

    def result(
        self, config: DemoConfig, k: int, broker: str, seconds: float, name: str
    ) -> DemoResult:
        status = self.status
        if status is None:
            raise DemoError("no aggregator status was ever seen")
        final = self.evals[status.version]
        records = [self.records[v] for v in sorted(self.records)]
        lowest: dict[str, float] = {}
        counts: dict[str, int] = {}
        contributions = [c for record in records for c in record.contributions]
        wire = sum(c.bytes for c in contributions)
        dense = sum(c.raw_bytes for c in contributions)
        for record in records:
            for c in record.contributions:
                lowest[c.node] = min(lowest.get(c.node, 1.0), c.staleness_factor)
                counts[c.node] = counts.get(c.node, 0) + 1
        return DemoResult(
            mean_accuracy=_mean(e.accuracy for e in final.values()),
            pooled_accuracy=sum(e.correct for e in final.values())
            / max(1, sum(e.num_examples for e in final.values())),
            per_node={node: final[node].accuracy for node in self.nodes},
            versions=status.version,
            updates_folded=status.counters.folded,
            wall_seconds=seconds,
            mode=config.mode,
            buffer_size=k,
            federation=name,
            broker=broker,
            min_staleness_factor=lowest,
            updates_per_node=counts,
            bytes_per_update=wire / max(len(contributions), 1),
            dense_bytes_per_update=dense / max(len(contributions), 1),
            compression_ratio=dense / max(wire, 1),
            mean_accuracy_last5=_mean(
                e.accuracy
                for v in range(max(0, status.version - 4), status.version + 1)
                for e in self.evals.get(v, {}).values()
            ),
            timeline=self.timeline(),
            ready_seconds=self.ready_seconds,
            blob_bytes=self.blob_bytes,
            model_bytes=self.model_bytes(),
            **self.privacy(status),
            personal_per_node={
                node: personal
                for node in self.nodes
                if (personal := final[node].personal_accuracy) is not None
            },
            secure_versions=sum(1 for r in records if r.secure_fold_id is not None),
        )

    def model_bytes(self) -> int:
        """Model bytes the hospitals received, each as its last evaluation reported."""
        last: dict[str, int] = {}
        for evals in self.evals.values():
            for node, evaluation in evals.items():
                last[node] = max(last.get(node, 0), evaluation.model_bytes)
        return sum(last.values())

    def privacy(self, status: AggregatorStatus) -> dict[str, dict[str, float]]:
        """Each hospital's epsilon and budget at the end: its own last status's ledger, which
        holds every charge (one for an update the aggregator refused too), else the final
        status's tally of it."""
        epsilon: dict[str, float] = {}
        budget: dict[str, float] = {}
        for entry in status.nodes:
            if entry.epsilon is not None and entry.epsilon_budget is not None:
                epsilon[entry.node], budget[entry.node] = entry.epsilon, entry.epsilon_budget
        for node, ledger in self.ledgers.items():
            epsilon[node], budget[node] = ledger.epsilon, ledger.epsilon_budget
        return {"epsilon": epsilon, "epsilon_budget": budget}


def _mean(values: Iterator[float] | list[float]) -> float:
    items = list(values)
    return math.fsum(items) / len(items) if items else 0.0


def _spent(result: DemoResult, node: str) -> str:
    epsilon = result.epsilon.get(node)
    if epsilon is None:
        return "-"
    budget = result.epsilon_budget.get(node)
    return f"{epsilon:.2f}" if budget is None else f"{epsilon:.2f} / {budget:g}"


def _personal(accuracy: float | None) -> str:
    return "-" if accuracy is None else f"{accuracy:.3f}"


def render(result: DemoResult, console: Console) -> None:
    table = Table(title=f"test accuracy, global v{result.versions}")
    table.add_column("hospital")
    table.add_column("accuracy", justify="right")
    private = bool(result.epsilon)
    personal = result.personal_mean_accuracy
    if personal is not None:
        table.add_column("personal", justify="right")
    if private:
        table.add_column("epsilon / budget", justify="right")
    for node, accuracy in result.per_node.items():
        table.add_row(
            node,
            f"{accuracy:.3f}",
            *([_personal(result.personal_per_node.get(node))] if personal is not None else []),
            *([_spent(result, node)] if private else []),
        )
    table.add_section()
    table.add_row(
        "[bold]mean",
        f"[bold]{result.mean_accuracy:.3f}",
        *([f"[bold]{personal:.3f}"] if personal is not None else []),
    )
    table.add_row("pooled", f"{result.pooled_accuracy:.3f}")
    console.print(table)
    # soft_wrap: a summary piped to a file or a log keeps its sentences whole.
    console.print(
        f"{result.updates_folded} updates folded into {result.versions} versions "
        f"({result.mode}, K={result.buffer_size}) in {result.wall_seconds:.1f}s",
        soft_wrap=True,
    )
    size = describe_wire_size(result.bytes_per_update, result.dense_bytes_per_update)
    console.print(f"per update: {size}", soft_wrap=True)
    if result.secure_versions:
        console.print(
            f"{result.secure_versions} of {result.versions} versions securely aggregated: the "
            "aggregator saw only masked updates and unmasked each buffer's weighted sum",
            soft_wrap=True,
        )
