"""``healthnet deploy init``: everything a federation's broker and identities need, in one folder.

Given a federation name and its hospitals, :func:`generate_deployment` writes::

    OUT/README.txt                  what goes where
    OUT/ca/ca.crt, ca.key           the federation's CA (keep ca.key offline)
    OUT/broker/mosquitto.conf       TLS listener, no anonymous access, ACL, limits, persistence
    OUT/broker/acl                  the access policy of healthnet.deploy.acl
    OUT/broker/ca.crt, server.crt, server.key
    OUT/broker/passwd               (password mode) Mosquitto $7$ hashes, one per identity
    OUT/clients/<identity>/         one folder per identity, to hand over as it is:
        healthnet.env               HEALTHNET_* settings the services read (broker URL, TLS files)
        ca.crt                      to verify the broker
        <identity>.crt, .key        (mutual TLS) the identity's client certificate and key

With regions (:mod:`healthnet.deploy.regions`), ``broker/`` is the core broker, which only the
services and the regions' bridges may use, and each region gets a broker of its own::

    OUT/regions/<region>/mosquitto.conf   its listener, ACL, limits, persistence and the bridge
    OUT/regions/<region>/acl              its hospitals, each its own topics
    OUT/regions/<region>/ca.crt, server.crt, server.key, bridge-<region>.crt, .key

and each hospital's env file points at its region's broker. A region with an aggregator
(``Region.aggregator``, ``deploy init --regional-aggregators``) also gets that identity's
``clients/region-<region>/`` folder, its env file pointing at the region's broker, and its rows in
the region's ACL; the bridge then carries its updates instead of the hospitals'.

The identities are the aggregator, each hospital, an operator and a read-only dashboard. Private
keys, password hashes and env files (which carry the password in password mode) are written with
mode 0600, folders with 0700; nothing secret is returned or logged. Paths inside the files are
absolute under ``prefix`` (default: OUT itself), the place where the folders will live.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from common.errors import ConfigError, TopicError
from common.topics import TopicTree, validate_identifier
from healthnet.deploy.acl import SERVICE_IDENTITIES, Role, render_acl, role_of
from healthnet.deploy.passwords import mosquitto_hash, new_password
from healthnet.deploy.regions import (
    BRIDGE_PREFIX,
    Region,
    render_bridge,
    render_core_acl,
    render_region_acl,
)

if TYPE_CHECKING:
    # cryptography comes in where a deployment is generated, not with the package: every
    # healthnet command imports this module (the CLI's deploy group), a node and the aggregator too.
    from healthnet.deploy.pki import CertificateAuthority

__all__ = [
    "AuthMode",
    "BrokerLimits",
    "Deployment",
    "DeploymentSpec",
    "generate_deployment",
    "read_env_file",
]

_PRIVATE = 0o600
_PUBLIC = 0o644
_PRIVATE_DIR = 0o700
MIB = 1024 * 1024
# Room above the largest message for the packet's topic and headers.
_PACKET_OVERHEAD = 64 * 1024
# Out of the box an update may claim at most this many training samples: far above a hospital's
# cohort in the built-in federations (hundreds to a few thousand), far below the millions that
# would let one identity outvote the rest. Operators enrol a tighter cap with --max-samples.
DEFAULT_MAX_SAMPLES = 100_000
# An honest update's norm varies within a few times the median of its peers' (data sizes,
# staleness); a poisoned one that wrecks the model is orders of magnitude beyond it.
DEFAULT_NORM_MULTIPLIER = 10.0


class AuthMode(StrEnum):
    MTLS = "mtls"
    PASSWORD = "password"  # noqa: S105 - the name of a mode, not a password


@dataclass(frozen=True, slots=True)
class BrokerLimits:
    """Mosquitto's per-client limits, sized for the federation (DESIGN §6)."""

    max_packet_size: int
    max_queued_messages: int
    max_queued_bytes: int
    max_inflight_messages: int = 20

    @classmethod
    def for_federation(
        cls, hospitals: int, *, max_message_bytes: int, updates_in_flight: int
    ) -> BrokerLimits:
        # The aggregator's persistent session must hold, while it is away, every update the
        # hospitals may have in flight plus their resends and evaluations; a hospital's must hold
        # a whole model in chunks. Mosquitto silently drops what exceeds these; the application
        # acks make nodes resend, so a drop costs time, never an update.
        messages = 1000 + 100 * hospitals
        return cls(
            max_packet_size=max_message_bytes + _PACKET_OVERHEAD,
            max_queued_messages=messages,
            max_queued_bytes=max_message_bytes * (updates_in_flight * hospitals + 16),
        )


