"""The ``healthnet`` command: demo, aggregator, node, broker, run control and status.

Every command takes the broker URL and federation as flags or ``HEALTHNET_*`` environment
variables (or a ``.env`` file). Flags left unset fall through to the environment, then defaults.

Bad input is refused before anything starts: every command builds its settings through
:func:`_settings`, which turns a validation error into one line on stderr naming the flag, and exit
status 2 (a usage error, as click gives for an unknown option). Failures at run time (a broker that
does not answer, a refused request) are one line and exit status 1.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError
from pydantic_settings import BaseSettings
from rich.console import Console
from rich.table import Table
from rich.text import Text

from common.errors import HealthNetError
from common.messages import (
    AggregatorState,
    AggregatorStatus,
    Compression,
    ControlCommand,
    MetricRelease,
    NodeTally,
    Personalisation,
    PersonalisationMethod,
    PrivacyPolicy,
    Quantization,
    ServerOptimizerKind,
    StalenessKind,
)
from common.wire_size import describe_wire_size
from healthnet.deploy.cli import deploy_app
from healthnet.model_cli import model_app, predict_command

app = typer.Typer(
    name="healthnet",
    help="Asynchronous federated learning for hospitals over MQTT.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
aggregator_app = typer.Typer(help="Run the aggregator.", no_args_is_help=True)
node_app = typer.Typer(help="Run an edge node (one per hospital).", no_args_is_help=True)
app.add_typer(aggregator_app, name="aggregator")
app.add_typer(node_app, name="node")
app.add_typer(deploy_app, name="deploy")
app.add_typer(model_app, name="model")
app.command("predict")(predict_command)

console = Console()
err_console = Console(stderr=True)

BrokerUrl = Annotated[
    str | None,
    typer.Option(
        "--broker-url",
        help="mqtt://[user[:pass]@]host[:port][?protocol=5] or mqtts://… "
        "[env: HEALTHNET_BROKER_URL]",
        show_default=False,
    ),
]
FederationOpt = Annotated[
    str | None,
    typer.Option("--federation", help="federation id [env: HEALTHNET_FEDERATION]"),
]
LogLevel = Annotated[str, typer.Option("--log-level", help="DEBUG, INFO, WARNING, ERROR")]
# Differential privacy, as the aggregator and the demo take it (see common.messages.PrivacyPolicy).
DpEpsilonBudget = Annotated[
    float | None,
    typer.Option(help="DP: each hospital's privacy budget epsilon; turns DP-SGD on"),
]
DpNoiseMultiplier = Annotated[
    float | None, typer.Option(help="DP: Gaussian noise as a multiple of the clipping norm")
]
DpCalibrateVersions = Annotated[
    int | None,
    typer.Option(help="DP: instead of a noise multiplier, the noise that spends the budget in N"),
]
DpDelta = Annotated[
    float | None, typer.Option(help="DP: delta, below 1/n for every hospital's n records")
]
# Personalisation, as the aggregator and the demo take it (see common.messages.Personalisation).
Personalise = Annotated[
    PersonalisationMethod | None,
    typer.Option(help="each hospital also keeps a personal model: finetune or ditto"),
]
PersonalEpochs = Annotated[
    int | None, typer.Option(help="personalisation: local epochs per version")
]
DittoLambda = Annotated[
    float | None, typer.Option(help="personalisation: Ditto's pull towards the global model")
]


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _given(**values: Any) -> dict[str, Any]:
    """Only the flags the user set, so that unset ones fall through to env and defaults."""
    return {key: value for key, value in values.items() if value is not None}


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def _error_line(message: str) -> None:
    # soft_wrap: one line however narrow the terminal; Text: brackets in messages are not markup.
    err_console.print(Text.assemble(("error: ", "red"), message), soft_wrap=True)


def _fail(exc: Exception) -> typer.Exit:
    """A failure at run time: one line, exit status 1."""
    _error_line(" ".join(str(exc).split()))
    return typer.Exit(code=1)


def _bad_input(message: str) -> typer.Exit:
    """Input refused before anything started: one line, exit status 2."""
    _error_line(" ".join(message.split()))
    return typer.Exit(code=2)


S = TypeVar("S", bound=BaseSettings)


def _settings(cls: type[S], **values: Any) -> S:
    """The command's settings from the flags given (the rest from env and defaults), or exit 2."""
    try:
        return cls(**_given(**values))
    except ValidationError as exc:
        raise _bad_input(_describe(exc)) from None


# Settings fields whose flag is not the field's own name.
_FLAGS = {
    ("model", "name"): "--model",
    ("model", "kwargs"): "--model-kwargs",
    ("knobs", "training", "learning_rate"): "--lr",
    ("dashboard_host",): "--host",
    ("dashboard_port",): "--port",
}
# Groups of fields that no single flag sets; their own checks are named by the dotted path.
_GROUPS = frozenset({"knobs", "model", "training", "compression"})
# Never echoed: the URL may carry a password (the parser's own message is redacted).
_SECRET_FIELDS = frozenset({"broker_url"})


