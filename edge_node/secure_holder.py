"""A hospital's part in secure aggregation: masking its own updates, holding the others' shares.

Theory of operation (docs/secure-aggregation.md#message-flow).

- :func:`mask_for_upload` turns the node's delta into a :class:`MaskedUpload` for the aggregator,
  one :class:`SealedShare` for every other holder of the policy, and the node's own share. The
  caller writes all of it to the outbox in one atomic file before it publishes any of it, so a
  resend after a crash sends the same bytes and an update id never gets two masks.
- :class:`ShareHolder` keeps the shares it is sent, one file per update (written atomically,
  first share wins), and answers unmask requests under the rules of
  :mod:`common.secure_aggregation.release`. Before it answers, it appends the release (fold id,
  digest of the sum, update ids) to ``released.jsonl`` and fsyncs: a holder killed after that
  answers the same request again with the same bytes after its restart, and never releases a
  share in a second sum.

Layout of ``directory``: ``agreement.key`` (the X25519 private key, mode 0600),
``shares/<update id>.share`` (a JSON header line, then the share's field elements) and
``released.jsonl``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict

from common.errors import DecodeError
from common.files import atomic_write
from common.jsonlog import JsonLog, read_json_lines
from common.secure_aggregation import (
    FieldVector,
    RandomBytes,
    ShareContext,
    ShareRefused,
    from_bytes,
    mask_update,
    open_share,
    release_refusal,
    seal_share,
    sum_digest,
    to_bytes,
    weighted_sum,
)
from common.secure_aggregation.events import (
    MaskedUpload,
    Receipt,
    SealedShare,
    UnmaskAnswer,
    UnmaskRefusal,
    UnmaskRequest,
)
from common.secure_aggregation.policy import SecureAggregationPolicy
from common.topics import validate_identifier

__all__ = ["SecureUpload", "ShareHolder", "load_agreement_key", "mask_for_upload"]

log = logging.getLogger(__name__)

KEY_FILE = "agreement.key"
RELEASE_LOG = "released.jsonl"
_SHARES = "shares"
# Each share is shares/<update id>.share; atomic_write's temp files end in .tmp and never match.
_SHARE_SUFFIX = ".share"
_KEY_MODE = 0o600


def load_agreement_key(directory: Path) -> X25519PrivateKey:
    """The node's X25519 private key, made (mode 0600) on first use and kept across restarts."""
    path = directory / KEY_FILE
    if path.exists():
        return X25519PrivateKey.from_private_bytes(path.read_bytes())
    directory.mkdir(parents=True, exist_ok=True)
    key = X25519PrivateKey.generate()
    raw = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    tmp = path.with_name(KEY_FILE + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _KEY_MODE)
    with os.fdopen(fd, "wb") as handle:
        handle.write(raw)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)
    return key


@dataclass(frozen=True, slots=True)
class SecureUpload:
    """What one masked update sends, and the share its sender keeps."""

    upload: MaskedUpload
    shares: tuple[SealedShare, ...]
    own_share: FieldVector = field(repr=False)


def mask_for_upload(
    delta: NDArray[np.floating],
    *,
    policy: SecureAggregationPolicy,
    federation: str,
    identity: str,
    own_key: X25519PrivateKey,
    holder_keys: Mapping[str, X25519PublicKey],
    update_id: str,
    base_version: int,
    num_samples: int,
    rng: np.random.Generator,
    random_bytes: RandomBytes,
) -> SecureUpload:
    """Quantize, mask and share ``delta`` (flattened); seal each share for its holder.

    ``holder_keys`` are verified key records' keys; every holder but this node needs one.
    """
    own = policy.holder_index(identity)
    missing = [h for h in policy.holders if h != identity and h not in holder_keys]
    if missing:
        raise ValueError(f"no verified key for holders {', '.join(missing)}")
    masked = mask_update(delta, policy.plan, policy.scheme, rng=rng, random_bytes=random_bytes)
    digest = policy.digest()
    sealed = tuple(
        SealedShare(
            update_id=update_id,
            sender=identity,
            recipient=holder,
            policy_digest=digest,
            sealed=seal_share(
                own_key,
                holder_keys[holder],
                ShareContext(federation, identity, holder, update_id),
                to_bytes(masked.shares[index]),
                random_bytes,
            ),
        )
        for index, holder in enumerate(policy.holders)
        if holder != identity
    )
    upload = MaskedUpload(
        update_id=update_id,
        sender=identity,
        base_version=base_version,
        num_samples=num_samples,
        policy_digest=digest,
        masked=to_bytes(masked.masked),
    )
    return SecureUpload(upload=upload, shares=sealed, own_share=masked.shares[own])


