"""Specification of reconciliation: what counts as lost, double folded, or merely rejected."""

from __future__ import annotations

from aggregator.update_log import UpdateEvent, UpdateLogEntry
from common.messages import Contribution, VersionRecord
from devtools.reconcile import NodeRecords, RegionRecords, reconcile
from edge_node.sentlog import SentEntry, SentEvent


def sent(*ids: str, base: int = 0) -> tuple[SentEntry, ...]:
    return tuple(
        SentEntry(event=SentEvent.QUEUED, at=1.0, update_id=i, run_id="r", base_version=base)
        for i in ids
    )


def record(version: int, *ids: str) -> VersionRecord:
    return VersionRecord(
        run_id="r",
        version=version,
        created_at=1.0,
        contributions=tuple(
            Contribution(
                node="a",
                update_id=i,
                base_version=0,
                staleness=0,
                num_samples=1,
                staleness_factor=1.0,
                weight=1.0,
                bytes=10,
                train_loss=0.1,
            )
            for i in ids
        ),
        update_norm=0.0,
        train_loss=0.1,
        fold_seconds=0.0,
        reason="buffer_full",
    )


def line(
    event: UpdateEvent, update_id: str, version: int = 0, reason: str | None = None
) -> UpdateLogEntry:
    return UpdateLogEntry(
        event=event, at=1.0, node="a", update_id=update_id, version=version, reason=reason
    )


def folded(version: int, *ids: str) -> list[UpdateLogEntry]:
    return [line(UpdateEvent.FOLDED, i, version) for i in ids]


def test_a_clean_run_has_nothing_lost_or_folded_twice() -> None:
    """Every sent id folded once, in the update log and the versions log alike: clean."""
    result = reconcile(
        [NodeRecords("a", sent("u1", "u2", "u3", "u4"), ())],
        [record(1, "u1", "u2"), record(2, "u3", "u4")],
        [*folded(1, "u1", "u2"), *folded(2, "u3", "u4")],
    )
    assert result.clean
    assert (result.updates_sent, result.updates_folded, result.versions) == (4, 4, 2)


def test_an_update_sent_and_never_answered_is_lost_unless_still_in_an_outbox() -> None:
    """Not folded, not rejected: lost; the same id waiting in its node's outbox is not lost."""
    lost = reconcile([NodeRecords("a", sent("u1", "u2"), ())], [record(1, "u1")], folded(1, "u1"))
    assert lost.lost == ["u2"]
    assert not lost.clean
    waiting = reconcile(
        [NodeRecords("a", sent("u1", "u2"), ("u2",))], [record(1, "u1")], folded(1, "u1")
    )
    assert (waiting.lost, waiting.still_in_outbox) == ([], ["u2"])


def test_a_rejected_update_is_answered_not_lost() -> None:
    """A rejection is the node's answer: counted by reason, not lost."""
    result = reconcile(
        [NodeRecords("a", sent("u1", "u2"), ())],
        [record(1, "u1")],
        [*folded(1, "u1"), line(UpdateEvent.REJECTED, "u2", reason="stale")],
    )
    assert (result.lost, result.updates_rejected, result.rejections) == ([], 1, {"stale": 1})


def test_an_update_in_two_versions_is_double_folded() -> None:
    """The same id in two version records is reported, whatever the update log says."""
    result = reconcile(
        [NodeRecords("a", sent("u1", "u2"), ())],
        [record(1, "u1"), record(2, "u1", "u2")],
        [*folded(1, "u1"), *folded(2, "u2")],
    )
    assert result.double_folded == ["u1"]
    assert result.ledger_disagrees == ["u1"]


def test_gaps_in_versions_and_twice_trained_bases_are_reported() -> None:
    """Versions 1, 3 are not contiguous; two updates from one base version are flagged."""
    result = reconcile(
        [NodeRecords("a", sent("u1", "u2", base=4), ())],
        [record(1, "u1"), record(3, "u2")],
        [*folded(1, "u1"), *folded(3, "u2")],
    )
    assert not result.versions_contiguous
    assert result.same_base_twice == ["a@r/v4"]