@dataclass(frozen=True, slots=True)
class DeploymentSpec:
    federation: str
    hospitals: tuple[str, ...]
    host: str = "127.0.0.1"
    """The name or address clients dial; the server certificate names it."""
    port: int = 8883
    bind: str = "127.0.0.1"
    """The address the broker listens on: loopback unless asked (e.g. 0.0.0.0)."""
    auth: AuthMode = AuthMode.MTLS
    prefix: Path | None = None
    """Where the generated folder will live on the machines; paths in the files point there."""
    days: int = 825
    ca_days: int = 3650
    max_message_bytes: int = 64 * MIB
    updates_in_flight: int = 4
    broker_user: str | None = None
    """Mosquitto's ``user`` line: the account it runs as when started as root (default its own)."""
    max_samples: int = DEFAULT_MAX_SAMPLES
    """The most training samples one update may claim: its weight in the mean (the aggregator's
    ``max_num_samples``). Enrol it as the largest hospital's training set, or keep the default."""
    norm_multiplier: float = DEFAULT_NORM_MULTIPLIER
    """The aggregator's adaptive norm bound: an update's norm may be this many times the median
    norm of the last accepted ones (``norm_multiplier``)."""
    regions: tuple[Region, ...] = ()
    """A broker tree: each region's broker and hospitals (every hospital in one region); the
    broker at ``host:port`` is then the core. Empty: one broker for everyone."""

    def __post_init__(self) -> None:
        self._check_names()
        self._check_address()
        if self.days < 1 or self.ca_days < self.days:
            raise ConfigError("certificates need days >= 1 and a CA that outlives them")
        if self.max_message_bytes < 64 * 1024:
            raise ConfigError("max_message_bytes below 64 KiB cannot carry a model manifest")
        if self.updates_in_flight < 1:
            raise ConfigError("updates_in_flight must be at least 1")
        self._check_defences()
        self._check_regions()

    def _check_regions(self) -> None:
        if not self.regions:
            return
        if self.auth is not AuthMode.MTLS:
            raise ConfigError("a broker tree needs --auth mtls: bridges dial the core with mTLS")
        names = [r.name for r in self.regions]
        if len(set(names)) != len(names):
            raise ConfigError(f"region names repeat: {', '.join(names)}")
        placed = [h for r in self.regions for h in r.hospitals]
        repeated = sorted({h for h in placed if placed.count(h) > 1})
        if repeated:
            raise ConfigError(f"hospitals in more than one region: {', '.join(repeated)}")
        if set(placed) != set(self.hospitals):
            missing = sorted(set(self.hospitals) - set(placed))
            extra = sorted(set(placed) - set(self.hospitals))
            raise ConfigError(
                f"regions and hospitals disagree: in no region {missing}, not a hospital {extra}"
            )
        bridges = [h for h in self.hospitals if h.startswith(BRIDGE_PREFIX)]
        if bridges:
            raise ConfigError(f"hospital names {bridges} are reserved for regions' bridges")
        self._check_regional_aggregators()
        addresses = [(self.host, self.port)] + [(r.host, r.port) for r in self.regions]
        if len(set(addresses)) != len(addresses):
            raise ConfigError("the core and every region need a broker address of their own")
        for region in self.regions:
            for what, value in (("host", region.host), ("bind", region.bind)):
                _check_host(f"region {region.name} {what}", value)

    def _check_regional_aggregators(self) -> None:
        aggregators = [r.aggregator for r in self.regions if r.aggregator is not None]
        taken = {*self.hospitals, *SERVICE_IDENTITIES.values(), *(r.bridge for r in self.regions)}
        clashing = sorted({a for a in aggregators if a in taken or aggregators.count(a) > 1})
        if clashing:
            raise ConfigError(f"regional aggregator names {clashing} are taken")

    def region_of(self, identity: str) -> Region | None:
        """The region whose broker ``identity`` uses, a hospital's or the region's aggregator's
        (None: a single broker, or a service of the core)."""
        for region in self.regions:
            if identity in region.hospitals or identity == region.aggregator:
                return region
        return None

    @property
    def regional_aggregators(self) -> dict[str, Region]:
        """Each regional aggregator's identity and its region."""
        return {r.aggregator: r for r in self.regions if r.aggregator is not None}

    def _check_names(self) -> None:
        try:
            validate_identifier(self.federation, "federation")
            for hospital in self.hospitals:
                validate_identifier(hospital, "hospital")
        except TopicError as exc:
            raise ConfigError(str(exc)) from exc
        if not self.hospitals:
            raise ConfigError("a federation needs at least one hospital")
        if len(set(self.hospitals)) != len(self.hospitals):
            raise ConfigError(f"hospital names repeat: {', '.join(self.hospitals)}")
        reserved = [h for h in self.hospitals if role_of(h) is not Role.HOSPITAL]
        if reserved:
            raise ConfigError(f"hospital names {reserved} are reserved for service identities")

    def _check_address(self) -> None:
        for what, value in (("host", self.host), ("bind", self.bind)):
            _check_host(what, value)
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"port {self.port} is outside 1-65535")

    def _check_defences(self) -> None:
        if self.max_samples < 1:
            raise ConfigError(f"max_samples {self.max_samples} must be at least 1")
        if not 1 <= self.norm_multiplier <= 1e6:
            raise ConfigError(f"norm_multiplier {self.norm_multiplier} must be in 1-1e6")

    @property
    def identities(self) -> dict[str, Role]:
        """Every broker identity and its role, the aggregator first."""
        out = {SERVICE_IDENTITIES[Role.AGGREGATOR]: Role.AGGREGATOR}
        out.update(dict.fromkeys(self.hospitals, Role.HOSPITAL))
        out[SERVICE_IDENTITIES[Role.OPERATOR]] = Role.OPERATOR
        out[SERVICE_IDENTITIES[Role.DASHBOARD]] = Role.DASHBOARD
        return out

    def broker_url(self, identity: str, password: str | None = None) -> str:
        """The URL ``identity`` dials: its region's broker for a hospital in a tree, else the
        (core) broker."""
        region = self.region_of(identity)
        host, port = (self.host, self.port) if region is None else (region.host, region.port)
        host = f"[{host}]" if _is_ipv6(host) else host
        user = f"{identity}:{password}@" if password is not None else ""
        return f"mqtts://{user}{host}:{port}"


