"""``healthnet model …`` and ``healthnet predict``: take a federation's model home.

``list``, ``pull``, ``export``, ``card`` and ``verify`` work on a run's versions
(:mod:`healthnet.lifecycle`, :mod:`healthnet.export`, :mod:`healthnet.card`); ``predict`` runs a
model copy on a hospital's data (:mod:`healthnet.predict`). Each module is imported by the command
that needs it, so that ``healthnet --help`` loads no torch and no ONNX.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from common.errors import HealthNetError

if TYPE_CHECKING:
    from healthnet.lifecycle import ModelCopy

__all__ = ["model_app", "predict_command"]

model_app = typer.Typer(
    help="A run's versions: list, pull, export, model card, verify.", no_args_is_help=True
)
console = Console()
err_console = Console(stderr=True)

Version = Annotated[str, typer.Argument(help="a version number, 'latest' or 'best'")]
RunDir = Annotated[
    Path | None,
    typer.Option(
        "--run",
        help="the aggregator's state dir (or a demo --workdir); without it, the broker's "
        "retained current version",
        show_default=False,
    ),
]
BrokerUrl = Annotated[
    str | None,
    typer.Option("--broker-url", help="[env: HEALTHNET_BROKER_URL]", show_default=False),
]
FederationOpt = Annotated[
    str | None, typer.Option("--federation", help="federation id [env: HEALTHNET_FEDERATION]")
]
Personal = Annotated[
    bool,
    typer.Option(
        "--personal",
        help="a hospital's personal model, from its node's --state-dir (personalisation)",
    ),
]
NodeStateDir = Annotated[
    Path | None,
    typer.Option("--state-dir", help="the node's state dir (with --personal)", show_default=False),
]
DataSpec = Annotated[
    str | None,
    typer.Option(
        "--data",
        help="your training data spec (as your node's --data): its scaling statistics are "
        "fitted here and kept in the model copy for `healthnet predict --data records:FILE`",
        show_default=False,
    ),
]


def _fail(exc: Exception) -> typer.Exit:
    err_console.print(f"[red]error:[/red] {exc}")
    return typer.Exit(code=1)


def _when(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC).strftime("%H:%M:%S")


def _pull(
    version: str,
    out: Path,
    run: Path | None,
    broker_url: str | None,
    federation: str | None,
    data: str | None,
    personal_state: Path | None = None,
) -> ModelCopy:
    from common.settings import ConnectionSettings
    from healthnet.lifecycle import pull_from_broker, pull_from_run, pull_personal

    if personal_state is not None:
        copy = pull_personal(personal_state, version, out)
    elif run is not None:
        copy = pull_from_run(run, version, out)
    else:
        given: dict[str, Any] = {"broker_url": broker_url, "federation": federation}
        settings = ConnectionSettings(**{k: v for k, v in given.items() if v is not None})
        copy = pull_from_broker(settings, version, out)
    if data is not None:
        from healthnet.predict import write_preprocessing

        write_preprocessing(out, data)
    return copy


def _describe(copy: ModelCopy) -> str:
    chain = (
        f"chain verified, record {copy.record_digest[:16]}…"
        if copy.record_digest
        else "no hash chain"
    )
    if copy.personal is not None:
        return (
            f"the personal model ({copy.personal}, trained against v{copy.version} of run "
            f"{copy.run_id}) in {copy.source}: {copy.model.name}, {copy.blob_bytes:,} bytes, "
            f"sha256 {copy.sha256[:16]}…"
        )
    return (
        f"v{copy.version} of run {copy.run_id}: {copy.model.name}, {copy.blob_bytes:,} bytes, "
        f"sha256 {copy.sha256[:16]}… ({chain})"
    )


def _personal_source(personal: bool, state_dir: Path | None, run: Path | None) -> Path | None:
    """The node state dir to pull a personal model from (None: a run's version)."""
    if not personal:
        if state_dir is not None:
            raise HealthNetError("--state-dir names a node's state dir: it needs --personal")
        return None
    if state_dir is None:
        raise HealthNetError("--personal needs the node's --state-dir")
    if run is not None:
        raise HealthNetError("--personal reads a node's --state-dir, not a run's --run")
    return state_dir


@model_app.command("list")
def list_versions(
    run: Annotated[
        Path, typer.Option("--run", help="the aggregator's state dir or a demo workdir")
    ],
    last: Annotated[
        int | None, typer.Option("--last", min=1, help="only the newest N versions (and best)")
    ] = None,
) -> None:
    """Every version of a run: accuracy (mean and per hospital), contributors, time."""
    from healthnet.lifecycle import best_version, load_history

    try:
        history = load_history(run)
    except HealthNetError as exc:
        raise _fail(exc) from exc
    best = best_version(history.versions)
    hospitals = sorted({n for s in history.versions for n in (*s.evaluations, *s.contributors)})
    created = [s.created_at for s in history.versions if s.created_at is not None]
    day = datetime.datetime.fromtimestamp(min(created), tz=datetime.UTC).date() if created else ""
    table = Table(
        title=f"run {history.run_id} ({day}): {len(history.versions)} versions",
        caption="accuracy on each hospital's test split; + its update was folded into the version",
    )
    table.add_column("version", justify="right")
    table.add_column("UTC")
    table.add_column("mean", justify="right")
    for node in hospitals:
        table.add_column(node, justify="right")
    table.add_column("pull")
    shown = history.versions[-last:] if last is not None else history.versions
    if best is not None and best not in shown:
        shown = (best, *shown)
    for s in shown:
        accuracy = s.accuracy
        mark = " best" if best is not None and s.version == best.version else ""
        table.add_row(
            str(s.version),
            _when(s.created_at),
            "" if s.mean_accuracy is None else f"{s.mean_accuracy:.3f}",
            *(
                (f"{accuracy[n]:.3f}" if n in accuracy else "·")
                + (" +" if n in s.contributors else "  ")
                for n in hospitals
            ),
            ("yes" if s.retrievable else "no") + mark,
        )
    console.print(table)


@model_app.command("pull")
def pull(
    version: Version,
    out: Annotated[Path, typer.Option("--out", help="folder for the model copy")],
    run: RunDir = None,
    broker_url: BrokerUrl = None,
    federation: FederationOpt = None,
    data: DataSpec = None,
    personal: Personal = False,
    state_dir: NodeStateDir = None,
) -> None:
    """Fetch a version, verify its sha256 and hash chain, and write it as a model copy.

    With --personal --state-dir DIR: the hospital's personal model from its node's state dir."""
    try:
        source = _personal_source(personal, state_dir, run)
        copy = _pull(version, out, run, broker_url, federation, data, source)
    except (HealthNetError, ValueError) as exc:
        raise _fail(exc) from exc
    console.print(f"pulled {_describe(copy)} into {out}")


@model_app.command("export")
def export(
    version: Version,
    out: Annotated[Path, typer.Option("--out", help="folder for the model copy and export")],
    fmt: Annotated[
        str, typer.Option("--format", help="safetensors, onnx or torchscript")
    ] = "safetensors",
    run: RunDir = None,
    broker_url: BrokerUrl = None,
    federation: FederationOpt = None,
    data: DataSpec = None,
    input_shape: Annotated[
        str | None,
        typer.Option("--input-shape", help="one example's shape for a plug-in model, e.g. 3,28,28"),
    ] = None,
    personal: Personal = False,
    state_dir: NodeStateDir = None,
) -> None:
    """Pull a version and write its weights and spec as safetensors, ONNX or TorchScript.

    With --personal --state-dir DIR: the hospital's personal model from its node's state dir."""
    from healthnet.export import ExportFormat, export_model

    try:
        try:
            chosen = ExportFormat(fmt)
        except ValueError:
            raise HealthNetError(
                f"--format {fmt!r}: choose {', '.join(f.value for f in ExportFormat)}"
            ) from None
        shape = _shape(input_shape)
        source = _personal_source(personal, state_dir, run)
        copy = _pull(version, out, run, broker_url, federation, data, source)
        path = export_model(out, chosen, example_shape=shape)
    except (HealthNetError, ValueError) as exc:
        raise _fail(exc) from exc
    console.print(f"exported {_describe(copy)} as {chosen.value}: {path}")


def _shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(side) for side in text.split(","))
    except ValueError:
        raise HealthNetError(f"--input-shape {text!r} is not a list of integers") from None
    if not shape or any(side < 1 for side in shape):
        raise HealthNetError(f"--input-shape {text!r} needs positive sides")
    return shape