def test_a_discarded_update_is_its_own_category_neither_rejected_nor_lost() -> None:
    """Accepted, then discarded with its batch: counted as discarded, not rejected, not lost."""
    result = reconcile(
        [NodeRecords("a", sent("u1", "u2", "u3"), ())],
        [record(1, "u1")],
        [
            *folded(1, "u1"),
            line(UpdateEvent.ACCEPTED, "u2"),
            line(UpdateEvent.DISCARDED, "u2", reason="discarded"),
            line(UpdateEvent.REJECTED, "u3", reason="stale"),
        ],
    )
    assert (result.updates_discarded, result.updates_rejected, result.lost) == (1, 1, [])
    assert result.rejections == {"stale": 1}
    assert result.to_json()["updates_discarded"] == 1


# -- through regional aggregators


def region(
    combined: dict[str, tuple[str, ...]],
    ledger: list[UpdateLogEntry] | None = None,
    waiting: frozenset[str] = frozenset(),
) -> RegionRecords:
    return RegionRecords("eu", combined, tuple(ledger or ()), waiting)


def test_a_hospital_update_is_folded_where_its_combined_update_was() -> None:
    """The core folded c1, which carried u1 and u2: both are folded, nothing lost."""
    result = reconcile(
        [NodeRecords("a", sent("u1", "u2"), ())],
        [record(1, "c1")],
        folded(1, "c1"),
        [region({"c1": ("u1", "u2")})],
    )
    assert result.clean, result.to_json()
    assert result.updates_folded == 2


def test_a_combined_update_folded_twice_folds_each_of_its_updates_twice() -> None:
    result = reconcile(
        [NodeRecords("a", sent("u1"), ())],
        [record(1, "c1"), record(2, "c1")],
        [*folded(1, "c1"), *folded(2, "c1")],
        [region({"c1": ("u1",)})],
    )
    assert result.double_folded == ["u1"]
    assert not result.clean


def test_an_update_waiting_in_the_region_is_not_lost_and_one_nowhere_is() -> None:
    """u2 is in the region's WAL (or its combined update in the region's outbox): waiting;
    u3 reached no one: lost."""
    result = reconcile(
        [NodeRecords("a", sent("u1", "u2", "u3"), ())],
        [record(1, "c1")],
        folded(1, "c1"),
        [region({"c1": ("u1",)}, waiting=frozenset({"u2"}))],
    )
    assert result.lost == ["u3"]
    assert result.still_in_region == ["u2"]


def test_refusals_by_the_region_or_of_the_combined_update_are_answers() -> None:
    """The region refused u2; the core refused c1, which carried u1: both rejected, not lost."""
    result = reconcile(
        [NodeRecords("a", sent("u1", "u2"), ())],
        [],
        [line(UpdateEvent.REJECTED, "c1", reason="stale")],
        [
            region(
                {"c1": ("u1",)},
                ledger=[
                    line(UpdateEvent.ACCEPTED, "u1"),
                    line(UpdateEvent.REJECTED, "u2", reason="too_large"),
                ],
            )
        ],
    )
    assert result.clean, result.to_json()
    assert result.lost == []
    assert result.rejections == {"stale": 1, "too_large": 1}


def test_an_update_accepted_and_never_folded_is_buffered_at_stop_not_lost() -> None:
    """Accepted and still in the aggregator's buffer when the run stopped: counted apart, with
    how many hospitals it came from; sent and never accepted stays lost."""
    result = reconcile(
        [NodeRecords("a", sent("u1", "u2", "u3"), ())],
        [record(1, "u1")],
        [
            line(UpdateEvent.ACCEPTED, "u1"),
            line(UpdateEvent.ACCEPTED, "u2"),
            *folded(1, "u1"),
        ],
    )
    assert (result.buffered_at_stop, result.buffered_hospitals) == (["u2"], 1)
    assert result.lost == ["u3"]