def _describe(exc: ValidationError, *, within: tuple[str, ...] = ()) -> str:
    """Every problem of a validation error, each naming its flag, on one line (``within``: where
    the model that failed sits in the settings, for one validated on its own)."""
    problems = []
    for error in exc.errors(include_url=False):
        loc = within + tuple(str(part) for part in error["loc"])
        flag = _flag_for(loc)
        if error["type"] == "missing":
            problems.append(f"{flag} is required")
            continue
        message = error["msg"].removeprefix("Value error, ")
        value = error.get("input")
        if isinstance(value, str | int | float) and not _SECRET_FIELDS & set(loc):
            message += f" (got {value!r})"
        problems.append(f"{flag}: {message}")
    return "; ".join(problems)


def _flag_for(loc: tuple[str, ...]) -> str:
    """The option that sets a settings field: ``--top-k`` for knobs.compression.top_k,
    ``--dp-delta`` for knobs.privacy.delta."""
    if loc in _FLAGS:
        return _FLAGS[loc]
    if loc[-1:] == ("privacy",):  # the policy's own check: noise or calibration, not both
        return "--dp-noise-multiplier/--dp-calibrate-versions"
    if loc[-2:-1] == ("privacy",):
        return "--dp-" + loc[-1].replace("_", "-")
    if loc[-2:] == ("personalisation", "epochs"):
        return "--personal-epochs"
    if not loc or loc[-1] in _GROUPS:
        return ".".join(loc) or "settings"
    return "--" + loc[-1].replace("_", "-")


def _json_object(flag: str, raw: str | None) -> Any:
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise _bad_input(f"{flag}: not JSON ({exc})") from None


# -- demo ------------------------------------------------------------------------------------------


@app.command()
def demo(
    versions: Annotated[
        int | None,
        typer.Option(help="stop after this many global versions [default: the federation's]"),
    ] = None,
    target_accuracy: Annotated[
        float | None, typer.Option(help="stop once the mean test accuracy reaches this")
    ] = None,
    summary: Annotated[Path | None, typer.Option(help="write a JSON summary here")] = None,
    federation: Annotated[
        str,
        typer.Option(
            "--federation", "--dataset", help="named federation to run: heart-disease or pneumonia"
        ),
    ] = "heart-disease",
    nodes: Annotated[
        int | None, typer.Option(help="run only the federation's first N hospitals")
    ] = None,
    mode: Annotated[str, typer.Option(help="fedbuff, sync (FedAvg) or fedasync")] = "fedbuff",
    buffer_size: Annotated[int | None, typer.Option(help="K for fedbuff")] = None,
    broker: Annotated[str, typer.Option(help="embedded broker: auto, mosquitto or amqtt")] = "auto",
    broker_url: Annotated[
        str | None, typer.Option(help="use this broker instead of an embedded one")
    ] = None,
    delay: Annotated[
        list[str] | None, typer.Option(help="NODE=SECONDS: slow a hospital down (repeatable)")
    ] = None,
    workdir: Annotated[Path | None, typer.Option(help="keep state and logs here")] = None,
    seed: int = 0,
    timeout: Annotated[float, typer.Option(help="give up after this many seconds")] = 600.0,
    dashboard: Annotated[
        bool, typer.Option("--dashboard/--no-dashboard", help="serve the web dashboard meanwhile")
    ] = True,
    dashboard_port: Annotated[
        int, typer.Option(help="its port on 127.0.0.1 (a free one when taken)")
    ] = 8765,
    top_k: Annotated[
        float | None, typer.Option(help="hospitals send this fraction of each delta tensor")
    ] = None,
    quantization: Annotated[
        Quantization | None, typer.Option(help="hospitals send values as float32, float16, int8")
    ] = None,
    error_feedback: Annotated[
        bool, typer.Option("--error-feedback/--no-error-feedback", help="carry what was not sent")
    ] = True,
    dp_epsilon_budget: DpEpsilonBudget = None,
    dp_noise_multiplier: DpNoiseMultiplier = None,
    dp_calibrate_versions: DpCalibrateVersions = None,
    dp_delta: DpDelta = None,
    personalise: Personalise = None,
    personal_epochs: PersonalEpochs = None,
    ditto_lambda: DittoLambda = None,
    secure_aggregation: Annotated[
        bool,
        typer.Option(
            "--secure-aggregation",
            help="the aggregator sees only masked updates and unmasks each buffer's sum "
            "(keys signed by a throwaway demo CA)",
        ),
    ] = False,
    log_level: LogLevel = "WARNING",
) -> None:
    """Run a whole federation locally (broker, aggregator, hospitals) and report accuracy.

    With --dp-epsilon-budget the hospitals train with differential privacy, and the summary
    gives the epsilon each one spent. With --secure-aggregation every version is folded by
    secure aggregation (docs/secure-aggregation.md)."""
    from healthnet.demo import DemoConfig, render, run_demo

    _setup_logging(log_level)
    if mode not in ("fedbuff", "sync", "fedasync"):
        raise _bad_input(f"--mode must be fedbuff, sync or fedasync, not {mode!r}")
    if broker not in ("auto", "mosquitto", "amqtt"):
        raise _bad_input(f"--broker must be auto, mosquitto or amqtt, not {broker!r}")
    if broker_url is not None:
        from common.settings import ConnectionSettings

        _settings(ConnectionSettings, broker_url=broker_url)  # a bad URL: one line, exit 2
    delays: dict[str, float] = {}
    for item in delay or []:
        node, sep, seconds = item.partition("=")
        try:
            value = float(seconds)
        except ValueError:
            value = -1.0
        if not sep or not value >= 0:  # "not >=" refuses NaN too
            raise _bad_input(f"--delay takes NODE=SECONDS, got {item!r}")
        delays[node] = value
    config = DemoConfig(
        federation=federation,
        versions=versions,
        nodes=nodes,
        target_accuracy=target_accuracy,
        mode=mode,  # type: ignore[arg-type]
        buffer_size=buffer_size,
        broker=broker,  # type: ignore[arg-type]
        broker_url=broker_url,
        workdir=workdir,
        delays=delays,
        seed=seed,
        timeout=timeout,
        dashboard=dashboard,
        dashboard_port=dashboard_port,
        compression=_demo_compression(top_k, quantization, error_feedback),
        privacy=_demo_privacy(
            dp_epsilon_budget, dp_noise_multiplier, dp_calibrate_versions, dp_delta
        ),
        personalisation=_personalisation(personalise, personal_epochs, ditto_lambda),
        secure_aggregation=secure_aggregation,
    )
    try:
        result = run_demo(config, err_console)
    except HealthNetError as exc:
        raise _fail(exc) from exc
    render(result, console)
    if summary is not None:
        summary.write_text(json.dumps(result.to_json(), indent=2) + "\n", encoding="utf-8")
        err_console.print(f"summary written to {summary}")


