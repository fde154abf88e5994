"""A broker tree for tests: a core and regional Mosquittos started with the files of
`healthnet deploy init --regions`, each on a free 127.0.0.1 port, each killable and restartable."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.mqtt import MqttClient
from common.settings import ConnectionSettings
from healthnet.deploy import AuthMode, Deployment, DeploymentSpec, generate_deployment
from healthnet.deploy.generate import read_env_file
from healthnet.deploy.regions import REGION_NODE_PREFIX, Region
from tests.brokers import find_mosquitto, free_port
from tests.secure import wait_listening

__all__ = ["REGIONS", "BrokerProcess", "BrokerTree", "broker_tree"]

# The heart-disease federation split into two regions.
REGIONS = {"eu": ("cleveland", "hungarian"), "us": ("switzerland", "va")}
CORE = "core"


class BrokerProcess:
    """One Mosquitto of the tree, logging to its own file."""

    def __init__(self, name: str, config: Path, port: int, log_path: Path) -> None:
        self.name = name
        self.config = config
        self.port = port
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = find_mosquitto()
        assert binary is not None
        with self.log_path.open("ab") as log_file:
            self._process = subprocess.Popen(
                [str(binary), "-c", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_listening(self._process, self.port, self.log_path)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop it (SIGKILL: a crash, losing what was not saved) and wait for it to exit."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, sig)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


class BrokerTree:
    """The running tree: ``brokers`` by name (``core`` and each region)."""

    def __init__(
        self, deployment: Deployment, spec: DeploymentSpec, brokers: dict[str, BrokerProcess]
    ) -> None:
        self.deployment = deployment
        self.spec = spec
        self.brokers = brokers

    @property
    def federation(self) -> str:
        return self.spec.federation

    def env(self, identity: str) -> dict[str, str]:
        return read_env_file(self.deployment.env_files[identity])

    def settings(self, identity: str) -> ConnectionSettings:
        return ConnectionSettings(_env_file=self.deployment.env_files[identity])

    def client(self, identity: str, *, broker: str | None = None) -> MqttClient:
        """An unstarted client of ``identity`` with its own credentials, dialling its own broker
        or, if named, another one of the tree (as an intruder would)."""
        overrides: dict[str, object] = {"connect_timeout": 5.0}
        if broker is not None:
            overrides["broker_url"] = f"mqtts://127.0.0.1:{self.brokers[broker].port}"
        settings = ConnectionSettings(
            _env_file=self.deployment.env_files[identity],
            **overrides,  # type: ignore[arg-type]
        )
        return MqttClient.from_settings(settings, identity)


@contextlib.contextmanager
def broker_tree(
    root: Path,
    *,
    federation: str,
    regions: dict[str, tuple[str, ...]] = REGIONS,
    regional_aggregators: bool = False,
) -> Iterator[BrokerTree]:
    """Generate a tree deployment under ``root`` and run all its brokers until the block ends;
    with ``regional_aggregators``, each region has an aggregator identity ``region-<name>``."""
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed")
    spec = DeploymentSpec(
        federation=federation,
        hospitals=tuple(h for members in regions.values() for h in members),
        port=free_port(),
        auth=AuthMode.MTLS,
        broker_user="root" if os.geteuid() == 0 else None,
        regions=tuple(
            Region(
                name,
                members,
                port=free_port(),
                aggregator=f"{REGION_NODE_PREFIX}{name}" if regional_aggregators else None,
            )
            for name, members in regions.items()
        ),
    )
    deployment = generate_deployment(spec, root / "deployment")
    brokers = {CORE: BrokerProcess(CORE, deployment.broker_config, spec.port, root / "core.log")}
    for region in spec.regions:
        brokers[region.name] = BrokerProcess(
            region.name,
            deployment.region_configs[region.name],
            region.port,
            root / f"{region.name}.log",
        )
    try:
        for broker in brokers.values():
            broker.start()
        yield BrokerTree(deployment, spec, brokers)
    finally:
        for broker in brokers.values():
            broker.stop()
