"""Specification of what the aggregator's modules load: no torch until a run needs a model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize(
    "module",
    ["aggregator.service", "aggregator.core", "aggregator.aggregation", "aggregator.fold"],
)
def test_importing_the_aggregator_loads_no_torch(module: str) -> None:
    """torch comes in only where common.models builds a model (a user's model, the output probe)."""
    code = f"import sys, {module}; print('torch' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "False", done.stderr


# The aggregator's path on a fresh run up to its first publish (AggregatorService.run before it
# connects, then what _publish_model makes and archives), then the probe warmed as run does next.
_FIRST_PUBLISH = """
import json, sys
from pathlib import Path
from aggregator.service import AggregatorService
from aggregator.settings import AggregatorSettings
from aggregator.state_lock import locked_state_dir
from healthnet.federations import FEDERATIONS

settings = AggregatorSettings(
    state_dir=Path(sys.argv[1]), model=FEDERATIONS[sys.argv[2]].model, run_id="run-start"
)
service = AggregatorService(settings)
with locked_state_dir(settings.state_dir, "aggregator"):
    service._core = service._restore()
    broadcast = service._broadcast()
    service.journal.store.archive_model(service.core.version, broadcast.blob)
    before = "torch" in sys.modules
    service._probe.warm()
    verdict = service._probe(service.core.params)
    service.journal.close()
print(json.dumps({"version": service.core.version, "chunks": len(broadcast.chunks),
                  "torch_before": before, "torch_after": "torch" in sys.modules,
                  "verdict": verdict}))
"""


@pytest.mark.parametrize("federation", ["heart-disease", "pneumonia"])
def test_a_fresh_run_makes_and_encodes_v0_without_torch(federation: str, tmp_path: Path) -> None:
    """A built-in model's v0 is drawn, encoded and archived with no torch loaded; the probe,
    deferred, loads it afterwards and passes v0."""
    done = subprocess.run(
        [sys.executable, "-c", _FIRST_PUBLISH, str(tmp_path / "state"), federation],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["version"] == 0
    assert result["chunks"] >= 1
    assert result["torch_before"] is False
    assert result["torch_after"] is True
    assert result["verdict"] is None