def _personalisation(
    method: PersonalisationMethod | None, epochs: int | None, ditto_lambda: float | None
) -> Personalisation | None:
    """The policy of the --personalise, --personal-epochs and --ditto-lambda flags."""
    if method is None:
        if epochs is not None or ditto_lambda is not None:
            raise _bad_input("--personal-epochs and --ditto-lambda need --personalise")
        return None
    try:
        return Personalisation(method=method, **_given(epochs=epochs, ditto_lambda=ditto_lambda))
    except ValidationError as exc:
        raise _bad_input(_describe(exc, within=("personalisation",))) from None


def _demo_compression(
    top_k: float | None, quantization: Quantization | None, error_feedback: bool
) -> Compression | None:
    if top_k is None and quantization is None:
        return None
    try:
        return Compression(
            top_k=top_k,
            quantization=quantization or Quantization.NONE,
            error_feedback=error_feedback,
        )
    except ValueError as exc:
        raise _bad_input(f"--top-k/--quantization: {exc}") from None


def _demo_privacy(
    budget: float | None, noise: float | None, calibrate: int | None, delta: float | None
) -> PrivacyPolicy | None:
    """The demo's privacy policy from its --dp-* flags; None without a budget."""
    if budget is None:
        if noise is not None or calibrate is not None or delta is not None:
            raise _bad_input(
                "--dp-noise-multiplier, --dp-calibrate-versions and --dp-delta shape a privacy "
                "policy: give its --dp-epsilon-budget too"
            )
        return None
    try:
        return PrivacyPolicy(
            epsilon_budget=budget,
            noise_multiplier=noise,
            calibrate_versions=calibrate,
            **_given(delta=delta),
        )
    except ValidationError as exc:
        raise _bad_input(_describe(exc, within=("privacy",))) from None


# -- services --------------------------------------------------------------------------------------