@dataclass(frozen=True, slots=True)
class Deployment:
    """Where the generated files are (no secret is held here)."""

    out: Path
    broker_config: Path
    acl_file: Path
    ca_file: Path
    env_files: Mapping[str, Path] = field(default_factory=dict)
    limits: BrokerLimits | None = None
    region_configs: Mapping[str, Path] = field(default_factory=dict)
    """Each region's broker config (empty for a single broker)."""


def _new_ca(spec: DeploymentSpec) -> CertificateAuthority:
    from healthnet.deploy.pki import CertificateAuthority  # cryptography: see the imports

    return CertificateAuthority.create(spec.federation, days=spec.ca_days)


def generate_deployment(spec: DeploymentSpec, out: Path) -> Deployment:
    """Write a complete deployment into ``out``, which must not exist or be empty."""
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} is not empty: refusing to overwrite keys or passwords there")
    prefix = (spec.prefix or out).absolute()
    tree = TopicTree(spec.federation)
    limits = BrokerLimits.for_federation(
        len(spec.hospitals),
        max_message_bytes=spec.max_message_bytes,
        updates_in_flight=spec.updates_in_flight,
    )
    ca = _new_ca(spec)
    for folder in (out, out / "ca", out / "broker", out / "broker" / "data", out / "clients"):
        _mkdir(folder)
    _write(out / "ca" / "ca.crt", ca.certificate_pem, _PUBLIC)
    _write(out / "ca" / "ca.key", ca.private_key_pem, _PRIVATE)

    broker = out / "broker"
    server = ca.issue_server(spec.host, days=spec.days)
    _write(broker / "ca.crt", ca.certificate_pem, _PUBLIC)
    _write(broker / "server.crt", server.certificate, _PUBLIC)
    _write(broker / "server.key", server.private_key, _PRIVATE)
    if spec.regions:
        services = [(i, r) for i, r in spec.identities.items() if r is not Role.HOSPITAL]
        acl = render_core_acl(tree, spec.regions, services)
    else:
        acl = render_acl(tree, spec.hospitals)
    _write(broker / "acl", acl.encode(), _PUBLIC)
    region_configs = {
        region.name: _write_region(spec, ca, tree, region, out=out, prefix=prefix)
        for region in spec.regions
    }

    hashes: list[str] = []
    env_files: dict[str, Path] = {}
    writers = [
        (identity, _role_settings(spec, role, identity), partial(_env_text, spec, identity, role))
        for identity, role in spec.identities.items()
    ] + [
        (identity, _regional_settings(spec, region), partial(_regional_env_text, spec, region))
        for identity, region in spec.regional_aggregators.items()
    ]
    for identity, settings, env_text in writers:
        env_files[identity], password_hash = _write_identity(
            spec, ca, identity, settings, env_text, out=out, prefix=prefix
        )
        if password_hash is not None:
            hashes.append(password_hash)
    if hashes:
        _write(broker / "passwd", ("\n".join(hashes) + "\n").encode(), _PRIVATE)

    config = broker / "mosquitto.conf"
    _write(config, mosquitto_conf(spec, limits, prefix / "broker").encode(), _PUBLIC)
    _write(out / "README.txt", _readme(spec, prefix).encode(), _PUBLIC)
    return Deployment(
        out=out,
        broker_config=config,
        acl_file=broker / "acl",
        ca_file=out / "ca" / "ca.crt",
        env_files=env_files,
        limits=limits,
        region_configs=region_configs,
    )


