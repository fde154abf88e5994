"""The heart-disease federation across a broker tree, as real processes: the aggregator on the core
Mosquitto, two hospitals on each of two regional Mosquittos bridged to it, every file from
`healthnet deploy init --regions`. It trains as far as on one broker, and a regional or the core
broker killed mid-run and restarted loses no update that was sent (nothing lost, nothing folded
twice). With `--regional-aggregators`, each region's aggregator combines its hospitals' updates
and the core folds the regions' combined updates: it trains as far, and a regional aggregator
SIGKILLed mid-run and restarted loses nothing and folds nothing twice."""

from __future__ import annotations

import json
import signal
import time
import uuid
from pathlib import Path

import pytest

from aggregator.regional_store import COMBINED_LOG_FILE, CombinedLogEntry
from common.jsonlog import read_json_lines
from devtools.chaos import evaluate_final
from devtools.reconcile import Reconciliation, load
from edge_node.sentlog import read_sent_log
from healthnet.federations import HEART_DISEASE
from healthnet.processes import ProcessGroup
from tests.regions import REGIONS, BrokerTree, broker_tree

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(300)]

# The demo's bar (tests/integration/test_federation.py); fault-free runs reach 0.77-0.80.
ACCURACY_BAR = 0.75
VERSIONS = 45


def versions_made(aggregator_dir: Path) -> int:
    path = aggregator_dir / "versions.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def wait_for_version(
    group: ProcessGroup, aggregator_dir: Path, version: int, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while versions_made(aggregator_dir) < version:
        if time.monotonic() > deadline or group.failed():
            tails = [p.tail() for p in group.processes.values()]
            raise AssertionError(f"v{version} not reached in {timeout:.0f}s: {tails}")
        time.sleep(0.3)


# With regional aggregators: each region combines its two hospitals' updates into one, and the
# core folds two regions' updates into a version: each version carries four hospitals' work, and
# each version's training makes about one version (with a core buffer of 1 it would make two, and
# staleness would grow through the run).
REGIONAL_BUFFER = 2
CORE_BUFFER_WITH_REGIONS = 2


def start_federation(
    tree: BrokerTree, group: ProcessGroup, workdir: Path, *, regional: bool = False
) -> Path:
    """The aggregator (against the core) and each hospital (against its region's broker), each
    configured by its own generated env file; with ``regional``, each region's aggregator too."""
    knobs = HEART_DISEASE.knobs
    model = HEART_DISEASE.model
    aggregator_dir = workdir / "aggregator"
    aggregator_args = [
        "aggregator", "run",
        "--state-dir", str(aggregator_dir),
        "--model", model.name,
        "--model-kwargs", json.dumps(model.kwargs),
        "--buffer-size", str(CORE_BUFFER_WITH_REGIONS if regional else knobs.buffer_size),
        "--max-staleness", str(knobs.max_staleness),
        "--epochs", str(knobs.training.epochs),
        "--batch-size", str(knobs.training.batch_size),
        "--lr", str(knobs.training.learning_rate),
        "--optimizer", knobs.training.optimizer,
        "--max-versions", str(VERSIONS),
        "--status-interval", "1",
    ]  # fmt: skip
    group.start("aggregator", aggregator_args, env=tree.env("aggregator"))
    if regional:
        for region in tree.spec.regions:
            start_regional(tree, group, workdir, region.name)
    for site in HEART_DISEASE.sites:
        node_args = [
            "node", "run",
            "--data", site.data,
            "--state-dir", str(workdir / site.node_id),
            "--torch-threads", "1",
            "--ack-timeout", "5",
            "--exit-when-stopped",
        ]  # fmt: skip
        group.start(site.node_id, node_args, env=tree.env(site.node_id))
    return aggregator_dir


def start_regional(tree: BrokerTree, group: ProcessGroup, workdir: Path, region: str) -> None:
    """Region ``region``'s aggregator against its broker, with its generated env file (started
    again, on the same state directory, after it was killed)."""
    identity = f"region-{region}"
    args = [
        "aggregator", "regional",
        "--state-dir", str(workdir / identity),
        "--buffer-size", str(REGIONAL_BUFFER),
        "--buffer-timeout", "10",
        "--ack-timeout", "5",
    ]  # fmt: skip
    group.start(identity, args, env=tree.env(identity))


