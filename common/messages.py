"""Typed, frozen message bodies and the envelope that carries them (DESIGN §3).

Every message on the broker, except raw model chunks, is an :class:`Envelope` whose ``body`` is one
of the models below; :data:`BODY_TYPES` is the closed set of kinds. ``common.codec`` turns them into
bytes and back; nothing else knows the wire format.
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, model_validator

if TYPE_CHECKING:
    from common.secure_aggregation.policy import SecureAggregationPolicy

__all__ = [
    "BODY_TYPES",
    "MAX_CERTIFICATE_BYTES",
    "MAX_SECAGG_ITEMS",
    "MAX_VARINT_BYTES",
    "MIN_TRIMMED_BUFFER",
    "NORM_HISTORY",
    "SCHEMA_VERSION",
    "TENSOR_DTYPES",
    "VALUES_DTYPES",
    "Ack",
    "AggregationRule",
    "AggregatorState",
    "AggregatorStatus",
    "Body",
    "Buffer",
    "CompressedTensor",
    "Compression",
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
    "MaskedDelta",
    "MetricRelease",
    "ModelDelta",
    "ModelSpec",
    "NodeSecureAggregation",
    "NodeState",
    "NodeStatus",
    "NodeTally",
    "NormPolicy",
    "Personalisation",
    "PersonalisationMethod",
    "PrivacyPolicy",
    "PrivacySpend",
    "Quantization",
    "RejectReason",
    "SecAggAnswer",
    "SecAggKey",
    "SecAggReceipt",
    "SecAggShare",
    "SecAggTerm",
    "SecAggUnmask",
    "SecureAggregation",
    "SecurePlanStatus",
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
Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


def _buffer(value: object) -> bytes | memoryview:
    """Raw bytes, or a read-only flat byte view of them (the decoder's zero-copy slices)."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, bytearray):
        return bytes(value)
    if (
        isinstance(value, memoryview)
        and value.readonly
        and value.ndim == 1
        and value.format == "B"
        and value.c_contiguous
    ):
        return value
    raise ValueError(f"expected bytes, got {type(value).__name__}")


# A tensor's payload. On decoding it is a read-only view into the received message, not a copy:
# copying a model's worth of bytes cost the aggregator more than folding them.
Buffer = Annotated[bytes | memoryview, PlainValidator(_buffer)]


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TensorPayload(Frozen):
    """One named tensor as raw little-endian bytes; its size is checked against dtype and shape."""

    name: Annotated[str, Field(min_length=1, max_length=256)]
    dtype: Literal["float32", "float16", "int8", "uint8", "int32"]
    shape: Annotated[tuple[NonNegative, ...], Field(max_length=MAX_TENSOR_RANK)]
    data: Buffer

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


class Quantization(StrEnum):
    """How a compressed delta's values travel; the value names the wire dtype.

    Their order (which is stronger) is policy: :func:`common.compression_policy.strength`.
    """

    NONE = "none"
    FP16 = "float16"
    INT8 = "int8"

    @property
    def values_dtype(self) -> Literal["float32", "float16", "int8"]:
        """The dtype that values quantized this way travel as."""
        return _VALUES_DTYPE[self]

    @classmethod
    def of_dtype(cls, values_dtype: str) -> Quantization:
        """The quantization that a tensor sent with ``values_dtype`` used."""
        for quantization, dtype in _VALUES_DTYPE.items():
            if dtype == values_dtype:
                return quantization
        raise ValueError(f"values dtype {values_dtype!r} is not one of {sorted(VALUES_DTYPES)}")


_VALUES_DTYPE: dict[Quantization, Literal["float32", "float16", "int8"]] = {
    Quantization.NONE: "float32",
    Quantization.FP16: "float16",
    Quantization.INT8: "int8",
}
# The dtypes a compressed tensor's values may travel as -> itemsize.
VALUES_DTYPES: dict[str, int] = {dtype: TENSOR_DTYPES[dtype] for dtype in _VALUES_DTYPE.values()}
# An int8 value q means q * scale, which must be a float32: |q| <= 127.
INT8_MAX = 127
FLOAT32_MAX = 3.4028234663852886e38  # numpy.finfo(numpy.float32).max
# The longest LEB128 varint that fits 64 bits; indices need at most this many bytes each.
MAX_VARINT_BYTES = 10
# The most accepted-update norms the aggregator keeps for the adaptive norm bound.
NORM_HISTORY = 1000
# A trimmed mean drops at least one value per end and keeps one: three updates at least.
MIN_TRIMMED_BUFFER = 3


class Compression(Frozen):
    """How nodes compress their deltas (DESIGN §5); the operator sets it for the whole run.

    ``top_k`` is the fraction of entries kept per tensor (``None``: all of them). What a node may
    send under a policy, and what the aggregator admits, is :mod:`common.compression_policy`.
    """

    top_k: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] | None = None
    quantization: Quantization = Quantization.NONE
    error_feedback: bool = True

    @property
    def lossless(self) -> bool:
        """Every entry sent at full precision: nothing is left over for error feedback."""
        return self.top_k is None and self.quantization is Quantization.NONE

    @property
    def kept_fraction(self) -> float:
        return 1.0 if self.top_k is None else self.top_k


