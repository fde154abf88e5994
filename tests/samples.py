"""Sample message bodies that the tests of several layers build their cases from."""

from __future__ import annotations

from typing import Any

from common.messages import (
    AggregatorState,
    AggregatorStatus,
    Contribution,
    Counters,
    Knobs,
    NodeTally,
    PrivacySpend,
    VersionRecord,
)

__all__ = ["RUN", "privacy_spend", "record", "status"]

RUN = "run-1"


def status(
    version: int,
    *,
    updated_at: float = 100.0,
    run_id: str = RUN,
    nodes: tuple[NodeTally, ...] = (),
    buffer_fill: int = 1,
) -> AggregatorStatus:
    return AggregatorStatus(
        run_id=run_id,
        state=AggregatorState.RUNNING,
        version=version,
        buffer_fill=buffer_fill,
        knobs=Knobs(buffer_size=3),
        counters=Counters(received=7, accepted=6, rejected=1, bytes_received=700),
        nodes=nodes,
        updated_at=updated_at,
    )


def record(version: int, *stalenesses: int, run_id: str = RUN) -> VersionRecord:
    return VersionRecord(
        run_id=run_id,
        version=version,
        created_at=float(version),
        contributions=tuple(
            Contribution(
                node=f"n{i}",
                update_id=f"u{version}-{i}",
                base_version=max(0, version - 1 - s),
                staleness=s,
                num_samples=10,
                staleness_factor=1.0,
                weight=10.0,
                bytes=100 + i,
                train_loss=0.5,
            )
            for i, s in enumerate(stalenesses)
        ),
        update_norm=1.0,
        train_loss=0.5,
        fold_seconds=0.001,
        reason="buffer_full",
    )


def privacy_spend(**fields: Any) -> PrivacySpend:
    """A node's privacy ledger as its update or status states it, with ``fields`` changed."""
    values: dict[str, Any] = {
        "epsilon": 1.2,
        "delta": 1e-5,
        "epsilon_budget": 3.0,
        "noise_multiplier": 1.0,
        "max_grad_norm": 1.0,
        "sample_rate": 0.1,
        "steps": 10,
        "versions": 1,
    }
    return PrivacySpend(**{**values, **fields})
