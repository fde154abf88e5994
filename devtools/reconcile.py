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
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from aggregator.update_log import UpdateEvent, UpdateLogEntry, read_update_log, update_fates
from common.jsonlog import read_json_lines
from common.messages import VersionRecord
from common.outbox import Outbox
from edge_node.sentlog import SentEntry, SentEvent, read_sent_log

__all__ = ["NodeRecords", "Reconciliation", "load", "reconcile"]


@dataclass(frozen=True, slots=True)
class NodeRecords:
    node: str
    sent: tuple[SentEntry, ...]
    outbox: tuple[str, ...]  # ids still unacked when the records were read


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
            "buffered_at_stop": len(self.buffered_at_stop),
            "buffered_hospitals": self.buffered_hospitals,
            "lost_ids": self.lost[:20],
            "double_folded_ids": self.double_folded[:20],
        }


def reconcile(
    nodes: Sequence[NodeRecords],
    versions: Sequence[VersionRecord],
    ledger: Iterable[UpdateLogEntry],
) -> Reconciliation:
    """Compare the nodes' records with the aggregator's (pure)."""
    sent: dict[str, str] = {}
    bases: Counter[tuple[str, str | None, int | None]] = Counter()
    for records in nodes:
        for entry in records.sent:
            if entry.event is SentEvent.QUEUED and entry.update_id not in sent:
                sent[entry.update_id] = records.node
                bases[(records.node, entry.run_id, entry.base_version)] += 1
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
    rejected = {uid for uid, f in fates.items() if f.rejected}
    discarded = {uid for uid, f in fates.items() if f.discarded and not f.folded}
    rejections = Counter(fates[uid].rejections[-1] for uid in rejected if uid in sent)

    held = {
        uid: f.node
        for uid, f in fates.items()
        if uid in sent and f.accepted and not (f.folded or f.rejected or f.discarded)
    }
    lost = sorted(
        uid
        for uid in sent
        if uid not in folded_in
        and uid not in rejected
        and uid not in discarded
        and uid not in in_outbox
        and uid not in held
    )
    return Reconciliation(
        updates_sent=len(sent),
        updates_folded=len(folded_in),
        updates_rejected=len(rejected & set(sent)),
        updates_discarded=len(discarded & set(sent)),
        rejections=dict(rejections),
        duplicates=sum(1 for e in entries if e.event is UpdateEvent.DUPLICATE),
        versions=len(numbers),
        versions_contiguous=numbers == list(range(1, len(numbers) + 1)),
        lost=lost,
        double_folded=sorted(uid for uid, vs in folded_in.items() if len(vs) > 1),
        still_in_outbox=sorted(in_outbox),
        folded_not_sent=sorted(uid for uid in folded_in if uid not in sent),
        ledger_disagrees=disagree,
        same_base_twice=sorted(
            f"{node}@{run}/v{base}" for (node, run, base), n in bases.items() if n > 1
        ),
        buffered_at_stop=sorted(held),
        buffered_hospitals=len(set(held.values())),
    )


def load(aggregator_dir: Path, node_dirs: Mapping[str, Path]) -> Reconciliation:
    """Read the records from an aggregator state dir and the nodes' state dirs, and reconcile."""
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
    return reconcile(nodes, versions, read_update_log(aggregator_dir))
