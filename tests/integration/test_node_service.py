"""The node service against a real aggregator on Mosquitto: what it does when its own work fails."""

from __future__ import annotations

import logging
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from aggregator.service import AggregatorService
from aggregator.settings import AggregatorSettings
from aggregator.update_log import read_update_log, update_fates
from common.broker_url import BrokerEndpoint
from common.codec import encode, envelope, new_id
from common.compression import dense_tensor
from common.messages import (
    AggregatorStatus,
    ControlCommand,
    Knobs,
    ModelSpec,
    NodeTally,
    TrainMetrics,
    Update,
)
from common.mqtt import MqttClient
from common.outbox import Outbox
from common.settings import ConnectionSettings
from common.topics import TopicTree
from edge_node.sentlog import SentEvent, read_sent_log
from edge_node.service import NodeService
from edge_node.settings import NodeSettings
from healthnet.broker import EmbeddedBroker
from healthnet.control import ControlClient

pytestmark = [pytest.mark.broker, pytest.mark.timeout(60)]

WAIT = 15.0

# Five features for a model that expects thirteen: every training and evaluation raises.
MISFIT_DATA = textwrap.dedent(
    """
    import numpy as np
    from edge_node.datasets import LocalDataset

    def misfit():
        rng = np.random.default_rng(0)
        x = rng.normal(size=(20, 5)).astype(np.float32)
        y = (x[:, 0] > 0).astype(np.int64)
        return LocalDataset("misfit", x, y, x, y, num_classes=2)
    """
)


LOGREG = ModelSpec(name="logreg", kwargs={"in_features": 13, "num_classes": 2})


def aggregator_service(
    url: str, federation: str, tmp_path: Path, knobs: Knobs
) -> AggregatorService:
    return AggregatorService(
        AggregatorSettings(
            broker_url=url,  # type: ignore[arg-type]
            federation=federation,
            state_dir=tmp_path / "aggregator",
            model=LOGREG,
            knobs=knobs,
            status_interval=0.2,
        )
    )


def node_settings(
    url: str, federation: str, node_id: str, data: str, tmp_path: Path
) -> NodeSettings:
    return NodeSettings(
        broker_url=url,  # type: ignore[arg-type]
        federation=federation,
        node_id=node_id,
        data=data,
        state_dir=tmp_path / "node",
        torch_threads=1,
    )


