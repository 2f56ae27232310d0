"""`swarmx nodes`: the scheduler's live node table."""

from __future__ import annotations

from rich.console import Console

from swarmx.cli.common import (
    EXIT_UNAVAILABLE,
    ConfigOpt,
    JsonOpt,
    SchedulerOpt,
    fail,
    load,
    print_json,
)
from swarmx.cli.render import nodes_table
from swarmx.clock import RealClock
from swarmx.config import ConfigError, override
from swarmx.protocol import Error, Message, NodesReply, QueryNodes
from swarmx.schema import encode
from swarmx.transport import TransportError, request


def ask(config: ConfigOpt, scheduler: str | None, query: Message) -> Message:
    """One request to the scheduler named by flag, env or config; exits with a clear line if it
    cannot be reached or refuses."""
    cfg = load(config)
    try:
        client = override(cfg.client, scheduler=scheduler)
    except ConfigError as exc:
        fail(str(exc))
    try:
        env = request(client.scheduler, query, "cli", RealClock(), client.timeout_s)
    except (TimeoutError, TransportError) as exc:
        fail(str(exc), EXIT_UNAVAILABLE)
    if isinstance(env.body, Error):
        fail(
            f"scheduler refused {query.TYPE!r}: {env.body.code}: {env.body.message}",
            EXIT_UNAVAILABLE,
        )
    return env.body


def nodes(config: ConfigOpt = None, scheduler: SchedulerOpt = None, json: JsonOpt = False) -> None:
    """List nodes with their state and latest telemetry."""
    reply = ask(config, scheduler, QueryNodes())
    if not isinstance(reply, NodesReply):
        fail(f"unexpected reply {reply.TYPE!r} from the scheduler", EXIT_UNAVAILABLE)
    if json:
        print_json(encode(reply))
    else:
        Console().print(nodes_table(reply))
