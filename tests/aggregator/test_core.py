"""Specification of the aggregator's decisions: validate, buffer, fold, control (no I/O)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

from aggregator.aggregation import ServerOptimizerState, densify
from aggregator.core import AggregatorCore, Discard, Fold, Unreadable, Verdict
from common.codec import decode_tensors, sha256_hex
from common.compression import dense_tensor
from common.errors import ControlError
from common.inbound import Refusal, Refused
from common.messages import (
    AggregatorState,
    CompressedTensor,
    Compression,
    ControlCommand,
    Counters,
    Evaluation,
    Knobs,
    ModelSpec,
    RejectReason,
    ServerOptimizerKind,
    StalenessKind,
    TrainingConfig,
    TrainMetrics,
    Update,
    VersionRecord,
)
from common.topics import TopicTree

RUN = "run-1"
PARAMS = {
    "w": np.array([[0.1, 0.2, 0.3], [-0.1, -0.2, -0.3]], dtype=np.float32),
    "b": np.array([0.5, -0.5], dtype=np.float32),
}
DELTA = {
    "w": np.full((2, 3), 0.1, dtype=np.float32),
    "b": np.full(2, -0.2, dtype=np.float32),
}
SIZE = 100

Arrays = Mapping[str, np.ndarray]


def make_core(
    *,
    version: int = 0,
    state: AggregatorState = AggregatorState.RUNNING,
    **knobs: Any,
) -> AggregatorCore:
    return AggregatorCore(
        run_id=RUN, params=PARAMS, knobs=Knobs(**knobs), version=version, state=state
    )


def make_update(
    update_id: str = "u1",
    *,
    base_version: int = 0,
    num_samples: int = 10,
    delta: Arrays | None = None,
    tensors: tuple[CompressedTensor, ...] | None = None,
    run_id: str = RUN,
    loss: float = 0.5,
) -> Update:
    if tensors is None:
        tensors = tuple(dense_tensor(n, a) for n, a in (delta or DELTA).items())
    return Update(
        update_id=update_id,
        run_id=run_id,
        base_version=base_version,
        num_samples=num_samples,
        metrics=TrainMetrics(loss=loss, accuracy=0.5, seconds=1.0),
        delta=tensors,
    )


def scaled(factor: float) -> dict[str, np.ndarray]:
    return {name: (factor * t).astype(np.float32) for name, t in DELTA.items()}


def send(
    core: AggregatorCore,
    update: Update,
    *,
    node: str = "n1",
    sender: str | None = None,
    now: float = 0.0,
) -> Verdict:
    return core.receive(node, sender or node, update, SIZE, now)


def assert_params_equal(actual: Arrays, expected: Arrays) -> None:
    assert list(actual) == list(expected)
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name])


def tally_of(core: AggregatorCore, node: str) -> Any:
    (entry,) = [e for e in core.node_tallies() if e.node == node]
    return entry


# -- rejections

W_ONLY = {"w": DELTA["w"]}


def _with(name: str, value: float) -> dict[str, np.ndarray]:
    delta = {k: v.copy() for k, v in DELTA.items()}
    delta[name].flat[0] = value
    return delta


REJECTIONS = [
    pytest.param({}, {"sender": "n2"}, make_update(), RejectReason.WRONG_SENDER, id="wrong-sender"),
    pytest.param({}, {}, make_update(run_id="run-2"), RejectReason.WRONG_RUN, id="wrong-run"),
    pytest.param(
        {"state": AggregatorState.STOPPED},
        {},
        make_update(),
        RejectReason.RUN_STOPPED,
        id="stopped-run",
    ),
    pytest.param(
        {"version": 3}, {}, make_update(base_version=4), RejectReason.FUTURE_VERSION, id="future"
    ),
    pytest.param(
        {"version": 5, "max_staleness": 2},
        {},
        make_update(base_version=2),
        RejectReason.STALE,
        id="stale",
    ),
    pytest.param(
        {}, {}, make_update(delta=W_ONLY), RejectReason.SHAPE_MISMATCH, id="missing-tensor"
    ),
    pytest.param(
        {},
        {},
        make_update(delta={**DELTA, "extra": np.zeros(1, np.float32)}),
        RejectReason.SHAPE_MISMATCH,
        id="extra-tensor",
    ),
    pytest.param(
        {},
        {},
        make_update(
            tensors=(
                dense_tensor("w", DELTA["w"]),
                dense_tensor("w", DELTA["w"]),
                dense_tensor("b", DELTA["b"]),
            )
        ),
        RejectReason.SHAPE_MISMATCH,
        id="tensor-twice",
    ),
    pytest.param(
        {},
        {},
        make_update(delta={"w": DELTA["w"].reshape(3, 2), "b": DELTA["b"]}),
        RejectReason.SHAPE_MISMATCH,
        id="wrong-shape",
    ),
    pytest.param(
        {"compression": Compression(top_k=0.5)},
        {},
        make_update(),
        RejectReason.COMPRESSION_POLICY,
        id="denser-than-asked",
    ),
    pytest.param(
        {},
        {},
        make_update(
            tensors=(
                CompressedTensor(
                    name="w",
                    shape=(2, 3),
                    count=2,
                    index_coding="varint",
                    indices=bytes([1, 9]),  # indices 1 and 10 of 6
                    values_dtype="float32",
                    values=np.ones(2, np.float32).tobytes(),
                ),
                dense_tensor("b", DELTA["b"]),
            )
        ),
        RejectReason.MALFORMED,
        id="index-out-of-range",
    ),
    pytest.param({}, {}, make_update(delta=_with("w", np.nan)), RejectReason.NON_FINITE, id="nan"),
    pytest.param({}, {}, make_update(delta=_with("b", np.inf)), RejectReason.NON_FINITE, id="inf"),
    pytest.param(
        {}, {}, make_update(delta=_with("b", -np.inf)), RejectReason.NON_FINITE, id="-inf"
    ),
    pytest.param(
        {"max_update_norm": 0.1},
        {},
        make_update(),
        RejectReason.NORM_BOUND,
        id="norm-bound",
    ),
]


@pytest.mark.parametrize(("core_options", "send_options", "update", "reason"), REJECTIONS)
def test_rejected_update_is_counted_and_changes_nothing(
    core_options: dict[str, Any],
    send_options: dict[str, Any],
    update: Update,
    reason: RejectReason,
) -> None:
    """Each rule rejects with its reason, counted overall and per node; model and buffer stay."""
    core = make_core(**core_options)
    version = core.version
    verdict = send(core, update, **send_options)
    assert verdict.accepted is False
    assert verdict.reason is reason
    assert not verdict.duplicate
    assert verdict.detail
    counters = core.counters()
    assert (counters.received, counters.accepted, counters.rejected) == (1, 0, 1)
    assert counters.rejections == {reason.value: 1}
    assert counters.bytes_received == SIZE
    entry = tally_of(core, "n1")
    assert (entry.accepted, entry.rejected, entry.folded) == (0, 1, 0)
    assert entry.rejections == {reason.value: 1}
    assert core.buffer == ()
    assert core.version == version
    assert_params_equal(core.params, PARAMS)
    if reason is RejectReason.WRONG_SENDER:
        # Not remembered: the id may belong to the rightful node, whose update must still count.
        assert update.update_id not in core.seen
    else:
        assert core.seen[update.update_id] == reason.value
    assert core.fold_due(now=1e9) is None


def test_rejection_leaves_an_existing_buffer_alone() -> None:
    """A rejected update after an accepted one leaves exactly the accepted one in the buffer."""
    core = make_core(buffer_size=3)
    send(core, make_update("good"))
    verdict = send(core, make_update("bad", delta=_with("w", np.nan)))
    assert verdict.reason is RejectReason.NON_FINITE
    assert [u.update_id for u in core.buffer] == ["good"]
    assert_params_equal(core.params, PARAMS)


def test_update_within_norm_bound_is_accepted() -> None:
    """An update whose global norm is at most max_update_norm passes the norm rule."""
    norm = float(np.sqrt(sum(float(np.sum(t.astype(np.float64) ** 2)) for t in DELTA.values())))
    core = make_core(max_update_norm=norm * 1.001)
    assert send(core, make_update()).accepted


def test_update_at_max_staleness_is_accepted() -> None:
    """Staleness equal to max_staleness is still allowed; only beyond it is stale."""
    core = make_core(version=5, max_staleness=2)
    verdict = send(core, make_update(base_version=3))
    assert verdict == Verdict(accepted=True)
    assert core.version - core.buffer[0].base_version == 2


# -- acceptance


def test_accepted_update_is_buffered_seen_and_counted() -> None:
    """A valid update is buffered with its base version, marked seen, and counted for its node."""
    core = make_core(version=2, buffer_size=5)
    verdict = send(core, make_update(base_version=1, num_samples=7), now=12.5)
    assert verdict == Verdict(accepted=True)
    (buffered,) = core.buffer
    assert (buffered.node, buffered.update_id, buffered.base_version) == ("n1", "u1", 1)
    assert (buffered.num_samples, buffered.received_at) == (7, 12.5)
    assert_params_equal(densify(buffered.delta), DELTA)
    assert core.seen == {"u1": "accepted"}
    counters = core.counters()
    assert (counters.received, counters.accepted, counters.rejected) == (1, 1, 0)
    entry = tally_of(core, "n1")
    assert (entry.accepted, entry.last_base_version, entry.last_staleness) == (1, 1, 1)
    assert entry.last_seen == 12.5


def test_duplicate_of_an_accepted_update_is_acknowledged_but_not_buffered_again() -> None:
    """Resending an accepted update id answers accepted+duplicate and buffers nothing new."""
    core = make_core(buffer_size=5)
    send(core, make_update())
    verdict = send(core, make_update())
    assert verdict.accepted is True
    assert verdict.duplicate is True
    assert len(core.buffer) == 1
    counters = core.counters()
    assert (counters.received, counters.accepted, counters.duplicates) == (2, 1, 1)


def test_duplicate_of_a_folded_update_is_never_folded_again() -> None:
    """After its fold, the same update id is a duplicate: no second buffer entry, no new version."""
    core = make_core(buffer_size=1)
    send(core, make_update())
    core.fold(now=0.0)
    params = {k: v.copy() for k, v in core.params.items()}
    verdict = send(core, make_update(base_version=1))
    assert verdict == Verdict(accepted=True, duplicate=True, detail=verdict.detail)
    assert core.buffer == ()
    assert core.fold_due(now=0.0) is None
    assert core.version == 1
    assert_params_equal(core.params, params)
    assert core.counters().folded == 1


def test_paused_run_accepts_and_buffers_updates() -> None:
    """PAUSED accepts updates into the buffer (work in flight is kept) but does not fold."""
    core = make_core(state=AggregatorState.PAUSED, buffer_size=2)
    assert send(core, make_update("u1")).accepted
    assert send(core, make_update("u2")).accepted
    assert len(core.buffer) == 2
    assert core.fold_due(now=0.0) is None


# -- folding


def test_no_fold_below_buffer_size() -> None:
    """With fewer than K updates and no timeout, no fold is due."""
    core = make_core(buffer_size=3)
    send(core, make_update("u1"))
    send(core, make_update("u2"))
    assert core.fold_due(now=1e6) is None
    assert core.next_deadline() is None
    with pytest.raises(ControlError, match=r"^nothing to fold$"):
        core.fold(now=0.0)


def test_fold_is_due_when_the_buffer_is_full() -> None:
    """The K-th accepted update makes a fold due, for reason buffer_full."""
    core = make_core(buffer_size=2)
    send(core, make_update("u1"))
    assert core.fold_due(now=0.0) is None
    send(core, make_update("u2"))
    assert core.fold_due(now=0.0) == "buffer_full"


def test_fold_is_due_when_the_oldest_update_waited_buffer_timeout() -> None:
    """With buffer_timeout, a partial buffer folds once its oldest update waited that long."""
    core = make_core(buffer_size=5, buffer_timeout=10.0)
    send(core, make_update("u1"), now=100.0)
    send(core, make_update("u2"), now=105.0)
    assert core.next_deadline() == 110.0
    assert core.fold_due(now=109.9) is None
    assert core.fold_due(now=110.0) == "buffer_timeout"
    fold = core.fold(now=110.0)
    assert fold.record.reason == "buffer_timeout"
    assert fold.folded_ids == ("u1", "u2")
    assert core.next_deadline() is None


def test_paused_run_folds_after_resume() -> None:
    """A full buffer waits while PAUSED and folds as soon as the run resumes."""
    core = make_core(buffer_size=2)
    core.command(ControlCommand.PAUSE)
    send(core, make_update("u1"))
    send(core, make_update("u2"))
    assert core.fold_due(now=0.0) is None
    with pytest.raises(ControlError, match=r"^nothing to fold$"):
        core.fold(now=0.0)
    core.command(ControlCommand.RESUME)
    assert core.fold_due(now=0.0) == "buffer_full"
    assert core.fold(now=0.0).version == 1


def test_idle_run_does_not_fold() -> None:
    """Before start, a full buffer is not folded."""
    core = make_core(state=AggregatorState.IDLE, buffer_size=1)
    send(core, make_update())
    assert core.fold_due(now=0.0) is None


def test_fold_takes_at_most_k_oldest_updates() -> None:
    """A buffer longer than K folds its K oldest updates and keeps the rest, in order."""
    core = make_core(buffer_size=2, state=AggregatorState.PAUSED)
    for i in range(5):
        send(core, make_update(f"u{i}"), now=float(i))
    core.command(ControlCommand.RESUME)
    fold = core.fold(now=10.0)
    assert fold.folded_ids == ("u0", "u1")
    assert [u.update_id for u in core.buffer] == ["u2", "u3", "u4"]
    assert [c.update_id for c in fold.record.contributions] == ["u0", "u1"]
    assert core.counters().folded == 2


def test_updates_left_in_the_buffer_count_the_versions_folded_before_them() -> None:
    """Every contribution's staleness is the versions between its base and the params it updates."""
    core = make_core(buffer_size=3, max_staleness=0)
    for i in range(3):
        send(core, make_update(f"u{i}"))
    core.set_knobs({"buffer_size": 1})
    records = [core.fold(now=0.0).record for _ in range(3)]
    for record in records:
        for c in record.contributions:
            assert c.staleness == record.version - 1 - c.base_version, record


