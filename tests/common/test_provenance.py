"""Specification of the versions' hash chain: digests of records and the check of a chain."""

from __future__ import annotations

import pytest

from common.errors import IntegrityError
from common.messages import Contribution, VersionRecord
from common.provenance import contributions_digest, record_digest, seal, verify_chain

MODEL_SHA = "ab" * 32


def record(version: int, node: str = "a") -> VersionRecord:
    contribution = Contribution(
        node=node,
        update_id=f"u{version}",
        base_version=version - 1,
        staleness=0,
        num_samples=10,
        staleness_factor=1.0,
        weight=10.0,
        bytes=100,
        train_loss=0.5,
    )
    return VersionRecord(
        run_id="run-1",
        version=version,
        created_at=float(version),
        contributions=(contribution,),
        update_norm=0.1,
        train_loss=0.5,
        fold_seconds=0.01,
        reason="buffer_full",
    )


def chain(length: int) -> list[VersionRecord]:
    records: list[VersionRecord] = []
    for version in range(1, length + 1):
        parent = record_digest(records[-1]) if records else None
        sha = f"{version:064x}"
        records.append(seal(record(version), parent=parent, model_sha256=sha))
    return records


def test_an_unbroken_chain_verifies_and_returns_the_last_records_digest() -> None:
    """A chain sealed version by version verifies, and ends at the digest of its last record."""
    records = chain(4)
    assert verify_chain(records, model_sha256=f"{4:064x}") == record_digest(records[-1])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        pytest.param(lambda r: r.model_copy(update={"update_norm": 9.0}), "parent", id="record"),
        pytest.param(
            lambda r: r.model_copy(update={"contributions": (record(2, node="b").contributions)}),
            "contributions",
            id="contributions",
        ),
        pytest.param(
            lambda r: r.model_copy(update={"parent_digest": "0" * 64}), "parent", id="parent-digest"
        ),
    ],
)
def test_a_changed_record_breaks_the_chain(change: object, message: str) -> None:
    """Editing any field of an earlier record, its folded updates or its parent link is refused."""
    records = chain(4)
    records[1] = change(records[1])  # type: ignore[operator]
    with pytest.raises(IntegrityError, match=message):
        verify_chain(records)


def test_a_model_that_is_not_the_one_the_record_names_is_refused() -> None:
    """The last record's model sha256 must be the pulled blob's."""
    with pytest.raises(IntegrityError, match="sha256"):
        verify_chain(chain(3), model_sha256="cd" * 32)


def test_a_gap_in_the_versions_is_refused() -> None:
    """A chain with a version missing does not verify, even if each record is intact."""
    records = chain(4)
    with pytest.raises(IntegrityError, match="does not follow"):
        verify_chain([records[0], records[2], records[3]])


def test_records_without_the_chain_are_refused() -> None:
    """A record written before the chain existed cannot be verified, and says so."""
    with pytest.raises(IntegrityError, match="no digests"):
        verify_chain([record(1)])


def test_a_default_valued_field_does_not_change_the_digest() -> None:
    """Fields at their defaults are left out of the digest, so a record logged before a new field
    existed keeps its digest when read back with it."""
    sealed = chain(1)[0]
    dumped = sealed.model_dump(mode="json")
    del dumped["contributions"][0]["raw_bytes"]  # as if written before raw_bytes existed
    assert record_digest(VersionRecord.model_validate(dumped)) == record_digest(sealed)
    assert sealed.updates_digest == contributions_digest(sealed.contributions)
