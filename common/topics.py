"""The healthNET topic tree: every topic string is built and parsed here, with its QoS and retain.

All topics live under ``healthnet/v1/{federation}/``. The ``{node}`` segment is the broker identity
of the sender; the aggregator checks it against the envelope's sender. Identifiers are restricted
to a safe alphabet so that they can never inject MQTT wildcards or extra levels.

Beside its QoS and retain flag, each :class:`Route` declares what it carries
(:attr:`Route.body_type`): one envelope body type from :mod:`common.messages`, or, for model
chunks, raw bytes with no envelope. :func:`common.inbound.receive` holds every received message
to that declaration. Subscriptions take a :class:`Topic` or a :class:`TopicFilter`, never a bare
string.

:data:`ROLE_TOPICS` says, once, which routes each role's code reads and writes. The services
subscribe through :meth:`TopicTree.subscriptions`, and ``healthnet deploy`` writes the broker's
ACL from the same table, so a role never subscribes to a topic its ACL does not let it read.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType

from common.errors import TopicError
from common.messages import (
    Ack,
    AggregatorStatus,
    Body,
    ControlReply,
    ControlRequest,
    Evaluation,
    Manifest,
    ModelDelta,
    NodeStatus,
    SecAggAnswer,
    SecAggKey,
    SecAggReceipt,
    SecAggShare,
    SecAggUnmask,
    Update,
    VersionRecord,
)

__all__ = [
    "ROLE_TOPICS",
    "ROOT",
    "SECURE_AGGREGATION_ROUTES",
    "Role",
    "RoleTopics",
    "Route",
    "Scope",
    "Topic",
    "TopicFilter",
    "TopicTree",
    "Use",
    "validate_identifier",
]

ROOT = "healthnet/v1"
_IDENTIFIER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def validate_identifier(value: str, what: str = "identifier") -> str:
    """Return ``value`` if it is a safe topic segment (no wildcards, slashes or spaces)."""
    if not _IDENTIFIER.fullmatch(value):
        raise TopicError(
            f"{what} {value!r} is invalid: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


class Route(StrEnum):
    """The kinds of topic in the tree; each has a fixed QoS and retain flag."""

    MANIFEST = "model/manifest"
    CHUNK = "model/chunk"
    DELTA = "model/delta"
    UPDATE = "updates"
    ACK = "acks"
    NODE_STATUS = "nodes/status"
    NODE_EVAL = "nodes/eval"
    CONTROL_REQUEST = "control/requests"
    CONTROL_REPLY = "control/replies"
    AGGREGATOR_STATUS = "aggregator/status"
    VERSIONS = "versions"
    # Secure aggregation (docs/secure-aggregation.md#message-flow).
    SECAGG_KEY = "secagg/keys"
    SECAGG_SHARE = "secagg/shares"
    SECAGG_RECEIPT = "secagg/receipts"
    SECAGG_UNMASK = "secagg/unmask"
    SECAGG_ANSWER = "secagg/answers"

    @property
    def qos(self) -> int:
        return 1

    @property
    def retain(self) -> bool:
        # The manifest, its chunks and every status are state, not events: a late subscriber
        # must see the latest value at once.
        return self in _RETAINED

    @property
    def body_type(self) -> type[Body] | type[bytes]:
        """What a message on this route carries: an envelope with a body of this type, or, for
        ``bytes`` (model chunks), the raw bytes themselves."""
        return _BODY_TYPES[self]


# The latest delta is retained too: a node that was away for one version catches up from it
# without downloading the whole model. A key record is state: a node that starts late must find
# every key.
_RETAINED = frozenset(
    {
        Route.MANIFEST,
        Route.CHUNK,
        Route.DELTA,
        Route.NODE_STATUS,
        Route.AGGREGATOR_STATUS,
        Route.SECAGG_KEY,
    }
)
# The routes of secure aggregation: in every ACL, subscribed only when the policy is on.
SECURE_AGGREGATION_ROUTES = frozenset(
    {
        Route.SECAGG_KEY,
        Route.SECAGG_SHARE,
        Route.SECAGG_RECEIPT,
        Route.SECAGG_UNMASK,
        Route.SECAGG_ANSWER,
    }
)
_BODY_TYPES: Mapping[Route, type[Body] | type[bytes]] = MappingProxyType(
    {
        Route.MANIFEST: Manifest,
        Route.CHUNK: bytes,  # a slice of the model blob, not an envelope
        Route.DELTA: ModelDelta,
        Route.UPDATE: Update,
        Route.ACK: Ack,
        Route.NODE_STATUS: NodeStatus,
        Route.NODE_EVAL: Evaluation,
        Route.CONTROL_REQUEST: ControlRequest,
        Route.CONTROL_REPLY: ControlReply,
        Route.AGGREGATOR_STATUS: AggregatorStatus,
        Route.VERSIONS: VersionRecord,
        Route.SECAGG_KEY: SecAggKey,
        Route.SECAGG_SHARE: SecAggShare,
        Route.SECAGG_RECEIPT: SecAggReceipt,
        Route.SECAGG_UNMASK: SecAggUnmask,
        Route.SECAGG_ANSWER: SecAggAnswer,
    }
)


class Role(StrEnum):
    """Who connects to a federation's broker: each role is one kind of broker identity."""

    HOSPITAL = "hospital"  # edge_node
    AGGREGATOR = "aggregator"  # aggregator.service
    OPERATOR = "operator"  # healthnet.control, and `healthnet watch` (healthnet.feed)
    DASHBOARD = "dashboard"  # healthnet.feed