def test_fold_increments_the_version_and_records_the_contributions() -> None:
    """A fold makes version t+1 whose record gives each update's staleness, f(s) and weight."""
    core = make_core(version=3, buffer_size=2, staleness=StalenessKind.POLYNOMIAL, staleness_a=0.5)
    send(core, make_update("fresh", base_version=3, num_samples=10, loss=1.0), node="a")
    send(core, make_update("stale", base_version=0, num_samples=30, loss=2.0), node="b")
    fold = core.fold(now=42.0)
    assert fold.version == core.version == 4
    record = fold.record
    assert (record.run_id, record.version, record.created_at) == (RUN, 4, 42.0)
    assert record.reason == "buffer_full"
    fresh, stale = record.contributions
    assert (fresh.node, fresh.staleness, fresh.staleness_factor) == ("a", 0, 1.0)
    assert (stale.node, stale.staleness, stale.base_version) == ("b", 3, 0)
    assert stale.staleness_factor == pytest.approx(0.5)
    assert stale.staleness_factor < 1
    assert fresh.weight == pytest.approx(10 / 40)
    assert stale.weight == pytest.approx(30 * 0.5 / 40)
    assert (fresh.num_samples, stale.num_samples) == (10, 30)
    assert (fresh.bytes, fresh.train_loss, stale.train_loss) == (SIZE, 1.0, 2.0)
    assert record.update_norm >= 0
    assert record.fold_seconds >= 0
    assert [(e.node, e.folded) for e in core.node_tallies()] == [("a", 1), ("b", 1)]


