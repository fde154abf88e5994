"""Typed, frozen message bodies and the envelope that carries them (DESIGN §3).

Every message on the broker, except raw model chunks, is an :class:`Envelope` whose ``body`` is one
of the models below; :data:`BODY_TYPES` is the closed set of kinds. ``common.codec`` turns them into
bytes and back; nothing else knows the wire format.
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "BODY_TYPES",
    "SCHEMA_VERSION",
    "TENSOR_DTYPES",
    "Ack",
    "AggregatorState",
    "AggregatorStatus",
    "Body",
    "Contribution",
    "ControlCommand",
    "ControlReply",
    "ControlRequest",
    "Counters",
    "Envelope",
    "Evaluation",
    "Kind",
    "Knobs",
    "Manifest",
    "ModelSpec",
    "NodeLedgerEntry",
    "NodeState",
    "NodeStatus",
    "RejectReason",
    "ServerOptimizerKind",
    "StalenessKind",
    "TensorPayload",
    "TrainMetrics",
    "TrainingConfig",
    "Update",
    "VersionRecord",
    "kind_of",
]

SCHEMA_VERSION = 1

# dtype name -> itemsize. Anything else on the wire is rejected before numpy sees it.
TENSOR_DTYPES: dict[str, int] = {"float32": 4, "float16": 2, "int8": 1, "uint8": 1, "int32": 4}
MAX_TENSOR_RANK = 8

Identifier = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
NonNegative = Annotated[int, Field(ge=0)]


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TensorPayload(Frozen):
    """One named tensor as raw little-endian bytes; its size is checked against dtype and shape."""

    name: Annotated[str, Field(min_length=1, max_length=256)]
    dtype: Literal["float32", "float16", "int8", "uint8", "int32"]
    shape: Annotated[tuple[NonNegative, ...], Field(max_length=MAX_TENSOR_RANK)]
    data: bytes

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @model_validator(mode="after")
    def _size_matches(self) -> Self:
        expected = self.size * TENSOR_DTYPES[self.dtype]
        if len(self.data) != expected:
            raise ValueError(
                f"tensor {self.name!r}: {len(self.data)} bytes for {self.dtype}{list(self.shape)}, "
                f"expected {expected}"
            )
        return self


class StalenessKind(StrEnum):
    CONSTANT = "constant"
    POLYNOMIAL = "polynomial"
    HINGE = "hinge"


class ServerOptimizerKind(StrEnum):
    SGD = "sgd"
    FEDAVGM = "fedavgm"
    FEDADAM = "fedadam"
    FEDYOGI = "fedyogi"


class TrainingConfig(Frozen):
    """What a node does with each global version; travels in the manifest."""

    epochs: Annotated[int, Field(ge=1, le=1000)] = 1
    batch_size: Annotated[int, Field(ge=1, le=65536)] = 8
    learning_rate: Annotated[float, Field(gt=0, le=10, allow_inf_nan=False)] = 0.05
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.0
    weight_decay: Annotated[float, Field(ge=0, le=1)] = 0.0


class Knobs(Frozen):
    """The aggregation rule and its parameters; an operator may change them while a run is live.

    ``buffer_size = nodes, max_staleness = 0`` is synchronous FedAvg; ``buffer_size = 1`` with
    ``server_lr = alpha`` is FedAsync.
    """

    buffer_size: Annotated[int, Field(ge=1, le=100_000)] = 2
    buffer_timeout: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    max_staleness: Annotated[int, Field(ge=0)] = 20
    staleness: StalenessKind = StalenessKind.POLYNOMIAL
    staleness_a: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.5
    staleness_b: Annotated[int, Field(ge=0)] = 4
    sample_exponent: Annotated[float, Field(ge=0, le=4, allow_inf_nan=False)] = 1.0
    server_optimizer: ServerOptimizerKind = ServerOptimizerKind.SGD
    server_lr: Annotated[float, Field(gt=0, le=100, allow_inf_nan=False)] = 1.0
    server_momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    server_beta1: Annotated[float, Field(ge=0, lt=1)] = 0.9
    server_beta2: Annotated[float, Field(ge=0, lt=1)] = 0.99
    server_tau: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1e-3
    max_update_norm: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    max_versions: Annotated[int, Field(ge=1)] | None = None
    training: TrainingConfig = TrainingConfig()


class ModelSpec(Frozen):
    """Names the model: a built-in name or a ``module:function`` installed on every node."""

    name: Annotated[str, Field(min_length=1, max_length=256)]
    kwargs: dict[str, int | float | str | bool] = Field(default_factory=dict)


class Manifest(Frozen):
    """The current global version: where its weights are and how to train on them."""

    run_id: Identifier
    version: NonNegative
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    blob_bytes: NonNegative
    chunk_size: Annotated[int, Field(ge=1)]
    chunk_count: Annotated[int, Field(ge=1)]
    model: ModelSpec
    training: TrainingConfig
    created_at: FiniteFloat

    @model_validator(mode="after")
    def _chunks_cover_blob(self) -> Self:
        if self.chunk_count != max(1, math.ceil(self.blob_bytes / self.chunk_size)):
            raise ValueError("chunk_count does not match blob_bytes / chunk_size")
        return self


class TrainMetrics(Frozen):
    loss: FiniteFloat
    accuracy: Annotated[float, Field(ge=0, le=1)]
    seconds: Annotated[float, Field(ge=0, allow_inf_nan=False)]


class Update(Frozen):
    """A node's weight delta against ``base_version``; kept in its outbox until acked."""

    update_id: Identifier
    run_id: Identifier
    base_version: NonNegative
    num_samples: Annotated[int, Field(ge=1)]
    metrics: TrainMetrics
    delta: tuple[TensorPayload, ...]


