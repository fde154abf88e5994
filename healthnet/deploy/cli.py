"""``healthnet deploy``: write a federation's secure deployment (CA, credentials, ACL, config)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from common.errors import HealthNetError

__all__ = ["deploy_app"]

deploy_app = typer.Typer(help="Generate a secure deployment of a federation.", no_args_is_help=True)

_console = Console(stderr=True)


@deploy_app.command("init")
def init(
    federation: Annotated[str, typer.Option(help="federation id (topic prefix)")],
    nodes: Annotated[str, typer.Option(help="hospital identities, comma-separated: a,b,c")],
    out: Annotated[Path, typer.Option(help="folder to create (must not exist or be empty)")],
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
        spec = DeploymentSpec(
            federation=federation,
            hospitals=tuple(n.strip() for n in nodes.split(",") if n.strip()),
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
    for identity, env_file in deployment.env_files.items():
        _console.print(f"  {identity:<16} {env_file}")
    _console.print("keep ca/ca.key offline; hand each clients/<identity>/ folder to its owner only")