@pytest.mark.parametrize(
    ("server_lr", "sample_exponent"),
    [
        pytest.param(1.0, 1.0, id="lr1-by-samples"),
        pytest.param(0.5, 1.0, id="lr0.5-by-samples"),
        pytest.param(2.0, 0.0, id="lr2-equal-hospitals"),
    ],
)
def test_sgd_fold_adds_server_lr_times_the_weighted_aggregate(
    server_lr: float, sample_exponent: float
) -> None:
    """New params are old + lr * sum(n_i**beta f(s_i) delta_i) / sum(n_i**beta), per tensor."""
    core = make_core(version=2, buffer_size=3, server_lr=server_lr, sample_exponent=sample_exponent)
    updates = [("a", 2, 10, 1.0), ("b", 1, 20, -2.0), ("c", 0, 5, 3.0)]
    for node, base, n, factor in updates:
        send(
            core,
            make_update(node, base_version=base, num_samples=n, delta=scaled(factor)),
            node=node,
        )
    fold = core.fold(now=0.0)
    a = [n**sample_exponent for _, _, n, _ in updates]
    f = [(1 + (2 - base)) ** -0.5 for _, base, _, _ in updates]
    for name, x in PARAMS.items():
        aggregate = sum(
            ai * fi * factor * DELTA[name].astype(np.float64)
            for ai, fi, (_, _, _, factor) in zip(a, f, updates, strict=True)
        ) / sum(a)
        expected = x.astype(np.float64) + server_lr * aggregate
        np.testing.assert_allclose(core.params[name], expected, rtol=1e-6, atol=1e-7)
        assert core.params[name].dtype == np.float32
    assert_params_equal(fold.params, core.params)


def test_max_versions_stops_the_run_after_the_fold() -> None:
    """The fold that reaches max_versions stops the run; later updates are refused."""
    core = make_core(buffer_size=1, max_versions=2)
    send(core, make_update("u1"))
    core.fold(now=0.0)
    assert core.state is AggregatorState.RUNNING
    send(core, make_update("u2", base_version=1))
    assert core.fold(now=0.0).version == 2
    assert core.state is AggregatorState.STOPPED
    assert send(core, make_update("u3", base_version=2)).reason is RejectReason.RUN_STOPPED


