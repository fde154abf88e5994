"""Specification of the demo: its choice of sites and versions, checked before anything starts, and
the settings its child processes run with, which reach them whole."""

from __future__ import annotations

import dataclasses
import os
import queue
import time
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from common.broker_url import BrokerEndpoint
from common.codec import decode, encode, envelope, new_id
from common.messages import (
    AggregationRule,
    AggregatorState,
    AggregatorStatus,
    Body,
    Compression,
    Knobs,
    MetricRelease,
    NodeState,
    NodeStatus,
    NodeTally,
    NormPolicy,
    Personalisation,
    PersonalisationMethod,
    PrivacyPolicy,
    PrivacySpend,
    Quantization,
    ServerOptimizerKind,
    StalenessKind,
    TrainingConfig,
)
from common.mqtt import Message, MqttClient
from common.topics import Topic, TopicTree
from healthnet.broker import EmbeddedBroker
from healthnet.demo import (
    DemoConfig,
    DemoError,
    DemoResult,
    _time_to_stop,
    _Watch,
    aggregator_settings,
    demo_identities,
    first_sites,
    node_settings,
    render,
    run_demo,
)
from healthnet.federations import HEART_DISEASE, PNEUMONIA
from healthnet.processes import ManagedProcess, ProcessGroup, ServiceSettings, service_command
from tests.healthnet.test_observe import evaluation
from tests.samples import privacy_spend, status


def test_nodes_keeps_the_first_sites_and_lowers_k_to_fit() -> None:
    """--nodes 3 keeps hospital-1..3, and the federation's K = 4 becomes 3."""
    cut = first_sites(PNEUMONIA, 3, None)
    assert [site.node_id for site in cut.sites] == ["hospital-1", "hospital-2", "hospital-3"]
    assert cut.knobs.buffer_size == 3
    assert cut.knobs.training == PNEUMONIA.knobs.training


def test_nodes_above_k_keep_the_federations_k() -> None:
    """With more nodes than K, K stays the federation's."""
    assert first_sites(PNEUMONIA, 6, None).knobs.buffer_size == PNEUMONIA.knobs.buffer_size


def test_no_nodes_means_every_site_unchanged() -> None:
    """Without --nodes the federation is used as defined."""
    assert first_sites(HEART_DISEASE, None, None) is HEART_DISEASE
    assert first_sites(PNEUMONIA, 8, 8) is PNEUMONIA


@pytest.mark.parametrize(
    ("nodes", "buffer_size", "message"),
    [
        pytest.param(0, None, r"must be 1\.\.8", id="no-nodes"),
        pytest.param(9, None, r"must be 1\.\.8", id="too-many-nodes"),
        pytest.param(2, 3, "exceeds the 2 nodes", id="k-above-nodes"),
        pytest.param(None, 9, "exceeds the 8 nodes", id="k-above-sites"),
    ],
)
def test_impossible_site_choices_are_refused(
    nodes: int | None, buffer_size: int | None, message: str
) -> None:
    """A node count outside the federation, or a K no version could fill, is a DemoError."""
    with pytest.raises(DemoError, match=message):
        first_sites(PNEUMONIA, nodes, buffer_size)


def test_run_demo_refuses_bad_nodes_before_starting_anything() -> None:
    """run_demo checks --nodes before it starts a broker or a process."""
    with pytest.raises(DemoError, match=r"must be 1\.\.4"):
        run_demo(DemoConfig(federation="heart-disease", nodes=5, broker_url="mqtt://127.0.0.1:1"))