class RejectReason(StrEnum):
    MALFORMED = "malformed"
    WRONG_SENDER = "wrong_sender"
    WRONG_RUN = "wrong_run"
    STALE = "stale"
    FUTURE_VERSION = "future_version"
    SHAPE_MISMATCH = "shape_mismatch"
    NON_FINITE = "non_finite"
    NORM_BOUND = "norm_bound"
    TOO_LARGE = "too_large"
    RUN_STOPPED = "run_stopped"


class Ack(Frozen):
    """The aggregator's verdict on one update. A rejection is final: the node drops the update."""

    update_id: Identifier
    accepted: bool
    reason: RejectReason | None = None
    detail: str = ""
    current_version: NonNegative


class NodeState(StrEnum):
    IDLE = "idle"
    TRAINING = "training"
    PAUSED = "paused"
    OFFLINE = "offline"


class NodeStatus(Frozen):
    """A node's retained status; its Last Will publishes the OFFLINE form."""

    state: NodeState
    version: NonNegative | None = None
    software: str = ""
    device: str = ""
    num_train: NonNegative = 0
    num_test: NonNegative = 0


class Evaluation(Frozen):
    """A node's metrics for one global version on its local test split."""

    run_id: Identifier
    version: NonNegative
    loss: FiniteFloat
    accuracy: Annotated[float, Field(ge=0, le=1)]
    correct: NonNegative
    num_examples: NonNegative


class ControlCommand(StrEnum):
    START = "start"
    PAUSE = "pause"
    RESUME = "resume"
    STOP = "stop"
    SET = "set"
    STATUS = "status"


class ControlRequest(Frozen):
    request_id: Identifier
    command: ControlCommand
    # For SET: knob name -> new value; ``training.<field>`` reaches the training config.
    knobs: dict[str, int | float | str | bool | None] = Field(default_factory=dict)


class AggregatorState(StrEnum):
    IDLE = "idle"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


class Counters(Frozen):
    received: NonNegative = 0
    accepted: NonNegative = 0
    rejected: NonNegative = 0
    duplicates: NonNegative = 0
    folded: NonNegative = 0
    bytes_received: NonNegative = 0
    rejections: dict[str, NonNegative] = Field(default_factory=dict)


