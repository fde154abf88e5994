"""Start and stop healthNET roles as real child processes (demo, integration tests, benchmarks)."""

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
from typing import IO, Self

from common.errors import HealthNetError

__all__ = ["ManagedProcess", "ProcessGroup"]

log = logging.getLogger(__name__)


@dataclass
class ManagedProcess:
    name: str
    args: list[str]
    log_path: Path
    env: Mapping[str, str] = field(default_factory=dict)
    """Set in the child's environment on top of ours (e.g. an identity's HEALTHNET_* settings)."""
    process: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "healthnet", *self.args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        log.debug("started %s (pid %d): %s", self.name, self.process.pid, " ".join(self.args))

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
        self, name: str, args: list[str], env: Mapping[str, str] | None = None
    ) -> ManagedProcess:
        """Start (or restart, once it has exited) a child; ``env`` adds environment variables."""
        previous = self.processes.get(name)
        if previous is not None:
            if previous.poll() is None:
                raise HealthNetError(f"process {name} is already running")
            previous.stop()  # reaps it and closes its log
        proc = ManagedProcess(name, args, self.log_dir / f"{name}.log", dict(env or {}))
        proc.start()
        self.processes[name] = proc
        return proc

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