def test_the_summary_gives_wire_and_dense_bytes_per_update_the_right_way_round() -> None:
    """A heart-disease run, whose updates outweigh their 112 dense bytes, is not called smaller."""
    result = DemoResult(
        mean_accuracy=0.8,
        pooled_accuracy=0.8,
        per_node={"cleveland": 0.8},
        versions=60,
        updates_folded=180,
        wall_seconds=10.0,
        mode="fedbuff",
        buffer_size=3,
        federation="heart-disease",
        broker="mosquitto",
        min_staleness_factor={},
        updates_per_node={},
        bytes_per_update=559.0,
        dense_bytes_per_update=112.0,
        compression_ratio=112 / 559,
    )
    console = Console(record=True, width=200, color_system=None)
    render(result, console)
    text = console.export_text()
    assert (
        "per update: 559 bytes on the wire, 112 as dense float32 (5.0x larger than dense)" in text
    )
    assert "smaller" not in text
    assert result.to_json()["dense_bytes_per_update"] == 112.0
    assert "epsilon" not in text  # no DP, no privacy column


def _result(**fields: object) -> DemoResult:
    values: dict[str, object] = {
        "mean_accuracy": 0.8,
        "pooled_accuracy": 0.8,
        "per_node": {"cleveland": 0.8, "va": 0.7},
        "versions": 60,
        "updates_folded": 180,
        "wall_seconds": 10.0,
        "mode": "fedbuff",
        "buffer_size": 3,
        "federation": "heart-disease",
        "broker": "mosquitto",
        "min_staleness_factor": {},
        "updates_per_node": {},
    }
    return DemoResult(**{**values, **fields})  # type: ignore[arg-type]


def test_under_dp_the_summary_gives_each_hospitals_epsilon_of_its_budget() -> None:
    result = _result(epsilon={"cleveland": 2.345, "va": 3.0}, epsilon_budget={"cleveland": 3.0})
    console = Console(record=True, width=200, color_system=None)
    render(result, console)
    text = console.export_text()
    assert "epsilon / budget" in text
    rows = [line.replace("\u2502", " ").split() for line in text.splitlines()]
    assert ["cleveland", "0.800", "2.35", "/", "3"] in rows
    assert ["va", "0.700", "3.00"] in rows  # no budget known: the epsilon alone
    assert result.to_json()["epsilon"] == {"cleveland": 2.345, "va": 3.0}
    assert result.to_json()["epsilon_budget"] == {"cleveland": 3.0}


def _ledger(epsilon: float) -> PrivacySpend:
    return privacy_spend(epsilon=epsilon, steps=9, versions=3)


def test_the_demo_reports_each_hospitals_ledger_else_the_aggregators_tally() -> None:
    """The summary's epsilon is the node's own last word on its ledger when it gave one (a
    charge for an update the aggregator refused counts too), else the final status's tally."""
    tree = TopicTree("fed")
    watch = _Watch(tree, ["cleveland", "va"])

    def deliver(topic: Topic, body: Body, sender: str) -> None:
        payload = encode(envelope(body, sender=sender, sent_at=0.0))
        watch.on_message(Message(topic=str(topic), payload=payload, retain=False, qos=1))

    tallies = (
        NodeTally(node="cleveland", epsilon=1.0, epsilon_budget=3.0),
        NodeTally(node="va", epsilon=0.5, epsilon_budget=2.0),
    )
    final = status(1, nodes=tallies).model_copy(update={"state": AggregatorState.STOPPED})
    deliver(tree.aggregator_status(), final, "aggregator")
    own = NodeStatus(state=NodeState.BUDGET_SPENT, privacy=_ledger(2.9))
    deliver(tree.node_status("cleveland"), own, "cleveland")
    deliver(tree.node_status("va"), NodeStatus(state=NodeState.OFFLINE), "va")
    deliver(tree.node_status("va"), own, "impostor")  # not va's own word
    for node in ("cleveland", "va"):
        deliver(tree.node_eval(node), evaluation(1, 0.75), node)
    assert watch.finished()
    result = watch.result(DemoConfig(), 2, "mosquitto", 1.0, "heart-disease")
    assert (result.epsilon, result.epsilon_budget) == (
        {"cleveland": 2.9, "va": 0.5},
        {"cleveland": 3.0, "va": 2.0},
    )


