"""Specification of `healthnet deploy init`: files, their modes, certificates and the ACL."""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from aggregator.service import AggregatorService
from aggregator.settings import AggregatorSettings
from common.errors import ConfigError
from common.messages import NormPolicy
from common.settings import ConnectionSettings
from common.topics import Route, Scope, TopicTree
from healthnet.deploy import (
    PERMISSIONS,
    Access,
    AuthMode,
    DeploymentSpec,
    Role,
    generate_deployment,
    read_env_file,
)
from healthnet.deploy.acl import render_acl
from healthnet.deploy.passwords import mosquitto_hash, verify_mosquitto_hash
from healthnet.feed import subscriptions as feed_subscriptions

HOSPITALS = ("cleveland", "hungarian")


def generate(tmp_path: Path, **overrides: object) -> Path:
    fields: dict[str, object] = {"federation": "heart", "hospitals": HOSPITALS}
    fields.update(overrides)
    out = tmp_path / "out"
    generate_deployment(DeploymentSpec(**fields), out)  # type: ignore[arg-type]
    return out


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


# -- files


@pytest.mark.parametrize("auth", list(AuthMode), ids=[a.value for a in AuthMode])
def test_every_secret_is_private_and_every_identity_has_an_env_file(
    tmp_path: Path, auth: AuthMode
) -> None:
    """Keys, password hashes and env files are 0600, folders 0700; one env file per identity."""
    out = generate(tmp_path, auth=auth)
    identities = ["aggregator", *HOSPITALS, "operator", "dashboard"]
    assert sorted(p.name for p in (out / "clients").iterdir()) == sorted(identities)
    for path in out.rglob("*"):
        if path.is_dir():
            assert mode(path) == 0o700, path
        elif path.suffix == ".key" or path.name in ("passwd", "healthnet.env"):
            assert mode(path) == 0o600, path
        else:
            assert mode(path) & 0o022 == 0, path
    keys = sorted(p.name for p in out.rglob("*.key"))
    expected_keys = ["ca.key", "server.key"]
    if auth is AuthMode.MTLS:
        expected_keys += [f"{identity}.key" for identity in identities]
    assert keys == sorted(expected_keys)
    assert (out / "broker" / "passwd").exists() is (auth is AuthMode.PASSWORD)


def test_env_files_are_what_the_services_read(tmp_path: Path) -> None:
    """An identity's env file, read by its settings class, names its broker URL and TLS files."""
    out = generate(tmp_path, host="broker.example.org", port=9883)
    env = out / "clients" / "cleveland" / "healthnet.env"
    settings = ConnectionSettings(_env_file=env)
    endpoint = settings.broker_url
    assert (endpoint.host, endpoint.port, endpoint.tls) == ("broker.example.org", 9883, True)
    assert settings.federation == "heart"
    assert settings.cert_file is not None
    assert Path(settings.cert_file) == (out / "clients" / "cleveland" / "cleveland.crt").absolute()
    assert read_env_file(env)["HEALTHNET_NODE_ID"] == "cleveland"
    aggregator = read_env_file(out / "clients" / "aggregator" / "healthnet.env")
    assert aggregator["HEALTHNET_KNOBS__ONE_UPDATE_PER_VERSION"] == "true"


@pytest.mark.parametrize(
    ("overrides", "max_samples", "multiplier"),
    [
        pytest.param({}, 100_000, 10.0, id="defaults"),
        pytest.param({"max_samples": 5000, "norm_multiplier": 4.0}, 5000, 4.0, id="enrolled"),
    ],
)
def test_the_generated_aggregator_defends_itself(
    tmp_path: Path, overrides: dict[str, object], max_samples: int, multiplier: float
) -> None:
    """The aggregator's env file, read as the aggregator reads it, caps sample counts, bounds
    update norms adaptively and refuses floods, with no knob to tune by hand."""
    out = generate(tmp_path, **overrides)
    knobs = AggregatorSettings(_env_file=out / "clients" / "aggregator" / "healthnet.env").knobs
    assert knobs.one_update_per_version
    assert knobs.max_num_samples == max_samples
    assert knobs.norm_multiplier == multiplier
    assert knobs.norm_policy is NormPolicy.REJECT


