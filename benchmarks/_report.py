"""What every benchmark writes beside its figures: the machine, the git revision, a JSON file."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

__all__ = ["machine", "write_report"]


def machine() -> dict[str, object]:
    """Cores, CPU model, Python version and the git revision these figures were measured at."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        revision = subprocess.run(
            ["git", "rev-parse", "HEAD"],  # noqa: S607 - whichever git is on PATH, read-only
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        revision = "unknown"
    try:
        load = list(os.getloadavg())
    except OSError:
        load = []
    return {"cores": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "git_revision": revision, "load_average": load,
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip


def write_report(path: Path, report: dict[str, object]) -> None:
    """Write ``report`` with the machine added, atomically (a partial run leaves a whole file)."""
    text = json.dumps({**report, "machine": machine()}, indent=2) + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
