"""Start and stop healthNET roles as real child processes (demo, integration tests, benchmarks).

A service is started with its settings object whole (:meth:`ProcessGroup.start_service`): the
child's environment holds every field as the ``HEALTHNET_*`` variable that reads it back, in place
of any ``HEALTHNET_*`` variable of ours, and its command line holds no setting at all (see
:mod:`common.settings` for why the environment).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Self, assert_never

from aggregator.settings import AggregatorSettings
from common.errors import HealthNetError
from common.settings import ConnectionSettings
from edge_node.settings import NodeSettings

__all__ = ["ManagedProcess", "ProcessGroup", "ServiceSettings", "service_command"]

ServiceSettings = AggregatorSettings | NodeSettings

log = logging.getLogger(__name__)


@dataclass
class ManagedProcess:
    name: str
    args: list[str]
    log_path: Path
    # Neither is in the repr: both may hold the broker password.
    env: Mapping[str, str] = field(default_factory=dict, repr=False)
    """Set in the child's environment on top of ours (e.g. an identity's HEALTHNET_* settings)."""
    settings: ConnectionSettings | None = field(default=None, repr=False)
    """The child's settings, whole; they replace every ``HEALTHNET_*`` variable of ours."""
    process: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "healthnet", *self.args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.environment(),
            start_new_session=True,
        )
        log.debug("started %s (pid %d): %s", self.name, self.process.pid, " ".join(self.args))

    def environment(self) -> dict[str, str]:
        """The child's environment: ours, then its settings whole, then ``env``."""
        inherited = dict(os.environ)
        whole: dict[str, str] = {}
        if self.settings is not None:
            # Ours would otherwise fill what the settings leave out, or merge into their nested
            # fields (HEALTHNET_KNOBS__*), and the child would run with settings no one built.
            prefix = self.settings.model_config.get("env_prefix", "").upper()
            if prefix:
                inherited = {k: v for k, v in inherited.items() if not k.upper().startswith(prefix)}
            whole = self.settings.to_env()
        return {**inherited, "PYTHONUNBUFFERED": "1", **whole, **self.env}

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def poll(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def signal(self, signum: signal.Signals) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signum)

    def wait(self, timeout: float) -> int | None:
        if self.process is None:
            return None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.signal(signal.SIGTERM)
            if self.wait(timeout) is None:
                self.signal(signal.SIGKILL)
                self.wait(5.0)
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.process.poll()

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class ProcessGroup:
    """Children started together and all stopped on exit, whatever happens."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.processes: dict[str, ManagedProcess] = {}

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()

    def start(
        self,
        name: str,
        args: list[str],
        env: Mapping[str, str] | None = None,
        *,
        settings: ConnectionSettings | None = None,
    ) -> ManagedProcess:
        """Start (or restart, once it has exited) a child; ``env`` adds environment variables,
        ``settings`` passes its settings whole."""
        previous = self.processes.get(name)
        if previous is not None:
            if previous.poll() is None:
                raise HealthNetError(f"process {name} is already running")
            previous.stop()  # reaps it and closes its log
        proc = ManagedProcess(
            name, args, self.log_dir / f"{name}.log", dict(env or {}), settings=settings
        )
        proc.start()
        self.processes[name] = proc
        return proc

    def start_service(self, name: str, settings: ServiceSettings) -> ManagedProcess:
        """Start (or restart) an aggregator or an edge node that runs with ``settings``."""
        return self.start(name, service_command(settings), settings=settings)

    def __getitem__(self, name: str) -> ManagedProcess:
        return self.processes[name]

    def failed(self) -> list[ManagedProcess]:
        """Children that exited with an error."""
        return [p for p in self.processes.values() if p.poll() not in (None, 0)]

    def wait_all(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        for proc in self.processes.values():
            if proc.wait(max(0.0, deadline - time.monotonic())) is None:
                return False
        return True

    def stop_all(self, timeout: float = 10.0) -> None:
        for proc in self.processes.values():
            proc.signal(signal.SIGTERM)
        for proc in self.processes.values():
            proc.stop(timeout)


def service_command(settings: ServiceSettings) -> list[str]:
    """The ``healthnet`` subcommand that runs the service these settings are for."""
    match settings:
        case AggregatorSettings():
            return ["aggregator", "run"]
        case NodeSettings():
            return ["node", "run"]
        case _:
            assert_never(settings)
