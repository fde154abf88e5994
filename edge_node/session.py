"""What a node does next, decided without I/O.

Theory of operation. The node follows two retained streams: the model manifest (with its blob) and
the aggregator's status. It evaluates every new global version on its local test split, and trains
at most once per version, only while the run is RUNNING: a node never sends two updates from the
same base, which keeps synchronous FedAvg (K = number of nodes) honest. One job runs at a time off
the MQTT thread; the shell asks :meth:`NodeSession.next_job` whenever something changes.

A version that cannot be used (its outputs are not finite) is remembered with the reason
(:meth:`NodeSession.job_failed`) until the next version arrives: the node reports it and waits. An
evaluation that fails that way also rules out training on the version, which would fail the same.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from numpy.typing import NDArray

from common.messages import AggregatorState, Manifest, NodeState

__all__ = ["Job", "JobKind", "NodeSession"]


class JobKind(StrEnum):
    EVALUATE = "evaluate"
    TRAIN = "train"


@dataclass(frozen=True, slots=True)
class Job:
    kind: JobKind
    manifest: Manifest
    params: Mapping[str, NDArray[np.float32]]


class NodeSession:
    def __init__(self) -> None:
        self.aggregator_state: AggregatorState | None = None
        self.run_id: str | None = None
        self._manifest: Manifest | None = None
        self._params: Mapping[str, NDArray[np.float32]] | None = None
        self._trained: tuple[str, int] | None = None
        self._evaluated: tuple[str, int] | None = None
        self._busy: JobKind | None = None
        self._last: JobKind | None = None
        self._failure: tuple[tuple[str, int], str] | None = None

    @property
    def version(self) -> int | None:
        return None if self._manifest is None else self._manifest.version

    @property
    def busy(self) -> JobKind | None:
        return self._busy

    @property
    def failure(self) -> str:
        """Why the current version cannot be used (empty when it can, or is not known yet)."""
        manifest = self._manifest
        if self._failure is None or manifest is None:
            return ""
        key, reason = self._failure
        return reason if key == (manifest.run_id, manifest.version) else ""

    def on_status(self, state: AggregatorState, run_id: str) -> None:
        self.aggregator_state = state
        self.run_id = run_id

    def mark_trained(self, run_id: str, version: int) -> None:
        """Remember an update made before a restart, so that version is not trained on again."""
        self._trained = (run_id, version)

    def on_model(self, manifest: Manifest, params: Mapping[str, NDArray[np.float32]]) -> None:
        self._manifest = manifest
        self._params = params

    def next_job(self) -> Job | None:
        """The job to start now, if any; marks the session busy until :meth:`job_done`."""
        if self._busy is not None or self._manifest is None or self._params is None:
            return None
        key = (self._manifest.run_id, self._manifest.version)
        may_train = self._trained != key and self._may_train()
        may_evaluate = self._evaluated != key
        # Alternate when both are due: versions can arrive faster than a node evaluates, and
        # evaluating first every time would starve training (and training first, evaluation).
        if may_train and (not may_evaluate or self._last is JobKind.EVALUATE):
            return self._start(JobKind.TRAIN)
        if may_evaluate:
            return self._start(JobKind.EVALUATE)
        return None

    def job_done(self, job: Job) -> None:
        key = (job.manifest.run_id, job.manifest.version)
        if job.kind is JobKind.EVALUATE:
            self._evaluated = key
        else:
            self._trained = key
        self._last = job.kind
        self._busy = None

    def job_failed(self, job: Job, reason: str) -> None:
        """``job``'s version cannot be used, for ``reason``; do not try it again."""
        self.job_done(job)
        key = (job.manifest.run_id, job.manifest.version)
        self._failure = (key, reason)
        if job.kind is JobKind.EVALUATE:
            self._trained = key

    def node_state(self) -> NodeState:
        if self._busy is JobKind.TRAIN:
            return NodeState.TRAINING
        if self.aggregator_state in (AggregatorState.PAUSED, AggregatorState.STOPPED):
            return NodeState.PAUSED
        return NodeState.IDLE

    def finished(self) -> bool:
        """The run is over and the node has evaluated the last version it announced."""
        if self.aggregator_state is not AggregatorState.STOPPED or self._busy is not None:
            return False
        manifest = self._manifest
        if manifest is None or manifest.run_id != self.run_id:
            return manifest is None
        return self._evaluated == (manifest.run_id, manifest.version)

    def _may_train(self) -> bool:
        manifest = self._manifest
        return (
            self.aggregator_state is AggregatorState.RUNNING
            and manifest is not None
            and manifest.run_id == self.run_id
        )

    def _start(self, kind: JobKind) -> Job:
        manifest, params = self._manifest, self._params
        if manifest is None or params is None:
            raise RuntimeError("no model to work on")  # next_job checked this already
        self._busy = kind
        return Job(kind, manifest, params)