class MetricRelease(StrEnum):
    """What a node's reports say beyond its update when it trains under differential privacy.

    Its evaluation (loss, accuracy, correct count), its training loss and its sample count also
    leave the hospital, outside the DP guarantee: ``exact`` sends them as measured, ``rounded``
    coarsens them (see :mod:`common.privacy_policy`), ``suppressed`` sends none it can withhold.
    """

    EXACT = "exact"
    ROUNDED = "rounded"
    SUPPRESSED = "suppressed"


class PersonalisationMethod(StrEnum):
    """How a hospital keeps a model of its own beside the global one (see docs/personalisation.md).

    ``finetune``: each global version, trained further on the hospital's training split.
    ``ditto``: a personal model that lives across versions, trained on the training split with a
    proximal pull of strength ``ditto_lambda`` towards each global version (Li et al., 2021).
    """

    FINETUNE = "finetune"
    DITTO = "ditto"


class Personalisation(Frozen):
    """The run's personalisation policy; travels in the manifest (None: off).

    Every node trains a personal model on its own training split, keeps it in its state
    directory and reports its accuracy on its own test split beside the global model's. Personal
    weights never leave the hospital; the global model and the updates do not change.
    ``learning_rate`` None: the run's training learning rate. ``holdout`` above 0 keeps that
    fraction of the training split out of personal training, to choose between the personal model
    and the global version: the hospital keeps (and reports) the personal model only where it is
    more accurate than the global one on the held-out records.
    """

    method: PersonalisationMethod
    epochs: Annotated[int, Field(ge=1, le=100)] = 1
    ditto_lambda: Annotated[float, Field(ge=0, le=1000, allow_inf_nan=False)] = 0.1
    learning_rate: Annotated[float, Field(gt=0, le=10, allow_inf_nan=False)] | None = None
    holdout: Annotated[float, Field(ge=0, le=0.5, allow_inf_nan=False)] = 0.0


class PrivacyPolicy(Frozen):
    """Record-level differential privacy (DP-SGD) asked of every node; travels in the manifest.

    Each node clips every example's gradient to ``max_grad_norm`` (C), adds Gaussian noise of
    standard deviation ``noise_multiplier`` x C to each Poisson-sampled batch, and charges every
    version it trains on to its own accountant at ``delta``; it stops training before its
    patients' privacy loss would pass ``epsilon_budget``. Either ``noise_multiplier`` is given,
    or ``calibrate_versions``: the node then picks the smallest noise with which training on that
    many versions spends exactly its budget. A node may be stricter (more noise, a smaller budget
    or delta), never laxer (:mod:`common.privacy_policy`). ``delta`` must be below 1/n for every
    hospital's n training records; a node refuses a policy where it is not.
    """

    noise_multiplier: Annotated[float, Field(gt=0, le=100, allow_inf_nan=False)] | None = None
    calibrate_versions: Annotated[int, Field(ge=1, le=100_000)] | None = None
    max_grad_norm: Annotated[float, Field(gt=0, le=1e6, allow_inf_nan=False)] = 1.0
    delta: Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)] = 1e-5
    epsilon_budget: Annotated[float, Field(gt=0, le=1e4, allow_inf_nan=False)]
    metrics: MetricRelease = MetricRelease.ROUNDED

    @model_validator(mode="after")
    def _noise_or_calibration(self) -> Self:
        if (self.noise_multiplier is None) == (self.calibrate_versions is None):
            raise ValueError(
                "a privacy policy sets exactly one of noise_multiplier and calibrate_versions"
            )
        return self


class PrivacySpend(Frozen):
    """What a node's DP training has cost its patients, as its accountant computes it.

    In an update: ``epsilon`` is the hospital's total privacy loss at ``delta`` once this update's
    training is charged, ``steps`` and ``noise_multiplier`` what this update took. In a node's
    status: the total so far and the latest version's parameters.
    """

    epsilon: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    delta: Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)]
    epsilon_budget: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    noise_multiplier: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    max_grad_norm: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    sample_rate: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
    steps: NonNegative
    # Versions charged to the node's ledger so far, this one included.
    versions: NonNegative
    accountant: Literal["rdp", "prv"] = "rdp"


