"""Specification of `healthnet deploy init --regions`: the files of a broker tree, its bridges'
topics and its ACLs, and the layouts it refuses."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from common.errors import ConfigError
from common.topics import ROLE_TOPICS, Role, Scope, TopicTree
from healthnet.cli import app
from healthnet.deploy import AuthMode, DeploymentSpec, generate_deployment, read_env_file
from healthnet.deploy.regions import Region, bridge_topics, parse_regions

EU = Region("eu", ("cleveland", "hungarian"), port=18884)
US = Region("us", ("va", "switzerland"), port=18885)


def spec(**overrides: object) -> DeploymentSpec:
    fields: dict[str, object] = {
        "federation": "heart",
        "hospitals": ("cleveland", "hungarian", "va", "switzerland"),
        "port": 18883,
        "regions": (EU, US),
    }
    fields.update(overrides)
    return DeploymentSpec(**fields)  # type: ignore[arg-type]


def conf_lines(path: Path, key: str) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.startswith(key + " ")]


def test_regions_parse_in_order() -> None:
    """The --regions syntax: regions split by ';', hospitals by ','; blanks are ignored."""
    assert parse_regions("eu=cleveland, hungarian; us=va,switzerland;") == (
        ("eu", ("cleveland", "hungarian")),
        ("us", ("va", "switzerland")),
    )


@pytest.mark.parametrize(
    "text", ["", ";", "eu", "=a,b"], ids=["empty", "blank", "no-eq", "no-name"]
)
def test_a_malformed_regions_option_is_refused(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_regions(text)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        pytest.param({"auth": AuthMode.PASSWORD}, "mtls", id="password"),
        pytest.param(
            {"regions": (EU, Region("us", ("va", "cleveland"), port=18885))},
            "more than one region",
            id="twice",
        ),
        pytest.param({"regions": (EU,)}, "in no region", id="missing"),
        pytest.param({"regions": (EU, Region("eu", US.hospitals, port=1))}, "repeat", id="name"),
        pytest.param(
            {"regions": (EU, Region("us", US.hospitals, port=18884))}, "address", id="port"
        ),
        pytest.param(
            {
                "hospitals": ("cleveland", "hungarian", "bridge-x"),
                "regions": (EU, Region("us", ("bridge-x",), port=18885)),
            },
            "bridges",
            id="bridge-name",
        ),
    ],
)
def test_a_tree_that_cannot_work_is_refused(overrides: dict[str, object], message: str) -> None:
    """Password mode (bridges log in with certificates), a hospital in two regions or none, two
    regions of one name or one address, and a hospital named like a bridge are refused."""
    with pytest.raises(ConfigError, match=message):
        spec(**overrides)


def test_a_region_has_a_broker_folder_and_its_hospitals_dial_it(tmp_path: Path) -> None:
    """Each region gets its own server and bridge identity, ACL and config; a hospital's env file
    names its region's broker, the services' name the core."""
    deployment = generate_deployment(spec(), tmp_path / "out")
    for region in (EU, US):
        folder = tmp_path / "out" / "regions" / region.name
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            [
                "acl",
                "ca.crt",
                "data",
                "mosquitto.conf",
                "server.crt",
                "server.key",
                f"bridge-{region.name}.crt",
                f"bridge-{region.name}.key",
            ]
        )
        assert deployment.region_configs[region.name] == folder / "mosquitto.conf"
        for hospital in region.hospitals:
            env = read_env_file(deployment.env_files[hospital])
            assert env["HEALTHNET_BROKER_URL"] == f"mqtts://127.0.0.1:{region.port}"
    for service in ("aggregator", "operator", "dashboard"):
        env = read_env_file(deployment.env_files[service])
        assert env["HEALTHNET_BROKER_URL"] == "mqtts://127.0.0.1:18883"


def test_a_bridge_carries_its_hospitals_topics_in_the_directions_they_flow(tmp_path: Path) -> None:
    """In: what a hospital reads (the model, the run's state, its own acks); out: what it writes
    (its updates, status, evaluations); at QoS 1, for its own region's hospitals only."""
    tree = TopicTree("heart")
    topics = bridge_topics(tree, EU)
    inbound = {t.topic for t in topics if t.direction == "in"}
    outbound = {t.topic for t in topics if t.direction == "out"}
    assert inbound == {
        "healthnet/v1/heart/model/manifest",
        "healthnet/v1/heart/model/+/chunk/+",
        "healthnet/v1/heart/model/delta",  # the broadcast chain's latest delta
        "healthnet/v1/heart/aggregator/status",
        "healthnet/v1/heart/acks/cleveland",
        "healthnet/v1/heart/acks/hungarian",
        # Secure aggregation: every key record; the shares and unmask requests of its own.
        "healthnet/v1/heart/secagg/keys/+",
        "healthnet/v1/heart/secagg/shares/cleveland/+",
        "healthnet/v1/heart/secagg/shares/hungarian/+",
        "healthnet/v1/heart/secagg/unmask/cleveland",
        "healthnet/v1/heart/secagg/unmask/hungarian",
    }
    assert outbound == {
        f"healthnet/v1/heart/{kind}"
        for h in EU.hospitals
        for kind in (
            f"updates/{h}",
            f"nodes/{h}/status",
            f"nodes/{h}/eval",
            f"secagg/keys/{h}",
            f"secagg/shares/+/{h}",
            f"secagg/receipts/{h}",
            f"secagg/answers/{h}",
        )
    }
    assert {t.qos for t in topics} == {1}
    assert len(topics) == len(inbound) + len(outbound)
    uses = ROLE_TOPICS[Role.HOSPITAL]
    per_hospital = [u for u in uses.reads if u.scope is not Scope.ANY]
    assert len(inbound) == len(uses.reads) + len(per_hospital) * (len(EU.hospitals) - 1)

    generate_deployment(spec(), tmp_path / "out")
    conf = tmp_path / "out" / "regions" / "eu" / "mosquitto.conf"
    assert sorted(conf_lines(conf, "topic")) == sorted(t.line() for t in topics)
    assert conf_lines(conf, "address") == ["address 127.0.0.1:18883"]
    assert conf_lines(conf, "cleansession") == ["cleansession false"]
    assert conf_lines(conf, "try_private") == ["try_private true"]
    assert conf_lines(conf, "bridge_insecure") == ["bridge_insecure false"]
    assert conf_lines(conf, "listener") == ["listener 18884 127.0.0.1"]


def test_the_acls_name_no_hospital_at_the_core_and_only_their_own_in_a_region(
    tmp_path: Path,
) -> None:
    """The core's ACL has no hospital and no %u pattern (which would apply to everyone); a
    region's ACL names only its own hospitals."""
    generate_deployment(spec(), tmp_path / "out")
    core = (tmp_path / "out" / "broker" / "acl").read_text()
    users = {line.split()[1] for line in core.splitlines() if line.startswith("user ")}
    assert users == {"aggregator", "operator", "dashboard", "bridge-eu", "bridge-us"}
    assert "pattern" not in core
    eu = (tmp_path / "out" / "regions" / "eu" / "acl").read_text()
    assert {line.split()[1] for line in eu.splitlines() if line.startswith("user ")} == {
        "cleveland",
        "hungarian",
    }
    assert "pattern" not in eu
    assert "va" not in eu.split()
    # bridge-eu at the core: cleveland's and hungarian's topics, nothing of us.
    block = core.split("user bridge-eu")[1].split("user ")[0]
    assert "updates/cleveland" in block
    assert "acks/hungarian" in block
    assert "updates/va" not in block
    assert "acks/switzerland" not in block


def test_the_cli_writes_a_tree_with_regions_next_to_the_core(tmp_path: Path) -> None:
    """`--regions` alone names the hospitals; regions listen on the ports after the core's unless
    `--region-addresses` says where."""
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        [
            "deploy", "init", "--federation", "heart", "--out", str(out), "--port", "9000",
            "--regions", "eu=cleveland,hungarian;us=va,switzerland",
            "--region-addresses", "us=us.example.org:9443",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert conf_lines(out / "regions" / "eu" / "mosquitto.conf", "listener") == [
        "listener 9001 127.0.0.1"
    ]
    assert conf_lines(out / "regions" / "us" / "mosquitto.conf", "listener") == [
        "listener 9443 127.0.0.1"
    ]
    env = read_env_file(out / "clients" / "va" / "healthnet.env")
    assert env["HEALTHNET_BROKER_URL"] == "mqtts://us.example.org:9443"
    bad = CliRunner().invoke(
        app,
        [
            "deploy", "init", "--federation", "heart", "--out", str(tmp_path / "bad"),
            "--regions", "eu=cleveland", "--region-addresses", "mars=x:1",
        ],
    )  # fmt: skip
    assert bad.exit_code == 1
    assert "mars" in bad.output


# -- regional aggregators

EU_AGG = Region("eu", EU.hospitals, port=EU.port, aggregator="region-eu")
US_AGG = Region("us", US.hospitals, port=US.port, aggregator="region-us")


def test_with_a_regional_aggregator_the_bridge_carries_its_updates_not_the_hospitals() -> None:
    """The hospitals' updates and acks end at the region's broker; the bridge carries the
    regional aggregator's update out and its ack in instead, and everything else as before."""
    tree = TopicTree("heart")
    plain = {(t.topic, t.direction) for t in bridge_topics(tree, EU)}
    combined = {(t.topic, t.direction) for t in bridge_topics(tree, EU_AGG)}
    hospitals_own = {
        (f"healthnet/v1/heart/{kind}/{h}", direction)
        for h in EU.hospitals
        for kind, direction in (("updates", "out"), ("acks", "in"))
    }
    regions_own = {
        ("healthnet/v1/heart/updates/region-eu", "out"),
        ("healthnet/v1/heart/acks/region-eu", "in"),
    }
    assert hospitals_own <= plain
    assert combined == (plain - hospitals_own) | regions_own


def test_deploy_init_writes_each_regional_aggregator_an_identity_on_its_regions_broker(
    tmp_path: Path,
) -> None:
    """region-<name> gets a certificate and an env file naming its region's broker, with the
    per-hospital defences the core's aggregator then leaves off; its region's ACL lets it read
    its hospitals' updates, the core's status and manifest and its own acks, and write their
    acks and its own updates; the core's ACL never names it."""
    deployment = generate_deployment(spec(regions=(EU_AGG, US_AGG)), tmp_path / "out")
    folder = tmp_path / "out" / "clients" / "region-eu"
    assert {"region-eu.crt", "region-eu.key", "ca.crt", "healthnet.env"} <= {
        p.name for p in folder.iterdir()
    }
    env = read_env_file(deployment.env_files["region-eu"])
    assert env["HEALTHNET_BROKER_URL"] == f"mqtts://127.0.0.1:{EU.port}"
    assert (env["HEALTHNET_REGION"], env["HEALTHNET_NODE_ID"]) == ("eu", "region-eu")
    assert env["HEALTHNET_ONE_UPDATE_PER_VERSION"] == "true"
    assert env["HEALTHNET_MAX_NUM_SAMPLES"] == "100000"
    core_env = read_env_file(deployment.env_files["aggregator"])
    assert "HEALTHNET_KNOBS__ONE_UPDATE_PER_VERSION" not in core_env
    assert "HEALTHNET_KNOBS__MAX_NUM_SAMPLES" not in core_env
    assert "HEALTHNET_KNOBS__NORM_MULTIPLIER" in core_env

    acl = (tmp_path / "out" / "regions" / "eu" / "acl").read_text()
    block = acl.split("user region-eu\n")[1].split("\n\n")[0].splitlines()
    prefix = "healthnet/v1/heart"
    assert sorted(block) == sorted(
        [
            f"topic write {prefix}/updates/region-eu",
            f"topic write {prefix}/acks/cleveland",
            f"topic write {prefix}/acks/hungarian",
            f"topic read {prefix}/aggregator/status",
            f"topic read {prefix}/model/manifest",
            f"topic read {prefix}/acks/region-eu",
            f"topic read {prefix}/updates/cleveland",
            f"topic read {prefix}/updates/hungarian",
        ]
    )
    core = (tmp_path / "out" / "broker" / "acl").read_text()
    assert "user region-eu" not in core
    bridge = core.split("user bridge-eu")[1].split("user ")[0]
    assert "topic write healthnet/v1/heart/updates/region-eu" in bridge
    assert "topic read healthnet/v1/heart/acks/region-eu" in bridge
    assert "updates/cleveland" not in bridge
    assert "acks/cleveland" not in bridge


@pytest.mark.parametrize(
    ("regions", "message"),
    [
        pytest.param(
            (Region("eu", EU.hospitals, port=EU.port, aggregator="va"), US), "taken", id="hospital"
        ),
        pytest.param(
            (Region("eu", EU.hospitals, port=EU.port, aggregator="aggregator"), US),
            "taken",
            id="service",
        ),
        pytest.param(
            (EU_AGG, Region("us", US.hospitals, port=US.port, aggregator="region-eu")),
            "taken",
            id="twice",
        ),
    ],
)
def test_a_regional_aggregator_named_like_another_identity_is_refused(
    regions: tuple[Region, ...], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        spec(regions=regions)


def test_the_cli_gives_every_region_an_aggregator(tmp_path: Path) -> None:
    """`--regional-aggregators` names each region-<region>; without --regions it is refused."""
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        [
            "deploy", "init", "--federation", "heart", "--out", str(out),
            "--regions", "eu=cleveland,hungarian;us=va,switzerland", "--regional-aggregators",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    for region in ("eu", "us"):
        env = read_env_file(out / "clients" / f"region-{region}" / "healthnet.env")
        assert env["HEALTHNET_REGION"] == region
    bad = CliRunner().invoke(
        app,
        [
            "deploy", "init", "--federation", "heart", "--out", str(tmp_path / "bad"),
            "--nodes", "a,b", "--regional-aggregators",
        ],
    )  # fmt: skip
    assert bad.exit_code == 1
    assert "--regions" in bad.output