def test_deploy_init_enrols_the_sample_cap_and_norm_multiplier(tmp_path: Path) -> None:
    """--max-samples and --norm-multiplier reach the aggregator's env file."""
    out = tmp_path / "deployment"
    command = [
        sys.executable, "-m", "healthnet", "deploy", "init", "--federation", "heart",
        "--nodes", "cleveland", "--out", str(out), "--max-samples", "303",
        "--norm-multiplier", "5",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    env = read_env_file(out / "clients" / "aggregator" / "healthnet.env")
    assert env["HEALTHNET_KNOBS__MAX_NUM_SAMPLES"] == "303"
    assert env["HEALTHNET_KNOBS__NORM_MULTIPLIER"] == "5"


def test_password_mode_puts_a_distinct_password_in_each_env_file_only(tmp_path: Path) -> None:
    """Each identity gets its own random password in its URL; the broker keeps only hashes."""
    out = generate(tmp_path, auth=AuthMode.PASSWORD)
    hashes = dict(
        line.split(":", 1) for line in (out / "broker" / "passwd").read_text().splitlines()
    )
    passwords = set()
    for identity, encoded in hashes.items():
        settings = ConnectionSettings(_env_file=out / "clients" / identity / "healthnet.env")
        endpoint = settings.broker_url
        assert endpoint.username == identity
        assert endpoint.password is not None
        assert verify_mosquitto_hash(endpoint.password, encoded)
        passwords.add(endpoint.password)
        for path in out.rglob("*"):
            if path.is_file() and path.parent.name != identity:
                assert endpoint.password not in path.read_text(errors="ignore"), path
    assert len(passwords) == len(hashes) == len(HOSPITALS) + 3


def test_prefix_sets_the_paths_written_into_the_files(tmp_path: Path) -> None:
    """With --prefix, configs point where the folder will be installed, not where it was made."""
    out = generate(tmp_path, prefix=Path("/etc/healthnet"))
    conf = (out / "broker" / "mosquitto.conf").read_text()
    assert "certfile /etc/healthnet/broker/server.crt" in conf
    cleveland = read_env_file(out / "clients" / "cleveland" / "healthnet.env")
    assert cleveland["HEALTHNET_CA_FILE"] == "/etc/healthnet/clients/cleveland/ca.crt"


def test_a_non_empty_folder_is_never_overwritten(tmp_path: Path) -> None:
    """Generating into a folder that holds files refuses, so no key is ever replaced."""
    generate(tmp_path)
    with pytest.raises(ConfigError, match="not empty"):
        generate(tmp_path)


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        pytest.param(
            "hospitals", (), "a federation needs at least one hospital", id="no-hospitals"
        ),
        pytest.param("hospitals", ("a", "a"), "hospital names repeat: a, a", id="repeated"),
        pytest.param(
            "hospitals",
            ("aggregator",),
            "hospital names ['aggregator'] are reserved for service identities",
            id="reserved-aggregator",
        ),
        pytest.param(
            "hospitals",
            ("dashboard",),
            "hospital names ['dashboard'] are reserved for service identities",
            id="reserved-dashboard",
        ),
        pytest.param(
            "hospitals", ("a/b",), "hospital 'a/b' is invalid: use 1-64 letters", id="slash"
        ),
        pytest.param(
            "hospitals", ("+",), "hospital '+' is invalid: use 1-64 letters", id="wildcard"
        ),
        pytest.param(
            "federation", "x#", "federation 'x#' is invalid: use 1-64 letters", id="bad-federation"
        ),
        pytest.param("port", 0, "port 0 is outside 1-65535", id="port-0"),
        pytest.param("host", "a b", "host 'a b' is not a host name or address", id="host-space"),
        pytest.param(
            "days",
            5000,
            "certificates need days >= 1 and a CA that outlives them",
            id="outlives-ca",
        ),
    ],
)
def test_invalid_specs_are_refused(field: str, value: object, reason: str) -> None:
    """Names that could break out of a topic segment, reserved names and bad ports are refused,
    each saying what is wrong."""
    fields: dict[str, object] = {"federation": "heart", "hospitals": HOSPITALS, field: value}
    with pytest.raises(ConfigError, match=f"^{re.escape(reason)}"):
        DeploymentSpec(**fields)  # type: ignore[arg-type]


def test_mosquitto_conf_is_secure_by_default(tmp_path: Path) -> None:
    """TLS listener on loopback, no anonymous access, identities as client ids, explicit limits."""
    conf = (generate(tmp_path, port=9000) / "broker" / "mosquitto.conf").read_text().splitlines()
    for line in (
        "allow_anonymous false",
        "listener 9000 127.0.0.1",
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
        "persistence true",
        "set_tcp_nodelay true",
    ):
        assert line in conf
    settings = dict(line.split(" ", 1) for line in conf if line and not line.startswith("#"))
    assert int(settings["max_packet_size"]) >= 64 * 1024 * 1024
    assert int(settings["max_queued_messages"]) >= 1000 + 100 * len(HOSPITALS)
    assert settings["acl_file"].endswith("/broker/acl")