def test_a_failing_job_is_logged_once_per_version_and_the_node_keeps_running(
    mosquitto: EmbeddedBroker,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Training that raises is logged and skipped for that version, not retried in a loop."""
    (tmp_path / "misfit_site.py").write_text(MISFIT_DATA, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "misfit_site", raising=False)
    federation = f"svc{uuid.uuid4().hex[:12]}"
    aggregator = aggregator_service(mosquitto.url, federation, tmp_path, Knobs(buffer_size=1))
    node = NodeService(
        node_settings(mosquitto.url, federation, "misfit", "misfit_site:misfit", tmp_path)
    )
    stop = threading.Event()
    threads = [
        threading.Thread(target=aggregator.run, args=(stop,), name="aggregator"),
        threading.Thread(target=node.run, args=(stop,), name="node"),
    ]
    caplog.set_level(logging.ERROR, logger="edge_node.service")
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline and len(caplog.records) < 2:
            time.sleep(0.1)
        time.sleep(1.0)  # long enough for a retry loop to show itself many times over
        assert all(thread.is_alive() for thread in threads)
        settings = ConnectionSettings(broker_url=mosquitto.url, federation=federation)  # type: ignore[arg-type]
        with ControlClient(settings) as client:
            status = client.status(timeout=WAIT)
    finally:
        stop.set()
        for thread in threads:
            thread.join(WAIT)
    failures = sorted(r.getMessage() for r in caplog.records)
    assert failures == ["node misfit: evaluate of v0 failed", "node misfit: train of v0 failed"]
    assert (status.version, status.counters.received) == (0, 0)


def test_a_restarted_node_does_not_train_again_on_the_version_it_sent_an_update_for(
    mosquitto: EmbeddedBroker, tmp_path: Path
) -> None:
    """The sent log carries progress across a restart: one update per base version, not two."""
    federation = f"svc{uuid.uuid4().hex[:12]}"
    # buffer_size 5: v0 stays current, so a restarted node sees it again
    aggregator = aggregator_service(mosquitto.url, federation, tmp_path, Knobs(buffer_size=5))
    cleveland = node_settings(
        mosquitto.url, federation, "cleveland", "heart-disease:cleveland", tmp_path
    )
    settings = ConnectionSettings(broker_url=mosquitto.url, federation=federation)  # type: ignore[arg-type]
    stop_aggregator = threading.Event()
    agg_thread = threading.Thread(target=aggregator.run, args=(stop_aggregator,), name="agg")
    agg_thread.start()
    try:
        with ControlClient(settings) as client:
            for _ in range(2):  # the node's first life, then its second
                stop_node = threading.Event()
                node = NodeService(cleveland)
                node_thread = threading.Thread(target=node.run, args=(stop_node,), name="node")
                node_thread.start()
                deadline = time.monotonic() + WAIT
                while time.monotonic() < deadline:
                    if client.status(timeout=WAIT).counters.received >= 1:
                        break
                    time.sleep(0.1)
                time.sleep(1.5)  # time enough to (wrongly) train v0 again and send it
                stop_node.set()
                node_thread.join(WAIT)
            status = client.status(timeout=WAIT)
    finally:
        stop_aggregator.set()
        agg_thread.join(WAIT)
    assert (status.version, status.counters.received, status.counters.accepted) == (0, 1, 1)
    lines = [e for e in read_sent_log(tmp_path / "node") if e.event is SentEvent.QUEUED]
    assert [(e.run_id, e.base_version) for e in lines] == [(status.run_id, 0)]


def test_a_node_back_after_long_catches_up_and_its_stale_work_is_rejected_with_an_ack(
    mosquitto: EmbeddedBroker, tmp_path: Path
) -> None:
    """An update left in the outbox while versions moved on is resent, rejected as stale with an
    ack, leaves the outbox and is logged; the node then trains on the retained current version."""
    federation = f"svc{uuid.uuid4().hex[:12]}"
    aggregator = aggregator_service(
        mosquitto.url, federation, tmp_path, Knobs(buffer_size=1, max_staleness=0)
    )
    settings = ConnectionSettings(broker_url=mosquitto.url, federation=federation)  # type: ignore[arg-type]
    stop = threading.Event()
    agg_thread = threading.Thread(target=aggregator.run, args=(stop,), name="agg")
    agg_thread.start()
    try:
        with ControlClient(settings) as control:
            run_id = control.status(timeout=WAIT).run_id
            zeros = tuple(
                dense_tensor(n, np.zeros(s, np.float32))
                for n, s in (("1.weight", (2, 13)), ("1.bias", (2,)))
            )

            def update(base: int) -> Update:
                return Update(
                    update_id=new_id(),
                    run_id=run_id,
                    base_version=base,
                    num_samples=5,
                    metrics=TrainMetrics(loss=0.5, accuracy=0.5, seconds=0.1),
                    delta=zeros,
                )

            # The node's work from v0, made before it went away, still unacked in its outbox.
            stale = update(0)
            outbox = Outbox(tmp_path / "node" / "outbox")
            outbox.open()
            outbox.put(stale.update_id, encode(envelope(stale, sender="va", sent_at=time.time())))
            # Meanwhile another hospital moves the run on to v2.
            topics = TopicTree(federation)
            with MqttClient(BrokerEndpoint.parse(mosquitto.url), f"n2-{new_id()[:6]}") as n2:
                for base in (0, 1):
                    body = encode(envelope(update(base), sender="n2", sent_at=time.time()))
                    n2.publish(topics.update("n2"), body, wait=WAIT)
                    deadline = time.monotonic() + WAIT
                    while control.status(timeout=WAIT).version <= base:
                        assert time.monotonic() < deadline, "the run did not move on"
                        time.sleep(0.1)

            node = NodeService(
                node_settings(mosquitto.url, federation, "va", "heart-disease:va", tmp_path)
            )
            node_stop = threading.Event()
            node_thread = threading.Thread(target=node.run, args=(node_stop,), name="node")
            node_thread.start()
            deadline = time.monotonic() + WAIT
            while control.status(timeout=WAIT).version < 3:  # the node's fresh update from v2
                assert time.monotonic() < deadline, "the node never caught up"
                time.sleep(0.1)
            node_stop.set()
            node_thread.join(WAIT)
    finally:
        stop.set()
        agg_thread.join(WAIT)
    assert stale.update_id not in outbox.ids()
    log = list(read_sent_log(tmp_path / "node"))
    stale_lines = [(e.event, e.accepted, e.reason) for e in log if e.update_id == stale.update_id]
    # adopted from the outbox at start (a crash kept it out of the log), then rejected with an ack
    assert stale_lines == [(SentEvent.QUEUED, None, None), (SentEvent.ACKED, False, "stale")]
    fates = update_fates(read_update_log(tmp_path / "aggregator"))
    assert fates[stale.update_id].rejections == ["stale"]
    fresh = [
        e.base_version
        for e in log
        if e.event is SentEvent.QUEUED and e.update_id != stale.update_id
    ]
    assert fresh[:1] == [2], "the first update after catching up is from the current version"


@pytest.mark.parametrize(
    "no_probe_from",
    [
        # at start-up, as for a factory with no input shape (the service asks model_probe)
        pytest.param("common.model_init.model_probe", id="at-start-up"),
        # from the deferred build of a built-in's probe, after v0 is out
        pytest.param("common.models.output_probe", id="from-the-deferred-build"),
    ],
)
def test_a_node_given_a_version_it_cannot_use_says_why_keeps_running_and_trains_after_a_rollback(
    mosquitto: EmbeddedBroker,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    no_probe_from: str,
) -> None:
    """An aggregator that cannot probe its model folds one hospital's update of 3e38s claiming
    10^6 samples and publishes it; the node says why it cannot use that version, in its status and
    its evaluation, keeps running, and trains again once a rollback publishes usable weights."""
    # A model the aggregator has no probe batch for (the gap the probe closes for built-ins).
    monkeypatch.setattr(no_probe_from, lambda spec, **_: None)
    federation = f"svc{uuid.uuid4().hex[:12]}"
    aggregator = aggregator_service(mosquitto.url, federation, tmp_path, Knobs(buffer_size=1))
    node = NodeService(node_settings(mosquitto.url, federation, "va", "heart-disease:va", tmp_path))
    settings = ConnectionSettings(broker_url=mosquitto.url, federation=federation)  # type: ignore[arg-type]
    stop = threading.Event()
    threads = [
        threading.Thread(target=aggregator.run, args=(stop,), name="aggregator"),
        threading.Thread(target=node.run, args=(stop,), name="node"),
    ]
    for thread in threads:
        thread.start()
    try:
        with ControlClient(settings) as control:

            def wait_for(check: Callable[[AggregatorStatus], bool], what: str) -> AggregatorStatus:
                deadline = time.monotonic() + WAIT
                while not check(status := control.status(timeout=WAIT)):
                    assert all(t.is_alive() for t in threads), f"a service exited before {what}"
                    assert time.monotonic() < deadline, f"no {what} within {WAIT}s"
                    time.sleep(0.1)
                return status

            def va(status: AggregatorStatus) -> NodeTally:
                return next(e for e in status.nodes if e.node == "va")

            first = wait_for(lambda s: s.version >= 1, "a version from the node")
            attack = Update(
                update_id=new_id(),
                run_id=first.run_id,
                base_version=first.version,
                num_samples=10**6,
                metrics=TrainMetrics(loss=0.5, accuracy=0.5, seconds=0.1),
                delta=tuple(
                    dense_tensor(n, np.full(s, 3e38, np.float32))
                    for n, s in (("1.weight", (2, 13)), ("1.bias", (2,)))
                ),
            )
            with MqttClient(BrokerEndpoint.parse(mosquitto.url), f"bad-{new_id()[:6]}") as bad:
                payload = encode(envelope(attack, sender="bad", sent_at=time.time()))
                bad.publish(TopicTree(federation).update("bad"), payload, wait=WAIT)
            broken = wait_for(lambda s: bool(va(s).eval_failure), "the node's failed evaluation")
            assert "not finite" in va(broken).eval_failure
            assert va(broken).eval_accuracy is None
            deadline = time.monotonic() + WAIT
            while not (reported := control.nodes(settle=0.3).get("va", None)) or not (
                reported.failure
            ):
                assert time.monotonic() < deadline, "the node's status never said why"
            assert "not finite" in reported.failure
            assert reported.version is not None
            assert reported.version > first.version

            folded = va(broken).folded
            reply = control.request(ControlCommand.ROLLBACK, version=first.version)
            rolled_back = int(reply.message.rsplit("v", 1)[1])
            wait_for(
                lambda s: va(s).folded > folded and va(s).last_base_version == rolled_back,
                "an update from the rolled-back version",
            )
            wait_for(
                lambda s: va(s).eval_failure == "" and (va(s).eval_version or 0) >= rolled_back,
                "an evaluation of a usable version",
            )
            assert all(thread.is_alive() for thread in threads)
    finally:
        stop.set()
        for thread in threads:
            thread.join(WAIT)


def test_a_node_whose_accepted_update_is_discarded_hears_why_and_logs_it(
    mosquitto: EmbeddedBroker, tmp_path: Path
) -> None:
    """The node's update shares a batch with one of 3e38s claiming 10^6 samples; the version they
    make fails the aggregator's probe: the node gets a second ack, discarded with the reason, and
    its sent log records it after the acceptance."""
    federation = f"svc{uuid.uuid4().hex[:12]}"
    aggregator = AggregatorService(
        AggregatorSettings(
            broker_url=mosquitto.url,  # type: ignore[arg-type]
            federation=federation,
            state_dir=tmp_path / "aggregator",
            model=LOGREG,
            knobs=Knobs(buffer_size=2),
            status_interval=0.2,
            autostart=False,  # the attack waits in the buffer for the node's update
        )
    )
    node = NodeService(node_settings(mosquitto.url, federation, "va", "heart-disease:va", tmp_path))
    settings = ConnectionSettings(broker_url=mosquitto.url, federation=federation)  # type: ignore[arg-type]
    stop = threading.Event()
    threads = [
        threading.Thread(target=aggregator.run, args=(stop,), name="aggregator"),
        threading.Thread(target=node.run, args=(stop,), name="node"),
    ]
    for thread in threads:
        thread.start()
    try:
        with ControlClient(settings) as control:
            run_id = control.status(timeout=WAIT).run_id
            attack = Update(
                update_id=new_id(),
                run_id=run_id,
                base_version=0,
                num_samples=10**6,
                metrics=TrainMetrics(loss=0.5, accuracy=0.5, seconds=0.1),
                delta=tuple(
                    dense_tensor(n, np.full(s, 3e38, np.float32))
                    for n, s in (("1.weight", (2, 13)), ("1.bias", (2,)))
                ),
            )
            with MqttClient(BrokerEndpoint.parse(mosquitto.url), f"bad-{new_id()[:6]}") as bad:
                payload = encode(envelope(attack, sender="bad", sent_at=time.time()))
                bad.publish(TopicTree(federation).update("bad"), payload, wait=WAIT)
            deadline = time.monotonic() + WAIT
            while control.status(timeout=WAIT).buffer_fill < 1:
                assert time.monotonic() < deadline, "the attack was never buffered"
                time.sleep(0.1)
            control.request(ControlCommand.START)
            # Training, an upload and two acks: on a loaded 2-core machine that took over WAIT.
            deadline = time.monotonic() + 3 * WAIT
            while not any(
                e.event is SentEvent.ACKED and e.reason == "discarded"
                for e in read_sent_log(tmp_path / "node")
            ):
                assert time.monotonic() < deadline, "the node never heard of the discard"
                assert all(thread.is_alive() for thread in threads)
                time.sleep(0.1)
            while (status := control.status(timeout=WAIT)).counters.discarded < 2:
                assert time.monotonic() < deadline, "the status never counted the discard"
                time.sleep(0.1)
    finally:
        stop.set()
        for thread in threads:
            thread.join(WAIT)
    (mine,) = [e for e in read_sent_log(tmp_path / "node") if e.event is SentEvent.QUEUED]
    lines = [
        (e.event, e.accepted, e.reason)
        for e in read_sent_log(tmp_path / "node")
        if e.update_id == mine.update_id
    ]
    assert lines == [
        (SentEvent.QUEUED, None, None),
        (SentEvent.ACKED, True, None),
        (SentEvent.ACKED, False, "discarded"),
    ]
    assert (status.version, status.counters.discarded, status.counters.probe_failures) == (0, 2, 1)


class _Awaited(logging.Handler):
    """Keeps the records whose message contains ``text`` and signals the first."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.INFO)
        self.text = text
        self.found: list[str] = []
        self.event = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if self.text in message:
            self.found.append(message)
            self.event.set()


def test_the_node_logs_each_update_in_wire_and_dense_bytes_the_right_way_round(
    mosquitto: EmbeddedBroker, tmp_path: Path
) -> None:
    """A logistic regression's update (112 dense bytes) is logged as larger on the wire."""
    federation = f"svc{uuid.uuid4().hex[:12]}"
    aggregator = aggregator_service(mosquitto.url, federation, tmp_path, Knobs(buffer_size=5))
    node = NodeService(
        node_settings(mosquitto.url, federation, "cleveland", "heart-disease:cleveland", tmp_path)
    )
    handler = _Awaited(" sent: ")
    logger = logging.getLogger("edge_node.service")
    logger.addHandler(handler)
    previous_level = logger.level
    logger.setLevel(logging.INFO)
    stop = threading.Event()
    threads = [
        threading.Thread(target=aggregator.run, args=(stop,), name="aggregator"),
        threading.Thread(target=node.run, args=(stop,), name="node"),
    ]
    for thread in threads:
        thread.start()
    try:
        assert handler.event.wait(45), "the node sent no update"
    finally:
        stop.set()
        for thread in threads:
            thread.join(WAIT)
        logger.removeHandler(handler)
        logger.setLevel(previous_level)
    assert "as dense float32 (" in handler.found[0]
    assert ", 112 as dense float32 (" in handler.found[0]
    assert "x larger than dense)" in handler.found[0]
