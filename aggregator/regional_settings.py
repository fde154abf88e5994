"""A regional aggregator's settings, and the knobs it validates with: one class, built once by the
CLI (or a test) and passed down.

A regional aggregator judges its hospitals' updates with the core's knobs (it reads them from the
core's retained status), except for what only a region can decide: how many hospital updates make
one combined update and how long a partial buffer may wait (``buffer_size``,
``buffer_timeout``), and the per-hospital defences that the core cannot apply once a region
speaks for its hospitals (``one_update_per_version``, ``max_num_samples``: at the core they would
apply to the region as one node). :func:`regional_knobs` is that rule; :func:`core_conflicts`
says which of the core's knobs make it refuse every combined update.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from common.messages import Knobs
from common.settings import ConnectionSettings

__all__ = ["REGION_NODE_PREFIX", "RegionalSettings", "core_conflicts", "regional_knobs"]

_IDENTIFIER = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
# As healthnet.deploy.regions.REGION_NODE_PREFIX, which names the identity it is given.
REGION_NODE_PREFIX = "region-"


class RegionalSettings(ConnectionSettings):
    """One region's aggregator; ``broker_url`` is the region's broker, never the core."""

    region: str = Field(pattern=_IDENTIFIER, description="the region's name")
    node_id: str | None = Field(
        default=None,
        pattern=_IDENTIFIER,
        description="its broker identity on the regional broker, MQTT client id and node id at "
        "the core (its update topic); default region-<region>",
    )
    state_dir: Path = Field(
        default=Path("runs/regional"),
        description="write-ahead log of its hospitals' updates, `combined.jsonl`, the outbox of "
        "combined updates, `ledger.jsonl`",
    )
    seed: int = Field(
        default=0,
        description="seed of the initial weights, as the core aggregator's: the norm bound's "
        "warm-up scale",
    )
    buffer_size: int = Field(
        default=2, ge=1, le=100_000, description="hospital updates per combined update"
    )
    buffer_timeout: float = Field(
        default=30.0,
        ge=0,
        allow_inf_nan=False,
        description="send a partial buffer after this many seconds (0: never); keep it well "
        "under the time the core takes to publish max_staleness versions",
    )
    one_update_per_version: bool = Field(
        default=False, description="refuse a hospital's second update from one base version"
    )
    max_num_samples: int | None = Field(
        default=None, ge=1, description="the most training samples one hospital update may claim"
    )
    ack_timeout: float = Field(
        default=60.0, gt=0, description="resend a combined update the core has not acked after"
    )
    max_update_bytes: int = Field(
        default=64 * 1024 * 1024, ge=1024, description="updates larger than this are dropped"
    )

    def identity(self) -> str:
        """Its broker identity, client id (the persistent session's key) and node id at the core."""
        return self.node_id or f"{REGION_NODE_PREFIX}{self.region}"[:64]


def regional_knobs(core: Knobs, settings: RegionalSettings) -> Knobs:
    """The knobs a region validates its hospitals' updates with: the core's, with the region's
    buffer and per-hospital defences."""
    return Knobs.model_validate(
        {
            **core.model_dump(),
            "buffer_size": settings.buffer_size,
            "buffer_timeout": settings.buffer_timeout,
            "one_update_per_version": settings.one_update_per_version,
            "max_num_samples": settings.max_num_samples,
        }
    )


def core_conflicts(core: Knobs) -> list[str]:
    """The core's knobs under which it refuses a region's combined updates, each said in words."""
    problems = []
    if core.one_update_per_version:
        problems.append(
            "one_update_per_version: a region sends several updates from one base version "
            "(set it on the regional aggregators instead)"
        )
    if core.max_num_samples is not None:
        problems.append(
            f"max_num_samples={core.max_num_samples}: it caps a region's summed sample count "
            "(set it on the regional aggregators instead)"
        )
    if core.privacy is not None:
        problems.append("a privacy policy: a combined update carries no privacy spend")
    if core.secure_aggregation is not None:
        problems.append("secure aggregation: a region cannot combine masked updates")
    return problems
