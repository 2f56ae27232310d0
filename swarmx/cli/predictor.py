"""`swarmx predictor train|predict|eval|status`: the latency predictors, offline and live.

torch is imported only inside these commands, never when the CLI starts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from swarmx.cli.common import (
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    ConfigOpt,
    JsonOpt,
    SchedulerOpt,
    ask,
    fail,
    load,
    print_json,
)
from swarmx.protocol import Ack, InstallPredictor, PredictorStatus, QueryPredictor
from swarmx.schema import encode
from swarmx.traces import TraceError, TraceRecord, read_traces

if TYPE_CHECKING:
    from swarmx.models.predictor import QuantilePredictor

predictor_app = typer.Typer(
    help="Latency predictors: train, predict, evaluate, inspect.", no_args_is_help=True
)

TracesOpt = Annotated[
    list[Path], typer.Option("--traces", help="Trace JSONL file(s) (swarmx traces export).")
]
ModelOpt = Annotated[
    Path,
    typer.Option(
        "--model", help="A model file from `predictor train`.", exists=True, dir_okay=False
    ),
]


def _read(paths: list[Path]) -> list[TraceRecord]:
    try:
        records = read_traces(paths)
    except (OSError, TraceError) as exc:
        fail(str(exc), EXIT_USAGE)
    if not records:
        fail(f"no calls in {', '.join(map(str, paths))}", EXIT_USAGE)
    return records


def _load(path: Path) -> QuantilePredictor:
    from swarmx.models.predictor import QuantilePredictor

    try:
        return QuantilePredictor.load(path)
    except (OSError, RuntimeError, KeyError, ValueError) as exc:
        fail(f"{path}: not a SwarmX predictor ({exc})", EXIT_USAGE)


def _levels(text: str) -> tuple[float, ...]:
    try:
        levels = tuple(sorted(float(x) for x in text.split(",") if x.strip()))
    except ValueError:
        fail(f"--quantiles: expected numbers like 0.5,0.9,0.99, got {text!r}", EXIT_USAGE)
    if not levels or any(not 0 < p < 1 for p in levels) or len(set(levels)) != len(levels):
        fail(f"--quantiles: need distinct levels in (0, 1), got {text!r}", EXIT_USAGE)
    return levels


@predictor_app.command("train")
def train_cmd(
    traces: TracesOpt,
    out: Annotated[Path, typer.Option("--out", help="Where to write the model file.")],
    quantiles: Annotated[str, typer.Option(help="Levels to forecast.")] = "0.5,0.9,0.95,0.99",
    epochs: Annotated[int, typer.Option(help="At most this many epochs.", min=1)] = 30,
    seed: Annotated[int, typer.Option()] = 0,
    config: ConfigOpt = None,
    json: JsonOpt = False,
) -> None:
    """Train a predictor on recorded calls (validation split by session, early stopping,
    conformal calibration per load bucket); the three baselines are fitted alongside and kept in
    the model file for `predictor eval`."""
    from swarmx.models.baselines import BASELINES
    from swarmx.models.features import FeatureConfig
    from swarmx.models.train import train

    load(config)
    records = _read(traces)
    levels = _levels(quantiles)
    console = Console(stderr=True)
    with Progress(
        TextColumn("[bold]training"),
        BarColumn(),
        TextColumn("epoch {task.completed:.0f}/{task.total:.0f}  {task.fields[loss]}"),
        TimeElapsedColumn(),
        console=console,
        disable=json,
    ) as bar:
        task = bar.add_task("train", total=epochs, loss="")

        def progress(epoch: int, total: int, train_loss: float, val_loss: float) -> None:
            bar.update(
                task,
                completed=epoch,
                total=total,
                loss=f"train {train_loss:.4f}  val {val_loss:.4f}",
            )

        try:
            model, report = train(
                records,
                FeatureConfig(levels=levels),
                seed=seed,
                max_epochs=epochs,
                progress=progress,
            )
        except ValueError as exc:
            fail(f"cannot train: {exc}", EXIT_USAGE)
    model.extras["baselines"] = [b.fit(records, levels).to_dict() for b in BASELINES]
    model.save(out)
    summary = {
        "model": str(out),
        "version": model.version,
        "calls": len(records),
        "epochs": report.epochs,
        "wall_s": round(report.wall_s, 1),
        "n_train": report.n_train,
        "n_val": report.n_val,
        "n_cal": report.n_cal,
        "val_coverage": {f"{p:g}": round(c, 4) for p, c in report.coverage.items()},
    }
    if json:
        print_json(summary)
        return
    cov = ", ".join(f"{p}: {c:.3f}" for p, c in summary["val_coverage"].items())  # type: ignore[attr-defined]
    console.print(
        f"[green]trained[/] {model.version} on {len(records)} calls in "
        f"{report.wall_s:.1f}s ({report.epochs} epochs); validation coverage {cov}; "
        f"written to {out}"
    )


@predictor_app.command("predict")
def predict_cmd(traces: TracesOpt, model: ModelOpt, config: ConfigOpt = None) -> None:
    """Forecast every call in the traces: JSONL on stdout, one line per call in input order."""
    from swarmx.models.query import queries

    load(config)
    records = _read(traces)
    for dist in _load(model).predict(queries(records)):
        sys.stdout.write(json.dumps({"quantiles": dist.as_dict()}) + "\n")


@predictor_app.command("eval")
def eval_cmd(
    traces: TracesOpt,
    model: ModelOpt,
    plot: Annotated[
        Path | None,
        typer.Option(
            help="Write a reliability diagram and a predicted-vs-actual scatter to this PNG."
        ),
    ] = None,
    config: ConfigOpt = None,
    json: JsonOpt = False,
) -> None:
    """Pinball loss, coverage and median absolute error of the model and, in the same run, of
    the three baselines fitted on its training data."""
    from swarmx.models import plotting
    from swarmx.models.baselines import baseline_from_dict
    from swarmx.models.evaluate import evaluate, markdown_table, write_plot_png
    from swarmx.models.query import queries

    if plot is not None:
        try:
            plotting.require()  # before the evaluation, not after it
        except plotting.PlotUnavailable as exc:
            fail(f"--plot: {exc}", EXIT_USAGE)
    load(config)
    records = [r for r in _read(traces) if r.ok and r.latency_s > 0]
    predictor = _load(model)
    qs = queries(records)
    actual = [r.latency_s for r in records]
    runs = {"swarmx": predictor.predict(qs)}
    for d in predictor.extras.get("baselines", []):
        baseline = baseline_from_dict(d)
        runs[baseline.name] = baseline.predict(qs)
    levels = predictor.levels
    results = [evaluate(name, dists, actual, levels) for name, dists in runs.items()]
    if plot is not None:
        write_plot_png(plot, {name: (dists, actual) for name, dists in runs.items()}, levels)
    if json:
        print_json(
            {
                "model": predictor.version,
                "calls": len(records),
                "results": [r.to_dict() for r in results],
            }
        )
    else:
        Console().print(markdown_table(results, levels), markup=False, highlight=False)


@predictor_app.command("install")
def install_cmd(
    model: Annotated[Path, typer.Argument(help="Model file; the scheduler reads this path.")],
    config: ConfigOpt = None,
    scheduler: SchedulerOpt = None,
) -> None:
    """Make a trained model the scheduler's live predictor (it keeps adapting it online)."""
    # the scheduler loads the file (and torch, the first time): allow it more than a query
    reply = ask(config, scheduler, InstallPredictor(str(model.resolve())), min_timeout_s=60.0)
    if not isinstance(reply, Ack):
        fail(f"unexpected reply {reply.TYPE!r} from the scheduler", EXIT_UNAVAILABLE)
    typer.echo(f"predictor {reply.detail} is live")