def _write_identity(
    spec: DeploymentSpec,
    ca: CertificateAuthority,
    identity: str,
    role_settings: Mapping[str, str],
    env_text: Callable[[dict[str, str]], str],
    *,
    out: Path,
    prefix: Path,
) -> tuple[Path, str | None]:
    """``clients/<identity>/``: the CA, its certificate and key (or a password) and its env file;
    returns the env file and, in password mode, the password file's line for the identity."""
    folder = out / "clients" / identity
    installed = prefix / "clients" / identity
    _mkdir(folder)
    _write(folder / "ca.crt", ca.certificate_pem, _PUBLIC)
    settings: dict[str, str] = {"HEALTHNET_FEDERATION": spec.federation}
    settings["HEALTHNET_CA_FILE"] = str(installed / "ca.crt")
    if spec.auth is AuthMode.MTLS:
        issued = ca.issue_client(identity, federation=spec.federation, days=spec.days)
        _write(folder / f"{identity}.crt", issued.certificate, _PUBLIC)
        _write(folder / f"{identity}.key", issued.private_key, _PRIVATE)
        settings["HEALTHNET_BROKER_URL"] = spec.broker_url(identity)
        settings["HEALTHNET_CERT_FILE"] = str(installed / f"{identity}.crt")
        settings["HEALTHNET_KEY_FILE"] = str(installed / f"{identity}.key")
    password_hash = None
    if spec.auth is AuthMode.PASSWORD:
        password = new_password()
        password_hash = f"{identity}:{mosquitto_hash(password)}"
        settings["HEALTHNET_BROKER_URL"] = spec.broker_url(identity, password)
    settings.update(role_settings)
    env_path = folder / "healthnet.env"
    _write(env_path, env_text(settings).encode(), _PRIVATE)
    return env_path, password_hash