# -- certificates


def test_certificates_chain_to_the_ca_with_the_right_names_and_usages(tmp_path: Path) -> None:
    """The server certificate verifies for the host and loopback; client certificates carry the
    identity as CN and are for client authentication only."""
    out = generate(tmp_path, host="broker.example.org")
    ca = load(out / "ca" / "ca.crt")
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert (constraints.value.ca, constraints.value.path_length) == (True, 0)
    store = verification.Store([ca])
    now = dt.datetime.now(dt.UTC)
    server = load(out / "broker" / "server.crt")
    for name in ("broker.example.org", "localhost"):
        verifier = verification.PolicyBuilder().store(store).time(now)
        verifier.build_server_verifier(x509.DNSName(name)).verify(server, [])
    verifier = verification.PolicyBuilder().store(store).time(now)
    loopback = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
    verifier.build_server_verifier(loopback).verify(server, [])
    usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]

    client = load(out / "clients" / "cleveland" / "cleveland.crt")
    client_verifier = verification.PolicyBuilder().store(store).time(now).build_client_verifier()
    verified = client_verifier.verify(client, [])
    assert verified.subjects == [x509.UniformResourceIdentifier("urn:healthnet:heart:cleveland")]
    cn = client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == "cleveland"
    usage = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not client.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_a_hospital_certificate_cannot_pose_as_the_broker(tmp_path: Path) -> None:
    """A client certificate fails server verification, so a hospital cannot impersonate the
    broker to the others."""
    out = generate(tmp_path)
    store = verification.Store([load(out / "ca" / "ca.crt")])
    client = load(out / "clients" / "cleveland" / "cleveland.crt")
    verifier = (
        verification.PolicyBuilder().store(store).build_server_verifier(x509.DNSName("cleveland"))
    )
    # Refused for want of a subjectAltName: hospital certificates name no host at all.
    with pytest.raises(
        verification.VerificationError,
        match=r"^validation failed: leaf certificate has no matching subjectAltName",
    ):
        verifier.verify(client, [])


# -- passwords


def test_hash_round_trips_and_refuses_other_passwords() -> None:
    """A $7$ hash verifies its own password and no other."""
    encoded = mosquitto_hash("s3cret")
    assert encoded.startswith("$7$1000$")
    assert verify_mosquitto_hash("s3cret", encoded)
    assert not verify_mosquitto_hash("s3cret ", encoded)


def test_hash_reads_what_mosquitto_passwd_writes(tmp_path: Path) -> None:
    """A hash written by the real mosquitto_passwd verifies here: the same format."""
    binary = shutil.which("mosquitto_passwd")
    if binary is None:
        pytest.skip("mosquitto_passwd is not installed")
    path = tmp_path / "passwd"
    subprocess.run([binary, "-c", "-b", str(path), "alice", "w0nderland"], check=True)
    user, encoded = path.read_text().strip().split(":", 1)
    assert user == "alice"
    assert verify_mosquitto_hash("w0nderland", encoded)
    assert not verify_mosquitto_hash("wonderland", encoded)


# -- the ACL


# Hospital to hospital: key records (every hospital reads every one) and shares (each read
# only by its recipient). A hospital writes only its own, under its own name.
PEER_ROUTES = {Route.SECAGG_KEY, Route.SECAGG_SHARE}


def test_every_route_has_exactly_one_kind_of_writer_and_a_reader() -> None:
    """Each topic of the tree is written by one role and read by another (or, between
    hospitals, written only under the writer's own name): a new route without a policy fails
    here."""
    for route in Route:
        writers = {g.role for g in PERMISSIONS if g.route is route and g.access is Access.WRITE}
        readers = {g.role for g in PERMISSIONS if g.route is route and g.access is Access.READ}
        assert len(writers) == 1, (route, writers)
        assert readers, route
        if route in PEER_ROUTES:
            assert writers == {Role.HOSPITAL}, route
            scopes = {g.scope for g in PERMISSIONS if g.route is route and g.access is Access.WRITE}
            assert scopes == {Scope.OWN}, route
        else:
            assert not writers & readers, route