@pytest.mark.parametrize(
    ("spent", "buffer_fill", "stop"),
    [
        pytest.param(False, 0, False, id="budget-left"),
        pytest.param(True, 1, False, id="spent-buffer-still-to-fold"),
        pytest.param(True, 0, True, id="spent-and-folded"),
    ],
)
def test_the_demo_stops_a_run_whose_hospitals_have_spent_their_budgets(
    spent: bool, buffer_fill: int, stop: bool
) -> None:
    """No version can come once every budget is spent and the buffer is folded: the demo stops
    the run then, as at its target, and the hospitals evaluate the last version."""
    watch = _Watch(TopicTree("fed"), ["cleveland"])
    watch.status = status(3, buffer_fill=buffer_fill).model_copy(update={"budgets_spent": spent})
    assert _time_to_stop(DemoConfig(), watch, None) is stop


def test_the_aggregators_last_will_does_not_hide_the_run_it_finished() -> None:
    """A Last Will fixed at connect time (OFFLINE, version 0) that the broker publishes after
    the stopped run's status leaves the demo's view of the run as the aggregator last gave it."""
    tree = TopicTree("fed")
    watch = _Watch(tree, ["cleveland"])

    def deliver(topic: Topic, body: Body, sender: str) -> None:
        payload = encode(envelope(body, sender=sender, sent_at=0.0))
        watch.on_message(Message(topic=str(topic), payload=payload, retain=True, qos=1))

    final = status(3).model_copy(update={"state": AggregatorState.STOPPED})
    deliver(tree.aggregator_status(), final, "aggregator")
    will = status(0).model_copy(update={"state": AggregatorState.OFFLINE})
    deliver(tree.aggregator_status(), will, "aggregator")
    deliver(tree.node_eval("cleveland"), evaluation(3, 0.75), "cleveland")
    assert watch.version == 3
    assert watch.finished()


SECRET = "s3cr3t-Pa55"  # noqa: S105 - a made-up credential that must never leak

# Every knob away from its default, so that one that does not reach the child shows.
EVERY_KNOB = Knobs(
    buffer_size=3,
    buffer_timeout=45.0,
    max_staleness=7,
    staleness=StalenessKind.HINGE,
    staleness_a=0.25,
    staleness_b=3,
    sample_exponent=0.5,
    server_optimizer=ServerOptimizerKind.FEDADAM,
    server_lr=0.5,
    server_momentum=0.6,
    server_beta1=0.8,
    server_beta2=0.95,
    server_tau=0.01,
    max_update_norm=50.0,
    norm_multiplier=3.0,
    norm_window=10,
    norm_policy=NormPolicy.CLIP,
    aggregation=AggregationRule.TRIMMED_MEAN,
    trim_fraction=0.2,
    one_update_per_version=True,
    max_num_samples=10_000,
    compression=Compression(top_k=0.5, quantization=Quantization.INT8, error_feedback=False),
    broadcast_dtype="float16",
    max_versions=100,
    privacy=PrivacyPolicy(
        calibrate_versions=12, max_grad_norm=2.0, delta=1e-6, epsilon_budget=5.0,
        metrics=MetricRelease.SUPPRESSED,
    ),
    personalisation=Personalisation(
        method=PersonalisationMethod.DITTO,
        epochs=2,
        ditto_lambda=0.5,
        learning_rate=0.01,
        holdout=0.2,
    ),
    training=TrainingConfig(
        epochs=2, batch_size=16, learning_rate=0.01, optimizer="adam", momentum=0.5,
        weight_decay=0.01,
    ),
)  # fmt: skip
TUNED = dataclasses.replace(HEART_DISEASE, knobs=EVERY_KNOB)


def _first_status(client: MqttClient, timeout: float) -> AggregatorStatus:
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            item = client.inbox.get(timeout=remaining)
        except queue.Empty:
            break
        if isinstance(item, Message) and item.payload:
            body = decode(item.payload).body
            if isinstance(body, AggregatorStatus):
                return body
    raise AssertionError(f"no aggregator status within {timeout:.0f}s")