class CompressedTensor(Frozen):
    """One tensor of a compressed delta: which entries were sent, and their values.

    ``index_coding`` says how ``indices`` lists the sent entries of the flattened tensor:
    ``dense`` sends every entry in order and no indices; ``varint`` sends the gaps between
    increasing indices (the first gap is the first index) as unsigned LEB128 varints; ``bitmap``
    sends one bit per entry, most significant bit first (``numpy.packbits``). ``values`` holds
    ``count`` little-endian ``values_dtype`` numbers; an int8 value ``q`` means ``q * scale``.

    Construction checks everything that costs O(1) (:meth:`structural_error`); the decoder in
    ``common.compression`` checks it again, then the index stream and the values themselves.
    """

    name: Annotated[str, Field(min_length=1, max_length=256)]
    shape: Annotated[tuple[NonNegative, ...], Field(max_length=MAX_TENSOR_RANK)]
    count: NonNegative
    index_coding: Literal["dense", "varint", "bitmap"]
    indices: Buffer = b""
    values_dtype: Literal["float32", "float16", "int8"]
    scale: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    values: Buffer

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def structural_error(self) -> str | None:
        """Why the fields disagree with each other, or None; reads no payload byte."""
        if any(not isinstance(side, int) or side < 0 for side in self.shape):
            return f"shape {list(self.shape)} has a negative or non-integer side"
        size = self.size
        if not isinstance(self.count, int) or self.count < 0:
            return f"count {self.count!r} is not a non-negative integer"
        if self.count > size:
            return f"count {self.count} exceeds the {size} entries of shape {list(self.shape)}"
        itemsize = VALUES_DTYPES.get(self.values_dtype)
        if itemsize is None:
            return f"values dtype {self.values_dtype!r} is not one of {sorted(VALUES_DTYPES)}"
        if len(self.values) != self.count * itemsize:
            return (
                f"{len(self.values)} value bytes for {self.count} {self.values_dtype} values, "
                f"expected {self.count * itemsize}"
            )
        if (error := self._scale_error()) is not None:
            return error
        return self._index_error(size)

    def _scale_error(self) -> str | None:
        if self.values_dtype != "int8":
            if self.scale is not None:
                return f"{self.values_dtype} values take no scale, got {self.scale!r}"
            return None
        if self.scale is None:
            return "int8 values need a scale"
        if not math.isfinite(self.scale) or self.scale <= 0:
            return f"scale {self.scale!r} is not a finite positive number"
        if self.scale * INT8_MAX > FLOAT32_MAX:
            return f"scale {self.scale!r} takes int8 values beyond float32's range"
        return None

    def _index_error(self, size: int) -> str | None:
        match self.index_coding:
            case "dense":
                if self.count != size:
                    return f"dense coding sends all {size} entries, count says {self.count}"
                if self.indices:
                    return f"dense coding takes no indices, got {len(self.indices)} bytes"
            case "bitmap":
                expected = -(-size // 8)
                if len(self.indices) != expected:
                    return (
                        f"bitmap of {len(self.indices)} bytes for {size} entries, "
                        f"expected {expected}"
                    )
            case "varint":
                # Each index takes 1 to MAX_VARINT_BYTES bytes.
                if not self.count <= len(self.indices) <= self.count * MAX_VARINT_BYTES:
                    return f"{len(self.indices)} varint bytes cannot hold {self.count} indices"
            case other:
                return f"unknown index coding {other!r}"
        return None

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if (error := self.structural_error()) is not None:
            raise ValueError(f"tensor {self.name!r}: {error}")
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


class NormPolicy(StrEnum):
    """What ``max_update_norm`` does to a larger update: refuse it, or scale it down to it."""

    REJECT = "reject"
    CLIP = "clip"


class AggregationRule(StrEnum):
    """How a buffer of deltas becomes one: the staleness-weighted mean, or a robust statistic of
    the staleness-discounted deltas (coordinate-wise median, trimmed mean) that a few poisoned
    updates cannot drag far."""

    MEAN = "mean"
    MEDIAN = "median"
    TRIMMED_MEAN = "trimmed_mean"


class TrainingConfig(Frozen):
    """What a node does with each global version; travels in the manifest."""

    epochs: Annotated[int, Field(ge=1, le=1000)] = 1
    batch_size: Annotated[int, Field(ge=1, le=65536)] = 8
    learning_rate: Annotated[float, Field(gt=0, le=10, allow_inf_nan=False)] = 0.05
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.0
    weight_decay: Annotated[float, Field(ge=0, le=1)] = 0.0
    # A step budget: each update is this many batches (the data reshuffled at each epoch's end)
    # instead of ``epochs`` whole epochs, so a large hospital does not drift further per update
    # than a small one. None: whole epochs.
    steps: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    # tau of the logit-adjusted loss (Menon et al., 2021; FedLC, Zhang et al., 2022): a node
    # trains on ``logits + tau * log(its own label frequencies)``, so that its update learns the
    # classes and not its own label mix. 0: plain cross-entropy. Not applied under a privacy
    # policy: the label counts would be read outside DP-SGD's accounting.
    logit_adjustment: Annotated[float, Field(ge=0, le=10, allow_inf_nan=False)] = 0.0

    def steps_for(self, records: int) -> int:
        """Optimizer steps in one update on ``records`` training rows."""
        if self.steps is not None:
            return self.steps
        return self.epochs * math.ceil(records / self.batch_size)

    def examples_for(self, records: int) -> int:
        """Training examples one update on ``records`` rows goes through (batches are full but
        for the last of each epoch)."""
        per_epoch = math.ceil(records / self.batch_size)
        epochs, batches = divmod(self.steps_for(records), per_epoch)
        return epochs * records + batches * self.batch_size


class SecureAggregation(Frozen):
    """Secure aggregation asked of the federation (docs/secure-aggregation.md#the-policy).

    The wire form of :class:`common.secure_aggregation.policy.SecureAggregationPolicy`, which
    holds the rules; construction builds that policy, so a roster or threshold it refuses never
    validates here. Needs client certificates: a password-mode federation cannot run it.
    """

    holders: Annotated[tuple[Identifier, ...], Field(min_length=2, max_length=1024)]
    privacy: Annotated[int, Field(ge=0, le=1023)] = 1
    recovery: Annotated[int, Field(ge=1, le=1024)] | None = None
    min_contributors: Annotated[int, Field(ge=2, le=1024)] | None = None
    clip: Annotated[float, Field(gt=0, le=1e6, allow_inf_nan=False)] = 4.0
    weight_levels: Annotated[int, Field(ge=1, le=1 << 20)] = 1024
    max_terms: Annotated[int, Field(ge=2, le=100_000)] = 16

    def policy(self) -> SecureAggregationPolicy:
        # Imported here: the policy validates holders with common.topics, which imports us.
        from common.secure_aggregation.policy import SecureAggregationPolicy

        return SecureAggregationPolicy(
            holders=self.holders,
            privacy=self.privacy,
            recovery=self.recovery,
            min_contributors=self.min_contributors,
            clip=self.clip,
            weight_levels=self.weight_levels,
            max_terms=self.max_terms,
        )

    @model_validator(mode="after")
    def _a_policy(self) -> Self:
        self.policy()  # raises ValueError saying which rule the settings break
        return self


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
    # An absolute ceiling on an update's L2 norm, in force whatever the adaptive bound says.
    max_update_norm: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    # The adaptive bound: at most this many times the median norm of the last ``norm_window``
    # accepted updates (until a few are known, of the run's initial weights; see
    # aggregator.aggregation.adaptive_norm_bound). None: off.
    norm_multiplier: Annotated[float, Field(ge=1, le=1e6, allow_inf_nan=False)] | None = None
    norm_window: Annotated[int, Field(ge=1, le=NORM_HISTORY)] = 20
    norm_policy: NormPolicy = NormPolicy.REJECT
    aggregation: AggregationRule = AggregationRule.MEAN
    # Of each end, per coordinate, at least one value when above 0 (see _trims_something):
    # 0.25 of a buffer of 4 drops the largest and smallest value, and so does 0.1.
    trim_fraction: Annotated[float, Field(ge=0, lt=0.5, allow_inf_nan=False)] = 0.1
    # A node trains once per global version; a second update from the same (or an older) base
    # is a flood, refused when this is on.
    one_update_per_version: bool = False
    # An update's sample count is its weight; a node claiming millions would outvote the rest.
    max_num_samples: Annotated[int, Field(ge=1)] | None = None
    # How nodes compress their deltas (they may compress more, never less) and what dtype the
    # model broadcast travels as; both reach the nodes in the manifest.
    compression: Compression = Compression()
    broadcast_dtype: Literal["float32", "float16"] = "float32"
    # How each version also travels as a delta from its predecessor (common.broadcast_chain):
    # None sends every version whole, as a snapshot only.
    broadcast_compression: Compression | None = None
    max_versions: Annotated[int, Field(ge=1)] | None = None
    training: TrainingConfig = TrainingConfig()
    # Record-level differential privacy every node trains under (None: none); in the manifest.
    privacy: PrivacyPolicy | None = None
    # Each hospital's personal model beside the global one (None: none); in the manifest.
    personalisation: Personalisation | None = None
    # Secure aggregation (None: off, the default): the aggregator sees only sums of updates.
    secure_aggregation: SecureAggregation | None = None

    @model_validator(mode="after")
    def _secure_aggregation_servable(self) -> Self:
        if self.secure_aggregation is None:
            return self
        from common.secure_aggregation.policy import knobs_refusal

        refusal = knobs_refusal(
            self.secure_aggregation.policy(),
            buffer_size=self.buffer_size,
            dense_updates=self.compression.lossless,
            mean_aggregation=self.aggregation is AggregationRule.MEAN,
        )
        if refusal is not None:
            raise ValueError(f"secure_aggregation: {refusal}")
        return self

    @model_validator(mode="after")
    def _trims_something(self) -> Self:
        # Refused rather than adjusted: a trimmed mean that cannot trim is the mean, and an
        # operator who asked for a robust rule must not silently get the one it replaces.
        if self.aggregation is AggregationRule.TRIMMED_MEAN:
            if self.trim_fraction <= 0:
                raise ValueError(
                    "aggregation trimmed_mean with trim_fraction 0 trims nothing: "
                    "set trim_fraction above 0 (0.1 trims one value per end) or use mean"
                )
            if self.buffer_size < MIN_TRIMMED_BUFFER:
                raise ValueError(
                    f"aggregation trimmed_mean with buffer_size {self.buffer_size} trims nothing: "
                    f"it drops one value per end and keeps one, so it needs buffer_size >= "
                    f"{MIN_TRIMMED_BUFFER} (set both in one request)"
                )
        return self


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
    compression: Compression = Compression()
    # The blob's tensors travel as this dtype; a node trains in float32 from the decoded values.
    broadcast_dtype: Literal["float32", "float16"] = "float32"
    privacy: PrivacyPolicy | None = None
    # Set: the versions after this one also travel as compressed deltas on ``model/delta``
    # (common.broadcast_chain), so a node that holds this version need not download the next.
    broadcast_compression: Compression | None = None
    personalisation: Personalisation | None = None
    secure_aggregation: SecureAggregation | None = None

    @model_validator(mode="after")
    def _chunks_cover_blob(self) -> Self:
        if self.chunk_count != max(1, math.ceil(self.blob_bytes / self.chunk_size)):
            raise ValueError("chunk_count does not match blob_bytes / chunk_size")
        return self


class ModelDelta(Frozen):
    """A version as a compressed delta from its predecessor's broadcast weights (the chain link).

    ``manifest`` is the new version's own, as its snapshot announces it: its ``sha256`` is that
    of the weights a node holds once it adds ``tensors`` to the weights of ``base_version``
    (whose blob's sha256 is ``base_sha256``) and rounds them to ``manifest.broadcast_dtype``.
    A node whose weights are not that base cannot use it (see :mod:`common.broadcast_chain`).
    """

    manifest: Manifest
    base_version: NonNegative
    base_sha256: Sha256Hex
    tensors: tuple[CompressedTensor, ...]

    @model_validator(mode="after")
    def _links_consecutive_versions(self) -> Self:
        if self.manifest.version != self.base_version + 1:
            raise ValueError(
                f"a delta links consecutive versions: v{self.base_version} to "
                f"v{self.manifest.version}"
            )
        return self


class TrainMetrics(Frozen):
    loss: FiniteFloat
    accuracy: Annotated[float, Field(ge=0, le=1)]
    seconds: Annotated[float, Field(ge=0, allow_inf_nan=False)]


class MaskedDelta(Frozen):
    """Under secure aggregation, an update's delta as the aggregator may see it.

    The flattened delta quantized into the field, plus a fresh mask whose shares the federation's
    holders keep (docs/secure-aggregation.md#message-flow): ``elements`` is 4 little-endian bytes
    per field element (``common.secure_aggregation.field.to_bytes``), uniformly random to anyone
    without ``U`` of the shares. ``policy_digest`` names the policy the mask was shared under.
    """

    policy_digest: Sha256Hex
    elements: Buffer


class Update(Frozen):
    """A node's weight delta against ``base_version``; kept in its outbox until acked.

    Under secure aggregation ``delta`` is empty and ``masked`` carries the delta instead; the
    metadata (ids, base version, sample count, metrics, privacy spend) stays in the clear.
    """

    update_id: Identifier
    run_id: Identifier
    base_version: NonNegative
    num_samples: Annotated[int, Field(ge=1)]
    metrics: TrainMetrics
    # One compressed tensor per model tensor (``dense`` float32 when nothing is compressed).
    delta: tuple[CompressedTensor, ...]
    encode_seconds: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    # Under a privacy policy: what training this update cost the node's patients, in all.
    privacy: PrivacySpend | None = None
    masked: MaskedDelta | None = None

    @model_validator(mode="after")
    def _delta_or_masked(self) -> Self:
        if self.masked is not None and self.delta:
            raise ValueError("a masked update carries no plaintext delta")
        return self


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
    REPLAY = "replay"
    QUARANTINED = "quarantined"
    RATE_LIMITED = "rate_limited"
    SAMPLE_COUNT = "sample_count"
    COMPRESSION_POLICY = "compression_policy"
    # Trained with less privacy than the run's policy asks, or under none when it asks for one.
    PRIVACY_POLICY = "privacy_policy"
    # Not a refusal on arrival: an accepted update whose batch could not become a version (the
    # sum was not finite, or the version failed the probe). Its node hears it in a second ack.
    DISCARDED = "discarded"
    # The update's form does not match the run's secure aggregation policy: a plaintext delta
    # under the policy, a masked one without it, or masked under another policy.
    SECURE_AGGREGATION = "secure_aggregation"


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
    # Its privacy budget is spent: it trains no more, and keeps evaluating every version.
    BUDGET_SPENT = "budget_spent"


class NodeSecureAggregation(Frozen):
    """A node under secure aggregation, as its status shows it: the policy it masks and holds
    shares under, and the holders of the roster whose key records it has not verified yet (it
    masks nothing while any is missing)."""

    policy_digest: Sha256Hex
    waiting_for_keys: Annotated[tuple[Identifier, ...], Field(max_length=1024)] = ()


class NodeStatus(Frozen):
    """A node's retained status; its Last Will publishes the OFFLINE form.

    ``failure`` says why the node cannot evaluate or train on ``version`` (its outputs are not
    finite, say); the node keeps running and waits for the next version. Empty when all is well.
    """

    state: NodeState
    version: NonNegative | None = None
    failure: Annotated[str, Field(max_length=500)] = ""
    software: str = ""
    device: str = ""
    num_train: NonNegative = 0
    num_test: NonNegative = 0
    # Under a privacy policy: the node's ledger, as of its last charge.
    privacy: PrivacySpend | None = None
    # Under secure aggregation (docs/secure-aggregation.md): its policy and the keys it awaits.
    secure_aggregation: NodeSecureAggregation | None = None


class Evaluation(Frozen):
    """A node's metrics for one global version on its local test split.

    ``failure`` (non-empty) says the version could not be evaluated, and why: then ``loss`` is
    None and ``accuracy`` and ``correct`` are 0. Messages from before the field decode unchanged.
    """

    run_id: Identifier
    version: NonNegative
    loss: FiniteFloat | None
    accuracy: Annotated[float, Field(ge=0, le=1)]
    correct: NonNegative
    num_examples: NonNegative
    failure: Annotated[str, Field(max_length=500)] = ""
    # Bytes of model messages (manifests, snapshot chunks, deltas) the node has received since it
    # started, when it evaluated this version: the broadcast's cost, as measured where it lands.
    model_bytes: NonNegative = 0
    # Under a personalisation policy: the hospital's personal model (trained against this
    # version) on the same test split. None: no personal model, or it could not be evaluated.
    personal_loss: FiniteFloat | None = None
    personal_accuracy: Annotated[float, Field(ge=0, le=1)] | None = None

    @model_validator(mode="after")
    def _loss_unless_failed(self) -> Self:
        if (self.loss is None) != bool(self.failure):
            raise ValueError("an evaluation has a loss, or a failure and no loss")
        if (self.personal_loss is None) != (self.personal_accuracy is None):
            raise ValueError("a personal evaluation has both a loss and an accuracy, or neither")
        return self


class ControlCommand(StrEnum):
    START = "start"
    PAUSE = "pause"
    RESUME = "resume"
    STOP = "stop"
    SET = "set"
    STATUS = "status"
    QUARANTINE = "quarantine"
    READMIT = "readmit"
    ROLLBACK = "rollback"
    # Secure aggregation: give up the open fold plan; its updates are dropped, never re-planned.
    ABANDON_PLAN = "abandon_plan"


class ControlRequest(Frozen):
    request_id: Identifier
    command: ControlCommand
    # For SET: knob name -> new value; ``training.<field>`` reaches the training config.
    knobs: dict[str, int | float | str | bool | None] = Field(default_factory=dict)
    # For QUARANTINE and READMIT: the node's broker identity.
    node: Identifier | None = None
    # For ROLLBACK: the version whose weights become the next version.
    version: NonNegative | None = None

    @model_validator(mode="after")
    def _node_given_when_needed(self) -> Self:
        needs_node = self.command in (ControlCommand.QUARANTINE, ControlCommand.READMIT)
        if needs_node != (self.node is not None):
            raise ValueError(f"{self.command} {'needs' if needs_node else 'takes no'} node")
        needs_version = self.command is ControlCommand.ROLLBACK
        if needs_version != (self.version is not None):
            raise ValueError(f"{self.command} {'needs' if needs_version else 'takes no'} version")
        return self


class AggregatorState(StrEnum):
    IDLE = "idle"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    # Never a run's state: what aggregator/status says once the aggregator is gone, published by
    # the broker as its Last Will (a crash) or by the aggregator as it exits before the run stops.
    OFFLINE = "offline"


class Counters(Frozen):
    received: NonNegative = 0
    accepted: NonNegative = 0
    rejected: NonNegative = 0
    duplicates: NonNegative = 0
    folded: NonNegative = 0
    # Accepted, then dropped with their batch when it could not become a version.
    discarded: NonNegative = 0
    # Folds refused because the new version's outputs on the probe batch were not finite.
    probe_failures: NonNegative = 0
    rollbacks: NonNegative = 0
    clipped: NonNegative = 0
    bytes_received: NonNegative = 0
    # Accepted updates only: their size on the wire and as dense float32 (the compression ratio).
    bytes_accepted: NonNegative = 0
    raw_bytes_accepted: NonNegative = 0
    rejections: dict[str, NonNegative] = Field(default_factory=dict)


class NodeTally(Frozen):
    """What the aggregator knows about one node: its running counts and latest evaluation."""

    node: Identifier
    accepted: NonNegative = 0
    rejected: NonNegative = 0
    folded: NonNegative = 0
    discarded: NonNegative = 0
    rejections: dict[str, NonNegative] = Field(default_factory=dict)
    # Every update message from this node, accepted or not, as it arrived on the wire.
    bytes_received: NonNegative = 0
    last_seen: FiniteFloat | None = None
    last_base_version: NonNegative | None = None
    last_staleness: NonNegative | None = None
    eval_version: NonNegative | None = None
    eval_accuracy: Annotated[float, Field(ge=0, le=1)] | None = None
    # Why the node could not evaluate ``eval_version`` (empty when it could).
    eval_failure: str = ""
    # The node's personal model on its test split, reported with ``eval_version``.
    eval_personal_accuracy: Annotated[float, Field(ge=0, le=1)] | None = None
    quarantined: bool = False
    # The privacy loss the node last reported (its latest update or status), and its budget.
    epsilon: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    epsilon_budget: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    # The node's last status while online said BUDGET_SPENT: it trains no more in this run.
    budget_spent: bool = False


class SecurePlanStatus(Frozen):
    """An open fold plan of secure aggregation (docs/secure-aggregation.md#drop-outs-and-crashes):
    its updates, the holders asked, those that answered and those that refused, and why."""

    fold_id: Identifier
    update_ids: tuple[Identifier, ...]
    holders: tuple[Identifier, ...]
    needed: Annotated[int, Field(ge=1)]
    answered: tuple[Identifier, ...] = ()
    refusals: dict[Identifier, Annotated[str, Field(max_length=500)]] = Field(default_factory=dict)
    # Why the answers did not unmask the sum (a holder answered wrongly), if they did not.
    failure: Annotated[str, Field(max_length=500)] = ""


class AggregatorStatus(Frozen):
    run_id: Identifier
    state: AggregatorState
    version: NonNegative
    buffer_fill: NonNegative
    knobs: Knobs
    counters: Counters
    nodes: tuple[NodeTally, ...] = ()
    updated_at: FiniteFloat
    # Every node the run knows (and has not quarantined) has spent its privacy budget: once the
    # buffer is folded no update can come, and the run may be stopped (the demo does so).
    budgets_spent: bool = False
    # Under secure aggregation: masked updates accepted and still short of ``U`` holders'
    # receipts, and the fold plan whose holders' answers the aggregator waits for.
    awaiting_receipts: NonNegative = 0
    secure_plan: SecurePlanStatus | None = None


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
    bytes: NonNegative  # the update message as it came over the wire
    train_loss: FiniteFloat
    raw_bytes: NonNegative = 0  # the same delta as dense float32
    encode_seconds: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0  # on the node
    decode_seconds: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0  # here, validation too
    # Under a privacy policy: the hospital's total privacy loss once this update was trained.
    epsilon: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None


class VersionRecord(Frozen):
    """Provenance of one global version: which updates made it and how much each counted."""

    run_id: Identifier
    version: NonNegative
    created_at: FiniteFloat
    contributions: tuple[Contribution, ...]
    update_norm: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    train_loss: FiniteFloat
    fold_seconds: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    # ``rollback``: an operator made this version from ``rollback_of``'s weights (no updates).
    # ``budgets_spent``: a partial buffer, folded because no node that could fill it has budget.
    reason: Literal["buffer_full", "buffer_timeout", "budgets_spent", "rollback"]
    rollback_of: NonNegative | None = None
    # The hash chain (common.provenance), filled in when the version is committed; None in
    # records written before the chain existed. ``parent_digest`` is the digest of the previous
    # version's record (None for the first version), ``updates_digest`` the digest of the
    # contributions folded, ``model_sha256`` the sha256 of the version's model blob as broadcast
    # (the manifest's sha256).
    parent_digest: Sha256Hex | None = None
    updates_digest: Sha256Hex | None = None
    model_sha256: Sha256Hex | None = None
    # Securely aggregated: the fold plan whose holders' answers unmasked this version's sum
    # (aggregator/secure_unmask.py); None for a version folded in the clear.
    secure_fold_id: Identifier | None = None


# Secure aggregation's messages (docs/secure-aggregation.md#message-flow). Each is the wire form of
# an event of common.secure_aggregation.events (or of a KeyRecord); common.secure_aggregation.wire
# converts between them. The sender of each is the envelope's, checked against the topic's node.
# The most update ids one receipt names, and terms one unmask request holds.
MAX_SECAGG_ITEMS = 100_000
# A PEM client certificate is about 1 KiB; this bounds what a key record may make us parse.
MAX_CERTIFICATE_BYTES = 16 * 1024


class SecAggKey(Frozen):
    """A hospital's X25519 public key, signed with its client certificate's key (PEM inside)."""

    federation: Identifier
    identity: Identifier
    public_key: Annotated[bytes, Field(strict=True, min_length=32, max_length=32)]
    certificate: Annotated[
        bytes, Field(strict=True, min_length=1, max_length=MAX_CERTIFICATE_BYTES)
    ]
    signature: Annotated[bytes, Field(strict=True, min_length=1, max_length=256)]


class SecAggShare(Frozen):
    """One holder's share of one update's mask, sealed for ``recipient`` by the sender."""

    update_id: Identifier
    recipient: Identifier
    policy_digest: Sha256Hex
    sealed: Buffer


class SecAggReceipt(Frozen):
    """The update ids whose shares the sending holder has stored durably, under one policy."""

    policy_digest: Sha256Hex
    update_ids: Annotated[tuple[Identifier, ...], Field(min_length=1, max_length=MAX_SECAGG_ITEMS)]


class SecAggTerm(Frozen):
    """One update of a sum: its id, its sender and its integer weight."""

    update_id: Identifier
    sender: Identifier
    weight: Annotated[int, Field(ge=1, le=1 << 30)]


class SecAggUnmask(Frozen):
    """The aggregator asks a holder for the weighted sum of its shares of one fold's updates."""

    fold_id: Identifier
    policy_digest: Sha256Hex
    terms: Annotated[tuple[SecAggTerm, ...], Field(min_length=1, max_length=MAX_SECAGG_ITEMS)]


class SecAggAnswer(Frozen):
    """A holder's weighted share sum for a fold (field-element bytes), or why it refuses."""

    fold_id: Identifier
    share_sum: Buffer | None = None
    refusal: Annotated[str, Field(max_length=500)] = ""

    @model_validator(mode="after")
    def _sum_or_refusal(self) -> Self:
        if (self.share_sum is None) == (not self.refusal):
            raise ValueError("a secure aggregation answer has a share sum, or a refusal and none")
        return self


Body = (
    Manifest
    | ModelDelta
    | Update
    | Ack
    | NodeStatus
    | Evaluation
    | ControlRequest
    | ControlReply
    | AggregatorStatus
    | VersionRecord
    | SecAggKey
    | SecAggShare
    | SecAggReceipt
    | SecAggUnmask
    | SecAggAnswer
)


class Kind(StrEnum):
    MANIFEST = "manifest"
    MODEL_DELTA = "model_delta"
    UPDATE = "update"
    ACK = "ack"
    NODE_STATUS = "node_status"
    EVALUATION = "evaluation"
    CONTROL_REQUEST = "control_request"
    CONTROL_REPLY = "control_reply"
    AGGREGATOR_STATUS = "aggregator_status"
    VERSION_RECORD = "version_record"
    SECAGG_KEY = "secagg_key"
    SECAGG_SHARE = "secagg_share"
    SECAGG_RECEIPT = "secagg_receipt"
    SECAGG_UNMASK = "secagg_unmask"
    SECAGG_ANSWER = "secagg_answer"


BODY_TYPES: dict[Kind, type[Body]] = {
    Kind.MANIFEST: Manifest,
    Kind.MODEL_DELTA: ModelDelta,
    Kind.UPDATE: Update,
    Kind.ACK: Ack,
    Kind.NODE_STATUS: NodeStatus,
    Kind.EVALUATION: Evaluation,
    Kind.CONTROL_REQUEST: ControlRequest,
    Kind.CONTROL_REPLY: ControlReply,
    Kind.AGGREGATOR_STATUS: AggregatorStatus,
    Kind.VERSION_RECORD: VersionRecord,
    Kind.SECAGG_KEY: SecAggKey,
    Kind.SECAGG_SHARE: SecAggShare,
    Kind.SECAGG_RECEIPT: SecAggReceipt,
    Kind.SECAGG_UNMASK: SecAggUnmask,
    Kind.SECAGG_ANSWER: SecAggAnswer,
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
