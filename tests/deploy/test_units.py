"""The deployment units under deploy/: the container image, the compose file and the systemd
units agree with the `healthnet` command and with the files `healthnet deploy init` writes.

Neither Docker nor systemd runs services on the test machines, so each unit is checked where it
can be: its commands run as plain processes with ``--help`` (an unknown option or subcommand
fails), its paths are held against a generated deployment, and the systemd units go through
``systemd-analyze verify`` and its offline security review when systemd-analyze is installed.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from healthnet.deploy import Deployment, DeploymentSpec, generate_deployment, read_env_file
from healthnet.deploy.regions import Region
from healthnet.federations import HEART_DISEASE

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
UNITS = DEPLOY / "systemd"
HOSPITALS = tuple(site.node_id for site in HEART_DISEASE.sites)
PREFIX = PurePosixPath("/etc/healthnet")  # where the units expect `deploy init --prefix`
HEALTHNET = "/opt/healthnet/bin/healthnet"


def healthnet_help(args: list[str]) -> subprocess.CompletedProcess[str]:
    """``healthnet ARGS --help`` as a plain process: parses every option, runs nothing."""
    return subprocess.run(
        [sys.executable, "-m", "healthnet", *args, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
    )


def test_a_command_with_an_unknown_option_fails_the_help_check() -> None:
    """The check the units' commands go through can fail: --help does not hide a bad option."""
    assert healthnet_help(["node", "run", "--data", "x"]).returncode == 0
    assert healthnet_help(["node", "run", "--no-such-option"]).returncode != 0


# -- systemd


def unit(name: str) -> dict[str, list[str]]:
    """A unit file's ``Key=value`` lines (every section), each key's values in order."""
    values: dict[str, list[str]] = {}
    for line in (UNITS / name).read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def exec_start(name: str, instance: str) -> list[str]:
    (command,) = unit(name)["ExecStart"]
    return shlex.split(command.replace("%I", instance).replace("%i", instance))


HEALTHNET_UNITS = {
    "healthnet-aggregator.service": "",
    "healthnet-node@.service": "cleveland",
    "healthnet-regional@.service": "eu",
    "healthnet-dashboard.service": "",
}


def test_every_unit_is_listed() -> None:
    assert {p.name for p in UNITS.glob("*.service")} == {
        *HEALTHNET_UNITS,
        "healthnet-broker@.service",
    }


@pytest.mark.parametrize("name", sorted(HEALTHNET_UNITS))
def test_each_units_command_is_a_healthnet_command(name: str) -> None:
    """ExecStart is the installed `healthnet` with a subcommand and options that it accepts."""
    argv = exec_start(name, HEALTHNET_UNITS[name])
    assert argv[0] == HEALTHNET
    result = healthnet_help(argv[1:])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", sorted([*HEALTHNET_UNITS, "healthnet-broker@.service"]))
def test_each_unit_is_hardened_and_writes_only_its_state(name: str) -> None:
    """No root, no new privileges, a read-only system, a private /tmp, no capabilities, and
    every path the command writes (--state-dir, the broker's store) under ReadWritePaths."""
    values = unit(name)
    for key, expected in (
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("CapabilityBoundingSet", ""),
        ("RestrictSUIDSGID", "yes"),
    ):
        assert values.get(key) == [expected], (name, key)
    assert values["User"][0] not in ("", "root")
    argv = exec_start(name, "cleveland")
    if "--state-dir" in argv:
        state = PurePosixPath(argv[argv.index("--state-dir") + 1])
        writable = [PurePosixPath(p) for p in values["ReadWritePaths"]]
        assert any(state.is_relative_to(p) for p in writable), (state, writable)
        # systemd creates the state directory for the service's user.
        assert state.is_relative_to(PurePosixPath("/var/lib") / values["StateDirectory"][0])


