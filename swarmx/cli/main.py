"""Entry point: one Typer app, one module per command group."""

from __future__ import annotations

import typer

from swarmx import __version__
from swarmx.cli.common import ConfigOpt, JsonOpt, load, print_json
from swarmx.cli.daemons import node_app, scheduler_app
from swarmx.cli.gateway import gateway
from swarmx.cli.keys import keys_app
from swarmx.cli.nodes import nodes
from swarmx.cli.predictor import predictor_app
from swarmx.cli.sim import sim
from swarmx.cli.top import top
from swarmx.cli.up import up
from swarmx.cli.workflows import cancel, result, status, submit, traces_app

app = typer.Typer(
    name="swarmx",
    help="SwarmX: a tail-aware scheduler for agentic AI clusters.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(scheduler_app, name="scheduler")
app.add_typer(node_app, name="node")
app.add_typer(traces_app, name="traces")
app.add_typer(predictor_app, name="predictor")
app.add_typer(keys_app, name="keys")
app.command()(nodes)
app.command()(top)
app.command()(up)
app.command()(submit)
app.command()(status)
app.command()(result)
app.command()(cancel)
app.command()(sim)
app.command()(gateway)


@app.command()
def version(config: ConfigOpt = None, json: JsonOpt = False) -> None:
    """Print the SwarmX version (and check the config file, if one is given)."""
    load(config)
    if json:
        print_json({"version": __version__})
    else:
        typer.echo(__version__)


def main() -> None:
    app()