class Scope(StrEnum):
    OWN = "own"  # only the topic whose node segment is the identity itself
    ANY = "any"  # every topic of the route
    # Only the topics whose recipient segment is the identity (a share sent to it, from anyone).
    ADDRESSED = "addressed"


@dataclass(frozen=True, slots=True)
class Use:
    """One route a role's code reads or writes."""

    route: Route
    scope: Scope = Scope.ANY


@dataclass(frozen=True, slots=True)
class RoleTopics:
    """What a role's code subscribes to (``reads``) and publishes to (``writes``)."""

    reads: tuple[Use, ...]
    writes: tuple[Use, ...]


_OBSERVED = (  # what an observer (healthnet.feed: dashboard, `healthnet watch`) follows
    Use(Route.AGGREGATOR_STATUS),
    Use(Route.VERSIONS),
    Use(Route.NODE_STATUS),
    Use(Route.NODE_EVAL),
)

ROLE_TOPICS: Mapping[Role, RoleTopics] = MappingProxyType(
    {
        # Hospitals: their own events out; the model, the run's state and their own verdicts in.
        Role.HOSPITAL: RoleTopics(
            reads=(
                Use(Route.MANIFEST),
                Use(Route.CHUNK),
                Use(Route.DELTA),
                Use(Route.AGGREGATOR_STATUS),
                Use(Route.ACK, Scope.OWN),
                # Secure aggregation: every hospital's key record, the shares sent to it and
                # the aggregator's unmask requests to it.
                Use(Route.SECAGG_KEY),
                Use(Route.SECAGG_SHARE, Scope.ADDRESSED),
                Use(Route.SECAGG_UNMASK, Scope.OWN),
            ),
            writes=(
                Use(Route.UPDATE, Scope.OWN),
                Use(Route.NODE_STATUS, Scope.OWN),
                Use(Route.NODE_EVAL, Scope.OWN),
                # Its own key record, the shares it sends (to anyone), its receipts and answers.
                Use(Route.SECAGG_KEY, Scope.OWN),
                Use(Route.SECAGG_SHARE, Scope.OWN),
                Use(Route.SECAGG_RECEIPT, Scope.OWN),
                Use(Route.SECAGG_ANSWER, Scope.OWN),
            ),
        ),
        # The aggregator: sole writer of the model, verdicts, provenance and run state; it reads
        # node statuses for its per-node connection view (/metrics).
        Role.AGGREGATOR: RoleTopics(
            reads=(
                Use(Route.UPDATE),
                Use(Route.NODE_EVAL),
                Use(Route.NODE_STATUS),
                Use(Route.CONTROL_REQUEST),
                # Secure aggregation: key records (to know the roster is keyed), receipts, answers.
                Use(Route.SECAGG_KEY),
                Use(Route.SECAGG_RECEIPT),
                Use(Route.SECAGG_ANSWER),
            ),
            writes=(
                Use(Route.MANIFEST),
                Use(Route.CHUNK),
                Use(Route.DELTA),
                Use(Route.ACK),
                Use(Route.AGGREGATOR_STATUS),
                Use(Route.VERSIONS),
                Use(Route.CONTROL_REPLY),
                Use(Route.SECAGG_UNMASK),
            ),
        ),
        # Operators steer the run and watch it.
        Role.OPERATOR: RoleTopics(
            reads=(Use(Route.CONTROL_REPLY), *_OBSERVED),
            writes=(Use(Route.CONTROL_REQUEST),),
        ),
        # The dashboard only watches: statuses, version records and evaluations.
        Role.DASHBOARD: RoleTopics(reads=_OBSERVED, writes=()),
    }
)