def finish(
    group: ProcessGroup, aggregator_dir: Path, workdir: Path, *, regions: tuple[str, ...] = ()
) -> Reconciliation:
    """Wait for every process to exit cleanly; the reconciliation of what was sent and folded
    (through the regional aggregators of ``regions``, if any)."""
    assert group.wait_all(timeout=180), [p.tail() for p in group.processes.values()]
    assert group.failed() == [], [p.tail() for p in group.failed()]
    return load(
        aggregator_dir,
        {s.node_id: workdir / s.node_id for s in HEART_DISEASE.sites},
        {region: workdir / f"region-{region}" for region in regions},
    )


def assert_trained_and_nothing_lost(aggregator_dir: Path, result: Reconciliation) -> None:
    assert result.clean, result.to_json()
    assert result.lost == []
    assert result.double_folded == []
    assert result.versions == VERSIONS
    version, mean, _, per_node = evaluate_final(aggregator_dir, HEART_DISEASE)
    assert version == VERSIONS
    assert mean >= ACCURACY_BAR, per_node


def contributors_after(aggregator_dir: Path, version: int) -> set[str]:
    """The hospitals whose updates were folded into versions after ``version``."""
    nodes: set[str] = set()
    for line in (aggregator_dir / "versions.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["version"] > version:
            nodes.update(c["node"] for c in record["contributions"])
    return nodes


def test_a_federation_across_two_regions_trains_to_the_demos_accuracy(tmp_path: Path) -> None:
    """Every hospital's updates reach the core through its region's bridge and every version
    reaches every hospital: all four contribute, and the model is as accurate as the demo's."""
    with (
        broker_tree(tmp_path / "brokers", federation=f"rg{uuid.uuid4().hex[:8]}") as tree,
        ProcessGroup(tmp_path / "logs") as group,
    ):
        aggregator_dir = start_federation(tree, group, tmp_path)
        result = finish(group, aggregator_dir, tmp_path)
    assert_trained_and_nothing_lost(aggregator_dir, result)
    assert contributors_after(aggregator_dir, 0) == {s.node_id for s in HEART_DISEASE.sites}


@pytest.mark.parametrize(
    ("broker", "hospitals"),
    [
        pytest.param("eu", {"cleveland", "hungarian"}, id="regional"),
        pytest.param("core", {s.node_id for s in HEART_DISEASE.sites}, id="core"),
    ],
)
def test_a_broker_of_the_tree_killed_mid_run_loses_no_update(
    tmp_path: Path, broker: str, hospitals: set[str]
) -> None:
    """SIGKILL of a broker (its queues and anything unsaved gone) and a restart a few seconds
    later: region eu's broker, or the core with the aggregator's session and every bridge. The
    hospitals resend from their outboxes, the bridges reconnect with their backoff, every update
    sent is folded once or answered, and the hospitals behind the killed broker contribute to
    versions made after it came back."""
    with (
        broker_tree(tmp_path / "brokers", federation=f"rk{uuid.uuid4().hex[:8]}") as tree,
        ProcessGroup(tmp_path / "logs") as group,
    ):
        aggregator_dir = start_federation(tree, group, tmp_path)
        wait_for_version(group, aggregator_dir, 10, timeout=120)
        killed = tree.brokers[broker]
        killed.stop(signal.SIGKILL)
        killed_at = versions_made(aggregator_dir)
        time.sleep(3.0)
        killed.start()
        result = finish(group, aggregator_dir, tmp_path)
    assert_trained_and_nothing_lost(aggregator_dir, result)
    assert killed_at < VERSIONS, "the run ended before the broker was killed"
    assert hospitals <= contributors_after(aggregator_dir, killed_at)


def test_two_regional_aggregators_train_to_the_demos_accuracy(tmp_path: Path) -> None:
    """Each region's aggregator acks its hospitals and sends the core one update per two of
    theirs; the core folds only the regions' updates, every hospital's work reaches it, and the
    model is as accurate as the demo's."""
    with (
        broker_tree(
            tmp_path / "brokers", federation=f"ra{uuid.uuid4().hex[:8]}", regional_aggregators=True
        ) as tree,
        ProcessGroup(tmp_path / "logs") as group,
    ):
        aggregator_dir = start_federation(tree, group, tmp_path, regional=True)
        result = finish(group, aggregator_dir, tmp_path, regions=tuple(REGIONS))
    assert_trained_and_nothing_lost(aggregator_dir, result)
    assert contributors_after(aggregator_dir, 0) == {f"region-{r}" for r in REGIONS}
    # Every hospital's updates reached the core inside its region's combined updates.
    folded_from = {
        s.node_id
        for s in HEART_DISEASE.sites
        if any(
            c in combined_constituents(tmp_path / f"region-{r}")
            for r in REGIONS
            for c in sent_ids(tmp_path / s.node_id)
        )
    }
    assert folded_from == {s.node_id for s in HEART_DISEASE.sites}


def test_a_regional_aggregator_killed_mid_run_loses_no_update(tmp_path: Path) -> None:
    """SIGKILL of region eu's aggregator (its connection and anything unsaved gone) and a restart
    on the same state directory: the broker redelivers what it never acked, the hospitals
    resend what they were not acked, the outbox resends what the core did not ack; every update
    sent is folded once, answered, or still waiting, and eu contributes after the restart."""
    with (
        broker_tree(
            tmp_path / "brokers", federation=f"rx{uuid.uuid4().hex[:8]}", regional_aggregators=True
        ) as tree,
        ProcessGroup(tmp_path / "logs") as group,
    ):
        aggregator_dir = start_federation(tree, group, tmp_path, regional=True)
        wait_for_version(group, aggregator_dir, 10, timeout=120)
        # Kill it, if it comes within a few seconds, while an acked hospital update waits in
        # its write-ahead log: the restart must buffer it again.
        wal = tmp_path / "region-eu" / "wal"
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and not any(wal.glob("*.msg")):
            time.sleep(0.01)
        group["region-eu"].signal(signal.SIGKILL)
        assert group["region-eu"].wait(10) is not None
        killed_at = versions_made(aggregator_dir)
        time.sleep(2.0)
        start_regional(tree, group, tmp_path, "eu")
        result = finish(group, aggregator_dir, tmp_path, regions=tuple(REGIONS))
    assert_trained_and_nothing_lost(aggregator_dir, result)
    assert killed_at < VERSIONS, "the run ended before the regional aggregator was killed"
    assert "region-eu" in contributors_after(aggregator_dir, killed_at)


def test_a_regional_broker_killed_under_a_regional_aggregator_loses_no_update(
    tmp_path: Path,
) -> None:
    """SIGKILL of region eu's broker (the regional aggregator's session, the hospitals' unacked
    updates and the bridge's queues gone) and a restart a few seconds later: the regional
    aggregator reconnects and resends its outbox, the hospitals resend from theirs, and every
    update sent is folded once, answered, or still waiting."""
    with (
        broker_tree(
            tmp_path / "brokers", federation=f"rb{uuid.uuid4().hex[:8]}", regional_aggregators=True
        ) as tree,
        ProcessGroup(tmp_path / "logs") as group,
    ):
        aggregator_dir = start_federation(tree, group, tmp_path, regional=True)
        wait_for_version(group, aggregator_dir, 10, timeout=120)
        broker = tree.brokers["eu"]
        broker.stop(signal.SIGKILL)
        killed_at = versions_made(aggregator_dir)
        time.sleep(3.0)
        broker.start()
        result = finish(group, aggregator_dir, tmp_path, regions=tuple(REGIONS))
    assert_trained_and_nothing_lost(aggregator_dir, result)
    assert killed_at < VERSIONS, "the run ended before the broker was killed"
    assert "region-eu" in contributors_after(aggregator_dir, killed_at)


def sent_ids(node_dir: Path) -> set[str]:
    return {e.update_id for e in read_sent_log(node_dir)}


def combined_constituents(regional_dir: Path) -> set[str]:
    return {
        uid
        for entry in read_json_lines(regional_dir / COMBINED_LOG_FILE, CombinedLogEntry)
        for uid in entry.constituents
    }