class NodeLedgerEntry(Frozen):
    """What the aggregator knows about one node."""

    node: Identifier
    accepted: NonNegative = 0
    rejected: NonNegative = 0
    folded: NonNegative = 0
    rejections: dict[str, NonNegative] = Field(default_factory=dict)
    # Every update message from this node, accepted or not, as it arrived on the wire.
    bytes_received: NonNegative = 0
    last_seen: FiniteFloat | None = None
    last_base_version: NonNegative | None = None
    last_staleness: NonNegative | None = None
    eval_version: NonNegative | None = None
    eval_accuracy: Annotated[float, Field(ge=0, le=1)] | None = None


class AggregatorStatus(Frozen):
    run_id: Identifier
    state: AggregatorState
    version: NonNegative
    buffer_fill: NonNegative
    knobs: Knobs
    counters: Counters
    nodes: tuple[NodeLedgerEntry, ...] = ()
    updated_at: FiniteFloat


class ControlReply(Frozen):
    request_id: Identifier
    ok: bool
    message: str = ""
    status: AggregatorStatus | None = None


class Contribution(Frozen):
    """One update folded into a version, with the weight it got."""

    node: Identifier
    update_id: Identifier
    base_version: NonNegative
    staleness: NonNegative
    num_samples: Annotated[int, Field(ge=1)]
    staleness_factor: Annotated[float, Field(ge=0, le=1)]
    weight: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    bytes: NonNegative
    train_loss: FiniteFloat


class VersionRecord(Frozen):
    """Provenance of one global version: which updates made it and how much each counted."""

    run_id: Identifier
    version: NonNegative
    created_at: FiniteFloat
    contributions: tuple[Contribution, ...]
    update_norm: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    train_loss: FiniteFloat
    fold_seconds: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    reason: Literal["buffer_full", "buffer_timeout"]


Body = (
    Manifest
    | Update
    | Ack
    | NodeStatus
    | Evaluation
    | ControlRequest
    | ControlReply
    | AggregatorStatus
    | VersionRecord
)


class Kind(StrEnum):
    MANIFEST = "manifest"
    UPDATE = "update"
    ACK = "ack"
    NODE_STATUS = "node_status"
    EVALUATION = "evaluation"
    CONTROL_REQUEST = "control_request"
    CONTROL_REPLY = "control_reply"
    AGGREGATOR_STATUS = "aggregator_status"
    VERSION_RECORD = "version_record"


BODY_TYPES: dict[Kind, type[Body]] = {
    Kind.MANIFEST: Manifest,
    Kind.UPDATE: Update,
    Kind.ACK: Ack,
    Kind.NODE_STATUS: NodeStatus,
    Kind.EVALUATION: Evaluation,
    Kind.CONTROL_REQUEST: ControlRequest,
    Kind.CONTROL_REPLY: ControlReply,
    Kind.AGGREGATOR_STATUS: AggregatorStatus,
    Kind.VERSION_RECORD: VersionRecord,
}
_KIND_OF: dict[type[Body], Kind] = {body: kind for kind, body in BODY_TYPES.items()}


def kind_of(body: Body) -> Kind:
    return _KIND_OF[type(body)]


class Envelope(Frozen):
    """What travels on the broker: who sent which kind of body, when, under which schema."""

    schema_version: int = SCHEMA_VERSION
    kind: Kind
    message_id: Identifier
    sender: Identifier
    sent_at: FiniteFloat
    body: Body

    @model_validator(mode="after")
    def _kind_matches_body(self) -> Self:
        if not isinstance(self.body, BODY_TYPES[self.kind]):
            raise ValueError(  # noqa: TRY004 - pydantic turns ValueError into a ValidationError
                f"envelope kind {self.kind} carries a {type(self.body).__name__}"
            )
        return self