@predictor_app.command("status")
def status_cmd(
    config: ConfigOpt = None, scheduler: SchedulerOpt = None, json: JsonOpt = False
) -> None:
    """The scheduler's live predictor: version, trained or fallback, calls seen, recent
    coverage and pinball loss."""
    reply = ask(config, scheduler, QueryPredictor())
    if not isinstance(reply, PredictorStatus):
        fail(f"unexpected reply {reply.TYPE!r} from the scheduler", EXIT_UNAVAILABLE)
    if json:
        print_json(encode(reply))
        return
    table = Table(
        title=f"predictor {reply.version} ({reply.kind})", title_justify="left", show_header=True
    )
    table.add_column("level")
    table.add_column("recent coverage", justify="right")
    table.add_column("recent pinball (s)", justify="right")
    table.add_column("online shift", justify="right")
    for p in reply.levels:
        key = f"{p:g}"
        cov, loss = reply.recent_coverage.get(key), reply.recent_pinball_s.get(key)
        table.add_row(
            key,
            "-" if cov is None else f"{cov:.3f}",
            "-" if loss is None else f"{loss:.4f}",
            f"{reply.online_shift.get(key, 0.0):+.3f}",
        )
    console = Console()
    console.print(table)
    console.print(
        f"calls seen {reply.calls_seen}, buffer {reply.buffer_calls}, swaps "
        f"{reply.swaps}, refused {reply.refused_swaps}"
        + (", training now" if reply.training else "")
    )
    if reply.last_error:
        console.print(f"last training round failed: {reply.last_error}", style="red", markup=False)