class _HeldShare(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    sender: str
    policy_digest: str


class _Release(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    fold_id: str
    digest: str
    update_ids: tuple[str, ...]


class ShareHolder:
    """The shares one hospital holds for a policy, and its durable record of what it released.

    ``size`` is the model's parameter count: every share is ``policy.scheme.share_length(size)``
    field elements. A context manager: the release log is open while it is.
    """

    def __init__(
        self,
        directory: Path,
        *,
        federation: str,
        identity: str,
        policy: SecureAggregationPolicy,
        size: int,
        own_key: X25519PrivateKey,
    ) -> None:
        self.directory = directory
        self.federation = federation
        self.identity = identity
        self.policy = policy
        self.index = policy.holder_index(identity)
        self.length = policy.scheme.share_length(size)
        self._own_key = own_key
        self._digest = policy.digest()
        self._shares = directory / _SHARES
        self._log = JsonLog(directory / RELEASE_LOG, _Release)
        self._released: dict[str, str] = {}

    def __enter__(self) -> Self:
        self._shares.mkdir(parents=True, exist_ok=True)
        self._log.open()
        for release in read_json_lines(self._log.path, _Release):
            for update_id in release.update_ids:
                self._released[update_id] = release.digest
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._log.close()

    # -- shares in

    def keep_own(self, update_id: str, share: FieldVector) -> Receipt:
        """Store this node's own share of its own update (it never travels)."""
        self._store(update_id, self.identity, to_bytes(share))
        return Receipt(holder=self.identity, update_id=update_id)

    def accept(self, share: SealedShare, sender_key: X25519PublicKey) -> Receipt:
        """Open, check and durably store a share; the receipt may then be published.

        Raises :class:`ShareRefused` for a share that is not for us, not under our policy,
        from a non-holder, that does not open or has the wrong length, or a second, different
        share for an update whose share we already hold.
        """
        if share.recipient != self.identity:
            raise ShareRefused(f"a share for {share.recipient} reached {self.identity}")
        if share.policy_digest != self._digest:
            raise ShareRefused(f"{share.sender}: share of {share.update_id} under another policy")
        if share.sender not in self.policy.holders or share.sender == self.identity:
            raise ShareRefused(f"{share.sender} is not another holder of the policy")
        context = ShareContext(self.federation, share.sender, self.identity, share.update_id)
        plain = open_share(self._own_key, sender_key, context, share.sealed)
        try:
            from_bytes(plain, self.length)
        except DecodeError as exc:
            raise ShareRefused(f"{share.sender}: share of {share.update_id}: {exc}") from exc
        self._store(share.update_id, share.sender, plain)
        return Receipt(holder=self.identity, update_id=share.update_id)

    def _store(self, update_id: str, sender: str, data: bytes) -> None:
        path = self._share_path(validate_identifier(update_id, "update id"))
        header = _HeldShare(sender=sender, policy_digest=self._digest).model_dump_json().encode()
        content = header + b"\n" + data
        if path.exists():
            if path.read_bytes() != content:
                raise ShareRefused(f"{sender}: a second, different share of {update_id}")
            return
        atomic_write(path, content)

    def held(self) -> dict[str, str]:
        """update id -> sender of every share held (reading each file's header line only)."""
        held = {}
        for path in self._shares.glob(f"*{_SHARE_SUFFIX}"):
            with path.open("rb") as handle:
                held[path.name.removesuffix(_SHARE_SUFFIX)] = _HeldShare.model_validate_json(
                    handle.readline()
                ).sender
        return held

    def holds_own(self, update_id: str) -> bool:
        """Whether this holder keeps its own share of its own update ``update_id``."""
        path = self._share_path(validate_identifier(update_id, "update id"))
        if not path.exists():
            return False
        with path.open("rb") as handle:
            return _HeldShare.model_validate_json(handle.readline()).sender == self.identity

    def _share_path(self, update_id: str) -> Path:
        return self._shares / f"{update_id}{_SHARE_SUFFIX}"

    def _read(self, update_id: str) -> tuple[str, FieldVector]:
        header, _, data = self._share_path(update_id).read_bytes().partition(b"\n")
        meta = _HeldShare.model_validate_json(header)
        return meta.sender, from_bytes(data, self.length)

    # -- unmasking

    def answer(self, request: UnmaskRequest) -> UnmaskAnswer | UnmaskRefusal:
        """The weighted sum of our shares for ``request``, once its release is durable; or a
        refusal naming the rule it breaks."""
        reason = self._refusal(request)
        if reason is not None:
            log.warning("refusing to unmask fold %s: %s", request.fold_id, reason)
            return UnmaskRefusal(fold_id=request.fold_id, holder=self.identity, reason=reason)
        digest = sum_digest(request.fold_id, request.terms)
        ids = tuple(term.update_id for term in request.terms)
        if any(self._released.get(update_id) != digest for update_id in ids):
            self._log.write([_Release(fold_id=request.fold_id, digest=digest, update_ids=ids)])
            self._released.update(dict.fromkeys(ids, digest))
        shares = [self._read(update_id)[1] for update_id in ids]
        total = weighted_sum(shares, [term.weight for term in request.terms])
        return UnmaskAnswer(
            fold_id=request.fold_id, holder=self.identity, share_sum=to_bytes(total)
        )

    def _refusal(self, request: UnmaskRequest) -> str | None:
        if request.policy_digest != self._digest:
            return "the request is under another policy"
        held = self.held()
        wrong = [t.update_id for t in request.terms if held.get(t.update_id, t.sender) != t.sender]
        if wrong:
            return f"the request names the wrong sender for {', '.join(sorted(wrong))}"
        return release_refusal(
            request.fold_id,
            request.terms,
            held=held.keys(),
            released=self._released,
            min_contributors=self.policy.contributors,
        )
