"""A tree of brokers: one core broker and one broker per region, joined by Mosquitto bridges.

Theory of operation. The aggregator, the operator and the dashboard connect to the *core*
broker; each hospital connects to its region's broker and nowhere else. Each regional broker
runs one bridge: it dials the core over mutual TLS as the identity ``bridge-<region>`` (a client
certificate of the federation's CA) and forwards exactly the topics its own hospitals use, with
the hospital role's QoS (:data:`common.topics.ROLE_TOPICS`)::

    core ──in──▶ region   model/manifest, model/+/chunk/+, aggregator/status, acks/<its hospitals>
    core ◀─out── region   updates/<h>, nodes/<h>/status, nodes/<h>/eval for each of its hospitals

So the bridge's topics are the hospital role's reads and writes, with each ``own`` topic named
for each hospital of the region: the bridge carries nothing a hospital of the region could not
read or write itself, and nothing of another region. The core's ACL lets ``bridge-<region>``
read and write just those topics, and no hospital may connect to the core at all; a regional
broker's ACL names each of its hospitals and grants it its own topics (no ``%u`` patterns, which
would also grant them to a hospital of another region that dialled in with its certificate).

Retained messages cross once. The bridge announces itself (``try_private``), so the core forwards
the retain flag of the model's manifest and chunks as published; the regional broker keeps them
retained and serves every hospital of its region from its own copy. A version therefore crosses
each core-to-region link once, however many hospitals the region has (once more after the bridge
reconnects, when the core resends retained messages for the bridge's subscriptions).

Durability. The bridge keeps a persistent session at the core (``cleansession false``): acks and
model messages for the region queue there while the link is down, within the core's queue
limits; updates queue in the regional broker for the bridge likewise. Beyond the limits Mosquitto
drops; the hospitals' outboxes resend every update until its ack arrives, so a drop or a lost
broker costs time, never an acknowledged update.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from common.errors import ConfigError, TopicError
from common.topics import ROLE_TOPICS, Role, Route, Scope, TopicTree, Use, validate_identifier

__all__ = [
    "BRIDGE_PREFIX",
    "REGION_NODE_PREFIX",
    "BridgeTopic",
    "Direction",
    "Region",
    "bridge_identity",
    "bridge_topics",
    "parse_regions",
    "regional_aggregator_topics",
    "render_bridge",
    "render_core_acl",
    "render_region_acl",
]

BRIDGE_PREFIX = "bridge-"
# A regional aggregator's identity is this and the region's name (``region-eu``); it is also its
# node id at the core.
REGION_NODE_PREFIX = "region-"
# The bridge's reconnect backoff: Mosquitto's decorrelated jitter from 2 s up to 60 s, so a core
# restart does not bring every region back in the same second, and a region is back within a
# minute of the core.
RESTART_BASE_S = 2
RESTART_CAP_S = 60
KEEPALIVE_S = 30


@dataclass(frozen=True, slots=True)
class Region:
    """One region: its hospitals and the address of its broker."""

    name: str
    hospitals: tuple[str, ...]
    host: str = "127.0.0.1"
    """The name or address the region's hospitals dial; its server certificate names it."""
    port: int = 8883
    bind: str = "127.0.0.1"
    aggregator: str | None = None
    """The identity (and node id at the core) of the region's aggregator, which combines its
    hospitals' updates; None: each hospital's update goes to the core aggregator itself."""

    def __post_init__(self) -> None:
        try:
            validate_identifier(self.name, "region")
            if self.aggregator is not None:
                validate_identifier(self.aggregator, "regional aggregator")
        except TopicError as exc:
            raise ConfigError(str(exc)) from exc
        if self.aggregator in self.hospitals:
            raise ConfigError(f"region {self.name}: its aggregator is named like a hospital")
        if not self.hospitals:
            raise ConfigError(f"region {self.name} has no hospital")
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"region {self.name}: port {self.port} is outside 1-65535")

    @property
    def bridge(self) -> str:
        return bridge_identity(self.name)