def test_every_field_of_the_demos_aggregator_settings_reaches_the_child(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The aggregator settings the demo builds come back whole from the child's environment."""
    settings = aggregator_settings(
        broker_url=f"mqtts://aggregator:{SECRET}@broker.example:8884?protocol=5",
        federation_id="whole",
        state_dir=tmp_path / "aggregator",
        federation=TUNED,
        buffer_size=EVERY_KNOB.buffer_size,
        max_staleness=EVERY_KNOB.max_staleness,
        server_lr=EVERY_KNOB.server_lr,
        max_versions=EVERY_KNOB.max_versions,
        seed=7,
        client_id="aggregator.whole",
        run_id="run-7",
        ca_file="/etc/healthnet/ca.crt",
        connect_timeout=3.5,
        keepalive=11,
        autostart=False,
        chunk_size=4096,
        max_update_bytes=2048,
        keep_checkpoints=5,
        archive_models=False,
        metrics_port=0,
        metrics_host="0.0.0.0",  # noqa: S104 - a value to carry, nothing binds it
        checkpoint_every=4,
    )
    assert settings.knobs == EVERY_KNOB
    assert settings.model == TUNED.model
    assert _read_back_in_the_child(settings, tmp_path, monkeypatch) == settings


POLICY = PrivacyPolicy(calibrate_versions=40, epsilon_budget=8.0)


@pytest.mark.parametrize(
    ("privacy", "training", "expected"),
    [
        pytest.param(None, None, PNEUMONIA.knobs.training, id="no-dp-federations-own"),
        pytest.param(POLICY, None, PNEUMONIA.dp_training, id="dp-federations-dp-training"),
        pytest.param(POLICY, TrainingConfig(epochs=3), TrainingConfig(epochs=3), id="dp-as-told"),
    ],
)
def test_a_private_run_trains_as_the_federations_dp_training(
    tmp_path: Path,
    privacy: PrivacyPolicy | None,
    training: TrainingConfig | None,
    expected: TrainingConfig,
) -> None:
    """Under a privacy policy the hospitals train as the federation's dp_training says (pneumonia:
    SGD, not its no-DP Adam), unless the demo is told a training of its own."""
    settings = aggregator_settings(
        broker_url="mqtt://127.0.0.1:1883",
        federation_id="dp",
        state_dir=tmp_path,
        federation=PNEUMONIA,
        buffer_size=4,
        max_staleness=20,
        privacy=privacy,
        training=training,
    )
    assert PNEUMONIA.dp_training != PNEUMONIA.knobs.training
    assert settings.knobs.training == expected


def test_the_demos_hospitals_sign_key_records_their_peers_accept(tmp_path: Path) -> None:
    """--secure-aggregation's throwaway CA issues each hospital a client certificate whose
    signed key record verifies against that CA; the private keys are 0600."""
    import datetime as dt

    from edge_node.secure_holder import load_agreement_key
    from edge_node.secure_keys import own_key_record

    files = demo_identities(tmp_path / "pki", "demo-1", ["cleveland", "va"])
    assert set(files) == {"cleveland", "va"}
    for hospital, fields in files.items():
        assert Path(fields["key_file"]).stat().st_mode & 0o777 == 0o600
        record = own_key_record(  # raises if its peers would refuse it
            federation="demo-1",
            identity=hospital,
            agreement_key=load_agreement_key(tmp_path / hospital),
            now=dt.datetime.now(dt.UTC),
            **fields,
        )
        assert record.identity == hospital


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        pytest.param({"nodes": 2}, "with 2 hospitals", id="too-few-holders"),
        pytest.param({"mode": "fedasync"}, "buffer_size 1 is below", id="fedasync"),
    ],
)
def test_secure_aggregation_the_run_cannot_serve_is_refused_before_anything_starts(
    changes: dict[str, Any], message: str, tmp_path: Path
) -> None:
    config = DemoConfig(
        federation="heart-disease",
        broker_url="mqtt://127.0.0.1:1",
        workdir=tmp_path,
        secure_aggregation=True,
        **changes,
    )
    with pytest.raises(DemoError, match=message):
        run_demo(config)


