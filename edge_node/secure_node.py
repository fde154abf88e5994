"""The node service's part in secure aggregation: its key, the shares it holds, what it masks.

Theory of operation (docs/secure-aggregation.md#message-flow). The service turns this on when a
version it holds carries the ``secure_aggregation`` policy, and holds one :class:`SecureNode` per
policy. Nothing here touches MQTT: each method returns the messages to publish (``Publish``, a
topic and the encoded envelope), and the service publishes them.

- **Keys.** :meth:`SecureNode.create` loads (or makes, mode 0600) the node's X25519 key in
  ``secagg/`` under its state dir and signs its key record with the node's client certificate,
  verified against the CA as its peers will verify it: a node without a client certificate (a
  password-mode deployment) cannot join the policy and gets
  :class:`~edge_node.secure_keys.SecureAggregationUnavailable`, which the service turns into a
  closed training gate whose reason its status shows. The service subscribes to the node's
  secure routes (:meth:`SecureNode.subscriptions`) before it publishes the record (retained), so
  no peer can mask for it before it listens for its shares. Key records go into a
  :class:`~common.secure_aggregation.directory.KeyDirectory`; :meth:`SecureNode.missing` lists
  the roster's holders not yet proven, and the node masks nothing while that is not empty.
- **Masking.** :meth:`SecureNode.mask` quantizes, masks and shares a flattened delta.
  :meth:`SecureNode.stage` then keeps the node's own share in its holder and writes the update's
  envelope with every sealed share's envelope to one atomic file (:class:`OutgoingShares`),
  all before the update enters the outbox and before anything is published. A resend, after a
  reconnect or a crash, sends those same bytes (shares first, then the update); an update id is
  masked once, when it is made, and never again. :meth:`OutgoingShares.recover` puts into the
  outbox an update whose file was written and whose outbox entry was not (a crash in between).
- **Holding.** Shares go through a :class:`~edge_node.secure_shares.ShareInbox` (stored with
  fsync, then receipted on ``secagg/receipts/{node}``). An unmask request is taken only on the
  node's own ``secagg/unmask/{node}`` from the aggregator's identity; the
  :class:`~edge_node.secure_holder.ShareHolder` applies the release rules, records the release
  durably and answers on ``secagg/answers/{node}``, or refuses naming the rule. The same request
  again, after a restart too, gets the same share sum.

The node's MQTT session is not persistent and PUBACKs a share when it arrives, before it is
stored: a share lost to a crash in between, or sent while the holder was offline, is not
receipted by that holder. A resend of the update sends its shares again, but resends stop at the
ack, and a buffer needs ``U`` holders that each hold every share of its batch: with holders
down in turn, no ``U`` may ever hold them all. So the sender keeps each update's sealed shares
after the ack too (:meth:`OutgoingShares.settle`), for updates whose base version is within
the run's ``max_staleness`` of the newest it holds and at most :data:`MAX_SETTLED` of them, and
sends a holder its shares again whenever that holder's key record arrives
(:meth:`OutgoingShares.for_holder`): a node republishes its retained record when it starts and
on every reconnect, and the broker delivers every retained record again when the sender itself
reconnects or restarts. A holder stores an identical share once and receipts it again. On a
reconnect a node also publishes again its receipts of its own shares of its recent updates
(:meth:`SecureNode.own_receipts`): the one published when an update was staged may have been
lost with the connection.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict

from common.codec import encode, envelope
from common.files import atomic_write
from common.inbound import Inbound
from common.messages import (
    Body,
    MaskedDelta,
    MetricRelease,
    NodeSecureAggregation,
    PrivacySpend,
    SecAggKey,
    SecAggShare,
    SecAggUnmask,
    TrainMetrics,
    Update,
)
from common.outbox import Outbox
from common.secure_aggregation.directory import KeyDirectory
from common.secure_aggregation.events import Receipt, UnmaskRefusal
from common.secure_aggregation.keys import KeyRecord
from common.secure_aggregation.policy import SecureAggregationPolicy
from common.secure_aggregation.wire import (
    WireRefusal,
    to_answer,
    to_key_record,
    to_receipt,
    to_share,
    unmask_of,
)
from common.topics import SECURE_AGGREGATION_ROUTES, Role, Topic, TopicFilter, TopicTree
from edge_node.release import release_train_metrics
from edge_node.secure_holder import SecureUpload, ShareHolder, load_agreement_key, mask_for_upload
from edge_node.secure_keys import own_key_record
from edge_node.secure_shares import ShareInbox
from edge_node.session import Job

if TYPE_CHECKING:
    from edge_node.privacy_ledger import Charge  # opacus: only for the type
    from edge_node.training import TrainResult  # torch: only for the type

__all__ = [
    "MAX_SETTLED",
    "OutgoingShares",
    "Publish",
    "SecureNode",
    "Unmasked",
    "flat_delta",
    "masked_update",
]

log = logging.getLogger(__name__)

# A message to publish: its topic and its encoded envelope.
Publish = tuple[Topic, bytes]

# Acked updates whose sealed shares are kept for a holder that comes back (newest first).
MAX_SETTLED = 64

_BUNDLE_SUFFIX = ".outgoing"
_BUNDLE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.-]{0,63})\.outgoing$")


@dataclass(frozen=True, slots=True)
class Unmasked:
    """A trained update under secure aggregation, not masked yet: the worker made it, and the
    service masks it once it holds a verified key for every holder of the policy."""

    job: Job
    result: TrainResult
    delta: NDArray[np.float64]  # flattened, in the order of the job's tensors
    update_id: str
    encode_seconds: float
    charge: Charge | None = None
    privacy: PrivacySpend | None = None
    release: MetricRelease = MetricRelease.EXACT


def flat_delta(job: Job, params: Mapping[str, NDArray[np.float32]]) -> NDArray[np.float64]:
    """The trained weights minus the job's base weights, flattened in the order of the job's
    tensors (the order of the version's blob, which the aggregator unflattens by)."""
    if not job.params:
        return np.zeros(0, dtype=np.float64)
    return np.concatenate(
        [
            (np.asarray(params[name], np.float64) - np.asarray(base, np.float64)).reshape(-1)
            for name, base in job.params.items()
        ]
    )


def masked_update(pending: Unmasked, secure: SecureUpload) -> Update:
    """The update that carries ``secure``'s masked elements in place of a delta."""
    result, manifest = pending.result, pending.job.manifest
    return Update(
        update_id=pending.update_id,
        run_id=manifest.run_id,
        base_version=manifest.version,
        num_samples=result.num_samples,
        metrics=release_train_metrics(
            TrainMetrics(loss=result.loss, accuracy=result.accuracy, seconds=result.seconds),
            pending.release,
        ),
        delta=(),
        encode_seconds=pending.encode_seconds,
        privacy=pending.privacy,
        masked=MaskedDelta(
            policy_digest=secure.upload.policy_digest, elements=secure.upload.masked
        ),
    )


class _Bundle(BaseModel):
    """One masked update as first sent: its envelope and each sealed share's envelope."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", ser_json_bytes="base64", val_json_bytes="base64"
    )

    update_id: str
    update: bytes
    recipients: tuple[str, ...]
    shares: tuple[bytes, ...]
    base_version: int = -1  # -1: written before it was recorded
    acked: bool = False  # answered: its shares are kept only for a holder that comes back


class OutgoingShares:
    """The node's masked updates and their sealed shares, byte for byte: until each is acked,
    then (settled) while a holder that missed its share may still need it.

    One file per update id (``{update id}.outgoing``, written atomically) in ``directory``.
    """

    def __init__(self, directory: Path, topics: TopicTree) -> None:
        self.directory = directory
        self.topics = topics

    def open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob("*.tmp"):
            stale.unlink()

    def write(
        self, update_id: str, update: bytes, shares: tuple[Publish, ...], *, base_version: int
    ) -> None:
        bundle = _Bundle(
            update_id=update_id,
            update=update,
            recipients=tuple(topic.recipient or "" for topic, _ in shares),
            shares=tuple(payload for _, payload in shares),
            base_version=base_version,
        )
        atomic_write(self._path(update_id), bundle.model_dump_json().encode())

    def settle(self, update_id: str, *, newest: int, window: int) -> None:
        """``update_id`` is acked: keep its shares for a holder that comes back (no longer an
        update to send), then prune what has left the window (see :meth:`prune`)."""
        bundle = self._read(update_id)
        if bundle is not None and not bundle.acked:
            atomic_write(
                self._path(update_id),
                bundle.model_copy(update={"acked": True}).model_dump_json().encode(),
            )
        self.prune(newest=newest, window=window)

    def prune(self, *, newest: int, window: int) -> list[str]:
        """Remove each settled update whose base version is more than ``window`` versions older
        than ``newest`` (the aggregator refuses it, or has folded it: nobody needs its
        shares), and all but the :data:`MAX_SETTLED` newest settled ones; the ids removed."""
        settled = sorted(
            (b for b in self._bundles() if b.acked),
            key=lambda b: (b.base_version, b.update_id),
            reverse=True,
        )
        removed = [
            b.update_id
            for rank, b in enumerate(settled)
            if rank >= MAX_SETTLED or b.base_version < newest - window
        ]
        for update_id in removed:
            self.remove(update_id)
        return removed

    def for_holder(
        self, holder: str, sender: str, *, newest: int, window: int
    ) -> tuple[Publish, ...]:
        """The shares addressed to ``holder`` of every update, sent or settled, whose base
        version is within ``window`` of ``newest``, as first published (oldest first): what to
        send a holder whose key record arrives again, for it may have missed them while down."""
        self.prune(newest=newest, window=window)
        bundles = sorted(
            (b for b in self._bundles() if b.base_version >= newest - window),
            key=lambda b: (b.base_version, b.update_id),
        )
        return tuple(
            (self.topics.secagg_share(recipient, sender), payload)
            for bundle in bundles
            for recipient, payload in zip(bundle.recipients, bundle.shares, strict=True)
            if recipient == holder
        )

    def shares(self, update_id: str, sender: str) -> tuple[Publish, ...]:
        """The shares of ``update_id`` as first published (none: not a masked update)."""
        bundle = self._read(update_id)
        if bundle is None:
            return ()
        return tuple(
            (self.topics.secagg_share(recipient, sender), payload)
            for recipient, payload in zip(bundle.recipients, bundle.shares, strict=True)
        )

    def recent(self, *, newest: int, window: int) -> tuple[str, ...]:
        """The update ids, sent or settled, whose base version is within ``window`` of
        ``newest`` (after :meth:`prune`)."""
        self.prune(newest=newest, window=window)
        return tuple(b.update_id for b in self._bundles() if b.base_version >= newest - window)

    def remove(self, update_id: str) -> None:
        self._path(update_id).unlink(missing_ok=True)

    def recover(self, outbox: Outbox) -> list[str]:
        """Put back into ``outbox`` each masked update written here whose outbox entry a crash
        kept from being written; the ids put back."""
        held = set(outbox.ids())
        recovered = []
        for bundle in self._bundles():
            if bundle.acked or bundle.update_id in held:
                continue
            outbox.put(bundle.update_id, bundle.update)
            recovered.append(bundle.update_id)
        return recovered

    def _bundles(self) -> list[_Bundle]:
        return [
            _Bundle.model_validate_json(path.read_bytes())
            for path in sorted(self.directory.iterdir())
            if _BUNDLE.match(path.name)
        ]

    def _read(self, update_id: str) -> _Bundle | None:
        path = self._path(update_id)
        if not path.exists():
            return None
        return _Bundle.model_validate_json(path.read_bytes())

    def _path(self, update_id: str) -> Path:
        if not _BUNDLE.match(update_id + _BUNDLE_SUFFIX):
            raise ValueError(f"invalid update id {update_id!r}")
        return self.directory / f"{update_id}{_BUNDLE_SUFFIX}"


class SecureNode:
    """One hospital's secure aggregation under one policy: a context manager (the holder's
    release log is open while it is)."""

    def __init__(
        self,
        *,
        topics: TopicTree,
        identity: str,
        aggregator: str,
        policy: SecureAggregationPolicy,
        holder: ShareHolder,
        keys: KeyDirectory,
        record: KeyRecord,
        own_key: X25519PrivateKey,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.topics = topics
        self.identity = identity
        self.aggregator = aggregator
        self.policy = policy
        self.digest = policy.digest()
        self.holder = holder
        self.keys = keys
        self.record = record
        self.inbox = ShareInbox(holder, keys)
        self.refusals: Counter[str] = Counter()  # unmask requests not taken, by reason
        self._own_key = own_key
        self._random_bytes = random_bytes

    @classmethod
    def create(
        cls,
        state_dir: Path,
        *,
        topics: TopicTree,
        identity: str,
        aggregator: str,
        policy: SecureAggregationPolicy,
        size: int,
        cert_file: str | Path | None,
        key_file: str | Path | None,
        ca_file: str | Path | None,
        now: dt.datetime,
    ) -> SecureNode:
        """The node's part under ``policy`` for a model of ``size`` parameters, its files under
        ``state_dir/secagg``; :class:`~edge_node.secure_keys.SecureAggregationUnavailable`
        when the node cannot sign a key record its peers would accept, and ValueError when it
        is not a holder of the policy's roster."""
        policy.holder_index(identity)
        directory = state_dir / "secagg"
        own_key = load_agreement_key(directory)
        record = own_key_record(
            federation=topics.federation,
            identity=identity,
            agreement_key=own_key,
            cert_file=cert_file,
            key_file=key_file,
            ca_file=ca_file,
            now=now,
        )
        # own_key_record has read ca_file: it is set.
        keys = KeyDirectory(federation=topics.federation, ca_certificate_pem=_read(ca_file))
        holder = ShareHolder(
            directory / policy.digest()[:16],
            federation=topics.federation,
            identity=identity,
            policy=policy,
            size=size,
            own_key=own_key,
        )
        return cls(
            topics=topics,
            identity=identity,
            aggregator=aggregator,
            policy=policy,
            holder=holder,
            keys=keys,
            record=record,
            own_key=own_key,
        )

    def __enter__(self) -> Self:
        self.holder.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.holder.__exit__(exc_type, exc, tb)

    # -- keys

    def subscriptions(self) -> tuple[TopicFilter, ...]:
        """The node's secure routes: every key record, its shares, its unmask requests."""
        return tuple(
            f
            for f in self.topics.subscriptions(
                Role.HOSPITAL, self.identity, secure_aggregation=True
            )
            if f.route in SECURE_AGGREGATION_ROUTES
        )

    def key_record(self, *, now: float) -> Publish:
        """The node's signed key record, for its own retained key topic."""
        body = to_key_record(self.record)
        return self.topics.secagg_key(self.identity), _encode(body, self.identity, now)

    def missing(self) -> tuple[str, ...]:
        """Holders of the roster (this node aside) whose key record is not verified yet."""
        return tuple(h for h in self.keys.missing(self.policy.holders) if h != self.identity)

    def status(self) -> NodeSecureAggregation:
        return NodeSecureAggregation(policy_digest=self.digest, waiting_for_keys=self.missing())

    def own_receipts(self, update_ids: tuple[str, ...], *, now: float) -> tuple[Publish, ...]:
        """The node's receipts of its own shares of ``update_ids`` (those it keeps), to publish
        again after a reconnect: the one published when the update was staged may have been
        lost with the connection, and nothing else would ever send it."""
        return self._receipts(
            tuple(
                Receipt(holder=self.identity, update_id=u)
                for u in update_ids
                if self.holder.holds_own(u)
            ),
            now,
        )

    # -- inbound

    def take(self, inbound: Inbound, *, now: float) -> tuple[Publish, ...]:
        """A secure aggregation message received on one of :meth:`subscriptions`: what to
        publish in answer (receipts, an unmask answer or refusal); every refusal is logged and
        counted."""
        match inbound.body:
            case SecAggKey():
                proven = self.keys.offer(inbound)
                node = inbound.topic.node
                if isinstance(proven, X25519PublicKey) and node:
                    return self._receipts(self.inbox.key_proven(node), now)
                return ()
            case SecAggShare():
                return self._receipts(self.inbox.take(inbound), now)
            case SecAggUnmask():
                return self._unmask(inbound, now)
            case _:
                log.warning(
                    "node %s: a %s on %s is not for secure aggregation's node side",
                    self.identity,
                    type(inbound.body).__name__,
                    inbound.topic,
                )
                return ()

    def _receipts(self, receipts: tuple[Receipt, ...], now: float) -> tuple[Publish, ...]:
        if not receipts:
            return ()
        body = to_receipt(self.digest, receipts)
        return ((self.topics.secagg_receipt(self.identity), _encode(body, self.identity, now)),)

    def _unmask(self, inbound: Inbound, now: float) -> tuple[Publish, ...]:
        if inbound.topic.node != self.identity:
            return self._refuse_request(inbound, "wrong_topic", f"not {self.identity}'s topic")
        request = unmask_of(inbound, self.aggregator)
        if isinstance(request, WireRefusal):
            return self._refuse_request(inbound, request.reason.value, request.detail)
        answer = self.holder.answer(request)
        log.info(
            "node %s: unmask request %s over %d updates: %s",
            self.identity,
            request.fold_id,
            len(request.terms),
            f"refused ({answer.reason})" if isinstance(answer, UnmaskRefusal) else "answered",
        )
        body = to_answer(answer)
        return ((self.topics.secagg_answer(self.identity), _encode(body, self.identity, now)),)

    def _refuse_request(self, inbound: Inbound, reason: str, detail: str) -> tuple[Publish, ...]:
        self.refusals[reason] += 1
        log.warning(
            "node %s: refused the unmask request on %s (%s): %s",
            self.identity,
            inbound.topic,
            reason,
            detail,
        )
        return ()

    # -- outbound

    def mask(self, pending: Unmasked) -> SecureUpload:
        """Quantize, mask and share ``pending``'s delta; ValueError while a holder's key is
        missing (the caller waits for :meth:`missing` to be empty)."""
        holder_keys = {
            h: key
            for h in self.policy.holders
            if h != self.identity and (key := self.keys.key(h)) is not None
        }
        return mask_for_upload(
            pending.delta,
            policy=self.policy,
            federation=self.topics.federation,
            identity=self.identity,
            own_key=self._own_key,
            holder_keys=holder_keys,
            update_id=pending.update_id,
            base_version=pending.job.manifest.version,
            num_samples=pending.result.num_samples,
            rng=np.random.default_rng(int.from_bytes(self._random_bytes(16), "little")),
            random_bytes=self._random_bytes,
        )

    def stage(
        self, secure: SecureUpload, payload: bytes, outgoing: OutgoingShares, *, now: float
    ) -> tuple[Publish, ...]:
        """Keep the node's own share and write the update with its sealed shares, durably,
        before the update enters the outbox; the shares to publish, then the node's own
        receipt (it holds its own share)."""
        update_id = secure.upload.update_id
        own = self.holder.keep_own(update_id, secure.own_share)
        shares = tuple(
            (
                self.topics.secagg_share(share.recipient, self.identity),
                _encode(to_share(share), self.identity, now),
            )
            for share in secure.shares
        )
        outgoing.write(update_id, payload, shares, base_version=secure.upload.base_version)
        return shares + self._receipts((own,), now)


def _encode(body: Body, sender: str, now: float) -> bytes:
    return encode(envelope(body, sender=sender, sent_at=now))


def _read(path: str | Path | None) -> bytes:
    if path is None:
        raise ValueError("no file")
    return Path(path).read_bytes()
