"""A real Mosquitto started with a deployment that `healthnet deploy init` generated, for tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.mqtt import MqttClient
from common.settings import ConnectionSettings
from healthnet.deploy import AuthMode, Deployment, DeploymentSpec, generate_deployment
from healthnet.deploy.generate import read_env_file
from tests.brokers import find_mosquitto, free_port

__all__ = ["HOSPITALS", "AuthMode", "SecureBroker", "secure_broker", "wait_listening"]

HOSPITALS = ("cleveland", "hungarian", "switzerland", "va")
STARTUP = 15.0


class SecureBroker:
    """Mosquitto on a free 127.0.0.1 port with a generated deployment's config and files."""

    def __init__(self, deployment: Deployment, spec: DeploymentSpec, log_path: Path) -> None:
        self.deployment = deployment
        self.spec = spec
        self.log_path = log_path

    @property
    def federation(self) -> str:
        return self.spec.federation

    def env(self, identity: str) -> dict[str, str]:
        """The identity's generated env file, as the environment of a child process."""
        return read_env_file(self.deployment.env_files[identity])

    def settings(self, identity: str) -> ConnectionSettings:
        """The identity's connection settings, read from its env file as the services read it."""
        return ConnectionSettings(_env_file=self.deployment.env_files[identity])

    def client(self, identity: str, client_id: str | None = None, **kwargs: object) -> MqttClient:
        """An unstarted client of ``identity`` with its generated credentials."""
        settings = self.settings(identity).model_copy(update={"connect_timeout": 5.0})
        return MqttClient.from_settings(
            settings,
            client_id or identity,
            **kwargs,  # type: ignore[arg-type]
        )

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


@contextlib.contextmanager
def secure_broker(
    root: Path, *, auth: AuthMode, federation: str, hospitals: tuple[str, ...] = HOSPITALS
) -> Iterator[SecureBroker]:
    """Generate a deployment under ``root`` and run Mosquitto with it until the block ends."""
    binary = find_mosquitto()
    if binary is None:
        pytest.skip("mosquitto is not installed")
    spec = DeploymentSpec(
        federation=federation,
        hospitals=hospitals,
        port=free_port(),
        auth=auth,
        # Started as root, mosquitto would switch to its own account, which cannot read the
        # 0600 keys written by the account that runs the tests.
        broker_user="root" if os.geteuid() == 0 else None,
    )
    deployment = generate_deployment(spec, root / "deployment")
    log_path = root / "mosquitto.log"
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            [str(binary), "-c", str(deployment.broker_config)],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_listening(process, spec.port, log_path)
        yield SecureBroker(deployment, spec, log_path)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)


def wait_listening(process: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"mosquitto exited: {log_path.read_text(errors='replace')}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise AssertionError(f"mosquitto did not listen on {port}: {log_path.read_text()}")