def test_synchronous_fedavg_folds_a_round_when_every_node_reported() -> None:
    """buffer_size = n, max_staleness = 0: each round folds exactly at n; late ones are stale."""
    nodes = ["a", "b", "c"]
    core = make_core(buffer_size=3, max_staleness=0)
    for round_ in range(2):
        for i, node in enumerate(nodes):
            assert core.fold_due(now=0.0) is None
            update = make_update(f"{node}{round_}", base_version=round_, num_samples=10 * (i + 1))
            assert send(core, update, node=node).accepted
        assert core.fold_due(now=0.0) == "buffer_full"
        assert core.fold(now=0.0).version == round_ + 1
        late = send(core, make_update(f"late{round_}", base_version=round_), node="a")
        assert late.reason is RejectReason.STALE
    expected = {k: PARAMS[k] + 2 * DELTA[k] for k in PARAMS}  # FedAvg of equal deltas, twice
    for name in PARAMS:
        np.testing.assert_allclose(core.params[name], expected[name], rtol=1e-6, atol=1e-7)


def test_fedasync_folds_every_update_at_once_with_weight_f_of_s() -> None:
    """buffer_size = 1, server_lr = alpha: x + alpha * f(s) * delta right after each update."""
    alpha = 0.6
    core = make_core(version=4, buffer_size=1, server_lr=alpha, staleness_a=0.5)
    before = {k: v.astype(np.float64) for k, v in core.params.items()}
    send(core, make_update("u1", base_version=1, num_samples=17))
    assert core.fold_due(now=0.0) == "buffer_full"
    fold = core.fold(now=0.0)
    (contribution,) = fold.record.contributions
    assert contribution.staleness == 3
    assert contribution.weight == pytest.approx(0.5)
    for name in PARAMS:
        np.testing.assert_allclose(
            core.params[name], before[name] + alpha * 0.5 * DELTA[name], rtol=1e-6
        )


# -- knobs, commands, status


def test_set_knobs_applies_a_valid_patch() -> None:
    """A patch of top-level and training.<field> knobs is validated and applied."""
    core = make_core()
    knobs = core.set_knobs(
        {"buffer_size": 5, "server_lr": 0.25, "staleness": "hinge", "training.epochs": 3}
    )
    assert knobs is core.knobs
    assert (knobs.buffer_size, knobs.server_lr, knobs.staleness) == (5, 0.25, StalenessKind.HINGE)
    assert knobs.training == TrainingConfig(epochs=3)


def test_set_knobs_can_clear_an_optional_knob() -> None:
    """An optional knob such as max_update_norm is set and cleared with None."""
    core = make_core()
    assert core.set_knobs({"max_update_norm": 2.0}).max_update_norm == 2.0
    assert core.set_knobs({"max_update_norm": None}).max_update_norm is None


def _invalid(field: str, problem: str) -> str:
    """The start of set_knobs' refusal of one invalid value (pydantic's words)."""
    return f"invalid knob value: 1 validation error for Knobs\n{field}\n  {problem}"


@pytest.mark.parametrize(
    ("patch", "reason"),
    [
        pytest.param({"no_such_knob": 1}, "unknown knob 'no_such_knob'", id="unknown"),
        pytest.param({"training": 3}, "unknown knob 'training'", id="training-as-a-value"),
        pytest.param(
            {"training.no_such_field": 1},
            "unknown knob 'training.no_such_field'",
            id="unknown-training-field",
        ),
        pytest.param({"other.epochs": 1}, "unknown knob 'other.epochs'", id="unknown-group"),
        pytest.param(
            {"buffer_size": 0},
            _invalid("buffer_size", "Input should be greater than or equal to 1"),
            id="buffer-size-zero",
        ),
        pytest.param(
            {"buffer_size": "many"},
            _invalid("buffer_size", "Input should be a valid integer,"),
            id="buffer-size-text",
        ),
        pytest.param(
            {"server_lr": -1.0},
            _invalid("server_lr", "Input should be greater than 0"),
            id="negative-lr",
        ),
        pytest.param(
            {"staleness": "linear"},
            _invalid("staleness", "Input should be 'constant', 'polynomial' or 'hinge'"),
            id="unknown-staleness",
        ),
        pytest.param(
            {"server_optimizer": "lion"},
            _invalid(
                "server_optimizer", "Input should be 'sgd', 'fedavgm', 'fedadam' or 'fedyogi'"
            ),
            id="unknown-optimizer",
        ),
        pytest.param(
            {"training.epochs": 0},
            _invalid("training.epochs", "Input should be greater than or equal to 1"),
            id="zero-epochs",
        ),
        pytest.param(
            {"buffer_size": 4, "server_lr": 0.0},
            _invalid("server_lr", "Input should be greater than 0"),
            id="valid-then-invalid",
        ),
    ],
)
def test_set_knobs_refuses_a_bad_patch_and_changes_nothing(
    patch: dict[str, Any], reason: str
) -> None:
    """An unknown knob or an invalid value raises ControlError naming the knob and what is wrong,
    and leaves every knob as it was."""
    core = make_core(buffer_size=2)
    before = core.knobs
    with pytest.raises(ControlError) as info:
        core.set_knobs(patch)
    assert str(info.value).startswith(reason), str(info.value)
    assert core.knobs == before


def test_illegal_command_raises_and_keeps_the_state() -> None:
    """An illegal command raises ControlError and the run stays in its state."""
    core = make_core(state=AggregatorState.RUNNING)
    with pytest.raises(
        ControlError, match=r"^cannot resume a run that is running \(allowed: pause, stop\)$"
    ):
        core.command(ControlCommand.RESUME)
    assert core.state is AggregatorState.RUNNING
    assert core.command(ControlCommand.STOP) is AggregatorState.STOPPED