def bridge_identity(region: str) -> str:
    """The broker identity (certificate common name) of a region's bridge at the core."""
    return f"{BRIDGE_PREFIX}{region}"


def parse_regions(text: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``eu=cleveland,hungarian;us=va,switzerland`` as ((region, hospitals), ...), in order."""
    regions: list[tuple[str, tuple[str, ...]]] = []
    for part in text.split(";"):
        if not part.strip():
            continue
        name, sep, hospitals = part.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"region {part.strip()!r} is not NAME=hospital,hospital,...")
        members = tuple(h.strip() for h in hospitals.split(",") if h.strip())
        regions.append((name.strip(), members))
    if not regions:
        raise ConfigError("--regions names no region")
    return tuple(regions)


class Direction(StrEnum):
    """Which way a bridge topic flows, as Mosquitto's ``topic`` line spells it."""

    IN = "in"  # core to region
    OUT = "out"  # region to core


@dataclass(frozen=True, slots=True)
class BridgeTopic:
    """One ``topic`` line of a bridge: a full topic (no prefixes), its direction and QoS."""

    topic: str
    direction: Direction
    qos: int

    def line(self) -> str:
        return f"topic {self.topic} {self.direction.value} {self.qos}"


def _topics_of(tree: TopicTree, uses: Sequence[Use], identities: Sequence[str]) -> list[str]:
    """The topics (or filters) of ``uses`` for these identities: ``own`` ones (and those
    ``addressed`` to an identity, such as secure aggregation's shares) once each."""
    topics: list[str] = []
    for use in uses:
        if use.scope is Scope.ANY:
            topics.append(str(tree.route_filter(use.route)))
        else:
            topics += [str(tree.scoped_filter(use, i)) for i in identities]
    return topics


# With a regional aggregator, these routes of the hospitals end at the region's broker: the
# regional aggregator reads the updates and writes the acks there, and the bridge carries its own
# update and ack topics instead.
_COMBINED_ROUTES = frozenset({Route.UPDATE, Route.ACK})


def bridge_topics(tree: TopicTree, region: Region) -> list[BridgeTopic]:
    """What the region's bridge carries: its hospitals' reads in, their writes out; with a
    regional aggregator, its updates and acks instead of the hospitals'."""
    role = ROLE_TOPICS[Role.HOSPITAL]
    found: list[BridgeTopic] = []
    for direction, uses in ((Direction.IN, role.reads), (Direction.OUT, role.writes)):
        for use in uses:
            identities = region.hospitals
            if region.aggregator is not None and use.route in _COMBINED_ROUTES:
                identities = (region.aggregator,)
            found.extend(
                BridgeTopic(topic, direction, use.route.qos)
                for topic in _topics_of(tree, [use], identities)
            )
    return found


def regional_aggregator_topics(tree: TopicTree, region: Region) -> tuple[list[str], list[str]]:
    """What a region's aggregator reads and writes on the region's broker: its hospitals'
    updates, the core's status and manifest and its own acks in; the hospitals' acks and its own
    combined updates out. Its subscriptions are these
    (:meth:`aggregator.regional_service.RegionalService.subscriptions`)."""
    if region.aggregator is None:
        return [], []
    me = region.aggregator
    reads = [
        str(tree.aggregator_status()),
        str(tree.manifest()),
        str(tree.ack(me)),
        *(str(tree.update(h)) for h in region.hospitals),
    ]
    writes = [str(tree.update(me)), *(str(tree.ack(h)) for h in region.hospitals)]
    return reads, writes


def render_bridge(
    tree: TopicTree,
    region: Region,
    *,
    core_host: str,
    core_port: int,
    files: Path,
    max_packet_size: int,
) -> str:
    """The ``connection`` section of a regional broker's mosquitto.conf (pure).

    ``files`` is the folder holding ``ca.crt`` and the bridge's ``<bridge>.crt``/``.key``.
    """
    address = f"[{core_host}]:{core_port}" if ":" in core_host else f"{core_host}:{core_port}"
    lines = [
        "# -- Bridge to the core broker (mutual TLS as the region's bridge identity) ----------",
        f"connection {tree.federation}-{region.name}",
        f"address {address}",
        f"remote_clientid {region.bridge}",
        f"local_clientid local.{region.bridge}",
        "bridge_protocol_version mqttv311",
        "# Announce a bridge: the core then forwards retain flags as published, so the model's",
        "# manifest and chunks stay retained here and every hospital of the region is served",
        "# from this broker's copy.",
        "try_private true",
        "# A persistent session at the core: acks and model messages for this region queue",
        "# there while the link is down (within the core's max_queued_messages/bytes).",
        "cleansession false",
        "local_cleansession false",
        f"restart_timeout {RESTART_BASE_S} {RESTART_CAP_S}",
        f"keepalive_interval {KEEPALIVE_S}",
        "start_type automatic",
        "# The link's state (1 up, 0 down), retained on this broker only:",
        f"# $SYS/broker/connection/{region.bridge}/state",
        "notifications true",
        "notifications_local_only true",
        f"bridge_max_packet_size {max_packet_size}",
        f"bridge_cafile {files / 'ca.crt'}",
        f"bridge_certfile {files / (region.bridge + '.crt')}",
        f"bridge_keyfile {files / (region.bridge + '.key')}",
        "bridge_tls_version tlsv1.2",
        "bridge_insecure false",
        "# Exactly the topics of this region's hospitals: the model, the run's state and their",
        "# acks in; their updates, statuses and evaluations out.",
        *(t.line() for t in bridge_topics(tree, region)),
    ]
    return "\n".join(lines) + "\n"


def _user_block(identity: str, reads: Sequence[str], writes: Sequence[str]) -> Iterator[str]:
    yield ""
    yield f"user {identity}"
    yield from (f"topic write {t}" for t in writes)
    yield from (f"topic read {t}" for t in reads)


def render_region_acl(tree: TopicTree, region: Region) -> str:
    """The regional broker's ``acl_file``: each hospital of the region, its own topics only."""
    role = ROLE_TOPICS[Role.HOSPITAL]
    lines = [
        f"# healthNET ACL of region {region.name}, federation {tree.federation}: generated by",
        "# `healthnet deploy init --regions`. Only this region's hospitals (and its aggregator,",
        "# if it has one) are named; any other identity (a hospital of another region included)",
        "# may read and write nothing here.",
    ]
    for hospital in region.hospitals:
        lines += _user_block(
            hospital,
            reads=_topics_of(tree, role.reads, [hospital]),
            writes=_topics_of(tree, role.writes, [hospital]),
        )
    if region.aggregator is not None:
        reads, writes = regional_aggregator_topics(tree, region)
        lines += _user_block(region.aggregator, reads=reads, writes=writes)
    return "\n".join(lines) + "\n"


def render_core_acl(
    tree: TopicTree, regions: Sequence[Region], services: Sequence[tuple[str, Role]]
) -> str:
    """The core broker's ``acl_file``: the services as on a single broker, one bridge per region
    (its hospitals' topics), and no hospital at all."""
    lines = [
        f"# healthNET ACL of the core broker, federation {tree.federation}: generated by",
        "# `healthnet deploy init --regions`. Hospitals connect to their regional broker, never",
        "# here; each region's bridge reads and writes what its hospitals do, and no more.",
    ]
    for identity, role in services:
        lines += _user_block(
            identity,
            reads=_topics_of(tree, ROLE_TOPICS[role].reads, [identity]),
            writes=_topics_of(tree, ROLE_TOPICS[role].writes, [identity]),
        )
    for region in regions:
        carried = bridge_topics(tree, region)
        lines += _user_block(
            region.bridge,
            reads=[t.topic for t in carried if t.direction is Direction.IN],
            writes=[t.topic for t in carried if t.direction is Direction.OUT],
        )
    return "\n".join(lines) + "\n"