def test_a_share_is_readable_only_by_its_recipient_and_writable_only_by_its_sender() -> None:
    """The ACL's share rows: hospital %u writes secagg/shares/+/%u (it is the sender) and reads
    secagg/shares/%u/+ (it is the recipient); no service identity may do either."""
    text = render_acl(TopicTree("heart"), HOSPITALS)
    prefix = "healthnet/v1/heart/secagg"
    assert f"pattern write {prefix}/shares/+/%u" in text
    assert f"pattern read {prefix}/shares/%u/+" in text
    assert f"pattern write {prefix}/keys/%u" in text
    assert acl_reads(text, "cleveland") >= {f"{prefix}/shares/cleveland/+", f"{prefix}/keys/+"}
    assert not any("shares/hungarian" in f for f in acl_reads(text, "cleveland"))
    for service in ("aggregator", "operator", "dashboard"):
        assert f"topic deny {prefix}/shares/{service}/+" in text
        assert f"topic deny {prefix}/shares/+/{service}" in text
        assert not any("/shares/" in f for f in acl_reads(text, service))


def test_the_dashboard_never_reads_the_model_or_updates() -> None:
    """The dashboard's grants are reads of statuses, evaluations and version records only."""
    grants = {(g.route, g.access) for g in PERMISSIONS if g.role is Role.DASHBOARD}
    assert grants == {
        (Route.AGGREGATOR_STATUS, Access.READ),
        (Route.NODE_STATUS, Access.READ),
        (Route.NODE_EVAL, Access.READ),
        (Route.VERSIONS, Access.READ),
    }


def acl_reads(text: str, identity: str) -> set[str]:
    """The filters ``identity`` may read under a generated ACL: its ``user`` block's read
    lines and the ``pattern read`` lines with its name, less its block's denials."""
    header, *blocks = text.split("\nuser ")
    patterns = {
        line.split()[2].replace("%u", identity)
        for line in header.splitlines()
        if line.startswith("pattern read ")
    }
    (block,) = [b.splitlines() for b in blocks if b.splitlines()[0] == identity]
    denied = {line.split()[2] for line in block if line.startswith("topic deny ")}
    granted = {line.split()[2] for line in block if line.startswith("topic read ")}
    return (granted | patterns) - denied


def test_every_topic_a_roles_code_subscribes_to_is_readable_under_the_generated_acl(
    tmp_path: Path,
) -> None:
    """The aggregator's client, each hospital's, the dashboard's and `healthnet watch`'s feeds
    subscribe only to filters the generated ACL lets their identity read (Mosquitto accepts any
    SUBSCRIBE and silently delivers nothing that the ACL denies)."""
    tree = TopicTree("heart")
    text = render_acl(tree, HOSPITALS)
    service = AggregatorService(
        AggregatorSettings(federation="heart", state_dir=tmp_path, client_id="aggregator")
    )
    service._core = service._fresh_core()  # its Last Will is built from the core's status
    subscribed = {
        "aggregator": service._connect().subscriptions,  # the real client, unstarted
        "cleveland": tree.subscriptions(Role.HOSPITAL, "cleveland", secure_aggregation=True),
        "aggregator-secure": tree.subscriptions(Role.AGGREGATOR, secure_aggregation=True),
        "dashboard": feed_subscriptions(tree),
        "operator": feed_subscriptions(tree),
    }
    for name, filters in subscribed.items():
        identity = name.removesuffix("-secure")
        missing = {str(topic_filter) for topic_filter in filters} - acl_reads(text, identity)
        assert not missing, (identity, missing)
    assert str(tree.all_node_status()) in subscribed["aggregator"]  # its per-node connection view


def test_acl_text_uses_patterns_for_hospitals_and_denies_them_to_services() -> None:
    """Hospitals' own topics are %u patterns; each service identity is denied those topics."""
    text = render_acl(TopicTree("heart"), HOSPITALS)
    assert "pattern write healthnet/v1/heart/updates/%u" in text
    assert "pattern read healthnet/v1/heart/acks/%u" in text
    assert "user dashboard\ntopic deny healthnet/v1/heart/updates/dashboard" in text
    assert "topic write healthnet/v1/heart/model/+/chunk/+" in text
    assert "%c" not in text


def test_cli_writes_a_deployment_and_prints_no_secret(tmp_path: Path) -> None:
    """`healthnet deploy init` writes the folder and names files, never keys or passwords."""
    out = tmp_path / "deployment"
    command = [
        sys.executable, "-m", "healthnet", "deploy", "init",
        "--federation", "heart", "--nodes", "cleveland,hungarian,va",
        "--out", str(out), "--auth", "password",
    ]  # fmt: skip
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    printed = done.stdout + done.stderr
    for identity in ("aggregator", "cleveland", "hungarian", "va", "operator", "dashboard"):
        password = ConnectionSettings(
            _env_file=out / "clients" / identity / "healthnet.env"
        ).broker_url.password
        assert password is not None
        assert password not in printed
    assert "PRIVATE KEY" not in printed
    assert "mosquitto -c" in printed
