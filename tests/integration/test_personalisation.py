"""A heart-disease federation with personalisation on, as real processes on Mosquitto: every
hospital reports its global and personal accuracy per version, keeps its personal model in its
state dir, and a restarted hospital resumes it."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from common.messages import Personalisation, PersonalisationMethod
from common.settings import ConnectionSettings
from edge_node.personal_store import read_personal
from edge_node.settings import NodeSettings
from healthnet.broker import EmbeddedBroker
from healthnet.demo import aggregator_settings, node_settings
from healthnet.federations import HEART_DISEASE
from healthnet.processes import ProcessGroup
from tests.integration.test_dp_node import WAIT, retained_status
from tests.integration.test_federation import cli, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(300)]

POLICY = Personalisation(method=PersonalisationMethod.DITTO, epochs=1, ditto_lambda=0.3)
VERSIONS = 8


def test_each_hospital_reports_its_global_and_personal_accuracy_in_status(
    mosquitto: EmbeddedBroker, tmp_path: Path
) -> None:
    federation = f"pers-{uuid.uuid4().hex[:12]}"
    sites = tuple(site.node_id for site in HEART_DISEASE.sites)
    aggregator = aggregator_settings(
        broker_url=mosquitto.url,
        federation_id=federation,
        state_dir=tmp_path / "aggregator",
        federation=HEART_DISEASE,
        buffer_size=3,
        max_staleness=20,
        status_interval=0.5,
        personalisation=POLICY,
    )

    def node(site: str) -> NodeSettings:
        return node_settings(
            broker_url=mosquitto.url,
            federation_id=federation,
            node_id=site,
            data=f"heart-disease:{site}",
            state_dir=tmp_path / site,
            exit_when_stopped=False,
        )

    settings = ConnectionSettings(broker_url=mosquitto.url, federation=federation)  # type: ignore[arg-type]

    def personal_reported(at_least: int) -> bool:
        status = retained_status(settings)
        return len(status.nodes) == len(sites) and all(
            t.eval_personal_accuracy is not None
            and t.eval_version is not None
            and t.eval_version >= at_least
            for t in status.nodes
        )

    with ProcessGroup(tmp_path / "logs") as group:
        group.start_service("aggregator", aggregator)
        for site in sites:
            group.start_service(site, node(site))
        wait_for(lambda: personal_reported(3), WAIT * 2, "every hospital's personal accuracy")
        # A hospital restarted mid-run resumes its personal model from its state dir and goes on
        # reporting it.
        saved = read_personal(tmp_path / "va" / "personal" / "personal.model")
        group["va"].stop()
        group.start_service("va", node("va"))
        wait_for(
            lambda: personal_reported(VERSIONS), WAIT * 3, f"personal accuracies at v{VERSIONS}"
        )
        shown = cli("status", "--json", "--broker-url", mosquitto.url, "--federation", federation)
        assert shown.returncode == 0, shown.stderr
        status = json.loads(shown.stdout)
    assert status["knobs"]["personalisation"] == POLICY.model_dump(mode="json")
    assert {t["node"] for t in status["nodes"]} == set(sites)
    for tally in status["nodes"]:
        assert tally["eval_version"] >= VERSIONS
        assert 0.0 <= tally["eval_accuracy"] <= 1.0
        assert 0.0 <= tally["eval_personal_accuracy"] <= 1.0
    for site in sites:
        personal = read_personal(tmp_path / site / "personal" / "personal.model")
        assert personal.method is PersonalisationMethod.DITTO
        assert personal.version >= VERSIONS
    assert saved.version >= 3
