"""The edge node's settings: one class, built once by the CLI (or a test) and passed down."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from common.messages import Compression, PrivacyPolicy
from common.settings import ConnectionSettings

__all__ = ["NodeSettings"]


class NodeSettings(ConnectionSettings):
    node_id: str = Field(
        default="node", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="broker identity"
    )
    # No default: a node that forgot its data must not quietly train on public example data (the
    # demo and the tests name theirs).
    data: str = Field(
        min_length=1,
        description="heart-disease:<hospital>, csv:<path>, npz:<path> or module:function",
    )
    state_dir: Path = Field(default=Path("runs/node"), description="outbox and node state")
    device: str = Field(default="auto", description="torch device: auto, cpu, cuda, cuda:1, ...")
    torch_threads: int | None = Field(default=None, ge=1, description="CPU threads for torch")
    seed: int = 0
    delay_seconds: float = Field(
        default=0.0, ge=0, description="artificial delay before each upload (tests, benchmarks)"
    )
    ack_timeout: float = Field(default=60.0, gt=0, description="resend an unacked update after")
    max_model_bytes: int = Field(default=1024**3, ge=1024)
    compression: Compression | None = Field(
        default=None,
        description="compress more than the run asks (a smaller top_k, a narrower quantization)",
    )
    privacy: PrivacyPolicy | None = Field(
        default=None,
        description=(
            "this hospital's own differential privacy: more noise, a smaller budget or delta than "
            "the run asks (never less); with no policy in the run, the node trains under this one"
        ),
    )
    aggregator_identity: str = Field(
        default="aggregator",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
        description="the aggregator's broker identity: the only sender whose secure aggregation "
        "unmask requests the node answers",
    )
    exit_when_stopped: bool = Field(
        default=False, description="exit once the run is stopped and the last version evaluated"
    )