@model_app.command("card")
def card(
    version: Version,
    run: Annotated[
        Path, typer.Option("--run", help="the aggregator's state dir or a demo workdir")
    ],
    out: Annotated[Path, typer.Option("--out", help="folder for card.md, card.json, plot")],
    intended_use: Annotated[
        str | None, typer.Option("--intended-use", help="what the model is for (operator)")
    ] = None,
    limitations: Annotated[
        str | None, typer.Option("--limitations", help="where it must not be used (operator)")
    ] = None,
    data_notes: Annotated[
        str | None,
        typer.Option("--data-notes", help="the data's licence and citations, if not built in"),
    ] = None,
) -> None:
    """Write a model card (Markdown and JSON) for a version, from the run's logs."""
    from healthnet.card import NOT_STATED, CardText, write_card

    text = CardText(
        intended_use=intended_use or NOT_STATED,
        limitations=limitations or NOT_STATED,
        data_notes=data_notes or "",
    )
    try:
        path = write_card(run, version, out, text)
    except HealthNetError as exc:
        raise _fail(exc) from exc
    console.print(f"model card: {path} (and card.json, accuracy.png)")


@model_app.command("verify")
def verify(model: Annotated[Path, typer.Argument(help="a model copy folder")]) -> None:
    """Check a model copy offline: its blob's sha256 and its records' hash chain."""
    from healthnet.lifecycle import verify_model_copy

    try:
        copy, _ = verify_model_copy(model)
    except HealthNetError as exc:
        raise _fail(exc) from exc
    console.print(f"ok: {_describe(copy)}")


def predict_command(
    model: Annotated[Path, typer.Option("--model", help="a model copy (pull or export --out)")],
    data: Annotated[
        str,
        typer.Option(
            "--data",
            help="a node data spec (its test split) or records:FILE.csv (new records, scaled "
            "with the statistics that pull --data kept)",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="the predictions CSV")] = Path(
        "predictions.csv"
    ),
) -> None:
    """Predict every record of a hospital's data: id, class, class probabilities."""
    from healthnet.predict import predict

    try:
        run = predict(model, data, out)
    except (HealthNetError, ValueError) as exc:
        raise _fail(exc) from exc
    summary = f"{len(run.rows)} rows with v{run.version} to {out}"
    if run.errors:
        summary += f"; {run.errors} with an error (see the error column)"
    if run.accuracy is not None:
        summary += f"; accuracy {run.accuracy:.4f} ({run.correct}/{len(run.labelled)} labelled)"
    console.print(summary)
