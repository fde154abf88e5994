"""``healthnet deploy``: write a federation's secure deployment (CA, credentials, ACL, config)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from common.errors import ConfigError, HealthNetError
from healthnet.deploy.regions import REGION_NODE_PREFIX, Region

__all__ = ["deploy_app"]

deploy_app = typer.Typer(help="Generate a secure deployment of a federation.", no_args_is_help=True)

_console = Console(stderr=True)


@deploy_app.command("init")
def init(
    federation: Annotated[str, typer.Option(help="federation id (topic prefix)")],
    out: Annotated[Path, typer.Option(help="folder to create (must not exist or be empty)")],
    nodes: Annotated[
        str | None,
        typer.Option(help="hospital identities, comma-separated: a,b,c (default: --regions')"),
    ] = None,
    regions: Annotated[
        str | None,
        typer.Option(
            help="a broker tree: a core broker and one per region, "
            "'eu=cleveland,hungarian;us=va,switzerland' (mtls only)"
        ),
    ] = None,
    region_addresses: Annotated[
        str | None,
        typer.Option(
            "--region-addresses",
            help="where each region's broker is dialled, 'eu=eu.example.org:8883;us=...' "
            "[default: --host, port --port+1, +2, ...]",
        ),
    ] = None,
    regional_aggregators: Annotated[
        bool,
        typer.Option(
            "--regional-aggregators",
            help="each region also gets an aggregator (identity region-<region>) that combines "
            "its hospitals' updates; the bridges then carry its updates, not theirs",
        ),
    ] = False,
    host: Annotated[str, typer.Option(help="broker name or address that clients dial")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="broker TLS port")] = 8883,
    bind: Annotated[str, typer.Option(help="address the broker listens on")] = "127.0.0.1",
    auth: Annotated[str, typer.Option(help="mtls (client certificates) or password")] = "mtls",
    prefix: Annotated[
        Path | None,
        typer.Option(help="where the folder will be installed (paths in files); default OUT"),
    ] = None,
    days: Annotated[int, typer.Option(help="validity of broker and client certificates")] = 825,
    ca_days: Annotated[int, typer.Option(help="validity of the CA certificate")] = 3650,
    max_message_mib: Annotated[int, typer.Option(help="largest update message, MiB")] = 64,
    broker_user: Annotated[
        str | None, typer.Option(help="account mosquitto switches to when started as root")
    ] = None,
    max_samples: Annotated[
        int | None,
        typer.Option(
            help="most training samples one update may claim (its weight): the largest "
            "hospital's training set [default: 100000]"
        ),
    ] = None,
    norm_multiplier: Annotated[
        float | None,
        typer.Option(
            help="an update's norm may be this many times the median of recent ones [default: 10]"
        ),
    ] = None,
) -> None:
    """Write a CA, certificates or passwords, the ACL, mosquitto.conf and one env file per identity.

    Identities: aggregator, each hospital, operator, dashboard. No key or password is printed.
    With --regions, also a broker per region bridged to the core broker (docs/regions.md); with
    --regional-aggregators, an aggregator identity per region on its broker as well.
    """
    from healthnet.deploy.generate import (
        DEFAULT_MAX_SAMPLES,
        DEFAULT_NORM_MULTIPLIER,
        AuthMode,
        DeploymentSpec,
        generate_deployment,
    )

    try:
        mode = AuthMode(auth)
    except ValueError:
        _console.print(f"[red]error:[/red] --auth must be mtls or password, not {auth!r}")
        raise typer.Exit(code=1) from None
    try:
        tree = _regions(regions, region_addresses, host=host, port=port, bind=bind)
        if regional_aggregators:
            if not tree:
                raise ConfigError("--regional-aggregators needs --regions")
            tree = tuple(
                dataclasses.replace(r, aggregator=f"{REGION_NODE_PREFIX}{r.name}") for r in tree
            )
        hospitals = (
            tuple(n.strip() for n in nodes.split(",") if n.strip())
            if nodes is not None
            else tuple(h for region in tree for h in region.hospitals)
        )
        spec = DeploymentSpec(
            federation=federation,
            hospitals=hospitals,
            regions=tree,
            host=host,
            port=port,
            bind=bind,
            auth=mode,
            prefix=prefix,
            days=days,
            ca_days=ca_days,
            max_message_bytes=max_message_mib * 1024 * 1024,
            broker_user=broker_user,
            max_samples=DEFAULT_MAX_SAMPLES if max_samples is None else max_samples,
            norm_multiplier=(
                DEFAULT_NORM_MULTIPLIER if norm_multiplier is None else norm_multiplier
            ),
        )
        deployment = generate_deployment(spec, out)
    except (HealthNetError, OSError) as exc:
        _console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(code=1) from exc
    _console.print(f"federation {federation}: deployment written to {out} ({mode.value})")
    _console.print(f"broker: mosquitto -c {deployment.broker_config}")
    for name, config in deployment.region_configs.items():
        _console.print(f"region {name}: mosquitto -c {config}")
    for identity, env_file in deployment.env_files.items():
        _console.print(f"  {identity:<16} {env_file}")
    _console.print("keep ca/ca.key offline; hand each clients/<identity>/ folder to its owner only")


def _regions(
    text: str | None, addresses: str | None, *, host: str, port: int, bind: str
) -> tuple[Region, ...]:
    """The regions of ``--regions``, each at its ``--region-addresses`` entry or next to the
    core: the core's host, the next free port numbers after the core's."""
    from healthnet.deploy.regions import parse_regions

    if text is None:
        if addresses is not None:
            raise ConfigError("--region-addresses needs --regions")
        return ()
    named = dict(parse_regions(addresses.replace(",", ";"))) if addresses else {}
    regions = []
    for index, (name, hospitals) in enumerate(parse_regions(text), start=1):
        where = named.pop(name, ())
        region_host, region_port = host, port + index
        if where:
            if len(where) != 1:
                raise ConfigError(f"region {name}: one address, not {','.join(where)}")
            region_host, sep, port_text = where[0].rpartition(":")
            if not sep or not port_text.isdigit():
                raise ConfigError(f"region {name}: address {where[0]!r} is not HOST:PORT")
            region_port = int(port_text)
        regions.append(
            Region(name, hospitals, host=region_host.strip("[]"), port=region_port, bind=bind)
        )
    if named:
        raise ConfigError(f"--region-addresses names unknown regions: {', '.join(named)}")
    return tuple(regions)