def test_status_tallies_and_counters_reflect_everything() -> None:
    """status() reports run, state, version, buffer fill, knobs, counters and every node."""
    core = make_core(buffer_size=3)
    send(core, make_update("u1"), node="a", now=1.0)
    send(core, make_update("u2", delta=_with("w", np.nan)), node="b", now=2.0)
    send(core, make_update("u1"), node="a", now=3.0)
    status = core.status(now=9.0)
    assert (status.run_id, status.state, status.version) == (RUN, AggregatorState.RUNNING, 0)
    assert (status.buffer_fill, status.updated_at) == (1, 9.0)
    assert status.knobs == core.knobs
    assert status.counters == Counters(
        received=3,
        accepted=1,
        rejected=1,
        duplicates=1,
        bytes_received=3 * SIZE,
        bytes_accepted=SIZE,
        raw_bytes_accepted=4 * sum(a.size for a in DELTA.values()),
        rejections={"non_finite": 1},
    )
    assert status.counters == core.counters()
    assert status.nodes == core.node_tallies()
    a, b = status.nodes
    assert (a.node, a.accepted, a.rejected, a.last_seen) == ("a", 1, 0, 3.0)
    assert (b.node, b.accepted, b.rejected, b.rejections) == ("b", 0, 1, {"non_finite": 1})
    assert (a.bytes_received, b.bytes_received) == (2 * SIZE, SIZE)


def test_counters_are_a_snapshot() -> None:
    """A Counters value taken earlier does not change when more updates arrive."""
    core = make_core()
    snapshot = core.counters()
    send(core, make_update(run_id="other"))
    assert snapshot == Counters()
    assert core.counters().rejections == {"wrong_run": 1}


def test_note_malformed_counts_a_rejection_for_the_node() -> None:
    """A message that never decoded is counted as received and rejected for its topic's node."""
    core = make_core()
    core.note_malformed("n1", RejectReason.TOO_LARGE, now=5.0, size=9999)
    counters = core.counters()
    assert (counters.received, counters.rejected, counters.bytes_received) == (1, 1, 9999)
    assert counters.rejections == {"too_large": 1}
    assert tally_of(core, "n1").rejections == {"too_large": 1}
    assert tally_of(core, "n1").bytes_received == 9999


@pytest.mark.parametrize(
    ("reason", "detail", "expected"),
    [
        pytest.param(
            Refused.TOO_LARGE,
            "9999 bytes, over the limit of 100",
            Unreadable(RejectReason.TOO_LARGE, "over max_update_bytes", 9999),
            id="too-large",
        ),
        pytest.param(
            Refused.MALFORMED,
            "x" * 300,
            Unreadable(RejectReason.MALFORMED, "x" * 200, 9999),
            id="malformed",
        ),
        pytest.param(
            Refused.WRONG_KIND,
            "ack on the update topic",
            Unreadable(RejectReason.MALFORMED, "ack on the update topic", 9999),
            id="wrong-kind",
        ),
    ],
)
def test_refuse_judges_and_counts_what_arrived_on_an_update_topic_but_is_no_update(
    reason: Refused, detail: str, expected: Unreadable
) -> None:
    """The core decides the rejection for an update topic's refused message and counts it."""
    core = make_core()
    topic = TopicTree("fed").update("n1")
    unreadable = core.refuse("n1", Refusal(str(topic), topic, reason, detail, 9999), now=5.0)
    assert unreadable == expected
    counters = core.counters()
    assert (counters.received, counters.rejected, counters.bytes_received) == (1, 1, 9999)
    assert tally_of(core, "n1").rejections == {expected.reason.value: 1}


def _evaluation(version: int, accuracy: float, run_id: str = RUN) -> Evaluation:
    return Evaluation(
        run_id=run_id, version=version, loss=0.3, accuracy=accuracy, correct=1, num_examples=2
    )


def test_record_evaluation_keeps_the_newest_version() -> None:
    """A node's tally shows the accuracy of the newest version it evaluated, whatever the order."""
    core = make_core()
    core.record_evaluation("a", _evaluation(2, 0.8))
    core.record_evaluation("a", _evaluation(1, 0.5))
    assert (tally_of(core, "a").eval_version, tally_of(core, "a").eval_accuracy) == (2, 0.8)
    core.record_evaluation("a", _evaluation(3, 0.9))
    assert (tally_of(core, "a").eval_version, tally_of(core, "a").eval_accuracy) == (3, 0.9)


def test_record_evaluation_ignores_other_runs() -> None:
    """An evaluation of another run's model changes no node's tally."""
    core = make_core()
    core.record_evaluation("a", _evaluation(5, 0.9, run_id="old-run"))
    assert core.node_tallies() == ()


def test_core_copies_the_params_it_is_given() -> None:
    """Folding never writes into the caller's arrays."""
    params = {k: v.copy() for k, v in PARAMS.items()}
    core = AggregatorCore(
        run_id=RUN, params=params, knobs=Knobs(buffer_size=1), state=AggregatorState.RUNNING
    )
    send(core, make_update())
    core.fold(now=0.0)
    assert_params_equal(params, PARAMS)


def test_folds_reuse_the_memory_of_versions_nobody_holds() -> None:
    """A long run's versions live in two places in memory, alternately, whatever the optimizer."""
    for optimizer in (ServerOptimizerKind.SGD, ServerOptimizerKind.FEDADAM):
        core = make_core(buffer_size=1, server_optimizer=optimizer)
        places = set()
        for i in range(20):
            send(core, make_update(f"u{i}", base_version=core.version))
            fold = core.fold(now=0.0)
            assert isinstance(fold, Fold)
            places.add(fold.params["w"].__array_interface__["data"][0])
        assert core.version == 20
        assert len(places) == 2


def test_a_version_a_caller_holds_is_never_written_over() -> None:
    """Folds go on while versions are held: every held version keeps the values it was made with."""
    core = make_core(buffer_size=1)
    held: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = []
    for i in range(12):
        send(core, make_update(f"u{i}", base_version=core.version, delta=scaled(i + 1.0)))
        fold = core.fold(now=0.0)
        if i % 3 == 0:  # keep every third version, as a slow publisher or a test might
            held.append((dict(fold.params), {k: v.copy() for k, v in fold.params.items()}))
    for arrays, values in held:
        assert_params_equal(arrays, values)


# -- resuming from exported state


def _drive(core: AggregatorCore, first: int, count: int) -> list[Any]:
    """Feed ``count`` updates and fold whenever due; return the verdicts and records."""
    out: list[Any] = []
    for i in range(first, first + count):
        node = "ab"[i % 2]
        update = make_update(
            f"s{i}",
            base_version=max(core.version - i % 2, 0),
            delta=scaled(i - 1.5),
            num_samples=i + 1,
        )
        out.append(send(core, update, node=node, now=float(i)))
        if i % 3 == 0:
            out.append(send(core, make_update(f"bad{i}", run_id="other"), node=node, now=float(i)))
        while core.fold_due(now=float(i)) is not None:
            out.append(_timeless(core.fold(now=float(i)).record))
    return out