def _write_region(
    spec: DeploymentSpec,
    ca: CertificateAuthority,
    tree: TopicTree,
    region: Region,
    *,
    out: Path,
    prefix: Path,
) -> Path:
    """A region's broker folder: its TLS identity, its bridge's identity, ACL and config."""
    for folder in (out / "regions", out / "regions" / region.name):
        _mkdir(folder)
    folder = out / "regions" / region.name
    _mkdir(folder / "data")
    installed = prefix / "regions" / region.name
    server = ca.issue_server(region.host, days=spec.days)
    bridge = ca.issue_client(region.bridge, federation=spec.federation, days=spec.days)
    _write(folder / "ca.crt", ca.certificate_pem, _PUBLIC)
    _write(folder / "server.crt", server.certificate, _PUBLIC)
    _write(folder / "server.key", server.private_key, _PRIVATE)
    _write(folder / f"{region.bridge}.crt", bridge.certificate, _PUBLIC)
    _write(folder / f"{region.bridge}.key", bridge.private_key, _PRIVATE)
    _write(folder / "acl", render_region_acl(tree, region).encode(), _PUBLIC)
    limits = BrokerLimits.for_federation(
        len(region.hospitals),
        max_message_bytes=spec.max_message_bytes,
        updates_in_flight=spec.updates_in_flight,
    )
    text = mosquitto_conf(
        spec, limits, installed, port=region.port, bind=region.bind, title=f"region {region.name}"
    )
    text += "\n" + render_bridge(
        tree,
        region,
        core_host=spec.host,
        core_port=spec.port,
        files=installed,
        max_packet_size=limits.max_packet_size,
    )
    config = folder / "mosquitto.conf"
    _write(config, text.encode(), _PUBLIC)
    return config


def mosquitto_conf(
    spec: DeploymentSpec,
    limits: BrokerLimits,
    broker_dir: Path,
    *,
    port: int | None = None,
    bind: str | None = None,
    title: str = "",
) -> str:
    """A broker's configuration (pure: paths point into ``broker_dir``); ``port`` and ``bind``
    default to the spec's (core) broker."""
    port = spec.port if port is None else port
    bind = spec.bind if bind is None else bind
    which = f" ({title})" if title else (" (core)" if spec.regions else "")
    lines = [
        f"# Mosquitto{which} for healthNET federation {spec.federation} (`healthnet deploy init`).",
        f"# Run: mosquitto -c {broker_dir / 'mosquitto.conf'}",
        "per_listener_settings false",
        "allow_anonymous false",
        f"acl_file {broker_dir / 'acl'}",
    ]
    if spec.auth is AuthMode.PASSWORD:
        lines.append(f"password_file {broker_dir / 'passwd'}")
    lines += [
        "",
        f"listener {port} {bind}",
        f"cafile {broker_dir / 'ca.crt'}",
        f"certfile {broker_dir / 'server.crt'}",
        f"keyfile {broker_dir / 'server.key'}",
        "tls_version tlsv1.2",
    ]
    if spec.auth is AuthMode.MTLS:
        lines += [
            "# Every client shows a certificate of the federation's CA; its CN is the identity.",
            "require_certificate true",
            "use_identity_as_username true",
        ]
    else:
        lines.append("require_certificate false")
    lines += [
        "# The client id is the identity: nobody can take over another identity's session.",
        "use_username_as_clientid true",
        "",
        "# Limits sized for the federation: mosquitto drops QoS 1 messages beyond them.",
        f"max_packet_size {limits.max_packet_size}",
        f"max_inflight_messages {limits.max_inflight_messages}",
        f"max_queued_messages {limits.max_queued_messages}",
        f"max_queued_bytes {limits.max_queued_bytes}",
        "set_tcp_nodelay true",
        "",
        "# The aggregator's persistent session and the retained model survive a restart.",
        "persistence true",
        # mosquitto before 2.0 joins location and file name without a separator (2.x adds one).
        f"persistence_location {broker_dir / 'data'}{os.sep}",
        "autosave_interval 60",
        "",
        "log_dest stderr",
        *(f"log_type {kind}" for kind in ("error", "warning", "notice", "information")),
        "connection_messages true",
    ]
    if spec.broker_user is not None:
        lines.append(f"user {spec.broker_user}")
    return "\n".join(lines) + "\n"


