"""`swarmx scheduler start` and `swarmx node start`: foreground daemons (systemd runs these)."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from swarmx.cli.common import (
    EXIT_UNAVAILABLE,
    ConfigOpt,
    KeyOpt,
    ListenOpt,
    LogFormatOpt,
    LogLevelOpt,
    MetricsPortOpt,
    SchedulerKeyOpt,
    SchedulerOpt,
    StateDirOpt,
    fail,
    load,
    scheduler_settings,
    setup_logging,
)
from swarmx.clock import RealClock
from swarmx.config import (
    REPLICA_PRESETS,
    ConfigError,
    NodeConfig,
    SchedulerConfig,
    is_loopback,
    load_config,
    override,
)
from swarmx.daemon.lifecycle import run_daemon
from swarmx.daemon.node import NodeAgent
from swarmx.daemon.scheduler import SchedulerDaemon, StateDirBusy
from swarmx.metrics import MetricsError
from swarmx.security import client_curve
from swarmx.store import StoreError
from swarmx.transport import TransportError

log = logging.getLogger(__name__)

scheduler_app = typer.Typer(help="The central scheduler daemon.", no_args_is_help=True)
node_app = typer.Typer(help="The per-node agent.", no_args_is_help=True)


@scheduler_app.command("start")
def scheduler_start(
    config: ConfigOpt = None,
    listen: ListenOpt = None,
    state_dir: StateDirOpt = None,
    metrics_port: MetricsPortOpt = None,
    key: KeyOpt = None,
    authorized_keys: Annotated[
        str | None,
        typer.Option(
            "--authorized-keys",
            envvar="SWARMX_AUTHORIZED_KEYS",
            help="Directory of nodes/, clients/ and admins/ public keys "
            "[default: [security] authorized_keys].",
            show_default=False,
        ),
    ] = None,
    insecure: Annotated[
        bool,
        typer.Option(
            "--insecure",
            envvar="SWARMX_INSECURE",
            help="Listen on a non-loopback address without keys: anyone who reaches the port "
            "can run tool commands on every node.",
        ),
    ] = False,
    log_level: LogLevelOpt = None,
    log_format: LogFormatOpt = None,
) -> None:
    """Run the scheduler in the foreground until SIGTERM or Ctrl-C."""
    cfg = load(config)
    sched = scheduler_settings(cfg, listen, state_dir, metrics_port)
    try:
        security = override(cfg.security, key=key, authorized_keys=authorized_keys)
    except ConfigError as exc:
        fail(str(exc))
    if not security.enabled and not insecure and not is_loopback(sched.listen):
        fail(
            f"refusing to listen on {sched.listen} without keys: make them with "
            "`swarmx keys generate` and set [security] (docs/security.md), or pass --insecure"
        )
    setup_logging(cfg, log_level, log_format)
    daemon = SchedulerDaemon(
        sched,
        RealClock(),
        predictor=cfg.predictor,
        router=cfg.router,
        scaler=cfg.scaler,
        security=security,
    )

    def reread() -> SchedulerConfig | None:
        """The config file again, with this command's flags (None if it is bad now)."""
        try:
            fresh = load_config(config)
            return override(
                fresh.scheduler,
                listen=listen,
                state_dir=str(state_dir) if state_dir else None,
                metrics_port=metrics_port,
            )
        except ConfigError as exc:
            log.error("SIGHUP: %s; the running settings stay", exc)
            return None

    try:
        run_daemon(daemon.run, on_hangup=lambda: daemon.reload(reread()))
    except (TransportError, StateDirBusy, StoreError, OSError) as exc:
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
    key: KeyOpt = None,
    scheduler_key: SchedulerKeyOpt = None,
    tool_commands: Annotated[
        str | None,
        typer.Option(
            "--tool-commands",
            envvar="SWARMX_TOOL_COMMANDS",
            help="Comma-separated executables tool steps may run here; * for any "
            "[default: [node] tool_commands, else none].",
            show_default=False,
        ),
    ] = None,
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
            tool_commands=None
            if tool_commands is None
            else [c.strip() for c in tool_commands.split(",") if c.strip()],
        )
        security = override(cfg.security, key=key, scheduler_key=scheduler_key)
    except ConfigError as exc:
        fail(str(exc))
    try:
        curve = client_curve(security)
    except TransportError as exc:
        fail(str(exc))
    setup_logging(cfg, log_level, log_format)
    agent = NodeAgent(node_cfg, RealClock(), curve=curve)

    def reread() -> NodeConfig | None:
        """The config file again, with this command's flags (None if it is bad now)."""
        try:
            fresh = load_config(config)
            return override(
                fresh.node,
                scheduler=scheduler,
                name=name,
                replicas=replicas,
                metrics_port=metrics_port,
                tool_commands=node_cfg.tool_commands if tool_commands is not None else None,
            )
        except ConfigError as exc:
            log.error("SIGHUP: %s; the running settings stay", exc)
            return None

    try:
        run_daemon(agent.run, on_hangup=lambda: agent.reload(reread()))
    except (TransportError, MetricsError) as exc:
        fail(str(exc), EXIT_UNAVAILABLE)