@aggregator_app.command("run")
def aggregator_run(
    broker_url: BrokerUrl = None,
    federation: FederationOpt = None,
    state_dir: Annotated[Path | None, typer.Option(help="checkpoints, WAL, versions log")] = None,
    run_id: Annotated[str | None, typer.Option(help="name of a new run")] = None,
    model: Annotated[str | None, typer.Option(help="logreg, mlp, cnn or module:function")] = None,
    model_kwargs: Annotated[str | None, typer.Option(help="JSON object of model arguments")] = None,
    seed: Annotated[int | None, typer.Option(help="seed of the initial weights")] = None,
    buffer_size: Annotated[int | None, typer.Option(help="K: updates per version")] = None,
    buffer_timeout: Annotated[
        float | None, typer.Option(help="fold a partial buffer after")
    ] = None,
    max_staleness: Annotated[int | None, typer.Option(help="reject updates staler than")] = None,
    staleness: Annotated[StalenessKind | None, typer.Option(help="staleness function")] = None,
    staleness_a: Annotated[float | None, typer.Option(help="its exponent / slope a")] = None,
    staleness_b: Annotated[int | None, typer.Option(help="hinge point b")] = None,
    sample_exponent: Annotated[float | None, typer.Option(help="beta: n**beta weighting")] = None,
    server_optimizer: Annotated[ServerOptimizerKind | None, typer.Option()] = None,
    server_lr: Annotated[float | None, typer.Option(help="server learning rate eta")] = None,
    max_update_norm: Annotated[float | None, typer.Option(help="reject larger updates")] = None,
    max_versions: Annotated[int | None, typer.Option(help="stop the run at this version")] = None,
    epochs: Annotated[int | None, typer.Option(help="local epochs per update")] = None,
    batch_size: Annotated[int | None, typer.Option(help="local batch size")] = None,
    lr: Annotated[float | None, typer.Option(help="local learning rate")] = None,
    optimizer: Annotated[str | None, typer.Option(help="local optimizer: sgd or adam")] = None,
    top_k: Annotated[
        float | None, typer.Option(help="compression: fraction of each delta tensor sent")
    ] = None,
    quantization: Annotated[
        Quantization | None, typer.Option(help="compression: values as float32, float16, int8")
    ] = None,
    error_feedback: Annotated[
        bool | None,
        typer.Option("--error-feedback/--no-error-feedback", help="carry what was not sent"),
    ] = None,
    broadcast_dtype: Annotated[
        str | None, typer.Option(help="model broadcast as float32 or float16")
    ] = None,
    autostart: Annotated[
        bool | None, typer.Option("--autostart/--no-autostart", help="fold at once")
    ] = None,
    status_interval: Annotated[float | None, typer.Option(help="status heartbeat, s")] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="serve Prometheus /metrics on this port (off by default)")
    ] = None,
    metrics_host: Annotated[str | None, typer.Option(help="address of /metrics")] = None,
    dp_epsilon_budget: DpEpsilonBudget = None,
    dp_noise_multiplier: DpNoiseMultiplier = None,
    dp_calibrate_versions: DpCalibrateVersions = None,
    dp_delta: DpDelta = None,
    dp_max_grad_norm: Annotated[
        float | None, typer.Option(help="DP: clip each example's gradient to this L2 norm C")
    ] = None,
    dp_metrics: Annotated[
        MetricRelease | None,
        typer.Option(help="DP: what evaluations and losses say: exact, rounded, suppressed"),
    ] = None,
    personalise: Personalise = None,
    personal_epochs: PersonalEpochs = None,
    ditto_lambda: DittoLambda = None,
    log_level: LogLevel = "INFO",
) -> None:
    """Run the aggregator of one federation until the run is stopped.

    With --dp-epsilon-budget every hospital trains with differential privacy (DP-SGD) and stops
    before its patients' privacy loss passes the budget; the policy may be made stricter while
    the run goes on (``healthnet set privacy.epsilon_budget=...``), never laxer."""
    from aggregator.service import AggregatorService
    from aggregator.settings import AggregatorSettings

    _setup_logging(log_level)
    knobs = _given(
        buffer_size=buffer_size,
        buffer_timeout=buffer_timeout,
        max_staleness=max_staleness,
        staleness=staleness,
        staleness_a=staleness_a,
        staleness_b=staleness_b,
        sample_exponent=sample_exponent,
        server_optimizer=server_optimizer,
        server_lr=server_lr,
        max_update_norm=max_update_norm,
        max_versions=max_versions,
        broadcast_dtype=broadcast_dtype,
    )
    training = _given(epochs=epochs, batch_size=batch_size, learning_rate=lr, optimizer=optimizer)
    if training:
        knobs["training"] = training
    compression = _given(top_k=top_k, quantization=quantization, error_feedback=error_feedback)
    if compression:
        knobs["compression"] = compression
    privacy = _given(
        epsilon_budget=dp_epsilon_budget,
        noise_multiplier=dp_noise_multiplier,
        calibrate_versions=dp_calibrate_versions,
        delta=dp_delta,
        max_grad_norm=dp_max_grad_norm,
        metrics=dp_metrics,
    )
    if privacy:
        knobs["privacy"] = privacy
    personal = _personalisation(personalise, personal_epochs, ditto_lambda)
    if personal is not None:
        knobs["personalisation"] = personal.model_dump(mode="json")
    model_spec: dict[str, Any] = _given(
        name=model, kwargs=_json_object("--model-kwargs", model_kwargs)
    )
    settings = _settings(
        AggregatorSettings,
        broker_url=broker_url,
        federation=federation,
        state_dir=state_dir,
        run_id=run_id,
        seed=seed,
        autostart=autostart,
        status_interval=status_interval,
        metrics_port=metrics_port,
        metrics_host=metrics_host,
        knobs=knobs or None,
        model=model_spec or None,
    )
    try:
        AggregatorService(settings).run(_stop_on_signals())
    except HealthNetError as exc:
        raise _fail(exc) from exc


@aggregator_app.command("regional")
def aggregator_regional(
    broker_url: BrokerUrl = None,
    federation: FederationOpt = None,
    region: Annotated[
        str | None, typer.Option(help="the region's name [env: HEALTHNET_REGION]")
    ] = None,
    node_id: Annotated[
        str | None,
        typer.Option(help="its identity here and node id at the core [default: region-<region>]"),
    ] = None,
    state_dir: Annotated[
        Path | None, typer.Option(help="write-ahead log, combined log and outbox")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="the core's seed of the initial weights")] = None,
    buffer_size: Annotated[
        int | None, typer.Option(help="hospital updates per combined update")
    ] = None,
    buffer_timeout: Annotated[
        float | None, typer.Option(help="send a partial buffer after, s (0: never)")
    ] = None,
    ack_timeout: Annotated[
        float | None, typer.Option(help="resend a combined update unacked after, s")
    ] = None,
    log_level: LogLevel = "INFO",
) -> None:
    """Run a region's aggregator against its regional broker: it acks the region's hospitals,
    combines their updates and sends the core one update for each buffer (docs/regions.md).

    It follows the core's run, versions and knobs from the core's retained status, and exits
    when that run stops."""
    from aggregator.regional_service import RegionalService
    from aggregator.regional_settings import RegionalSettings

    _setup_logging(log_level)
    settings = _settings(
        RegionalSettings,
        broker_url=broker_url,
        federation=federation,
        region=region,
        node_id=node_id,
        state_dir=state_dir,
        seed=seed,
        buffer_size=buffer_size,
        buffer_timeout=buffer_timeout,
        ack_timeout=ack_timeout,
    )
    try:
        RegionalService(settings).run(_stop_on_signals())
    except HealthNetError as exc:
        raise _fail(exc) from exc