def _timeless(record: VersionRecord) -> VersionRecord:
    """The record without its measured durations, which differ from run to run."""
    contributions = tuple(
        c.model_copy(update={"decode_seconds": 0.0}) for c in record.contributions
    )
    return record.model_copy(update={"fold_seconds": 0.0, "contributions": contributions})


def _resumed(core: AggregatorCore) -> AggregatorCore:
    return AggregatorCore(
        run_id=core.run_id,
        params=core.params,
        knobs=core.knobs,
        version=core.version,
        state=core.state,
        optimizer_state=core.optimizer_state,
        seen=core.seen,
        counters=core.counters(),
        nodes=core.node_tallies(),
    )


def test_core_rebuilt_from_exported_state_continues_identically() -> None:
    """seen, counters, tallies, optimizer state, params, version and state are a complete resume."""
    knobs = {"buffer_size": 2, "server_optimizer": ServerOptimizerKind.FEDADAM, "server_lr": 0.1}
    original = make_core(**knobs)
    _drive(original, 0, 6)
    original.record_evaluation("a", _evaluation(original.version, 0.7))
    assert original.buffer == ()
    assert original.optimizer_state.step > 0
    resumed = _resumed(original)

    assert send(resumed, make_update("s0"), node="a").duplicate
    assert send(original, make_update("s0"), node="a").duplicate
    assert _drive(resumed, 6, 6) == _drive(original, 6, 6)
    assert resumed.version == original.version
    assert_params_equal(resumed.params, original.params)
    assert resumed.optimizer_state.step == original.optimizer_state.step
    assert_params_equal(resumed.optimizer_state.m, original.optimizer_state.m)
    assert_params_equal(resumed.optimizer_state.v, original.optimizer_state.v)
    assert resumed.status(now=99.0) == original.status(now=99.0)


def test_restored_buffered_update_folds_as_if_never_interrupted() -> None:
    """An update buffered at export goes back with restore_buffered and folds with the next one."""
    original = make_core(version=1, buffer_size=2)
    pending = make_update("p", base_version=0, delta=scaled(2.0))
    send(original, pending, now=1.0)
    resumed = _resumed(original)
    resumed.restore_buffered("n1", pending, SIZE, now=1.0)
    assert resumed.counters() == original.counters()
    assert [u.update_id for u in resumed.buffer] == ["p"]
    assert send(resumed, pending).duplicate
    for core in (original, resumed):
        send(core, make_update("q", base_version=1), node="n2", now=2.0)
    fold_a, fold_b = original.fold(now=3.0), resumed.fold(now=3.0)
    assert _timeless(fold_a.record) == _timeless(fold_b.record)
    assert_params_equal(resumed.params, original.params)


def test_restore_buffered_refuses_an_update_that_does_not_fit_the_model() -> None:
    """A logged update whose tensors do not match the model raises instead of poisoning it."""
    core = make_core()
    with pytest.raises(ValueError, match="does not fit"):
        core.restore_buffered("n1", make_update(delta=W_ONLY), SIZE, now=0.0)


def test_huge_but_finite_update_folds_into_a_valid_record() -> None:
    """An accepted finite update, however large, folds; its record's norm is finite."""
    core = make_core(buffer_size=1)
    huge = {"w": np.full((2, 3), 1e20, np.float32), "b": np.zeros(2, np.float32)}
    assert send(core, make_update(delta=huge)).accepted
    fold = core.fold(now=0.0)
    assert fold.record.update_norm == pytest.approx(1e20 * np.sqrt(6), rel=1e-5)


def test_an_impostor_replaying_an_accepted_id_is_refused() -> None:
    """A node replaying another's accepted update on its own topic gets wrong_sender."""
    core = make_core(buffer_size=5)
    update = make_update()
    assert send(core, update).accepted
    verdict = send(core, update, node="n2", sender="n1")
    assert (verdict.accepted, verdict.reason) == (False, RejectReason.WRONG_SENDER)
    assert core.counters().duplicates == 0


def test_refold_makes_the_logged_version_again_bit_for_bit() -> None:
    """Recovery between checkpoints: refold of a record gives the weights the fold gave."""
    original = make_core(buffer_size=2, server_optimizer=ServerOptimizerKind.FEDADAM)
    updates = [make_update(f"u{i}", delta=scaled(0.5 + i)) for i in range(3)]
    for u in updates:
        send(original, u, now=1.0)
    fold = original.fold(2.0)
    assert isinstance(fold, Fold)

    again = make_core(buffer_size=2, server_optimizer=ServerOptimizerKind.FEDADAM)
    for u in updates:
        again.restore_buffered("n1", u, SIZE, now=5.0, count=True)
    refolded = again.refold(fold.record, now=6.0)
    assert refolded.folded_ids == fold.folded_ids
    for name, value in fold.params.items():
        assert np.array_equal(again.params[name], value)
    assert [u.update_id for u in again.buffer] == ["u2"]
    assert again.counters().model_dump(exclude={"duplicates"}) == original.counters().model_dump(
        exclude={"duplicates"}
    )


def test_refold_refuses_a_record_it_cannot_make_again() -> None:
    """A record for another version, or naming updates not buffered, raises and changes nothing."""
    original = make_core(buffer_size=1)
    send(original, make_update("u1"))
    fold = original.fold(1.0)
    assert isinstance(fold, Fold)
    empty = make_core(buffer_size=1)
    with pytest.raises(ControlError, match="not buffered"):
        empty.refold(fold.record, now=2.0)
    ahead = make_core(buffer_size=1, version=3)
    with pytest.raises(ControlError, match="cannot refold"):
        ahead.refold(fold.record, now=2.0)
    assert (empty.version, ahead.version) == (0, 3)


# -- discarded batches, the probe, rollback