def test_the_broker_unit_runs_the_generated_configs_where_they_are_installed(
    tmp_path: Path,
) -> None:
    """healthnet-broker@broker runs the core's generated config and healthnet-broker@regions-eu
    region eu's, as installed at the prefix the units expect; Mosquitto may write only data/."""
    spec = DeploymentSpec(
        federation="heart",
        hospitals=HOSPITALS,
        prefix=Path(PREFIX),
        regions=(Region("eu", HOSPITALS[:2], port=8884), Region("us", HOSPITALS[2:], port=8885)),
    )
    out = tmp_path / "out"
    deployment = generate_deployment(spec, out)
    name = "healthnet-broker@.service"
    values = unit(name)
    for instance, config in (
        ("broker", deployment.broker_config),
        ("regions/eu", deployment.region_configs["eu"]),
    ):
        argv = exec_start(name, instance)
        installed = PREFIX / config.relative_to(out)
        assert argv == ["/usr/sbin/mosquitto", "-c", str(installed)]
        text = config.read_text()
        (store,) = re.findall(r"^persistence_location (.+)$", text, re.MULTILINE)
        (writable,) = values["ReadWritePaths"]
        assert PurePosixPath(store) == PurePosixPath(writable.replace("%I", instance))


def test_the_node_unit_reads_the_env_file_deploy_init_writes(tmp_path: Path) -> None:
    """The node's EnvironmentFile is its identity's generated env file, installed at the prefix,
    and the TLS files that env file names are in the same folder."""
    spec = DeploymentSpec(federation="heart", hospitals=HOSPITALS, prefix=Path(PREFIX))
    out = tmp_path / "out"
    deployment = generate_deployment(spec, out)
    for name, identity in (
        ("healthnet-node@.service", "cleveland"),
        ("healthnet-aggregator.service", "aggregator"),
        ("healthnet-dashboard.service", "dashboard"),
    ):
        (env_file,) = unit(name)["EnvironmentFile"]
        generated = deployment.env_files[identity]
        assert env_file.replace("%i", identity) == str(PREFIX / generated.relative_to(out))
        env = read_env_file(generated)
        for key in ("HEALTHNET_CA_FILE", "HEALTHNET_CERT_FILE", "HEALTHNET_KEY_FILE"):
            assert PurePosixPath(env[key]).parent == PurePosixPath(env_file).parent.parent / (
                identity
            )


def test_the_regional_unit_reads_its_regions_aggregator_env_file(tmp_path: Path) -> None:
    """healthnet-regional@eu reads the env file `deploy init --regional-aggregators` wrote for
    region-eu, installed at the prefix, which names region eu's broker and TLS files beside it."""
    spec = DeploymentSpec(
        federation="heart",
        hospitals=HOSPITALS,
        prefix=Path(PREFIX),
        regions=(
            Region("eu", HOSPITALS[:2], port=8884, aggregator="region-eu"),
            Region("us", HOSPITALS[2:], port=8885, aggregator="region-us"),
        ),
    )
    out = tmp_path / "out"
    deployment = generate_deployment(spec, out)
    (env_file,) = unit("healthnet-regional@.service")["EnvironmentFile"]
    generated = deployment.env_files["region-eu"]
    assert env_file.replace("%i", "eu") == str(PREFIX / generated.relative_to(out))
    env = read_env_file(generated)
    assert env["HEALTHNET_BROKER_URL"] == "mqtts://127.0.0.1:8884"
    for key in ("HEALTHNET_CA_FILE", "HEALTHNET_CERT_FILE", "HEALTHNET_KEY_FILE"):
        assert PurePosixPath(env[key]).parent == PurePosixPath(env_file.replace("%i", "eu")).parent


SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize(
    ("name", "instance"),
    [
        ("healthnet-aggregator.service", None),
        ("healthnet-dashboard.service", None),
        ("healthnet-node@.service", "cleveland"),
        ("healthnet-regional@.service", "eu"),
        ("healthnet-broker@.service", "broker"),
    ],
)
def test_systemd_analyze_finds_nothing_to_say(
    tmp_path: Path, name: str, instance: str | None
) -> None:
    """`systemd-analyze verify` reports no unknown or malformed option, and the offline security
    review rates the unit's exposure 2.0 or lower ("OK"). The installed healthnet path is
    replaced by this Python (verify checks that the binary exists)."""
    assert SYSTEMD_ANALYZE is not None
    target = tmp_path / (name.replace("@.", f"@{instance}.") if instance else name)
    text = (UNITS / name).read_text().replace(HEALTHNET, f"{sys.executable} -m healthnet")
    target.write_text(text)
    verify = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(target)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert verify.returncode == 0, verify.stderr
    assert verify.stderr.strip() == "", verify.stderr
    security = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=yes", str(target)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", security.stdout)
    assert match is not None, security.stdout + security.stderr
    assert float(match.group(1)) <= 2.0, security.stdout