@node_app.command("run")
def node_run(
    broker_url: BrokerUrl = None,
    federation: FederationOpt = None,
    node_id: Annotated[str | None, typer.Option(help="this hospital's broker identity")] = None,
    data: Annotated[
        str | None,
        typer.Option(help="heart-disease:<hospital>, csv:<path>, npz:<path> or module:function"),
    ] = None,
    state_dir: Annotated[Path | None, typer.Option(help="outbox and node state")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N")] = None,
    torch_threads: Annotated[int | None, typer.Option(help="CPU threads for torch")] = None,
    seed: int | None = None,
    delay_seconds: Annotated[
        float | None, typer.Option(help="artificial delay per update (tests, benchmarks)")
    ] = None,
    ack_timeout: Annotated[float | None, typer.Option(help="resend unacked updates after")] = None,
    exit_when_stopped: Annotated[
        bool | None, typer.Option("--exit-when-stopped/--stay", help="exit when the run stops")
    ] = None,
    log_level: LogLevel = "INFO",
) -> None:
    """Run one hospital's edge node: train on local data, publish deltas, evaluate versions."""
    from edge_node.service import NodeService
    from edge_node.settings import NodeSettings

    _setup_logging(log_level)
    settings = _settings(
        NodeSettings,
        broker_url=broker_url,
        federation=federation,
        node_id=node_id,
        data=data,
        state_dir=state_dir,
        device=device,
        torch_threads=torch_threads,
        seed=seed,
        delay_seconds=delay_seconds,
        ack_timeout=ack_timeout,
        exit_when_stopped=exit_when_stopped,
    )
    try:
        NodeService(settings).run(_stop_on_signals())
    except HealthNetError as exc:
        raise _fail(exc) from exc


@node_app.command("privacy")
def node_privacy(
    state_dir: Annotated[Path, typer.Option(help="the node's state dir (its outbox and ledger)")],
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Show a node's privacy budget ledger: every version it trained on under DP, and epsilon."""
    from edge_node.privacy_ledger import LEDGER_FILE, read_ledger, running_epsilon, spend_of

    directory = state_dir / "privacy"
    try:
        charges = read_ledger(directory)
    except HealthNetError as exc:
        raise _fail(exc) from exc
    spend = spend_of(charges)
    running = running_epsilon(charges, charges[-1].delta) if charges else []
    if as_json:
        console.print_json(
            json.dumps(
                {
                    "ledger": str(directory / LEDGER_FILE),
                    "spend": None if spend is None else spend.model_dump(mode="json"),
                    "charges": [
                        {**c.model_dump(mode="json"), "epsilon_after": eps}
                        for c, eps in zip(charges, running, strict=True)
                    ],
                }
            )
        )
        return
    if spend is None:
        console.print(f"no privacy charges in {directory / LEDGER_FILE}")
        return
    console.print(
        f"epsilon {spend.epsilon:.4g} of budget {spend.epsilon_budget:g} at delta "
        f"{spend.delta:g} (RDP accountant), {spend.versions} version(s) charged"
    )
    table = Table("run", "version", "update", "noise", "C", "rate", "steps", "epsilon after")
    for c, eps in zip(charges, running, strict=True):
        table.add_row(
            c.run_id,
            str(c.base_version),
            c.update_id[:8],
            f"{c.noise_multiplier:.4g}",
            f"{c.max_grad_norm:g}",
            f"{c.sample_rate:.4g}",
            str(c.steps),
            f"{eps:.4g}",
        )
    console.print(table)


@app.command()
def broker(
    port: Annotated[int, typer.Option(help="TCP port")] = 1883,
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    implementation: Annotated[str, typer.Option(help="auto, mosquitto or amqtt")] = "auto",
    workdir: Annotated[Path | None, typer.Option(help="config, log, persistence")] = None,
    persistence: Annotated[bool, typer.Option(help="keep sessions across restarts")] = False,
    log_level: LogLevel = "INFO",
) -> None:
    """Run the embedded MQTT broker (Mosquitto when installed, else amqtt) until interrupted."""
    from healthnet.broker import BrokerConfig, EmbeddedBroker

    _setup_logging(log_level)
    if implementation not in ("auto", "mosquitto", "amqtt"):
        raise _bad_input(
            f"--implementation must be auto, mosquitto or amqtt, not {implementation!r}"
        )
    stop = _stop_on_signals()
    config = BrokerConfig(
        host=host,
        port=port,
        implementation=implementation,  # type: ignore[arg-type]
        workdir=workdir,
        persistence=persistence,
    )
    try:
        with EmbeddedBroker(config) as running:
            err_console.print(
                f"{running.implementation} listening at {running.url} (log: {running.log_path}); "
                "Ctrl-C stops it"
            )
            stop.wait()
    except HealthNetError as exc:
        raise _fail(exc) from exc


# -- run control -----------------------------------------------------------------------------------


def _control(command: ControlCommand, broker_url: str | None, federation: str | None,
             knobs: dict[str, Any] | None = None, node: str | None = None,
             version: int | None = None) -> None:  # fmt: skip
    from common.settings import ConnectionSettings
    from healthnet.control import ControlClient

    settings = _settings(ConnectionSettings, broker_url=broker_url, federation=federation)
    try:
        with ControlClient(settings) as client:
            reply = client.request(command, knobs, node=node, version=version)
    except (HealthNetError, ValueError) as exc:
        raise _fail(exc) from exc
    console.print(reply.message)


@app.command()
def start(broker_url: BrokerUrl = None, federation: FederationOpt = None) -> None:
    """Start folding updates (for an aggregator run with --no-autostart)."""
    _control(ControlCommand.START, broker_url, federation)


@app.command()
def pause(broker_url: BrokerUrl = None, federation: FederationOpt = None) -> None:
    """Pause the run: updates are still accepted and buffered, no new version is published."""
    _control(ControlCommand.PAUSE, broker_url, federation)


@app.command()
def resume(broker_url: BrokerUrl = None, federation: FederationOpt = None) -> None:
    """Resume a paused run."""
    _control(ControlCommand.RESUME, broker_url, federation)


@app.command()
def stop(broker_url: BrokerUrl = None, federation: FederationOpt = None) -> None:
    """Stop the run for good: a final checkpoint is written and the aggregator exits."""
    _control(ControlCommand.STOP, broker_url, federation)


@app.command()
def quarantine(
    node: Annotated[str, typer.Argument(help="the hospital's broker identity")],
    broker_url: BrokerUrl = None,
    federation: FederationOpt = None,
) -> None:
    """Refuse a node's updates from now on and drop its buffered ones (poisoning defence)."""
    _control(ControlCommand.QUARANTINE, broker_url, federation, node=node)


@app.command()
def readmit(
    node: Annotated[str, typer.Argument(help="the hospital's broker identity")],
    broker_url: BrokerUrl = None,
    federation: FederationOpt = None,
) -> None:
    """Accept a quarantined node's updates again."""
    _control(ControlCommand.READMIT, broker_url, federation, node=node)


@app.command("abandon-plan")
def abandon_plan(broker_url: BrokerUrl = None, federation: FederationOpt = None) -> None:
    """Secure aggregation: give up the open fold plan that cannot complete (too many holders
    gone); its updates are dropped and their nodes told, never folded in another sum."""
    _control(ControlCommand.ABANDON_PLAN, broker_url, federation)


@app.command()
def rollback(
    version: Annotated[int, typer.Argument(min=0, help="the earlier version to go back to")],
    broker_url: BrokerUrl = None,
    federation: FederationOpt = None,
) -> None:
    """Publish a new version with an earlier version's weights (a kept checkpoint, or a version
    since the newest one); the version number still moves forward."""
    _control(ControlCommand.ROLLBACK, broker_url, federation, version=version)


@app.command("set")
def set_knobs(
    assignments: Annotated[list[str], typer.Argument(help="KNOB=VALUE, e.g. buffer_size=4")],
    broker_url: BrokerUrl = None,
    federation: FederationOpt = None,
) -> None:
    """Change live knobs (buffer_size, max_staleness, server_lr, training.epochs, ...)."""
    knobs: dict[str, Any] = {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep:
            raise _bad_input(f"expected KNOB=VALUE, got {item!r}")
        knobs[key] = _parse_value(raw)
    _control(ControlCommand.SET, broker_url, federation, knobs)


def _age(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}min"
    return f"{seconds / 3600:.1f}h" if seconds < 172800 else f"{seconds / 86400:.1f}d"


def _parse_value(raw: str) -> int | float | str | bool | None:
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        return raw
    if isinstance(value, int | float | str | bool) or value is None:
        return value
    return raw


@app.command()
def status(
    broker_url: BrokerUrl = None,
    federation: FederationOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Show the aggregator's state, version, buffer, knobs and counters."""
    from common.settings import ConnectionSettings
    from healthnet.control import ControlClient

    settings = _settings(ConnectionSettings, broker_url=broker_url, federation=federation)
    try:
        with ControlClient(settings) as client:
            snapshot = client.status()
    except HealthNetError as exc:
        raise _fail(exc) from exc
    # Measured on the aggregator's clock: the retained status may be the last word of an
    # aggregator long gone, and its age is what tells.
    age = max(0.0, time.time() - snapshot.updated_at)
    if as_json:
        console.print_json(
            json.dumps({**snapshot.model_dump(mode="json"), "status_age_seconds": round(age, 3)})
        )
        return
    _render_status(snapshot, age)


def _render_status(snapshot: AggregatorStatus, age: float) -> None:
    c, k = snapshot.counters, snapshot.knobs
    console.print(
        f"run [bold]{snapshot.run_id}[/bold]: {snapshot.state.value}, version {snapshot.version}, "
        f"buffer {snapshot.buffer_fill}/{k.buffer_size}; status {_age(age)} old"
    )
    if snapshot.state is AggregatorState.OFFLINE:
        console.print(
            "the aggregator is gone (its Last Will, or its last word on a clean exit); the "
            "numbers below are from that moment or, for a Last Will, from when it connected"
        )
    console.print(
        f"updates: {c.received} received, {c.accepted} accepted, {c.rejected} rejected, "
        f"{c.duplicates} duplicates, {c.folded} folded"
    )
    if c.rejections:
        console.print("rejections: " + ", ".join(f"{r}={n}" for r, n in c.rejections.items()))
    if c.discarded or c.rollbacks:
        console.print(
            f"discarded: {c.discarded} accepted updates whose batch made no version "
            f"({c.probe_failures} failed the probe); rollbacks: {c.rollbacks}"
        )
    if c.accepted and c.bytes_accepted:
        per_update = describe_wire_size(
            c.bytes_accepted / c.accepted, c.raw_bytes_accepted / c.accepted
        )
        console.print(f"traffic per accepted update: {per_update}")
    z = k.compression
    console.print(
        f"compression: top_k={z.top_k}, quantization={z.quantization.value}, "
        f"error_feedback={z.error_feedback}, broadcast={k.broadcast_dtype}"
    )
    console.print(
        f"knobs: K={k.buffer_size}, max_staleness={k.max_staleness}, staleness={k.staleness.value}"
        f"(a={k.staleness_a}, b={k.staleness_b}), beta={k.sample_exponent}, "
        f"server={k.server_optimizer.value}(lr={k.server_lr}), training={k.training.model_dump()}"
    )
    _render_privacy(snapshot)
    _render_personalisation(snapshot)
    _render_secure_aggregation(snapshot)


def _render_secure_aggregation(snapshot: AggregatorStatus) -> None:
    """The run's secure aggregation policy, its updates short of receipts and its open plan."""
    policy = snapshot.knobs.secure_aggregation
    if policy is None:
        return
    scheme = policy.policy().scheme
    console.print(
        f"secure aggregation: {len(policy.holders)} holders, U={scheme.threshold}, "
        f"T={policy.privacy}; versions are folded from masked updates; "
        f"{snapshot.awaiting_receipts} updates wait for holders' receipts",
        soft_wrap=True,
    )
    plan = snapshot.secure_plan
    if plan is not None:
        refused = "".join(f"; {h} refused: {r}" for h, r in plan.refusals.items())
        failure = f"; does not unmask: {plan.failure}" if plan.failure else ""
        console.print(
            f"open fold plan {plan.fold_id}: {len(plan.update_ids)} updates, "
            f"{len(plan.answered)}/{plan.needed} answers from {', '.join(plan.holders)}"
            f"{refused}{failure}",
            soft_wrap=True,
        )


def _render_personalisation(snapshot: AggregatorStatus) -> None:
    """The run's personalisation policy, and each hospital's global and personal accuracy."""
    policy = snapshot.knobs.personalisation
    personal = [e for e in snapshot.nodes if e.eval_personal_accuracy is not None]
    if policy is None and not personal:
        return
    console.print(_describe_personalisation(policy), soft_wrap=True)
    if personal:
        console.print(
            "accuracy, global / personal: "
            + ", ".join(f"{e.node} {_accuracy(e)}/{_personal_accuracy(e)}" for e in personal),
            soft_wrap=True,
        )


def _describe_personalisation(policy: Personalisation | None) -> str:
    if policy is None:
        return "personalisation: no policy in force (the accuracies below are what nodes reported)"
    detail = (
        f", lambda {policy.ditto_lambda:g}" if policy.method is PersonalisationMethod.DITTO else ""
    )
    rate = "" if policy.learning_rate is None else f", lr {policy.learning_rate:g}"
    return (
        f"personalisation: {policy.method.value}, {policy.epochs} epoch(s) per version{detail}"
        f"{rate}; personal models stay at the hospitals"
    )


def _accuracy(entry: NodeTally | None) -> str:
    if entry is None or entry.eval_accuracy is None:
        return "-"
    return f"{entry.eval_accuracy:.3f}"


def _personal_accuracy(entry: NodeTally | None) -> str:
    if entry is None or entry.eval_personal_accuracy is None:
        return "-"
    return f"{entry.eval_personal_accuracy:.3f}"


def _render_privacy(snapshot: AggregatorStatus) -> None:
    """The run's privacy policy, and each hospital's epsilon spent against its budget."""
    policy = snapshot.knobs.privacy
    spent = [entry for entry in snapshot.nodes if entry.epsilon is not None]
    if policy is None and not spent:
        return
    console.print(_describe_policy(policy), soft_wrap=True)
    if spent:
        console.print(
            "epsilon spent: " + ", ".join(f"{e.node} {_epsilon_spent(e)}" for e in spent),
            soft_wrap=True,
        )
    if snapshot.budgets_spent:
        console.print(
            "every hospital that could still train has spent its budget: no more versions will "
            "come from training; stop the run, or raise the budget in a new one"
        )


def _describe_policy(policy: PrivacyPolicy | None) -> str:
    if policy is None:
        return "privacy: no policy in force (the epsilon below is what the nodes reported)"
    noise = (
        f"noise x{policy.noise_multiplier:g}"
        if policy.noise_multiplier is not None
        else f"noise calibrated to spend the budget in {policy.calibrate_versions} versions"
    )
    return (
        f"privacy: DP-SGD, budget epsilon={policy.epsilon_budget:g} per hospital at "
        f"delta={policy.delta:g}, {noise}, clipping norm {policy.max_grad_norm:g}, "
        f"metrics {policy.metrics.value}"
    )


def _epsilon_spent(entry: NodeTally | None) -> str:
    """``1.52/3`` (epsilon spent of the budget), or ``-`` for a node that reported none."""
    if entry is None or entry.epsilon is None:
        return "-"
    if entry.epsilon_budget is None:
        return f"{entry.epsilon:.2f}"
    return f"{entry.epsilon:.2f}/{entry.epsilon_budget:g}"


@app.command()
def nodes(broker_url: BrokerUrl = None, federation: FederationOpt = None) -> None:
    """List the hospitals: state, version lag, updates accepted and rejected, last accuracy."""
    from common.settings import ConnectionSettings
    from healthnet.control import ControlClient

    settings = _settings(ConnectionSettings, broker_url=broker_url, federation=federation)
    try:
        with ControlClient(settings) as client:
            snapshot = client.status()
            statuses = client.nodes()
    except HealthNetError as exc:
        raise _fail(exc) from exc
    tallies = {entry.node: entry for entry in snapshot.nodes}
    # Under DP, each hospital's epsilon spent of its budget, as it last reported it.
    private = snapshot.knobs.privacy is not None or any(
        e.epsilon is not None for e in tallies.values()
    )
    # Under personalisation, each hospital's personal model beside the global one.
    personal = snapshot.knobs.personalisation is not None or any(
        e.eval_personal_accuracy is not None for e in tallies.values()
    )
    table = Table(title=f"federation {settings.federation}, global v{snapshot.version}")
    columns = ("node", "state", "version", "lag", "accepted", "rejected", "accuracy")
    extra = ("personal",) * personal + ("epsilon",) * private
    for column in (*columns, *extra):
        table.add_column(column)
    for name in sorted(set(tallies) | set(statuses)):
        node_status, entry = statuses.get(name), tallies.get(name)
        version = node_status.version if node_status else None
        row = [
            name,
            node_status.state.value if node_status else "?",
            "-" if version is None else str(version),
            "-" if version is None else str(snapshot.version - version),
            str(entry.accepted) if entry else "0",
            str(entry.rejected) if entry else "0",
            _accuracy(entry),
        ]
        table.add_row(
            *row,
            *([_personal_accuracy(entry)] if personal else []),
            *([_epsilon_spent(entry)] if private else []),
        )
    console.print(table)


# -- observing ------------------------------------------------------------------------------------


@app.command("dashboard")
def dashboard_command(
    broker_url: BrokerUrl = None,
    federation: FederationOpt = None,
    host: Annotated[
        str | None, typer.Option(help="address to bind [env: HEALTHNET_DASHBOARD_HOST]")
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="port, 0 for any free [env: HEALTHNET_DASHBOARD_PORT]")
    ] = None,
    log_level: LogLevel = "WARNING",
) -> None:
    """Serve the live web dashboard of a federation (read-only; 127.0.0.1:8765 by default)."""
    from healthnet.dashboard import DashboardServer, DashboardSettings
    from healthnet.feed import FederationFeed

    _setup_logging(log_level)
    stop = _stop_on_signals()
    settings = _settings(
        DashboardSettings,
        broker_url=broker_url,
        federation=federation,
        dashboard_host=host,
        dashboard_port=port,
    )
    try:
        with (
            FederationFeed(settings) as feed,
            DashboardServer(feed, settings.dashboard_host, settings.dashboard_port) as server,
        ):
            err_console.print(
                f"dashboard of federation {settings.federation!r} at {server.url}; Ctrl-C stops it"
            )
            stop.wait()
    except (HealthNetError, OSError) as exc:
        raise _fail(exc) from exc


@app.command()
def watch(
    broker_url: BrokerUrl = None,
    federation: FederationOpt = None,
    refresh: Annotated[float, typer.Option(help="redraw at least this often, seconds")] = 1.0,
) -> None:
    """Follow a federation live in the terminal: version, rate, hospitals, accuracy, staleness."""
    from common.settings import ConnectionSettings
    from healthnet.watch import watch as watch_live

    settings = _settings(ConnectionSettings, broker_url=broker_url, federation=federation)
    try:
        watch_live(settings, console, _stop_on_signals(), refresh=refresh)
    except HealthNetError as exc:
        raise _fail(exc) from exc


@app.command()
def report(
    run_dir: Annotated[
        Path, typer.Argument(help="an aggregator state dir, or a demo --workdir, with its logs")
    ],
    out: Annotated[Path, typer.Option("--out", help="folder for the PNGs")] = Path("report"),
) -> None:
    """Plot a run from its logs: accuracy per hospital, staleness histogram, bytes per update."""
    from healthnet.report import write_report

    try:
        written = write_report(run_dir, out, err_console)
    except HealthNetError as exc:
        raise _fail(exc) from exc
    for path in written:
        console.print(str(path))


def main() -> None:
    app()