def huge_probe(params: Mapping[str, np.ndarray]) -> str | None:
    """Stands for the model on a probe batch: weights beyond 1e30 give infinite outputs."""
    return (
        "outputs not finite"
        if max(float(np.abs(p).max()) for p in params.values()) > 1e30
        else None
    )


def fill(core: AggregatorCore, *updates: tuple[str, str, Arrays, int]) -> None:
    for node, update_id, delta, samples in updates:
        update = make_update(update_id, delta=delta, num_samples=samples, base_version=core.version)
        assert core.receive(node, node, update, SIZE, now=0.0).accepted


@pytest.mark.parametrize(
    ("knobs", "probe", "attack", "detail"),
    [
        pytest.param(
            {"server_lr": 2.0}, None, 3e38, "aggregate of these updates is not finite", id="sum"
        ),
        pytest.param({}, huge_probe, 1e35, "fails the probe: outputs not finite", id="probe"),
    ],
)
def test_a_batch_that_cannot_become_a_version_is_discarded_not_rejected(
    knobs: dict[str, Any], probe: Any, attack: float, detail: str
) -> None:
    """A non-finite sum, or a version whose outputs fail the probe: the batch is discarded, each
    update counted ``discarded`` (not rejected), its node named, and the version stays."""
    core = AggregatorCore(
        run_id=RUN, params=PARAMS, knobs=Knobs(**knobs), state=AggregatorState.RUNNING, probe=probe
    )
    big = {name: np.full(t.shape, attack, np.float32) for name, t in DELTA.items()}
    fill(core, ("a", "u1", big, 10**6), ("b", "u2", big, 10))
    result = core.fold(now=1.0)
    assert isinstance(result, Discard)
    assert (result.update_ids, result.nodes) == (("u1", "u2"), ("a", "b"))
    assert detail in result.detail
    counters = core.counters()
    assert (counters.accepted, counters.discarded, counters.rejected, counters.folded) == (
        2,
        2,
        0,
        0,
    )
    assert counters.rejections == {}
    assert counters.probe_failures == (1 if probe else 0)
    assert {e.node: (e.discarded, e.rejected) for e in core.node_tallies()} == {
        "a": (1, 0),
        "b": (1, 0),
    }
    assert core.version == 0
    assert all(np.array_equal(core.params[n], PARAMS[n]) for n in PARAMS)
    assert core.buffer == ()
    again = core.receive("a", "a", make_update("u1"), SIZE, now=2.0)
    assert (again.accepted, again.reason) == (False, RejectReason.REPLAY)
    assert "discarded" in again.detail


def test_a_version_that_passes_the_probe_is_folded_and_the_probe_saw_it() -> None:
    """The probe is asked about the candidate weights, and a pass makes the version."""
    seen: list[dict[str, np.ndarray]] = []

    def probe(params: Mapping[str, np.ndarray]) -> str | None:
        seen.append({n: p.copy() for n, p in params.items()})
        return None

    core = AggregatorCore(
        run_id=RUN, params=PARAMS, knobs=Knobs(), state=AggregatorState.RUNNING, probe=probe
    )
    fill(core, ("a", "u1", DELTA, 10), ("b", "u2", DELTA, 10))
    fold = core.fold(now=1.0)
    assert isinstance(fold, Fold)
    assert len(seen) == 1
    assert all(np.array_equal(seen[0][n], fold.params[n]) for n in PARAMS)


def two_versions(**kwargs: Any) -> tuple[AggregatorCore, dict[str, np.ndarray]]:
    """A core at v2, and its v1 weights."""
    core = AggregatorCore(
        run_id=RUN, params=PARAMS, knobs=Knobs(), state=AggregatorState.RUNNING, **kwargs
    )
    fill(core, ("a", "u1", DELTA, 10), ("b", "u2", DELTA, 10))
    assert isinstance(core.fold(now=1.0), Fold)
    v1 = {n: p.copy() for n, p in core.params.items()}
    fill(core, ("a", "u3", DELTA, 10), ("b", "u4", DELTA, 10))
    assert isinstance(core.fold(now=2.0), Fold)
    return core, v1


def test_a_rollback_is_a_new_version_with_the_old_weights() -> None:
    """Rolling back to v1 from v2 makes v3 with v1's weights, recorded as a rollback of v1; an
    update buffered from v2 is one version stale at the next fold."""
    core, v1 = two_versions()
    fill(core, ("a", "u5", DELTA, 10))
    fold = core.rollback(1, v1, ServerOptimizerState(), now=3.0)
    assert (fold.version, core.version) == (3, 3)
    assert all(np.array_equal(core.params[n], v1[n]) for n in PARAMS)
    assert (fold.record.reason, fold.record.rollback_of, fold.record.contributions) == (
        "rollback",
        1,
        (),
    )
    assert core.counters().rollbacks == 1
    assert [u.update_id for u in core.buffer] == ["u5"]
    fill(core, ("b", "u6", DELTA, 10))
    record = core.fold(now=4.0)
    assert isinstance(record, Fold)
    assert [c.staleness for c in record.record.contributions] == [1, 0]


@pytest.mark.parametrize(
    ("target", "params", "match"),
    [
        pytest.param(2, None, "not an earlier version", id="the-current-version"),
        pytest.param(5, None, "not an earlier version", id="a-future-version"),
        pytest.param(1, {"w": np.zeros((2, 3), np.float32)}, "do not fit", id="misfit-weights"),
        pytest.param(1, "huge", "fails the probe", id="fails-the-probe"),
        pytest.param(1, "nan", "not finite", id="non-finite-weights"),
    ],
)
def test_a_rollback_that_cannot_be_made_is_refused_and_changes_nothing(
    target: int, params: Any, match: str
) -> None:
    """Only an earlier version whose weights fit the model and pass the probe can come back."""
    core, v1 = two_versions(probe=huge_probe)
    before = {n: p.copy() for n, p in core.params.items()}
    if params is None:
        params = v1
    elif params == "huge":
        params = {n: np.full_like(p, 3e38) for n, p in v1.items()}
    elif params == "nan":
        params = {n: np.full_like(p, np.nan) for n, p in v1.items()}
    with pytest.raises(ControlError, match=match):
        core.rollback(target, params, ServerOptimizerState(), now=3.0)
    assert core.version == 2
    assert core.counters().rollbacks == 0
    assert all(np.array_equal(core.params[n], before[n]) for n in PARAMS)


