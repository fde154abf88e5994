"""Specification of child processes started with their settings whole: the broker password is in
the child's environment, readable by its user only, and never on its command line or in a log."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import pytest

from healthnet.broker import free_port
from healthnet.demo import aggregator_settings
from healthnet.federations import HEART_DISEASE
from healthnet.processes import ProcessGroup

SECRET = "s3cr3t-Pa55"  # noqa: S105 - a made-up credential that must never leak


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_childs_broker_password_is_only_in_its_private_environment(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An aggregator started with a password URL (nothing listens there) holds the password in
    its /proc environ (mode 0400), not in its command line, its log, or ours."""
    settings = aggregator_settings(
        broker_url=f"mqtt://aggregator:{SECRET}@127.0.0.1:{free_port()}",
        federation_id="private",
        state_dir=tmp_path / "aggregator",
        federation=HEART_DISEASE,
        buffer_size=2,
        max_staleness=5,
        connect_timeout=1.0,
    )
    caplog.set_level(logging.DEBUG, logger="healthnet.processes")
    with ProcessGroup(tmp_path / "logs") as group:
        child = group.start_service("aggregator", settings)
        proc = Path("/proc") / str(child.pid)
        assert SECRET not in (proc / "cmdline").read_text(errors="replace")
        assert SECRET in (proc / "environ").read_text(errors="replace")
        assert stat.S_IMODE((proc / "environ").stat().st_mode) == 0o400
        assert child.wait(90) == 1, child.tail()
    logged = child.log_path.read_text(encoding="utf-8")
    assert "could not connect to mqtt://aggregator:***@127.0.0.1" in logged, logged
    assert SECRET not in logged
    assert SECRET not in caplog.text
    assert SECRET not in repr(child)