def test_every_field_of_the_demos_node_settings_reaches_the_child(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The node settings the demo builds come back whole from the child's environment."""
    settings = node_settings(
        broker_url=f"mqtt://cleveland:{SECRET}@127.0.0.1:1884",
        federation_id="whole",
        node_id="cleveland",
        data="heart-disease:cleveland",
        state_dir=tmp_path / "cleveland",
        delay=0.5,
        seed=3,
        torch_threads=2,
        exit_when_stopped=False,
        ack_timeout=4.0,
        device="cpu",
        max_model_bytes=4096,
        compression=Compression(top_k=0.1, quantization=Quantization.FP16),
        keepalive=2,
    )
    assert _read_back_in_the_child(settings, tmp_path, monkeypatch) == settings


def test_the_demos_privacy_policy_becomes_the_aggregators(tmp_path: Path) -> None:
    """DemoConfig.privacy reaches the aggregator's knobs, which put it in every manifest."""
    policy = PrivacyPolicy(noise_multiplier=1.3, epsilon_budget=3.0)
    settings = aggregator_settings(
        broker_url="mqtt://127.0.0.1:1883",
        federation_id="dp",
        state_dir=tmp_path,
        federation=HEART_DISEASE,
        buffer_size=2,
        max_staleness=5,
        privacy=policy,
    )
    assert settings.knobs.privacy == policy
    assert settings.knobs.buffer_size == 2


def _read_back_in_the_child(
    settings: ServiceSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> ServiceSettings:
    """The settings a child started with ``settings`` builds from its environment, as the CLI does
    with no flag given; a HEALTHNET_* variable and a .env file of the parent's are in the way."""
    monkeypatch.setenv("HEALTHNET_KNOBS__STALENESS", "constant")
    monkeypatch.setenv("HEALTHNET_CERT_FILE", "/parent/cert.pem")
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("HEALTHNET_KEY_FILE=/parent/key.pem\n", encoding="utf-8")
    child = ManagedProcess(
        "child", service_command(settings), tmp_path / "child.log", settings=settings
    )
    environment = child.environment()
    assert SECRET not in " ".join(child.args)
    assert SECRET not in repr(child)
    for name in list(os.environ):
        monkeypatch.delenv(name)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    return type(settings)()


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_the_demos_child_aggregator_runs_with_every_knob_of_the_federation(
    mosquitto: EmbeddedBroker, tmp_path: Path
) -> None:
    """The aggregator the demo's helpers start reports, in its status, every knob it was given."""
    federation = f"knobs-{new_id()[:8]}"
    watcher = MqttClient(BrokerEndpoint.parse(mosquitto.url), f"watch-{new_id()[:8]}")
    watcher.subscribe(TopicTree(federation).aggregator_status())
    with ProcessGroup(tmp_path / "logs") as group, watcher:
        aggregator = group.start_service(
            "aggregator",
            aggregator_settings(
                broker_url=mosquitto.url,
                federation_id=federation,
                state_dir=tmp_path / "aggregator",
                federation=TUNED,
                buffer_size=EVERY_KNOB.buffer_size,
                max_staleness=EVERY_KNOB.max_staleness,
                server_lr=EVERY_KNOB.server_lr,
                max_versions=EVERY_KNOB.max_versions,
            ),
        )
        try:
            status = _first_status(watcher, 90)
        except AssertionError:
            raise AssertionError(aggregator.tail()) from None
    lost = [
        name
        for name in Knobs.model_fields
        if getattr(status.knobs, name) != getattr(EVERY_KNOB, name)
    ]
    assert status.knobs == EVERY_KNOB, f"lost on the way: {lost}"