def read_env_file(path: Path) -> dict[str, str]:
    """The ``KEY=value`` lines of a generated env file (comments and blanks skipped)."""
    values: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def _role_settings(spec: DeploymentSpec, role: Role, identity: str) -> dict[str, str]:
    match role:
        case Role.HOSPITAL:
            return {"HEALTHNET_NODE_ID": identity}
        case Role.AGGREGATOR:
            # The defences every federation needs, model-independent (docs/security.md): one
            # legitimate identity must not be able to flood, outvote or blow up the model.
            defences = {
                "HEALTHNET_CLIENT_ID": identity,
                # A node trains once per global version; more is a flood.
                "HEALTHNET_KNOBS__ONE_UPDATE_PER_VERSION": "true",
                # An update's sample count is its weight.
                "HEALTHNET_KNOBS__MAX_NUM_SAMPLES": str(spec.max_samples),
                # Its norm is bounded by its peers' (warm-up: by the initial weights'), so an
                # update of huge values is refused without a bound tuned to the model.
                "HEALTHNET_KNOBS__NORM_MULTIPLIER": f"{spec.norm_multiplier:g}",
            }
            if spec.regional_aggregators:
                # The core's nodes are then regions, which send several updates from one base
                # and sum their hospitals' samples: the regional aggregators hold these two.
                del defences["HEALTHNET_KNOBS__ONE_UPDATE_PER_VERSION"]
                del defences["HEALTHNET_KNOBS__MAX_NUM_SAMPLES"]
            return defences
        case Role.OPERATOR | Role.DASHBOARD:
            return {}


def _regional_settings(spec: DeploymentSpec, region: Region) -> dict[str, str]:
    return {
        "HEALTHNET_REGION": region.name,
        "HEALTHNET_NODE_ID": region.aggregator or "",
        # The per-hospital defences the core cannot apply to a region (see _role_settings).
        "HEALTHNET_ONE_UPDATE_PER_VERSION": "true",
        "HEALTHNET_MAX_NUM_SAMPLES": str(spec.max_samples),
    }


def _regional_env_text(spec: DeploymentSpec, region: Region, settings: dict[str, str]) -> str:
    lines = [
        f"# healthNET settings of {region.aggregator}, region {region.name}'s aggregator,",
        f"# in federation {spec.federation}.",
        "# It reads its hospitals' updates and the core's status and manifest, and writes their",
        "# acks and its combined updates, on its region's broker only (healthnet aggregator",
        "# regional).",
        "# Private to this identity (mode 0600).",
        *(f"{key}={value}" for key, value in settings.items()),
    ]
    return "\n".join(lines) + "\n"