@dataclass(frozen=True, slots=True)
class Topic:
    """One concrete topic; ``str(topic)`` is the MQTT topic name."""

    federation: str
    route: Route
    node: str | None = None
    version: int | None = None
    chunk: int | None = None
    request_id: str | None = None
    recipient: str | None = None  # a share's addressee; ``node`` is its sender

    @property
    def qos(self) -> int:
        return self.route.qos

    @property
    def retain(self) -> bool:
        return self.route.retain

    def __str__(self) -> str:
        base = f"{ROOT}/{self.federation}"
        match self.route:
            case Route.CHUNK:
                return f"{base}/model/v{self.version}/chunk/{self.chunk}"
            case Route.UPDATE | Route.ACK:
                return f"{base}/{self.route.value}/{self.node}"
            case Route.NODE_STATUS:
                return f"{base}/nodes/{self.node}/status"
            case Route.NODE_EVAL:
                return f"{base}/nodes/{self.node}/eval"
            case Route.CONTROL_REPLY:
                return f"{base}/control/replies/{self.request_id}"
            case Route.SECAGG_SHARE:
                return f"{base}/{self.route.value}/{self.recipient}/{self.node}"
            case (
                Route.SECAGG_KEY | Route.SECAGG_RECEIPT | Route.SECAGG_UNMASK | Route.SECAGG_ANSWER
            ):
                return f"{base}/{self.route.value}/{self.node}"
            case _:
                return f"{base}/{self.route.value}"


@dataclass(frozen=True, slots=True)
class TopicFilter:
    """A subscription filter with wildcards, built only by :class:`TopicTree`; ``str()`` is the
    MQTT filter. ``route`` is the route whose topics it matches (None: every route)."""

    text: str
    route: Route | None = None

    def __str__(self) -> str:
        return self.text


