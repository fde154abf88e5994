"""The aggregator's settings: one class, built once by the CLI (or a test) and passed down."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from common.messages import Knobs, ModelSpec
from common.settings import ConnectionSettings

__all__ = ["AggregatorSettings"]


class AggregatorSettings(ConnectionSettings):
    client_id: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
        description="MQTT client id (and sender); default aggregator.<federation>",
    )

    state_dir: Path = Path("runs/aggregator")
    run_id: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
        description="name of a new run; ignored when the state directory holds a checkpoint",
    )
    model: ModelSpec = ModelSpec(name="logreg", kwargs={"in_features": 13, "num_classes": 2})
    seed: int = Field(default=0, description="seed of the initial weights")
    knobs: Knobs = Knobs()
    autostart: bool = Field(default=True, description="start folding at once, or wait for start")
    chunk_size: int = Field(default=1024 * 1024, ge=1024, description="model broadcast chunk size")
    max_update_bytes: int = Field(
        default=64 * 1024 * 1024, ge=1024, description="updates larger than this are dropped"
    )
    status_interval: float = Field(default=5.0, gt=0, description="status heartbeat, seconds")
    keep_checkpoints: int = Field(default=3, ge=1)
    archive_models: bool = Field(
        default=True,
        description="keep every version's model blob in models/ so that any version can be "
        "pulled later (healthnet model pull); off for models too large to keep one per version",
    )
    # Off unless asked for: an aggregator opens no listening port of its own by default.
    metrics_port: int | None = Field(
        default=None, ge=0, le=65535, description="serve Prometheus /metrics here (0: any free)"
    )
    metrics_host: str = Field(default="127.0.0.1", description="address of /metrics")
    checkpoint_every: int = Field(
        default=10,
        ge=1,
        description="write a checkpoint every N versions; between two, versions.jsonl and the "
        "write-ahead log make a crash lose nothing (recovery folds the logged versions again)",
    )

    def mqtt_client_id(self) -> str:
        # The persistent session is keyed by client id: one per federation, never shared.
        return self.client_id or f"aggregator.{self.federation}"[:64]