def test_a_stopped_run_cannot_be_rolled_back() -> None:
    """A stopped run is over: a rollback is refused."""
    core, v1 = two_versions()
    core.command(ControlCommand.STOP)
    with pytest.raises(ControlError, match="stopped"):
        core.rollback(1, v1, ServerOptimizerState(), now=3.0)


def test_a_logged_rollback_is_made_again_identically() -> None:
    """redo_rollback from the logged record gives the same version, weights and record."""
    core, v1 = two_versions()
    other, _ = two_versions()
    fold = core.rollback(1, v1, ServerOptimizerState(), now=3.0)
    again = other.redo_rollback(fold.record, v1, ServerOptimizerState())
    assert again.record == fold.record
    assert all(np.array_equal(again.params[n], fold.params[n]) for n in PARAMS)
    with pytest.raises(ControlError, match="not the next rollback"):
        other.redo_rollback(fold.record, v1, ServerOptimizerState())


def test_a_logged_version_is_folded_again_even_if_it_would_fail_the_probe() -> None:
    """Recovery makes a published version again as it was: the probe does not judge it twice."""
    big = {name: np.full(t.shape, 1e35, np.float32) for name, t in DELTA.items()}
    lenient = AggregatorCore(
        run_id=RUN, params=PARAMS, knobs=Knobs(), state=AggregatorState.RUNNING
    )
    fill(lenient, ("a", "u1", big, 10), ("b", "u2", big, 10))
    fold = lenient.fold(now=1.0)
    assert isinstance(fold, Fold)
    strict = AggregatorCore(
        run_id=RUN, params=PARAMS, knobs=Knobs(), state=AggregatorState.RUNNING, probe=huge_probe
    )
    fill(strict, ("a", "u1", big, 10), ("b", "u2", big, 10))
    again = strict.refold(fold.record, now=1.0)
    assert all(np.array_equal(again.params[n], fold.params[n]) for n in PARAMS)


# -- time comes in; the broadcast is the core's


def test_the_core_reads_no_clock_the_shell_hands_in_the_durations() -> None:
    """A record's decode and fold times are those the shell measured and handed in, not zero or
    anything the core timed itself."""
    core = make_core(buffer_size=2)
    send(core, make_update("u1"), node="a")
    send(core, make_update("u2"), node="b")
    core.record_decode_seconds("u2", 0.25)
    core.record_decode_seconds("unknown", 9.0)  # no longer buffered: nothing to say
    fold = core.fold(now=0.0)
    assert isinstance(fold, Fold)
    assert [c.decode_seconds for c in fold.record.contributions] == [0.0, 0.25]
    assert fold.record.fold_seconds == 0.0
    timed = fold.timed(1.5)
    assert timed.record.fold_seconds == 1.5
    assert timed.record.model_copy(update={"fold_seconds": 0.0}) == fold.record
    assert (timed.version, timed.folded_ids) == (fold.version, fold.folded_ids)


def test_max_versions_stops_through_the_transition_table_after_a_refold() -> None:
    """The stop at max_versions is the table's finish event: a version folded again during
    recovery stops the run the same way."""
    core = make_core(buffer_size=1, max_versions=1)
    send(core, make_update("u1"))
    fold = core.fold(now=3.0)
    assert isinstance(fold, Fold)
    assert core.state is AggregatorState.STOPPED
    again = make_core(buffer_size=1, max_versions=1)
    send(again, make_update("u1"))
    again.refold(fold.record, now=3.0)
    assert again.state is AggregatorState.STOPPED


HEART = ModelSpec(name="logreg", kwargs={"in_features": 3, "num_classes": 2})


def test_a_broadcast_announces_the_blob_it_carries() -> None:
    """The manifest names the run, version, blob hash and size, and chunks that make the blob."""
    core = make_core(version=2, compression=Compression(top_k=0.5))
    broadcast = core.broadcast(model=HEART, chunk_size=16, now=7.0)
    manifest = broadcast.manifest
    assert (manifest.run_id, manifest.version, manifest.created_at) == (RUN, 2, 7.0)
    assert (manifest.model, manifest.training, manifest.compression) == (
        HEART,
        core.knobs.training,
        core.knobs.compression,
    )
    assert b"".join(broadcast.chunks) == broadcast.blob
    assert all(len(c) <= 16 for c in broadcast.chunks)
    assert (manifest.chunk_count, manifest.blob_bytes) == (
        len(broadcast.chunks),
        len(broadcast.blob),
    )
    assert manifest.sha256 == sha256_hex(broadcast.blob)
    assert manifest.broadcast_dtype == "float32"
    assert not broadcast.widened
    assert_params_equal(decode_tensors(broadcast.blob, max_bytes=10_000), PARAMS)


def test_a_float16_broadcast_carries_the_weights_rounded_to_float16() -> None:
    """broadcast_dtype float16: the blob holds float16 tensors, and the manifest says so."""
    broadcast = make_core(broadcast_dtype="float16").broadcast(model=HEART, chunk_size=64, now=0)
    assert broadcast.manifest.broadcast_dtype == "float16"
    assert not broadcast.widened
    tensors = decode_tensors(broadcast.blob, max_bytes=10_000)
    assert {name: t.dtype for name, t in tensors.items()} == {"w": np.float16, "b": np.float16}
    assert_params_equal(tensors, {k: v.astype(np.float16) for k, v in PARAMS.items()})


def test_weights_beyond_float16_range_are_broadcast_as_float32() -> None:
    """A weight float16 would turn into infinity: that version travels whole, and says why."""
    huge = {"w": PARAMS["w"] * 1e6, "b": PARAMS["b"]}
    core = AggregatorCore(run_id=RUN, params=huge, knobs=Knobs(broadcast_dtype="float16"))
    broadcast = core.broadcast(model=HEART, chunk_size=64, now=0)
    assert (broadcast.manifest.broadcast_dtype, broadcast.widened) == ("float32", True)
    assert_params_equal(decode_tensors(broadcast.blob, max_bytes=10_000), core.params)
