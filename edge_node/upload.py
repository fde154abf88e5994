"""What a node sends for one training job: its delta, compressed under the run's policy, sealed.

Pure (no clock, no disk, no network): the service times the compression and hands the duration
in, and gives the update its id; the sans-I/O federation test builds its updates here too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from common.codec import encode, envelope
from common.compression import Compressed, compress
from common.messages import Compression, MetricRelease, PrivacySpend, TrainMetrics, Update
from edge_node.release import release_train_metrics
from edge_node.session import Job

if TYPE_CHECKING:
    from edge_node.privacy_ledger import Charge  # only for the type
    from edge_node.secure_holder import SecureUpload
    from edge_node.training import TrainResult  # torch: only for the type

__all__ = ["Upload", "carries_residual", "compress_delta", "seal_upload"]


@dataclass(frozen=True, slots=True)
class Upload:
    """A trained, compressed update ready for the outbox, with the residual it leaves behind."""

    update: Update
    payload: bytes
    residual: Mapping[str, NDArray[np.float32]] | None  # None: error feedback is off
    result: TrainResult
    raw_bytes: int
    # Under differential privacy: what this update costs, to commit before it may leave.
    charge: Charge | None = None
    # Under secure aggregation: the mask's shares, written to disk before the update may leave.
    secure: SecureUpload | None = None


def carries_residual(policy: Compression) -> bool:
    """Whether updates under ``policy`` carry an error-feedback residual to the next one."""
    return policy.error_feedback and not policy.lossless


def compress_delta(
    job: Job,
    result: TrainResult,
    policy: Compression,
    residual: Mapping[str, NDArray[np.float32]] | None,
) -> Compressed:
    """The trained weights minus the job's base weights, compressed as ``policy`` says."""
    delta = {name: result.params[name] - base for name, base in job.params.items()}
    return compress(delta, policy, residual)


def seal_upload(
    job: Job,
    result: TrainResult,
    compressed: Compressed,
    *,
    policy: Compression,
    node_id: str,
    update_id: str,
    encode_seconds: float,
    now: float,
    charge: Charge | None = None,
    privacy: PrivacySpend | None = None,
    release: MetricRelease = MetricRelease.EXACT,
) -> Upload:
    """The update for ``job`` and its encoded envelope, as ``node_id`` sends it at ``now``.

    Under differential privacy ``charge`` is what the training costs, ``privacy`` the node's
    spend once it is charged, and ``release`` how much of the training metrics may leave.
    """
    manifest = job.manifest
    update = Update(
        update_id=update_id,
        run_id=manifest.run_id,
        base_version=manifest.version,
        num_samples=result.num_samples,
        metrics=release_train_metrics(
            TrainMetrics(loss=result.loss, accuracy=result.accuracy, seconds=result.seconds),
            release,
        ),
        delta=compressed.tensors,
        encode_seconds=encode_seconds,
        privacy=privacy,
    )
    return Upload(
        update=update,
        payload=encode(envelope(update, sender=node_id, sent_at=now)),
        residual=compressed.residual if carries_residual(policy) else None,
        result=result,
        raw_bytes=compressed.raw_bytes,
        charge=charge,
    )
