"""The versions' hash chain: digests of version records, and the check that a chain is unbroken.

Theory of operation. When the aggregator commits a version it seals the record (:func:`seal`):
the record names the digest of the previous version's record (``parent_digest``), the digest of
the contributions it folds (``updates_digest``: node, update id, base version, staleness, weight,
bytes of every folded update) and the sha256 of its model blob as broadcast (``model_sha256``,
the manifest's). A record's digest is the sha256 of its canonical JSON, which covers
``parent_digest``, so changing any earlier record changes every digest after it. Given the records
from the first version to version N and version N's blob, anyone can check offline that the blob
is the one the run published as version N and which updates made each version before it
(:func:`verify_chain`).

The canonical JSON leaves out fields at their default value, so that a field added to the record
later (with a default) does not change the digests of records written before it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence

from common.errors import IntegrityError
from common.messages import Contribution, VersionRecord

__all__ = ["contributions_digest", "record_digest", "seal", "verify_chain"]


def _canonical(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def record_digest(record: VersionRecord) -> str:
    """The sha256 of the record's canonical JSON (fields at their defaults left out)."""
    return hashlib.sha256(
        _canonical(record.model_dump(mode="json", exclude_defaults=True))
    ).hexdigest()


def contributions_digest(contributions: Iterable[Contribution]) -> str:
    """The sha256 of the folded updates as the record names them, in folding order."""
    items = [c.model_dump(mode="json", exclude_defaults=True) for c in contributions]
    return hashlib.sha256(_canonical(items)).hexdigest()


def seal(record: VersionRecord, *, parent: str | None, model_sha256: str) -> VersionRecord:
    """``record`` with its chain fields: its parent's digest, its updates' and its model's."""
    return record.model_copy(
        update={
            "parent_digest": parent,
            "updates_digest": contributions_digest(record.contributions),
            "model_sha256": model_sha256,
        }
    )


def verify_chain(records: Sequence[VersionRecord], *, model_sha256: str | None = None) -> str:
    """Check that ``records`` (oldest first, consecutive versions of one run) form an unbroken
    chain, and that the last one names ``model_sha256`` when given; returns the last digest.

    Raises :class:`IntegrityError` naming the first version at fault. A record written before the
    chain existed (no ``updates_digest``) cannot be checked, so the chain must start after it:
    only the first record of ``records`` may lack its parent's digest.
    """
    if not records:
        raise IntegrityError("no version records to verify")
    previous: VersionRecord | None = None
    for record in records:
        where = f"run {record.run_id} v{record.version}"
        if record.updates_digest is None or record.model_sha256 is None:
            raise IntegrityError(
                f"{where}: the record carries no digests (written before the chain)"
            )
        if record.updates_digest != contributions_digest(record.contributions):
            raise IntegrityError(f"{where}: its contributions do not match its updates digest")
        if previous is not None:
            if record.run_id != previous.run_id or record.version != previous.version + 1:
                raise IntegrityError(
                    f"{where} does not follow run {previous.run_id} v{previous.version}"
                )
            if record.parent_digest != record_digest(previous):
                raise IntegrityError(
                    f"{where}: its parent digest is not the digest of v{previous.version}'s record"
                )
        elif record.version == 1 and record.parent_digest is not None:
            raise IntegrityError(f"{where}: the first version names a parent")
        previous = record
    last = records[-1]
    if model_sha256 is not None and last.model_sha256 != model_sha256:
        raise IntegrityError(
            f"run {last.run_id} v{last.version}: the model's sha256 {model_sha256[:12]}… "
            f"is not the {str(last.model_sha256)[:12]}… its record names"
        )
    return record_digest(last)
