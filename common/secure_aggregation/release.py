"""The rules a share holder enforces before it releases a weighted sum of its shares.

Theory of operation (docs/secure-aggregation.md#message-flow). An unmask request names a fold id
and its terms: each update's id, sender and integer weight. The holder answers only when

- the terms come from at least ``min_contributors`` distinct hospitals, every update at most once
  and every weight in ``[1, p)``;
- it holds a share of every update in the terms;
- no update in the terms was released before in a different sum. The same request again (same
  fold id, same terms) is allowed: it is how an aggregator that crashed between asking and
  folding recovers, and the answer is the same bytes.

Each release is identified by :func:`sum_digest`. The caller records ``update id -> digest``
durably *before* it answers; :func:`release_refusal` reads that record. Pure: no I/O.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from common.secure_aggregation.field import PRIME

__all__ = ["Term", "minimum_contributors", "release_refusal", "sum_digest"]


@dataclass(frozen=True, slots=True)
class Term:
    """One update of a sum: its id, its sender and its integer weight."""

    update_id: str
    sender: str
    weight: int


def minimum_contributors(privacy: int, buffer_size: int = 0) -> int:
    """The fewest distinct hospitals a sum may hold: at least two that do not collude with the
    ``privacy`` (T) who may, and never fewer than the policy's buffer size asks."""
    return max(2, privacy + 2, buffer_size)


def sum_digest(fold_id: str, terms: Sequence[Term]) -> str:
    """A name for one sum: the fold id and its terms, in order."""
    digest = hashlib.sha256(fold_id.encode())
    for term in terms:
        for part in (term.update_id, term.sender, str(term.weight)):
            digest.update(len(part).to_bytes(4, "big") + part.encode())
    return digest.hexdigest()


def release_refusal(
    fold_id: str,
    terms: Sequence[Term],
    *,
    held: Collection[str],
    released: Mapping[str, str],
    min_contributors: int,
) -> str | None:
    """Why this holder must not answer the request, or None when it may."""
    ids = [term.update_id for term in terms]
    if len(set(ids)) != len(ids):
        return "an update appears twice in the sum"
    if any(not 1 <= term.weight < PRIME for term in terms):
        return "a weight is outside [1, p)"
    senders = {term.sender for term in terms}
    if len(senders) < min_contributors:
        return f"the sum holds {len(senders)} distinct hospitals, fewer than {min_contributors}"
    missing = [update_id for update_id in ids if update_id not in held]
    if missing:
        return f"no share held for {', '.join(sorted(missing))}"
    digest = sum_digest(fold_id, terms)
    reused = sorted(u for u in ids if released.get(u, digest) != digest)
    if reused:
        return f"already released in another sum: {', '.join(reused)}"
    return None