# -- compose


def compose(name: str = "compose.yaml") -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / name).read_text())
    return loaded


TREE_COMPOSE = "compose.regions.yaml"
TREE_SERVICES = ("aggregator", "region-eu", "region-us", "dashboard", *HOSPITALS)


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """A service's volumes: container path -> host path or named volume."""
    found = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        found[target] = source
    return found


def test_the_compose_file_runs_a_whole_federation() -> None:
    """Broker, aggregator, one node per hospital and the dashboard; every healthnet service runs
    the image's entry point as a non-root user with no new privileges and no capabilities."""
    services = compose()["services"]
    assert set(services) == {"broker", "aggregator", "dashboard", *HOSPITALS}
    for name, service in services.items():
        assert "no-new-privileges:true" in service["security_opt"], name
        if name == "broker":
            continue
        assert service["build"]["dockerfile"] == "deploy/Containerfile"
        assert service["cap_drop"] == ["ALL"]
        assert service["read_only"] is True
        assert service["depends_on"] == ["broker"]
    for hospital in HOSPITALS:
        command = services[hospital]["command"]
        assert command[:2] == ["node", "run"]
        assert command[command.index("--data") + 1] == f"heart-disease:{hospital}"


@pytest.mark.parametrize("name", ["aggregator", "dashboard", *HOSPITALS])
def test_each_compose_command_is_a_healthnet_command(name: str) -> None:
    """The image's entry point is `healthnet`; each service's command is arguments it accepts."""
    result = healthnet_help(compose()["services"][name]["command"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_compose_mounts_hold_what_the_generated_files_name(tmp_path: Path) -> None:
    """Generated as the compose file's header says (--prefix /deployment --host broker), every
    file an env file or the broker's config names is inside a mount of that service, each env
    file exists, the clients dial the broker service, and state lives on a named volume."""
    spec = DeploymentSpec(
        federation="heart",
        hospitals=HOSPITALS,
        host="broker",
        bind="0.0.0.0",  # noqa: S104 - the broker's container listens on its own network
        prefix=Path("/deployment"),
    )
    deployment_dir = tmp_path / "deployment"
    deployment = generate_deployment(spec, deployment_dir)
    header = (DEPLOY / "compose.yaml").read_text()
    assert "--prefix /deployment --host broker --bind 0.0.0.0" in header
    assert_mounts_hold_the_deployment(
        compose(),
        deployment,
        deployment_dir,
        brokers={"broker": deployment.broker_config},
        dials=dict.fromkeys(("aggregator", "dashboard", *HOSPITALS), "mqtts://broker:8883"),
    )


def assert_mounts_hold_the_deployment(
    document: dict[str, Any],
    deployment: Deployment,
    deployment_dir: Path,
    *,
    brokers: dict[str, Path],
    dials: dict[str, str],
) -> None:
    """Each broker service runs its generated config, with every file it names mounted; each
    healthnet service in ``dials`` reads its identity's env file, dials the broker named there,
    has its TLS files mounted and keeps its state on a named volume."""
    services = document["services"]
    volumes = set(document["volumes"])

    def inside(path: str, service: dict[str, Any]) -> bool:
        return any(PurePosixPath(path).is_relative_to(target) for target in mounts(service))

    for name, generated_config in brokers.items():
        broker = services[name]
        config = broker["command"][broker["command"].index("-c") + 1]
        assert config == str(
            PurePosixPath("/deployment") / generated_config.relative_to(deployment_dir)
        )
        assert inside(config, broker)
        for line in generated_config.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key in (
                "acl_file", "cafile", "certfile", "keyfile", "persistence_location",
                "bridge_cafile", "bridge_certfile", "bridge_keyfile",
            ):  # fmt: skip
                assert inside(value, broker), (name, line)
    for name, url in dials.items():
        service = services[name]
        env_file = DEPLOY / service["env_file"]
        generated = deployment.env_files[name]
        assert env_file.relative_to(DEPLOY / "deployment") == generated.relative_to(deployment_dir)
        env = read_env_file(generated)
        assert env["HEALTHNET_BROKER_URL"] == url, name
        for key in ("HEALTHNET_CA_FILE", "HEALTHNET_CERT_FILE", "HEALTHNET_KEY_FILE"):
            assert inside(env[key], service), (name, key)
        command = service["command"]
        if "--state-dir" in command:
            state = command[command.index("--state-dir") + 1]
            (target,) = [t for t in mounts(service) if PurePosixPath(state).is_relative_to(t)]
            assert mounts(service)[target] in volumes, (name, target)


def test_the_tree_compose_file_runs_regions_with_their_aggregators() -> None:
    """A core broker, one per region, the core aggregator, each region's aggregator, the four
    hospitals and the dashboard; every healthnet service unprivileged, each hospital and regional
    aggregator after its region's broker."""
    services = compose(TREE_COMPOSE)["services"]
    assert set(services) == {"broker", "broker-eu", "broker-us", *TREE_SERVICES}
    for name in TREE_SERVICES:
        service = services[name]
        assert service["cap_drop"] == ["ALL"], name
        assert service["read_only"] is True, name
        assert "no-new-privileges:true" in service["security_opt"], name
    for region, members in (("eu", HOSPITALS[:2]), ("us", HOSPITALS[2:])):
        assert services[f"region-{region}"]["command"][:2] == ["aggregator", "regional"]
        for name in (f"region-{region}", *members):
            assert services[name]["depends_on"] == [f"broker-{region}"], name


@pytest.mark.parametrize("name", TREE_SERVICES)
def test_each_tree_compose_command_is_a_healthnet_command(name: str) -> None:
    result = healthnet_help(compose(TREE_COMPOSE)["services"][name]["command"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_tree_compose_mounts_hold_what_the_generated_files_name(tmp_path: Path) -> None:
    """Generated as the tree compose file's header says, each broker's config and files, and
    each identity's env file and TLS files, are mounted where they are named; hospitals and
    regional aggregators dial their region's broker service, the core's services the core."""
    header = (DEPLOY / TREE_COMPOSE).read_text()
    for option in (
        "--prefix /deployment",
        "--host broker --bind 0.0.0.0",
        '--region-addresses "eu=broker-eu:8883;us=broker-us:8883" --regional-aggregators',
    ):
        assert option in header
    spec = DeploymentSpec(
        federation="heart",
        hospitals=HOSPITALS,
        host="broker",
        bind="0.0.0.0",  # noqa: S104 - each broker's container listens on its own network
        prefix=Path("/deployment"),
        regions=(
            Region("eu", HOSPITALS[:2], host="broker-eu", bind="0.0.0.0", aggregator="region-eu"),  # noqa: S104
            Region("us", HOSPITALS[2:], host="broker-us", bind="0.0.0.0", aggregator="region-us"),  # noqa: S104
        ),
    )
    deployment_dir = tmp_path / "deployment"
    deployment = generate_deployment(spec, deployment_dir)
    dials = {"aggregator": "mqtts://broker:8883", "dashboard": "mqtts://broker:8883"}
    for region, members in (("eu", HOSPITALS[:2]), ("us", HOSPITALS[2:])):
        for name in (f"region-{region}", *members):
            dials[name] = f"mqtts://broker-{region}:8883"
    assert_mounts_hold_the_deployment(
        compose(TREE_COMPOSE),
        deployment,
        deployment_dir,
        brokers={
            "broker": deployment.broker_config,
            "broker-eu": deployment.region_configs["eu"],
            "broker-us": deployment.region_configs["us"],
        },
        dials=dials,
    )


# -- the image


def test_the_image_ships_the_installed_packages_and_runs_healthnet_unprivileged() -> None:
    """The Containerfile copies exactly the packages pyproject installs, runs `healthnet` as its
    entry point (pyproject's console script) and switches to a non-root user."""
    text = (DEPLOY / "Containerfile").read_text()
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    shipped = {
        p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    copied = set(re.findall(r"^COPY (\w+) \./\1$", text, re.MULTILINE))
    assert copied == shipped
    for package in copied:
        assert (REPO / package / "__init__.py").exists()
    assert pyproject["project"]["scripts"]["healthnet"] == "healthnet.cli:main"
    assert re.search(r'^ENTRYPOINT \["healthnet"\]$', text, re.MULTILINE)
    (user,) = re.findall(r"^USER (\S+)$", text, re.MULTILINE)
    assert user.split(":")[0] not in ("0", "root")
    # The user is switched to after everything that needs root, and stays.
    assert text.rindex("USER ") > text.rindex("RUN ")
