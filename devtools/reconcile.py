"""Reconcile what the nodes sent with what the aggregator folded: lost and double-folded updates.

Three records are compared, each written durably by its owner:

* every node's sent log (``sent.jsonl``): the ids of the updates it made, and its outbox of those
  still unacked;
* the aggregator's ``versions.jsonl``: which update ids made each version;
* the aggregator's update log (``ledger.jsonl``): every verdict, and the version each update
  was folded into.

An update is **lost** when a node sent it and it was neither folded nor rejected (a rejection is
an answer: the node was told) nor discarded, and it is not waiting in the node's outbox either.
**Discarded** updates were accepted and then dropped with a batch that could not become a version
(the aggregator told their nodes): a category of its own, neither rejected nor lost, and a run
without attacks should have none. It is **double
folded** when it appears in two versions. The update log and ``versions.jsonl`` must tell the same
story; where they do not, the ids are listed. :func:`reconcile` is pure; :func:`load` reads the
files.

Across regional aggregators (:mod:`aggregator.regional_service`) the core folds combined updates,
not the hospitals' own. Each region's records (:class:`RegionRecords`: its ``combined.jsonl``,
its update log and what its write-ahead log and outbox still hold) map a hospital's update to
the combined update that carried it: the hospital's update is folded in the versions that folded
its combined update, rejected if the region refused it or the core refused its combined update,
and **waiting in the region** (neither lost nor folded) while it is in the region's write-ahead
log or its combined update is in the region's outbox. It is double folded if it reached the core
twice (in two combined updates, or itself and in a combined one) or its combined update was
folded twice.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from aggregator.regional_store import COMBINED_LOG_FILE, CombinedEvent, CombinedLogEntry
from aggregator.store import StateStore
from aggregator.update_log import UpdateEvent, UpdateLogEntry, read_update_log, update_fates
from common.jsonlog import read_json_lines
from common.messages import VersionRecord
from common.outbox import Outbox
from edge_node.sentlog import SentEntry, SentEvent, read_sent_log

__all__ = ["NodeRecords", "Reconciliation", "RegionRecords", "load", "load_region", "reconcile"]


@dataclass(frozen=True, slots=True)
class NodeRecords:
    node: str
    sent: tuple[SentEntry, ...]
    outbox: tuple[str, ...]  # ids still unacked when the records were read


@dataclass(frozen=True, slots=True)
class RegionRecords:
    """One regional aggregator's records: ``combined`` maps each combined update to the
    hospital updates it carried; ``waiting`` is what its write-ahead log holds uncombined and
    what its outbox holds combined (both by hospital update id)."""

    region: str
    combined: Mapping[str, tuple[str, ...]]
    ledger: tuple[UpdateLogEntry, ...]
    waiting: frozenset[str]


@dataclass(frozen=True, slots=True)
class Reconciliation:
    updates_sent: int
    updates_folded: int
    updates_rejected: int
    updates_discarded: int
    rejections: dict[str, int]
    duplicates: int
    versions: int
    versions_contiguous: bool
    lost: list[str] = field(default_factory=list)
    double_folded: list[str] = field(default_factory=list)
    still_in_outbox: list[str] = field(default_factory=list)
    folded_not_sent: list[str] = field(default_factory=list)
    ledger_disagrees: list[str] = field(default_factory=list)
    # (node, run, base version) with more than one update: a restart that trained twice.
    same_base_twice: list[str] = field(default_factory=list)
    # Accepted by a regional aggregator and not yet folded: in its WAL or its outbox.
    still_in_region: list[str] = field(default_factory=list)
    # Accepted, neither folded, rejected nor discarded when the run stopped: still in the
    # aggregator's buffer (its write-ahead log), and from how many distinct hospitals.
    buffered_at_stop: list[str] = field(default_factory=list)
    buffered_hospitals: int = 0

    @property
    def clean(self) -> bool:
        """Nothing lost, nothing folded twice, and the logs agree."""
        return not (
            self.lost
            or self.double_folded
            or self.folded_not_sent
            or self.ledger_disagrees
            or not self.versions_contiguous
        )

    def to_json(self) -> dict[str, object]:
        return {
            "updates_sent": self.updates_sent,
            "updates_folded": self.updates_folded,
            "updates_rejected": self.updates_rejected,
            "updates_discarded": self.updates_discarded,
            "rejections": self.rejections,
            "duplicates": self.duplicates,
            "versions": self.versions,
            "versions_contiguous": self.versions_contiguous,
            "lost": len(self.lost),
            "double_folded": len(self.double_folded),
            "still_in_outbox": len(self.still_in_outbox),
            "folded_not_sent": len(self.folded_not_sent),
            "ledger_disagrees": len(self.ledger_disagrees),
            "same_base_twice": len(self.same_base_twice),
            "still_in_region": len(self.still_in_region),
            "buffered_at_stop": len(self.buffered_at_stop),
            "buffered_hospitals": self.buffered_hospitals,
            "lost_ids": self.lost[:20],
            "double_folded_ids": self.double_folded[:20],
        }


def reconcile(
    nodes: Sequence[NodeRecords],
    versions: Sequence[VersionRecord],
    ledger: Iterable[UpdateLogEntry],
    regions: Sequence[RegionRecords] = (),
) -> Reconciliation:
    """Compare the nodes' records with the aggregator's, through the regions' if any (pure)."""
    sent, bases = _sent(nodes)
    in_outbox = {uid for records in nodes for uid in records.outbox}

    folded_in: dict[str, list[int]] = {}
    for record in versions:
        for contribution in record.contributions:
            folded_in.setdefault(contribution.update_id, []).append(record.version)
    numbers = [record.version for record in versions]

    entries = list(ledger)
    fates = update_fates(entries)
    ledger_folds = {uid: sorted(f.folded_into) for uid, f in fates.items() if f.folded}
    disagree = sorted(
        uid
        for uid in set(ledger_folds) | set(folded_in)
        if ledger_folds.get(uid) != sorted(set(folded_in.get(uid, [])))
    )
    last_rejection = {uid: f.rejections[-1] for uid, f in fates.items() if f.rejected}
    discarded = {uid for uid, f in fates.items() if f.discarded and not f.folded}

    # Through the regions: a combined update that reached the core stands for its constituents.
    carried, waiting, refused_by_region = _through_regions(regions)
    combined_ids = {c for cs in carried.values() for c in cs}
    reached: dict[str, list[int]] = {
        uid: list(folds) for uid, folds in folded_in.items() if uid not in combined_ids
    }
    for uid, combined in carried.items():
        for cid in combined:
            if cid in folded_in:
                reached.setdefault(uid, []).extend(folded_in[cid])
            if cid in last_rejection:
                last_rejection[uid] = last_rejection[cid]
            if cid in discarded:
                discarded.add(uid)
    last_rejection.update(refused_by_region)
    rejected = set(last_rejection)
    rejections = Counter(last_rejection[uid] for uid in rejected if uid in sent)

    held = {
        uid: f.node
        for uid, f in fates.items()
        if uid in sent and f.accepted and not (f.folded or f.rejected or f.discarded)
    }
    lost = sorted(
        uid
        for uid in sent
        if uid not in reached
        and uid not in rejected
        and uid not in discarded
        and uid not in in_outbox
        and uid not in waiting
        and uid not in held
    )
    return Reconciliation(
        updates_sent=len(sent),
        updates_folded=len(reached),
        updates_rejected=len(rejected & set(sent)),
        updates_discarded=len(discarded & set(sent)),
        rejections=dict(rejections),
        duplicates=sum(1 for e in entries if e.event is UpdateEvent.DUPLICATE)
        + sum(1 for r in regions for e in r.ledger if e.event is UpdateEvent.DUPLICATE),
        versions=len(numbers),
        versions_contiguous=numbers == list(range(1, len(numbers) + 1)),
        lost=lost,
        double_folded=sorted(uid for uid, vs in reached.items() if len(vs) > 1),
        still_in_outbox=sorted(in_outbox),
        folded_not_sent=sorted(uid for uid in reached if uid not in sent),
        ledger_disagrees=disagree,
        same_base_twice=sorted(
            f"{node}@{run}/v{base}" for (node, run, base), n in bases.items() if n > 1
        ),
        still_in_region=sorted(waiting - set(reached)),
        buffered_at_stop=sorted(held),
        buffered_hospitals=len(set(held.values())),
    )