class TopicTree:
    """Builds and parses the topics of one federation."""

    def __init__(self, federation: str) -> None:
        self.federation = validate_identifier(federation, "federation")
        self.prefix = f"{ROOT}/{self.federation}"

    def manifest(self) -> Topic:
        return Topic(self.federation, Route.MANIFEST)

    def delta(self) -> Topic:
        return Topic(self.federation, Route.DELTA)

    def chunk(self, version: int, index: int) -> Topic:
        if version < 0 or index < 0:
            raise TopicError(f"chunk topic needs non-negative version and index: {version}/{index}")
        return Topic(self.federation, Route.CHUNK, version=version, chunk=index)

    def update(self, node: str) -> Topic:
        return Topic(self.federation, Route.UPDATE, node=validate_identifier(node, "node"))

    def ack(self, node: str) -> Topic:
        return Topic(self.federation, Route.ACK, node=validate_identifier(node, "node"))

    def node_status(self, node: str) -> Topic:
        return Topic(self.federation, Route.NODE_STATUS, node=validate_identifier(node, "node"))

    def node_eval(self, node: str) -> Topic:
        return Topic(self.federation, Route.NODE_EVAL, node=validate_identifier(node, "node"))

    def control_requests(self) -> Topic:
        return Topic(self.federation, Route.CONTROL_REQUEST)

    def control_reply(self, request_id: str) -> Topic:
        return Topic(
            self.federation,
            Route.CONTROL_REPLY,
            request_id=validate_identifier(request_id, "request id"),
        )

    def aggregator_status(self) -> Topic:
        return Topic(self.federation, Route.AGGREGATOR_STATUS)

    def versions(self) -> Topic:
        return Topic(self.federation, Route.VERSIONS)

    def secagg_key(self, node: str) -> Topic:
        return self._of_node(Route.SECAGG_KEY, node)

    def secagg_share(self, recipient: str, sender: str) -> Topic:
        return Topic(
            self.federation,
            Route.SECAGG_SHARE,
            node=validate_identifier(sender, "sender"),
            recipient=validate_identifier(recipient, "recipient"),
        )

    def secagg_receipt(self, node: str) -> Topic:
        return self._of_node(Route.SECAGG_RECEIPT, node)

    def secagg_unmask(self, node: str) -> Topic:
        return self._of_node(Route.SECAGG_UNMASK, node)

    def secagg_answer(self, node: str) -> Topic:
        return self._of_node(Route.SECAGG_ANSWER, node)

    def _of_node(self, route: Route, node: str) -> Topic:
        return Topic(self.federation, route, node=validate_identifier(node, "node"))

    # Subscription filters: the only places where wildcards appear.
    def all_updates(self) -> TopicFilter:
        return self.route_filter(Route.UPDATE)

    def all_chunks(self) -> TopicFilter:
        return self.route_filter(Route.CHUNK)

    def all_node_status(self) -> TopicFilter:
        return self.route_filter(Route.NODE_STATUS)

    def all_node_evals(self) -> TopicFilter:
        return self.route_filter(Route.NODE_EVAL)

    def everything(self) -> TopicFilter:
        """Every topic of this federation (what a broker's ACL must narrow for most identities)."""
        return TopicFilter(f"{self.prefix}/#")

    def subscriptions(
        self, role: Role, identity: str | None = None, *, secure_aggregation: bool = False
    ) -> tuple[TopicFilter, ...]:
        """The topic filters ``role``'s code subscribes to (:data:`ROLE_TOPICS`); ``identity``
        fills the node segment of its own topics. The routes of
        :data:`SECURE_AGGREGATION_ROUTES` only with ``secure_aggregation``: with the policy off
        a service subscribes to what it did before the policy existed."""
        filters = []
        for use in ROLE_TOPICS[role].reads:
            if use.route in SECURE_AGGREGATION_ROUTES and not secure_aggregation:
                continue
            if use.scope is Scope.ANY:
                filters.append(self.route_filter(use.route))
                continue
            if identity is None:
                raise TopicError(f"{role} reads its own {use.route} topic: name the identity")
            filters.append(self.scoped_filter(use, validate_identifier(identity)))
        return tuple(filters)

    def scoped_filter(self, use: Use, identity: str) -> TopicFilter:
        """The filter of ``use``'s topics that ``identity`` (a name, or Mosquitto's ``%u``) may
        use under its scope: its own, those addressed to it, or (ANY) every one."""
        match use.scope:
            case Scope.OWN:
                return self.route_filter(use.route, identity)
            case Scope.ADDRESSED:
                return self.route_filter(use.route, recipient=identity)
            case _:
                return self.route_filter(use.route)

    def route_filter(self, route: Route, node: str = "+", *, recipient: str = "+") -> TopicFilter:
        """The filter matching every topic of ``route``; ``node`` fills the node segment (``+``
        for any node, or a broker ACL substitution such as Mosquitto's ``%u``), ``recipient``
        a share's recipient segment."""
        match route:
            case Route.CHUNK:
                text = f"{self.prefix}/model/+/chunk/+"
            case Route.CONTROL_REPLY:
                text = f"{self.prefix}/control/replies/+"
            case Route.SECAGG_SHARE:
                text = str(Topic(self.federation, route, node=node, recipient=recipient))
            case (
                Route.UPDATE
                | Route.ACK
                | Route.NODE_STATUS
                | Route.NODE_EVAL
                | Route.SECAGG_KEY
                | Route.SECAGG_RECEIPT
                | Route.SECAGG_UNMASK
                | Route.SECAGG_ANSWER
            ):
                text = str(Topic(self.federation, route, node=node))
            case _:
                text = str(Topic(self.federation, route))
        return TopicFilter(text, route)

    def parse(self, topic: str) -> Topic:
        """Parse a topic name of this federation; raise TopicError for anything else."""
        head = self.prefix + "/"
        if not topic.startswith(head):
            raise TopicError(f"topic {topic!r} is not under {self.prefix!r}")
        parts = tuple(topic[len(head) :].split("/"))
        fixed = _FIXED_ROUTES.get(parts)
        if fixed is not None:
            return Topic(self.federation, fixed)
        try:
            parsed = self._parse_variable(parts)
        except TopicError as exc:
            raise TopicError(f"topic {topic!r}: {exc}") from exc
        if parsed is None:
            raise TopicError(f"topic {topic!r} is not a healthNET route")
        return parsed

    def _parse_variable(self, parts: tuple[str, ...]) -> Topic | None:
        """The topic of a route with a node, request id or chunk in its name; None if none."""
        match parts:
            case ("model", version, "chunk", index) if version.startswith("v"):
                return self.chunk(_number(version[1:]), _number(index))
            case ("updates", node):
                return self.update(node)
            case ("acks", node):
                return self.ack(node)
            case ("nodes", node, "status"):
                return self.node_status(node)
            case ("nodes", node, "eval"):
                return self.node_eval(node)
            case ("control", "replies", request_id):
                return self.control_reply(request_id)
            case ("secagg", "shares", recipient, sender):
                return self.secagg_share(recipient, sender)
            case ("secagg", kind, node) if kind in _SECAGG_OF_NODE:
                return self._of_node(_SECAGG_OF_NODE[kind], node)
        return None


# The routes whose topic name is the same for every message of a federation.
_FIXED_ROUTES: Mapping[tuple[str, ...], Route] = MappingProxyType(
    {
        ("model", "manifest"): Route.MANIFEST,
        ("model", "delta"): Route.DELTA,
        ("control", "requests"): Route.CONTROL_REQUEST,
        ("aggregator", "status"): Route.AGGREGATOR_STATUS,
        ("versions",): Route.VERSIONS,
    }
)

# The secure aggregation routes named secagg/{kind}/{node}.
_SECAGG_OF_NODE: Mapping[str, Route] = MappingProxyType(
    {
        route.value.removeprefix("secagg/"): route
        for route in (
            Route.SECAGG_KEY,
            Route.SECAGG_RECEIPT,
            Route.SECAGG_UNMASK,
            Route.SECAGG_ANSWER,
        )
    }
)

_NUMBER = re.compile(r"[0-9]{1,12}")


def _number(text: str) -> int:
    # ASCII digits only: str.isdigit() also accepts "²" and other scripts' digits.
    if not _NUMBER.fullmatch(text):
        raise TopicError(f"{text!r} is not a non-negative integer")
    return int(text)
