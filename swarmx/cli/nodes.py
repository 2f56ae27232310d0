"""`swarmx nodes`: the scheduler's live node table."""

from __future__ import annotations

from rich.console import Console

from swarmx.cli.common import (
    EXIT_UNAVAILABLE,
    ConfigOpt,
    JsonOpt,
    SchedulerOpt,
    ask,
    fail,
    print_json,
)
from swarmx.cli.render import nodes_table
from swarmx.protocol import NodesReply, QueryNodes
from swarmx.schema import encode


def nodes(config: ConfigOpt = None, scheduler: SchedulerOpt = None, json: JsonOpt = False) -> None:
    """List nodes with their state and latest telemetry."""
    reply = ask(config, scheduler, QueryNodes())
    if not isinstance(reply, NodesReply):
        fail(f"unexpected reply {reply.TYPE!r} from the scheduler", EXIT_UNAVAILABLE)
    if json:
        print_json(encode(reply))
    else:
        Console().print(nodes_table(reply))
