"""Options and helpers every command shares, so flags, env vars and errors look the same."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from swarmx import logs
from swarmx.clock import RealClock
from swarmx.config import Config, ConfigError, SchedulerConfig, load_config, override
from swarmx.daemon.scheduler import read_state_file
from swarmx.protocol import Error, Message
from swarmx.security import LOCAL_ADMIN_KEY, client_curve, local_client_curve
from swarmx.transport import ClientCurve, TransportError, request

EXIT_USAGE = 2
"""Bad input: config, flags, workflow files."""
EXIT_UNAVAILABLE = 1
"""The scheduler could not be reached, or a daemon could not start."""
EXIT_BUSY = 3
"""The scheduler is full (or the client over its quota): nothing was accepted; try later."""

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        envvar="SWARMX_CONFIG",
        help="TOML config file.",
        dir_okay=False,
        show_default=False,
    ),
]
SchedulerOpt = Annotated[
    str | None,
    typer.Option(
        "--scheduler",
        envvar="SWARMX_SCHEDULER",
        help="Scheduler address [default: tcp://127.0.0.1:7700, or the config's].",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
KeyOpt = Annotated[
    str | None,
    typer.Option(
        "--key",
        envvar="SWARMX_KEY",
        help="This daemon's secret key file (NAME.key_secret) [default: [security] key].",
        show_default=False,
    ),
]
SchedulerKeyOpt = Annotated[
    str | None,
    typer.Option(
        "--scheduler-key",
        envvar="SWARMX_SCHEDULER_KEY",
        help="The scheduler's public key file [default: [security] scheduler_key].",
        show_default=False,
    ),
]
LogLevelOpt = Annotated[
    str | None,
    typer.Option("--log-level", envvar="SWARMX_LOG_LEVEL", help="debug, info, warning or error."),
]
LogFormatOpt = Annotated[
    str | None,
    typer.Option(
        "--log-format",
        envvar="SWARMX_LOG_FORMAT",
        help="text (for people) or json (one object a line) [default: text, or the config's].",
        show_default=False,
    ),
]
MetricsPortOpt = Annotated[
    int | None,
    typer.Option(
        "--metrics-port",
        envvar="SWARMX_METRICS_PORT",
        help="Serve Prometheus metrics on this port; 0 = off [default: the config's, else off].",
        show_default=False,
    ),
]

ListenOpt = Annotated[
    str | None,
    typer.Option(
        "--listen",
        envvar="SWARMX_LISTEN",
        help="Scheduler address to bind, e.g. tcp://0.0.0.0:7700 [default: tcp://127.0.0.1:7700].",
        show_default=False,
    ),
]
StateDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--state-dir",
        envvar="SWARMX_STATE_DIR",
        help="Where the scheduler keeps its state.",
        file_okay=False,
        show_default=False,
    ),
]

USAGE_ERRORS = {"invalid_workflow", "not_found", "finished", "invalid_model", "forbidden"}
"""Refusals caused by what the user asked for: exit 2, like other bad input."""
BUSY_ERRORS = {"overloaded", "quota_exceeded"}
"""Refusals that say: nothing was accepted, the same request may succeed later (exit 3)."""

err_console = Console(stderr=True)


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """One line on stderr, then exit; never a traceback for bad input."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def load(path: Path | None) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        fail(str(exc))


def scheduler_settings(
    cfg: Config, listen: str | None, state_dir: Path | None, metrics_port: int | None = None
) -> SchedulerConfig:
    """The config's [scheduler] section with --listen / --state-dir / --metrics-port applied
    (exit 2 if bad)."""
    try:
        return override(
            cfg.scheduler,
            listen=listen,
            state_dir=str(state_dir) if state_dir else None,
            metrics_port=metrics_port,
        )
    except ConfigError as exc:
        fail(str(exc))


def setup_logging(cfg: Config, level: str | None, fmt: str | None) -> None:
    """Flags over the config's [log] section; one line and exit 2 for a bad value."""
    try:
        logs.setup_logging((level or cfg.log.level).lower(), (fmt or cfg.log.format).lower())
    except ValueError as exc:
        fail(str(exc))


def curve_for(cfg: Config, local_key: str = LOCAL_ADMIN_KEY) -> ClientCurve | None:
    """The keys this client connects with: the config's ``[security]``, else those of a
    `swarmx up` cluster in the state directory (``SWARMX_STATE_DIR``, or the config's; its
    ``local_key``), else none. Exits 2 naming the file if a key cannot be read."""
    try:
        curve = client_curve(cfg.security)
        if curve is not None:
            return curve
        state_dir = Path(os.environ.get("SWARMX_STATE_DIR") or cfg.scheduler.state_dir)
        state = read_state_file(state_dir) or {}
        return local_client_curve(state_dir, str(state.get("public_key") or ""), local_key)
    except TransportError as exc:
        fail(str(exc))


class AskFailed(Exception):
    """A request that got no usable answer: the line to print and the exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code

    @property
    def retryable(self) -> bool:
        """Unanswered or refused as busy: the same request may succeed later."""
        return self.code in (EXIT_UNAVAILABLE, EXIT_BUSY)


def try_ask(
    config: ConfigOpt, scheduler: str | None, query: Message, *, min_timeout_s: float = 0.0
) -> Message:
    """One request to the scheduler named by flag, env or config; raises `AskFailed` if it
    cannot be reached or refuses. ``min_timeout_s``: for requests whose answer takes a while."""
    cfg = load(config)
    try:
        client = override(cfg.client, scheduler=scheduler)
    except ConfigError as exc:
        fail(str(exc))
    try:
        timeout_s = max(client.timeout_s, min_timeout_s)
        env = request(client.scheduler, query, "cli", RealClock(), timeout_s, curve=curve_for(cfg))
    except (TimeoutError, TransportError) as exc:
        raise AskFailed(str(exc), EXIT_UNAVAILABLE) from None
    if isinstance(env.body, Error):
        if env.body.code in USAGE_ERRORS:
            raise AskFailed(env.body.message, EXIT_USAGE)
        if env.body.code in BUSY_ERRORS:
            raise AskFailed(env.body.message, EXIT_BUSY)
        raise AskFailed(
            f"scheduler refused {query.TYPE!r}: {env.body.code}: {env.body.message}",
            EXIT_UNAVAILABLE,
        )
    return env.body


def ask(
    config: ConfigOpt, scheduler: str | None, query: Message, *, min_timeout_s: float = 0.0
) -> Message:
    """`try_ask`, exiting with its line and code when it fails."""
    try:
        return try_ask(config, scheduler, query, min_timeout_s=min_timeout_s)
    except AskFailed as exc:
        fail(str(exc), exc.code)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")
