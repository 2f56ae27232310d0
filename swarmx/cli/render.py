"""Pure renderers: protocol objects in, Rich renderables out (tested on a fixed-size console)."""

from __future__ import annotations

import collections

from rich.table import Table
from rich.text import Text

from swarmx.protocol import GpuSample, NodesReply, NodeView, WorkflowView

GIB = 1024**3
_STATE_STYLE = {"live": "green", "stale": "yellow", "down": "red"}


def gib(n: int | None) -> str:
    """Bytes in GiB, to a tenth below 10 GiB and whole above (the unit is the caller's)."""
    return "?" if n is None else f"{n / GIB:.0f}" if n >= 10 * GIB else f"{n / GIB:.1f}"


def _age(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def gpu_label(g: GpuSample) -> str:
    """One GPU on one line, as `swarmx nodes` and `swarmx top` both show it: index, model, use,
    memory, and power and temperature where known."""
    name = g.name.removeprefix("NVIDIA ").split()[0] if g.name else "GPU"
    parts = [
        f"{g.index} {name[:8]}",
        "?%" if g.util_percent is None else f"{g.util_percent:.0f}%",
        f"{gib(g.mem_used_bytes)}/{gib(g.mem_total_bytes)}G",
        "" if g.power_w is None else f"{g.power_w:.0f}W",
        "" if g.temperature_c is None else f"{g.temperature_c:.0f}C",
    ]
    return " ".join(p for p in parts if p)


def _gpus(node: NodeView) -> str:
    if node.telemetry is not None and node.telemetry.gpus:
        return "\n".join(gpu_label(g) for g in node.telemetry.gpus)
    if node.hello.gpus:
        return "\n".join(f"{g.index}:{g.name.removeprefix('NVIDIA ')}" for g in node.hello.gpus)
    return "-"


def nodes_table(reply: NodesReply) -> Table:
    n = len(reply.nodes)
    table = Table(
        title=f"{n} node{'' if n == 1 else 's'} @ {reply.scheduler.endpoint}",
        title_justify="left",
        expand=False,
    )
    for header, justify in (
        ("NODE", "left"),
        ("STATE", "left"),
        ("LAST SEEN", "right"),
        ("CPU", "right"),
        ("MEMORY GiB", "right"),
        ("GPUs (util, mem GiB)", "left"),
    ):
        table.add_column(header, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    replicas = [f"{n.name}: {_replicas(n)}" for n in reply.nodes]
    if replicas:  # under the table, where a narrow terminal wraps it rather than the figures
        table.caption = "replicas  " + " · ".join(replicas)
        table.caption_justify = "left"
    for node in reply.nodes:
        cores = node.hello.cpu_cores_logical
        tel = node.telemetry
        cpu = f"{tel.host.cpu_percent:.0f}%/{cores}c" if tel else f"-/{cores}c"
        mem = (
            f"{gib(tel.host.mem_used_bytes)}/{gib(tel.host.mem_total_bytes)}"
            if tel
            else f"-/{gib(node.hello.mem_total_bytes)}"
        )
        table.add_row(
            node.name,
            Text(node.state, style=_STATE_STYLE[node.state]),
            _age(node.last_seen_age_s),
            cpu,
            mem,
            _gpus(node),
        )
    return table


def _replicas(node: NodeView) -> str:
    """Serving replicas per model (the node's tool slots aside), with their engines' restarts:
    ``qwen 2 (1 restart)``."""
    serving = collections.Counter(
        r.model for r in node.hello.replicas if not r.draining and r.backend != "tool"
    )
    restarts = collections.Counter[str]()
    for pool in node.hello.pools:
        restarts[pool.model] += pool.restarts
    parts = []
    for model in sorted(set(serving) | {m for m, n in restarts.items() if n}):
        n = restarts[model]
        parts.append(f"{model} {serving[model]}" + (f" ({n} restart{'s' * (n != 1)})" if n else ""))
    return ", ".join(parts) or "-"


_WF_STYLE = {
    "running": "cyan",
    "succeeded": "green",
    "failed": "red",
    "cancelled": "yellow",
    "waiting": "dim",
    "skipped": "dim",
}


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s"


def workflow_table(view: WorkflowView) -> Table:
    slo = f", SLO {view.slo_s:g}s" if view.slo_s else ""
    took = f" in {view.latency_s:.2f}s" if view.latency_s is not None else ""
    table = Table(
        title=f"{view.id} {view.name}: {view.state}{took}{slo}"
        + (f"\n{view.reason}" if view.reason else ""),
        title_justify="left",
    )
    for header in ("STEP", "STATE", "TRY", "REPLICA", "QUEUE", "LATENCY", "TOKENS"):
        table.add_column(header, no_wrap=header != "REPLICA")
    for step in view.steps:
        table.add_row(
            step.id,
            Text(step.state, style=_WF_STYLE.get(step.state, "")),
            str(step.attempt or "-"),
            step.replica or "-",
            _s(step.queue_s),
            _s(step.latency_s),
            "-" if step.output_tokens is None else str(step.output_tokens),
        )
    return table


def workflows_table(views: list[WorkflowView]) -> Table:
    table = Table(title=f"{len(views)} most recent workflows", title_justify="left")
    for header in ("ID", "NAME", "STATE", "STEPS DONE", "LATENCY", "SLO"):
        table.add_column(header, no_wrap=True)
    for v in views:
        done = sum(s.state == "succeeded" for s in v.steps)
        table.add_row(
            v.id,
            v.name,
            Text(v.state, style=_WF_STYLE.get(v.state, "")),
            f"{done}/{len(v.steps)}",
            _s(v.latency_s),
            _s(v.slo_s),
        )
    return table
