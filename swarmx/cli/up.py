"""`swarmx up`: a whole local cluster in the foreground, until Ctrl-C or SIGTERM."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from swarmx.cli.common import (
    EXIT_UNAVAILABLE,
    ConfigOpt,
    ListenOpt,
    LogFormatOpt,
    LogLevelOpt,
    StateDirOpt,
    fail,
    load,
    scheduler_settings,
    setup_logging,
)
from swarmx.cli.render import nodes_table
from swarmx.clock import RealClock
from swarmx.config import REPLICA_PRESETS, default_state_dir
from swarmx.daemon.local import POLL_S, ClusterError, LocalCluster, connectable


def up(
    nodes: Annotated[
        int, typer.Option("--nodes", "-n", min=1, max=64, help="Node agents to start.")
    ] = 2,
    listen: ListenOpt = None,
    state_dir: StateDirOpt = None,
    preset: Annotated[
        str,
        typer.Option(
            help="Replicas each node serves when the config declares none: local "
            "(tiny torch LM + vision model) or none (tools only)."
        ),
    ] = "local",
    metrics_port: Annotated[
        int | None,
        typer.Option(
            "--metrics-port",
            envvar="SWARMX_METRICS_PORT",
            help="Serve Prometheus metrics: the scheduler on this port, node-i on this port + i "
            "[default: the config's [scheduler] metrics_port, else off].",
            show_default=False,
        ),
    ] = None,
    gateway_port: Annotated[
        int | None,
        typer.Option(
            "--gateway-port",
            min=1,
            max=65535,
            help="Also serve the OpenAI API on http://127.0.0.1:PORT/v1 (callers on this host "
            "only).",
            show_default=False,
        ),
    ] = None,
    config: ConfigOpt = None,
    log_level: LogLevelOpt = "warning",
    log_format: LogFormatOpt = None,
) -> None:
    """Start a scheduler and N node agents (and a gateway) on this host; stop them all on Ctrl-C
    or SIGTERM."""
    cfg = load(config)
    sched = scheduler_settings(cfg, listen, state_dir, metrics_port)
    if sched.metrics_port and sched.metrics_port + nodes > 65535:
        fail(f"--metrics-port: {sched.metrics_port} + {nodes} nodes runs past port 65535")
    if preset not in REPLICA_PRESETS:
        fail(f"--preset: unknown preset {preset!r} (known: {', '.join(REPLICA_PRESETS)})")
    setup_logging(cfg, log_level, log_format)
    console = Console()
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if stop.is_set():  # second signal: stop() is already running; kill instead of waiting
            for pid in cluster.pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            raise SystemExit(130)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    cluster = LocalCluster(
        nodes,
        sched.listen,
        Path(sched.state_dir),
        RealClock(),
        config=config,
        log_level=log_level,
        log_format=log_format,
        preset=preset,
        metrics_port=sched.metrics_port,
        gateway_port=gateway_port,
    )
    try:
        with console.status(f"starting scheduler and {nodes} nodes..."):
            endpoint = cluster.start()
        reply = cluster.query_nodes()
        if reply is not None:
            console.print(nodes_table(reply))
        hint = "" if endpoint == connectable("tcp://127.0.0.1:7700") else f" --scheduler {endpoint}"
        env = (
            "" if sched.state_dir == default_state_dir() else f"SWARMX_STATE_DIR={sched.state_dir} "
        )
        console.print(
            f"[green]SwarmX local cluster up[/] at {endpoint} with {nodes} nodes "
            f"(CURVE keys in {sched.state_dir}/keys). "
            f"Try [bold]{escape(env)}swarmx top{hint}[/]. Ctrl-C stops it.",
            highlight=False,
        )
        if cluster.gateway_url:
            console.print(
                f"OpenAI API: [bold]{cluster.gateway_url}/v1[/] "
                f'(OpenAI(base_url="{cluster.gateway_url}/v1", api_key="none"))',
                highlight=False,
            )
        if sched.metrics_port:
            port = sched.metrics_port
            console.print(
                f"metrics: http://{sched.metrics_addr}:{port}/metrics (scheduler), "
                f"http://{cfg.node.metrics_addr}:{port + 1}..{port + nodes}/metrics "
                f"(node-1..node-{nodes})",
                highlight=False,
            )
        while not stop.is_set():
            cluster.supervise_once()
            time.sleep(POLL_S)
    except ClusterError as exc:
        fail(str(exc), EXIT_UNAVAILABLE)
    finally:
        cluster.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
    console.print("local cluster stopped")
