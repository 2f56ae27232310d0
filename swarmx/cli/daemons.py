"""`swarmx scheduler start` and `swarmx node start`: foreground daemons (systemd runs these)."""

from __future__ import annotations

from typing import Annotated

import typer

from swarmx.cli.common import (
    EXIT_UNAVAILABLE,
    ConfigOpt,
    ListenOpt,
    LogFormatOpt,
    LogLevelOpt,
    MetricsPortOpt,
    SchedulerOpt,
    StateDirOpt,
    fail,
    load,
    scheduler_settings,
    setup_logging,
)
from swarmx.clock import RealClock
from swarmx.config import REPLICA_PRESETS, ConfigError, override
from swarmx.daemon.lifecycle import run_daemon
from swarmx.daemon.node import NodeAgent
from swarmx.daemon.scheduler import SchedulerDaemon, StateDirBusy
from swarmx.metrics import MetricsError
from swarmx.transport import TransportError

scheduler_app = typer.Typer(help="The central scheduler daemon.", no_args_is_help=True)
node_app = typer.Typer(help="The per-node agent.", no_args_is_help=True)


@scheduler_app.command("start")
def scheduler_start(
    config: ConfigOpt = None,
    listen: ListenOpt = None,
    state_dir: StateDirOpt = None,
    metrics_port: MetricsPortOpt = None,
    log_level: LogLevelOpt = None,
    log_format: LogFormatOpt = None,
) -> None:
    """Run the scheduler in the foreground until SIGTERM or Ctrl-C."""
    cfg = load(config)
    sched = scheduler_settings(cfg, listen, state_dir, metrics_port)
    setup_logging(cfg, log_level, log_format)
    daemon = SchedulerDaemon(
        sched, RealClock(), predictor=cfg.predictor, router=cfg.router, scaler=cfg.scaler
    )
    try:
        run_daemon(daemon.run)
    except (TransportError, StateDirBusy, OSError) as exc:
        fail(str(exc), EXIT_UNAVAILABLE)


@node_app.command("start")
def node_start(
    config: ConfigOpt = None,
    scheduler: SchedulerOpt = None,
    name: Annotated[
        str | None,
        typer.Option(
            envvar="SWARMX_NODE_NAME", help="Node name [default: the hostname].", show_default=False
        ),
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(
            envvar="SWARMX_PRESET",
            help="Serve a built-in replica set (local: tiny torch LM + vision) when the config "
            "declares no [[node.replicas]].",
            show_default=False,
        ),
    ] = None,
    metrics_port: MetricsPortOpt = None,
    log_level: LogLevelOpt = None,
    log_format: LogFormatOpt = None,
) -> None:
    """Run the node agent in the foreground until SIGTERM or Ctrl-C."""
    cfg = load(config)
    if preset is not None and preset not in REPLICA_PRESETS:
        fail(f"--preset: unknown preset {preset!r} (known: {', '.join(REPLICA_PRESETS)})")
    replicas = REPLICA_PRESETS[preset] if preset and not cfg.node.replicas else None
    try:
        node_cfg = override(
            cfg.node,
            scheduler=scheduler,
            name=name,
            replicas=replicas,
            metrics_port=metrics_port,
        )
    except ConfigError as exc:
        fail(str(exc))
    setup_logging(cfg, log_level, log_format)
    agent = NodeAgent(node_cfg, RealClock())
    try:
        run_daemon(agent.run)
    except (TransportError, MetricsError) as exc:
        fail(str(exc), EXIT_UNAVAILABLE)
