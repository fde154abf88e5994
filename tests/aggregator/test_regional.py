"""Specification of a regional aggregator's decisions: what it acks, when it combines, what the
core receives, and what a restart brings back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aggregator.combine import combined_update_id
from aggregator.core import AggregatorCore, Fold
from aggregator.regional import RegionalCombiner, Upstream
from aggregator.regional_store import (
    COMBINED_LOG_FILE,
    CombinedEvent,
    CombinedLogEntry,
    RegionalStore,
)
from common.codec import encode, envelope
from common.compression import dense_tensor
from common.errors import ControlError
from common.inbound import Decoded, decode_body
from common.jsonlog import append_json_lines
from common.messages import Ack, AggregatorState, Knobs, RejectReason, TrainMetrics, Update

RUN = "run-1"
PARAMS = {
    "w": np.array([[0.1, 0.2, 0.3], [-0.1, -0.2, -0.3]], dtype=np.float32),
    "b": np.array([0.5, -0.5], dtype=np.float32),
}
MAX_BYTES = 1 << 20
HOSPITALS = ("cleveland", "hungarian", "va")


def hospital_update(uid: str, base: int, seed: int, run_id: str = RUN) -> Update:
    rng = np.random.default_rng(seed)
    return Update(
        update_id=uid,
        run_id=run_id,
        base_version=base,
        num_samples=10 * (seed + 1),
        metrics=TrainMetrics(loss=0.5, accuracy=0.7, seconds=1.0),
        delta=tuple(
            dense_tensor(n, rng.normal(0, 0.1, p.shape).astype(np.float32))
            for n, p in PARAMS.items()
        ),
    )


def payload(node: str, update: Update) -> bytes:
    return encode(envelope(update, sender=node, sent_at=0.0))


def combiner(directory: Path, *, version: int = 6, **knobs: object) -> RegionalCombiner:
    validator = AggregatorCore(
        run_id=RUN,
        params=PARAMS,
        knobs=Knobs.model_validate({"buffer_size": 3, **knobs}),
        version=version,
        state=AggregatorState.RUNNING,
    )
    return RegionalCombiner(
        region="eu",
        node_id="region-eu",
        validator=validator,
        store=RegionalStore(directory),
        max_bytes=MAX_BYTES,
    )


def send(region: RegionalCombiner, node: str, update: Update) -> Upstream | None:
    verdict = region.receive(node, node, update, payload(node, update), now=1.0)
    assert verdict.accepted, verdict
    return region.combine_due(now=1.0)


def core_at(version: int) -> AggregatorCore:
    return AggregatorCore(
        run_id=RUN,
        params=PARAMS,
        knobs=Knobs(buffer_size=1),
        version=version,
        state=AggregatorState.RUNNING,
    )


def upstream_update(message: Upstream) -> Update:
    decoded = decode_body(Update, message.payload, max_bytes=MAX_BYTES)
    assert isinstance(decoded, Decoded)
    assert decoded.sender == "region-eu"
    return decoded.body


def test_k_hospital_updates_become_one_update_the_core_folds(tmp_path: Path) -> None:
    """Nothing goes up before the K-th update; then one update, which the core accepts as the
    region's and which leaves the outbox on the core's ack."""
    region = combiner(tmp_path)
    assert region.open(now=0.0) == []
    assert send(region, "cleveland", hospital_update("c1", 6, 0)) is None
    assert send(region, "hungarian", hospital_update("h1", 5, 1)) is None
    message = send(region, "va", hospital_update("v1", 4, 2))
    assert message is not None
    update = upstream_update(message)
    assert update.update_id == message.update_id
    assert (update.base_version, update.num_samples) == (6, 10 + 20 + 30)
    assert region.store.unacked() == [(message.update_id, message.payload)]
    core = core_at(7)
    verdict = core.receive("region-eu", "region-eu", update, len(message.payload), now=2.0)
    assert verdict.accepted
    assert isinstance(core.fold(now=2.0), Fold)
    ack = Ack(update_id=update.update_id, accepted=True, current_version=8)
    assert region.core_acked(ack)
    assert region.store.unacked() == []
    region.close()


def test_a_resent_hospital_update_is_acked_again_and_not_combined_twice(tmp_path: Path) -> None:
    """A hospital's resend, before and after its update was combined, is a duplicate."""
    region = combiner(tmp_path, buffer_size=2)
    region.open(now=0.0)
    c1 = hospital_update("c1", 6, 0)
    send(region, "cleveland", c1)
    again = region.receive("cleveland", "cleveland", c1, payload("cleveland", c1), now=1.0)
    assert again.duplicate
    assert region.combine_due(now=1.0) is None
    assert send(region, "va", hospital_update("v1", 6, 2)) is not None
    assert region.receive("cleveland", "cleveland", c1, payload("cleveland", c1), now=1.0).duplicate
    region.close()