def _sent(
    nodes: Sequence[NodeRecords],
) -> tuple[dict[str, str], Counter[tuple[str, str | None, int | None]]]:
    """Every update a node made (by id, its node) and how many each (node, run, base) made."""
    sent: dict[str, str] = {}
    bases: Counter[tuple[str, str | None, int | None]] = Counter()
    for records in nodes:
        for entry in records.sent:
            if entry.event is SentEvent.QUEUED and entry.update_id not in sent:
                sent[entry.update_id] = records.node
                bases[(records.node, entry.run_id, entry.base_version)] += 1
    return sent, bases


def _through_regions(
    regions: Sequence[RegionRecords],
) -> tuple[dict[str, list[str]], set[str], dict[str, str]]:
    """Across the regions: the combined updates that carried each hospital update, what the
    regions still hold, and the hospital updates a region refused (with the reason)."""
    carried: dict[str, list[str]] = {}
    waiting: set[str] = set()
    refused: dict[str, str] = {}
    for region in regions:
        for combined, constituents in region.combined.items():
            for uid in constituents:
                carried.setdefault(uid, []).append(combined)
        waiting |= region.waiting
        for uid, fate in update_fates(region.ledger).items():
            if fate.rejected and not fate.accepted:
                refused[uid] = fate.rejections[-1]
    return carried, waiting, {u: r for u, r in refused.items() if u not in carried}


def load_region(region: str, directory: Path) -> RegionRecords:
    """A regional aggregator's records from its state directory."""
    combined: dict[str, tuple[str, ...]] = {}
    acked: set[str] = set()
    for entry in read_json_lines(directory / COMBINED_LOG_FILE, CombinedLogEntry):
        if entry.event is CombinedEvent.COMBINED:
            combined[entry.update_id] = entry.constituents
        else:
            acked.add(entry.update_id)
    waiting = {e.update_id for e in StateStore(directory).wal_entries()}
    outbox = directory / "outbox"
    if outbox.is_dir():
        for cid in Outbox(outbox).ids():
            if cid not in acked:
                waiting.update(combined.get(cid, ()))
    return RegionRecords(
        region=region,
        combined=combined,
        ledger=tuple(read_update_log(directory)),
        waiting=frozenset(waiting),
    )


def load(
    aggregator_dir: Path,
    node_dirs: Mapping[str, Path],
    regional_dirs: Mapping[str, Path] | None = None,
) -> Reconciliation:
    """Read the records from an aggregator state dir, the nodes' state dirs and the regional
    aggregators' (by region), and reconcile."""
    nodes = [
        NodeRecords(
            node=node,
            sent=tuple(read_sent_log(directory)),
            outbox=tuple(Outbox(directory / "outbox").ids())
            if (directory / "outbox").is_dir()
            else (),
        )
        for node, directory in node_dirs.items()
    ]
    versions = list(read_json_lines(aggregator_dir / "versions.jsonl", VersionRecord))
    regions = [load_region(name, path) for name, path in (regional_dirs or {}).items()]
    return reconcile(nodes, versions, read_update_log(aggregator_dir), regions)
