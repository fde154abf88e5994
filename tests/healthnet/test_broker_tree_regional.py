"""A broker tree from `healthnet deploy init --regions ... --regional-aggregators`, run as real
Mosquittos: a hospital's update stops at its region's aggregator, the regional aggregator's own
update reaches the core and its ack comes back, and no hospital can pose as its region.

As in tests/healthnet/test_broker_tree.py, a denial is a probe that never arrives while, in the
same test, the permitted path delivers.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from common.topics import TopicTree
from tests.healthnet.test_broker_tree import QUIET, WAIT, probe, received
from tests.regions import BrokerTree, broker_tree

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerTree]:
    root = tmp_path_factory.mktemp("regional-tree")
    federation = f"rt{uuid.uuid4().hex[:8]}"
    with broker_tree(root, federation=federation, regional_aggregators=True) as running:
        yield running


def test_a_hospitals_update_reaches_its_regional_aggregator_and_not_the_core(
    tree: BrokerTree,
) -> None:
    """cleveland's update goes to region-eu on eu's broker, and region-eu's ack to cleveland;
    the bridge no longer carries the update up, so the core aggregator never sees it twice."""
    topics = TopicTree(tree.federation)
    with (
        tree.client("aggregator") as aggregator,
        tree.client("region-eu") as regional,
        tree.client("cleveland") as hospital,
    ):
        aggregator.subscribe(topics.all_updates())
        regional.subscribe(topics.all_updates())
        hospital.subscribe(topics.ack("cleveland"))
        assert probe(regional, hospital, topics.update("cleveland"))
        assert received(aggregator, topics.update("cleveland"), QUIET) is None
        assert probe(hospital, regional, topics.ack("cleveland"))


def test_the_regional_aggregators_update_goes_up_and_the_cores_ack_comes_down(
    tree: BrokerTree,
) -> None:
    topics = TopicTree(tree.federation)
    with tree.client("aggregator") as aggregator, tree.client("region-us") as regional:
        aggregator.subscribe(topics.all_updates())
        regional.subscribe(topics.ack("region-us"))
        assert probe(aggregator, regional, topics.update("region-us"))
        assert probe(regional, aggregator, topics.ack("region-us"))


def test_no_hospital_may_pose_as_its_region_and_no_region_reads_another(
    tree: BrokerTree,
) -> None:
    """hungarian cannot publish its region's combined update nor read its region's acks;
    region-eu dialling us's broker reads none of us's updates."""
    topics = TopicTree(tree.federation)
    with (
        tree.client("aggregator") as aggregator,
        tree.client("hungarian") as hospital,
        tree.client("region-eu") as regional,
    ):
        aggregator.subscribe(topics.all_updates())
        hospital.subscribe(topics.ack("region-eu"))
        hospital.publish(topics.update("region-eu"), b"forged", wait=WAIT)
        assert received(aggregator, topics.update("region-eu"), QUIET) is None
        aggregator.publish(topics.ack("region-eu"), b"for the region only", wait=WAIT)
        assert received(hospital, topics.ack("region-eu"), QUIET) is None
        # The rightful path delivers, on the same subscriptions.
        assert probe(aggregator, regional, topics.update("region-eu"))
    with (
        tree.client("region-eu", broker="us") as intruder,
        tree.client("region-us") as regional,
        tree.client("va") as hospital,
    ):
        intruder.subscribe(topics.all_updates())
        regional.subscribe(topics.all_updates())
        assert probe(regional, hospital, topics.update("va"))
        assert received(intruder, topics.update("va"), QUIET) is None