_ROLE_NOTES = {
    Role.HOSPITAL: "writes its own updates, status and evaluations; reads the model, the "
    "aggregator's status and its own acks",
    Role.AGGREGATOR: "the only writer of the model, acks, versions and the aggregator's status",
    Role.OPERATOR: "the only writer of control requests; reads their replies and every status",
    Role.DASHBOARD: "read-only: statuses and version records, never the model or updates",
}


def _env_text(spec: DeploymentSpec, identity: str, role: Role, settings: dict[str, str]) -> str:
    lines = [
        f"# healthNET settings of {identity} ({role.value}) in federation {spec.federation}.",
        f"# It {_ROLE_NOTES[role]}.",
        "# Private to this identity (mode 0600). Use it as .env in the working directory, or",
        "# export it: set -a; . ./healthnet.env; set +a",
        *(f"{key}={value}" for key, value in settings.items()),
    ]
    if role is Role.AGGREGATOR:
        lines += [
            "# More defences (docs/security.md), off until chosen: a robust rule (for a buffer",
            "# of 3 or more), an absolute norm ceiling for this model, clipping instead of",
            "# refusing updates above the norm bound:",
            "# HEALTHNET_KNOBS__AGGREGATION=median",
            "# HEALTHNET_KNOBS__MAX_UPDATE_NORM=10",
            "# HEALTHNET_KNOBS__NORM_POLICY=clip",
        ]
    return "\n".join(lines) + "\n"


def _readme(spec: DeploymentSpec, prefix: Path) -> str:
    owner = "the account mosquitto runs as (user mosquitto unless configured)"
    return "\n".join(
        [
            f"healthNET deployment of federation {spec.federation} ({spec.auth.value})",
            "",
            f"Install this folder at {prefix} (paths in the files point there).",
            f"broker/    on the broker machine; owned by {owner}:",
            f"           mosquitto -c {prefix / 'broker' / 'mosquitto.conf'}",
            "clients/X/ to identity X only (its env file, CA certificate and key):",
            "           cd clients/X && cp healthnet.env .env && healthnet ...",
            "ca/ca.key  signs new certificates: keep it offline.",
            "",
            f"Broker: mqtts://{spec.host}:{spec.port}, listening on {spec.bind}.",
            "Identities: " + ", ".join([*spec.identities, *spec.regional_aggregators]),
            "",
            *_readme_regions(spec, prefix),
        ]
    )


def _readme_regions(spec: DeploymentSpec, prefix: Path) -> list[str]:
    if not spec.regions:
        return []
    lines = [
        "A broker tree: broker/ is the core (aggregator, operator, dashboard and the bridges);",
        "hospitals use their region's broker, which bridges to the core with its own identity.",
    ]
    for region in spec.regions:
        lines += [
            f"regions/{region.name}/ on region {region.name}'s broker machine:",
            f"           mosquitto -c {prefix / 'regions' / region.name / 'mosquitto.conf'}",
            f"           mqtts://{region.host}:{region.port}: " + ", ".join(region.hospitals),
        ]
        if region.aggregator is not None:
            lines += [
                f"clients/{region.aggregator}/ to region {region.name}'s aggregator:",
                (
                    f"           cd clients/{region.aggregator} && cp healthnet.env .env && "
                    "healthnet aggregator regional"
                ),
            ]
    return [*lines, ""]


def _mkdir(path: Path) -> None:
    path.mkdir(mode=_PRIVATE_DIR, parents=True, exist_ok=True)
    path.chmod(_PRIVATE_DIR)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` from the start, so a key is never readable by others."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        os.fchmod(fd, mode)  # the umask may have taken bits away
        handle.write(data)


def _check_host(what: str, value: str) -> None:
    if not value or any(c.isspace() or c in "/@?#" for c in value):
        raise ConfigError(f"{what} {value!r} is not a host name or address")


def _is_ipv6(host: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address)
    except ValueError:
        return False
