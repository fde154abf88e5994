"""The heart-disease federation under secure aggregation, end to end: the real aggregator and four
real node processes over Mosquitto with `healthnet deploy init --auth mtls`'s files (TLS, one
identity each, the generated ACL). Every version is folded from masked updates and the holders'
answers, its record names its fold plan, and the federation learns as the plaintext demo does.

Waits are bounded; nothing asserts on how long anything took.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from aggregator.settings import AggregatorSettings
from common.messages import AggregatorState, SecureAggregation, VersionRecord
from edge_node.settings import NodeSettings
from healthnet.control import ControlClient
from healthnet.demo import aggregator_settings, resolve_mode
from healthnet.deploy import AuthMode
from healthnet.federations import HEART_DISEASE
from healthnet.processes import ProcessGroup
from tests.integration.test_federation import ACCURACY_BAR
from tests.secure import secure_broker

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(300)]

VERSIONS = 30
HOLDERS = tuple(site.node_id for site in HEART_DISEASE.sites)


def test_the_heart_federation_trains_under_secure_aggregation_over_mutual_tls(
    tmp_path: Path,
) -> None:
    """Thirty versions, each securely aggregated (its record names a fold plan and no plaintext
    update was taken), and the hospitals' mean test accuracy reaches the plaintext demo's bar."""
    federation = f"secfed-{uuid.uuid4().hex[:8]}"
    policy = SecureAggregation(holders=HOLDERS)
    with (
        secure_broker(tmp_path, auth=AuthMode.MTLS, federation=federation) as broker,
        ProcessGroup(tmp_path / "logs") as group,
    ):
        k, max_staleness, server_lr = resolve_mode("fedbuff", HEART_DISEASE, None)
        knobs = aggregator_settings(
            broker_url="mqtt://127.0.0.1",
            federation_id=federation,
            state_dir=tmp_path / "aggregator",
            federation=HEART_DISEASE,
            buffer_size=k,
            max_staleness=max_staleness,
            server_lr=server_lr,
            max_versions=VERSIONS,
            secure_aggregation=policy,
        ).knobs
        aggregator = AggregatorSettings(
            _env_file=broker.deployment.env_files["aggregator"],
            state_dir=tmp_path / "aggregator",
            model=HEART_DISEASE.model,
            knobs=knobs,
            status_interval=1.0,
        )
        group.start_service("aggregator", aggregator)
        for site in HEART_DISEASE.sites:
            node = NodeSettings(
                _env_file=broker.deployment.env_files[site.node_id],
                data=site.data,
                state_dir=tmp_path / site.node_id,
                torch_threads=1,
                ack_timeout=10.0,
                exit_when_stopped=True,
            )
            assert (node.node_id, node.cert_file is not None) == (site.node_id, True)
            group.start_service(site.node_id, node)
        assert group.wait_all(timeout=240), [p.tail() for p in group.processes.values()]
        assert group.failed() == [], [p.tail() for p in group.failed()]

        with ControlClient(broker.settings("operator")) as client:
            status = client.status(timeout=10)
    assert (status.state, status.version) == (AggregatorState.STOPPED, VERSIONS)
    assert status.knobs.secure_aggregation == policy
    assert "secure_aggregation" not in status.counters.rejections, status.counters.rejections
    records = [
        VersionRecord.model_validate(json.loads(line))
        for line in (tmp_path / "aggregator" / "versions.jsonl").read_text().splitlines()
    ]
    assert len(records) == VERSIONS
    assert all(record.secure_fold_id is not None for record in records)
    # Every sum held at least min_contributors distinct hospitals.
    assert all(
        len({c.node for c in record.contributions}) >= policy.policy().contributors
        for record in records
    )
    accuracies = [n.eval_accuracy for n in status.nodes if n.eval_accuracy is not None]
    assert len(accuracies) == len(HOLDERS)
    assert sum(accuracies) / len(accuracies) >= ACCURACY_BAR, status.nodes
