"""`swarmx gateway`: the OpenAI-compatible endpoint, a foreground daemon (systemd runs it)."""

from __future__ import annotations

import ssl
from typing import Annotated

import typer

from swarmx.cli.common import (
    EXIT_UNAVAILABLE,
    ConfigOpt,
    KeyOpt,
    LogFormatOpt,
    LogLevelOpt,
    MetricsPortOpt,
    SchedulerKeyOpt,
    SchedulerOpt,
    curve_for,
    fail,
    load,
    setup_logging,
)
from swarmx.clock import RealClock
from swarmx.config import ConfigError, GatewayConfig, check_http_listen, is_loopback, override
from swarmx.daemon.gateway import GatewayDaemon
from swarmx.daemon.lifecycle import run_daemon
from swarmx.gateway.apikeys import ApiKeys, KeyFileError
from swarmx.metrics import MetricsError
from swarmx.security import LOCAL_GATEWAY_KEY, client_curve
from swarmx.transport import TransportError


def gateway(
    listen: Annotated[
        str | None,
        typer.Option(
            "--listen",
            envvar="SWARMX_GATEWAY_LISTEN",
            help="Serve the OpenAI API on http://HOST:PORT [default: http://127.0.0.1:8000, "
            "or the config's [gateway] listen].",
            show_default=False,
        ),
    ] = None,
    scheduler: SchedulerOpt = None,
    api_keys: Annotated[
        str | None,
        typer.Option(
            "--api-keys",
            envvar="SWARMX_API_KEYS",
            help="TOML file of API keys (make them with `swarmx keys api`) [default: [gateway] "
            "api_keys; without: callers on this host only].",
            show_default=False,
        ),
    ] = None,
    tls_cert: Annotated[
        str | None,
        typer.Option("--tls-cert", envvar="SWARMX_TLS_CERT", help="PEM certificate: serve HTTPS."),
    ] = None,
    tls_key: Annotated[
        str | None,
        typer.Option("--tls-key", envvar="SWARMX_TLS_KEY", help="PEM private key of --tls-cert."),
    ] = None,
    key: KeyOpt = None,
    scheduler_key: SchedulerKeyOpt = None,
    insecure: Annotated[
        bool,
        typer.Option(
            "--insecure",
            envvar="SWARMX_INSECURE",
            help="Serve plain HTTP on a non-loopback address: prompts and API keys cross the "
            "network in clear text.",
        ),
    ] = False,
    metrics_port: MetricsPortOpt = None,
    config: ConfigOpt = None,
    log_level: LogLevelOpt = None,
    log_format: LogFormatOpt = None,
) -> None:
    """Serve the OpenAI API (chat, completions, models) in front of the scheduler. Without
    --key or [security] key, it uses the gateway key of a `swarmx up` in SWARMX_STATE_DIR."""
    cfg = load(config)
    try:
        gw = override(
            cfg.gateway,
            listen=listen,
            scheduler=scheduler,
            api_keys=api_keys,
            tls_cert=tls_cert,
            tls_key=tls_key,
            metrics_port=metrics_port,
        )
        security = override(cfg.security, key=key, scheduler_key=scheduler_key)
    except ConfigError as exc:
        fail(str(exc))
    if not gw.tls_cert and not insecure and not _loopback_listen(gw):
        fail(
            f"refusing to serve plain HTTP on {gw.listen}: set --tls-cert and --tls-key "
            "(docs/gateway.md), or pass --insecure"
        )
    try:
        curve = client_curve(security) if security.enabled else curve_for(cfg, LOCAL_GATEWAY_KEY)
        keys = ApiKeys(gw.api_keys) if gw.api_keys else None
    except (TransportError, KeyFileError) as exc:
        fail(str(exc))
    tls = None
    if gw.tls_cert:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            tls.load_cert_chain(gw.tls_cert, gw.tls_key)
        except (OSError, ssl.SSLError) as exc:
            fail(f"--tls-cert/--tls-key: cannot load {gw.tls_cert}: {exc}")
    setup_logging(cfg, log_level, log_format)
    daemon = GatewayDaemon(gw, RealClock(), curve=curve, keys=keys, tls=tls)
    try:
        run_daemon(daemon.run)
    except (TransportError, MetricsError, OSError) as exc:
        fail(str(exc), EXIT_UNAVAILABLE)


def _loopback_listen(gw: GatewayConfig) -> bool:
    host, port = check_http_listen(gw.listen)
    return is_loopback(f"tcp://{host}:{port}")