def test_a_refused_update_is_not_logged(tmp_path: Path) -> None:
    """The core's validation runs in the region: another run's update is refused there."""
    region = combiner(tmp_path)
    region.open(now=0.0)
    foreign = hospital_update("x1", 6, 0, run_id="other-run")
    verdict = region.receive("va", "va", foreign, payload("va", foreign), now=1.0)
    assert not verdict.accepted
    assert verdict.reason is RejectReason.WRONG_RUN
    assert not region.store.known("x1")
    region.close()


def test_the_region_measures_staleness_against_the_cores_current_version(tmp_path: Path) -> None:
    """Following the core's versions, the region refuses what the core would refuse as stale."""
    region = combiner(tmp_path, max_staleness=3)
    region.open(now=0.0)
    region.validator.follow(10)
    old = hospital_update("c1", 6, 0)
    verdict = region.receive("cleveland", "cleveland", old, payload("cleveland", old), now=1.0)
    assert verdict.reason is RejectReason.STALE
    with pytest.raises(ControlError, match="older"):
        region.validator.follow(9)
    region.close()


def test_a_restart_buffers_again_what_was_acked_and_not_combined(tmp_path: Path) -> None:
    """Killed with two updates buffered, the region combines them with the third after restart
    into the update it would have made without the restart."""
    updates = [hospital_update(f"u{i}", 6 - i, i) for i in range(3)]
    straight = combiner(tmp_path / "straight")
    straight.open(now=0.0)
    expected = [send(straight, h, u) for h, u in zip(HOSPITALS, updates, strict=True)][-1]
    straight.close()
    first = combiner(tmp_path / "restarted")
    first.open(now=0.0)
    for hospital, update in zip(HOSPITALS[:2], updates[:2], strict=True):
        send(first, hospital, update)
    first.close()
    second = combiner(tmp_path / "restarted")
    assert second.open(now=5.0) == []
    assert [u.update_id for u in second.validator.buffer] == ["u0", "u1"]
    message = send(second, HOSPITALS[2], updates[2])
    assert message is not None
    assert expected is not None
    assert upstream_update(message) == upstream_update(expected)
    second.close()


def test_an_unacked_combined_update_is_resent_and_the_core_answers_duplicate(
    tmp_path: Path,
) -> None:
    """The core folded it, but its ack never arrived: after a restart the same message goes up
    again and the core's replay protection acks it without folding it twice."""
    region = combiner(tmp_path, buffer_size=1)
    region.open(now=0.0)
    message = send(region, "va", hospital_update("v1", 6, 0))
    assert message is not None
    core = core_at(6)
    assert core.receive("region-eu", "region-eu", upstream_update(message), 1, now=1.0).accepted
    region.close()
    restarted = combiner(tmp_path, buffer_size=1)
    assert restarted.open(now=2.0) == [message]
    again = core.receive("region-eu", "region-eu", upstream_update(message), 1, now=3.0)
    assert again.duplicate
    assert restarted.core_acked(Ack(update_id=message.update_id, accepted=True, current_version=7))
    restarted.close()
    last = combiner(tmp_path, buffer_size=1)
    assert last.open(now=4.0) == []
    last.close()


def test_a_refusal_from_the_core_also_clears_the_outbox(tmp_path: Path) -> None:
    """A refused combined update is logged with its reason and not resent for ever."""
    region = combiner(tmp_path, buffer_size=1)
    region.open(now=0.0)
    message = send(region, "va", hospital_update("v1", 6, 0))
    assert message is not None
    refusal = Ack(
        update_id=message.update_id,
        accepted=False,
        reason=RejectReason.STALE,
        detail="staleness 30 exceeds max_staleness 20",
        current_version=36,
    )
    assert region.core_acked(refusal)
    assert region.store.unacked() == []
    region.close()


def test_a_combination_committed_without_its_message_is_rebuilt_on_restart(
    tmp_path: Path,
) -> None:
    """Killed after the commit line and before the outbox write: the restart combines the same
    constituents, not others, into the update of the same id and sends it."""
    region = combiner(tmp_path, buffer_size=5)
    region.open(now=0.0)
    for i, hospital in enumerate(HOSPITALS):
        send(region, hospital, hospital_update(f"u{i}", 6, i))
    region.close()
    uid = combined_update_id("eu", ["u2", "u0"])
    append_json_lines(
        tmp_path / COMBINED_LOG_FILE,
        [CombinedLogEntry(event=CombinedEvent.COMBINED, update_id=uid, constituents=("u2", "u0"))],
    )
    restarted = combiner(tmp_path, buffer_size=5)
    (message,) = restarted.open(now=1.0)
    assert message.update_id == uid
    assert upstream_update(message).num_samples == 30 + 10
    assert [u.update_id for u in restarted.validator.buffer] == ["u1"]
    with pytest.raises(ControlError, match="cannot take"):
        restarted.validator.take(2)
    restarted.close()
