"""The frames of `swarmx top`, as pure functions: a snapshot (`Screen`) and the operator's choices
(`View`) in, a Rich renderable out; key presses in, a new `View` out. No I/O and no clock, so
unit tests render hand-made snapshots at 80x24 or with 200 nodes (docs/top.md).

A live frame is exactly ``height`` lines: a header (scheduler, cluster, workflows, predictor),
a tab line, the active pane paged to fit, and a key line. ``height=None`` (``--once``) prints the
header and every pane in full.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Group, JustifyMethod, RenderableType
from rich.table import Table
from rich.text import Text

from swarmx.cli.render import gib, gpu_label
from swarmx.protocol import (
    DecisionView,
    GpuSample,
    NodeView,
    ReplicaStats,
    TopReply,
    WorkflowBrief,
)

PANES = ("nodes", "replicas", "workflows", "decisions")
TITLES = ("Nodes", "Replicas", "Workflows", "Decisions")
SORTS: dict[str, tuple[str, ...]] = {
    "nodes": ("name", "cpu", "memory", "gpu", "state"),
    "replicas": ("model", "queue", "running", "p95"),
    "workflows": ("age", "slack", "progress"),
    "decisions": ("newest", "model"),
}
KEYS_HELP = "q quit  tab/1-4 pane  s sort  p pause  ↑↓ PgUp PgDn scroll"
_STATE_STYLE = {"live": "green", "stale": "yellow", "down": "red"}
_WF_STYLE = {"running": "cyan", "succeeded": "green", "failed": "red", "cancelled": "yellow"}
_ESCAPES = {
    b"\x1b[A": "up",
    b"\x1bOA": "up",
    b"\x1b[B": "down",
    b"\x1bOB": "down",
    b"\x1b[5~": "pgup",
    b"\x1b[6~": "pgdn",
    b"\x1b[H": "home",
    b"\x1bOH": "home",
    b"\x1b[1~": "home",
    b"\x1b[F": "end",
    b"\x1bOF": "end",
    b"\x1b[4~": "end",
    b"\x1b[Z": "btab",
}
_PANE_KEYS = [str(i + 1) for i in range(len(PANES))]
_ALIASES = {"\t": "tab", "j": "down", "k": "up", " ": "pgdn", "g": "home", "G": "end"}


@dataclass(frozen=True)
class Screen:
    """What `swarmx top` has to show: the latest snapshot, or why there is no fresh one."""

    endpoint: str
    reply: TopReply | None
    error: str = ""
    """Why the last query failed (the scheduler is unreachable); empty when it answered."""
    age_s: float = 0.0
    """How old ``reply`` is (it is the last good one while ``error`` is set)."""


@dataclass(frozen=True)
class View:
    """The operator's choices: the pane, each pane's sort, the scroll position, pause."""

    pane: int = 0
    sorts: tuple[int, ...] = (0,) * len(PANES)
    offset: int = 0
    paused: bool = False

    @property
    def sort(self) -> str:
        name = PANES[self.pane]
        return SORTS[name][self.sorts[self.pane]]

    def press(self, key: str, page: int) -> View | None:
        """The view after ``key``; None means quit. ``page``: rows a page scroll moves."""
        key = _ALIASES.get(key, key)
        if key in ("q", "Q"):
            return None
        if key in ("tab", "btab"):
            step = 1 if key == "tab" else -1
            return dataclasses.replace(self, pane=(self.pane + step) % len(PANES), offset=0)
        if key in _PANE_KEYS:
            return dataclasses.replace(self, pane=_PANE_KEYS.index(key), offset=0)
        if key == "s":
            sorts = list(self.sorts)
            sorts[self.pane] = (sorts[self.pane] + 1) % len(SORTS[PANES[self.pane]])
            return dataclasses.replace(self, sorts=tuple(sorts), offset=0)
        if key == "p":
            return dataclasses.replace(self, paused=not self.paused)
        moves = {"up": -1, "down": 1, "pgup": -page, "pgdn": page}
        if key in moves:
            return dataclasses.replace(self, offset=max(0, self.offset + moves[key]))
        if key == "home":
            return dataclasses.replace(self, offset=0)
        if key == "end":
            return dataclasses.replace(self, offset=1 << 30)  # clamped to the last page
        return self


def parse_keys(data: bytes) -> list[str]:
    """Key names in what a terminal in cbreak mode sent: characters as themselves, arrows and
    page keys as ``up``/``down``/``pgup``/``pgdn``/``home``/``end``, tab and shift-tab."""
    keys: list[str] = []
    i = 0
    while i < len(data):
        for seq, name in _ESCAPES.items():
            if data.startswith(seq, i):
                keys.append(name)
                i += len(seq)
                break
        else:
            char = data[i : i + 1]
            if char != b"\x1b":  # a lone or unknown escape sequence is ignored
                keys.append(char.decode("latin-1"))
            elif data[i + 1 : i + 2] == b"[":  # skip the rest of an unknown CSI sequence
                end = i + 2
                while end < len(data) and not 0x40 <= data[end] <= 0x7E:
                    end += 1
                i = end
            i += 1
    return keys


# --- formatting ---------------------------------------------------------------------------------


def _secs(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    sign, v = ("-" if value < 0 else ""), abs(value)
    if v < 10:
        return f"{sign}{v:.2f}s"
    if v < 100:
        return f"{sign}{v:.1f}s"
    if v < 3600:
        return f"{sign}{v // 60:.0f}m{v % 60:02.0f}s"
    return f"{sign}{v // 3600:.0f}h{v % 3600 // 60:02.0f}m"


def _uptime(seconds: float) -> str:
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s"


def _level_style(frac: float) -> str:
    return "red" if frac >= 0.9 else "yellow" if frac >= 0.7 else "green"


def bar(frac: float | None, width: int = 6) -> Text:
    """A horizontal bar of ``frac`` (0..1) in ``width`` cells, coloured by level."""
    if frac is None:
        return Text("·" * width, style="dim")
    frac = min(max(frac, 0.0), 1.0)
    filled = round(frac * width)
    return Text.assemble(
        ("█" * filled, _level_style(frac)), ("░" * (width - filled), "bright_black")
    )


def _bar_pct(frac: float | None, width: int = 6) -> Text:
    label = "   -" if frac is None else f"{frac * 100:4.0f}%"
    return Text.assemble(bar(frac, width), label)


def _gpu(g: GpuSample) -> Text:
    util = None if g.util_percent is None else g.util_percent / 100
    return Text(gpu_label(g), style=_level_style(util) if util else "")


def _line(*parts: str | tuple[str, str] | Text) -> Text:
    """One line that never wraps: cut with an ellipsis at the screen's edge."""
    text = Text.assemble(*parts)
    text.no_wrap = True
    text.overflow = "ellipsis"
    return text


def _quant(values: dict[str, float] | None, level: str) -> float | None:
    return None if not values else values.get(level)


# --- header -------------------------------------------------------------------------------------


def header(screen: Screen, view: View) -> list[Text]:
    """Scheduler and uptime; nodes; replicas by model; the measured warm-up of the models the
    nodes can scale (the scaler's lead time); workflows, SLO and tail latency; the predictor. A
    lost connection or a pause is said on the first line."""
    reply = screen.reply
    status: tuple[str, str]
    if screen.error:
        status = (" ✖ disconnected, retrying", "bold red")
    elif view.paused:
        status = (" ❚❚ paused", "bold yellow")
    elif reply is None:
        status = (" … connecting", "yellow")
    else:
        status = (" ● live", "green")
    lines: list[Text] = []
    if reply is None:
        lines.append(_line(("SwarmX", "bold"), status, f"  {screen.endpoint}"))
    else:
        info = reply.scheduler
        lines.append(
            _line(
                ("SwarmX", "bold"),
                status,
                f"  {screen.endpoint}  up {_uptime(info.uptime_s)}",
                f"  router {reply.router} · scaler {reply.scaler}  v{info.version}",
            )
        )
    if screen.error:
        since = f"data {_secs(screen.age_s)} old · " if reply is not None else ""
        lines.append(_line((f"{since}{screen.error}", "red")))
    if reply is None:
        return lines
    states = {s: sum(n.state == s for n in reply.nodes) for s in ("live", "stale", "down")}
    models = " · ".join(f"{m.model} {m.replicas}" for m in reply.models) or "none"
    waiting = " · ".join(f"{m.model} {m.queued}" for m in reply.models if m.queued)
    lines.append(
        _line(
            ("nodes ", "bold"),
            (f"{states['live']} up", "green"),
            " · ",
            (f"{states['stale']} stale", "yellow" if states["stale"] else ""),
            " · ",
            (f"{states['down']} down", "red" if states["down"] else ""),
            ("   replicas ", "bold"),
            models,
            *((("   waiting ", "bold"), waiting) if waiting else ()),
        )
    )
    scalable = {p.model for n in reply.nodes if n.state == "live" for p in n.hello.pools}
    warmups = [
        f"{m.model} {_secs(m.warmup_p90_s)}"
        + (
            f" ({m.engine_restarts} restart{'s' * (m.engine_restarts != 1)})"
            if m.engine_restarts
            else ""
        )
        for m in reply.models
        if m.model in scalable
    ]
    if warmups:
        lines.append(_line(("warm-up p90 ", "bold"), " · ".join(warmups)))
    s = reply.summary
    attainment: tuple[str, str] = ("-", "")
    if s.window_slo_total:
        frac = s.window_slo_met / s.window_slo_total
        style = "green" if frac >= 0.99 else "yellow" if frac >= 0.9 else "red"
        pct = f"{frac * 100:.0f}" if frac in (0.0, 1.0) else f"{frac * 100:.1f}"
        attainment = (f"{pct}% of {s.window_slo_total}", style)
    lines.append(
        _line(
            ("workflows ", "bold"),
            f"{s.running} running · {s.finished} finished",
            (f"   {s.window_s / 60:g}m: ", "bold"),
            "SLO ",
            attainment,
            f" · p95 {_secs(s.latency_p95_s)} p99 {_secs(s.latency_p99_s)}",
        )
    )
    p = reply.predictor
    cov = p.recent_coverage.get("0.9")
    lines.append(
        _line(
            ("predictor ", "bold"),
            (p.version, "cyan"),
            (f" ({p.kind})", "green" if p.kind == "trained" else "yellow"),
            " · 0.9 coverage ",
            "-" if cov is None else f"{cov:.2f}",
            f" · {p.calls_seen} calls · {p.swaps} swaps",
            " · training" if p.training else "",
        )
    )
    return lines


def _tabs(view: View) -> Text:
    parts: list[str | tuple[str, str]] = []
    for i, title in enumerate(TITLES):
        parts.append((f" {i + 1} {title} ", "reverse bold" if i == view.pane else "dim"))
        parts.append(" ")
    parts.append((f" sort: {view.sort}", "dim"))
    return _line(*parts)


# --- panes --------------------------------------------------------------------------------------

Row = list[str | Text]
"""One table line (a node's GPUs beyond the first take a line each)."""


@dataclass(frozen=True)
class Col:
    """A pane's column. Narrow screens shrink columns towards ``min_width`` (text beyond is cut
    with an ellipsis, never wrapped: a row is one line); a ``flex`` column takes whatever width
    the others leave, so long free text (a scale decision's reason) cannot crowd them out."""

    header: str
    justify: JustifyMethod = "left"
    min_width: int = 0
    max_width: int | None = None
    flex: bool = False


@dataclass(frozen=True)
class _Pane:
    columns: list[Col]
    rows: list[Row]


def _node_key(sort: str) -> Callable[[NodeView], Any]:
    def cpu(n: NodeView) -> float:
        return n.telemetry.host.cpu_percent if n.telemetry else -1.0

    def memory(n: NodeView) -> float:
        host = n.telemetry.host if n.telemetry else None
        return host.mem_used_bytes / host.mem_total_bytes if host and host.mem_total_bytes else -1

    def gpu(n: NodeView) -> float:
        gpus = n.telemetry.gpus if n.telemetry else []
        return max((g.util_percent or 0.0 for g in gpus), default=-1.0)

    order = {"down": 0, "stale": 1, "live": 2}
    return {
        "name": lambda n: (n.name,),
        "cpu": lambda n: (-cpu(n), n.name),
        "memory": lambda n: (-memory(n), n.name),
        "gpu": lambda n: (-gpu(n), n.name),
        "state": lambda n: (order[n.state], n.name),
    }[sort]


def nodes_pane(reply: TopReply, sort: str) -> _Pane:
    rows: list[Row] = []
    for n in sorted(reply.nodes, key=_node_key(sort)):
        tel = n.telemetry
        host = tel.host if tel else None
        cpu = host.cpu_percent / 100 if host else None
        mem = host.mem_used_bytes / host.mem_total_bytes if host and host.mem_total_bytes else None
        mem_label = f" {gib(host.mem_used_bytes)}/{gib(host.mem_total_bytes)}G" if host else ""
        gpus = [_gpu(g) for g in tel.gpus] if tel else []
        first: Row = [
            n.name,
            Text(n.state, style=_STATE_STYLE[n.state]),
            _bar_pct(cpu),
            Text.assemble(bar(mem), mem_label),
            gpus[0] if gpus else Text("no GPU" if tel else "-", style="dim"),
        ]
        rows.append(first)
        rows.extend(["", "", "", "", g] for g in gpus[1:])
    return _Pane(
        [
            Col("NODE", min_width=6, max_width=24),
            Col("STATE", min_width=5),
            Col("CPU", min_width=11),
            Col("MEMORY", min_width=10),
            Col("GPUs: util mem power temp", min_width=10, flex=True),
        ],
        rows,
    )


def _replica_key(sort: str) -> Callable[[ReplicaStats], Any]:
    return {
        "model": lambda r: (r.model, r.replica),
        "queue": lambda r: (-(r.queued or 0), r.replica),
        "running": lambda r: (-(r.inflight if r.inflight is not None else r.outstanding),),
        "p95": lambda r: (-(_quant(r.actual_s, "0.95") or -1.0), r.replica),
    }[sort]


def _vs(actual: float | None, pred: float | None) -> tuple[Text, Text]:
    """Actual and predicted side by side; the actual in red where it exceeds the prediction."""
    late = actual is not None and pred is not None and actual > pred
    return Text(_secs(actual), style="red" if late else ""), Text(_secs(pred), style="cyan")


def replicas_pane(reply: TopReply, sort: str) -> _Pane:
    rows: list[Row] = []
    for r in sorted(reply.replicas, key=_replica_key(sort)):
        style = "" if r.state == "serving" else "yellow" if r.state == "draining" else "red"
        index = r.replica.rpartition("#")[2] if "#" in r.replica else ""
        running = r.inflight if r.inflight is not None else r.outstanding
        cov = _quant(r.covered, "0.95")
        rows.append(
            [
                Text(r.model, style=style),
                Text(r.node, style=style),
                index,
                "-" if r.queued is None else str(r.queued),
                f"{running}/{r.concurrency}",
                *_vs(_quant(r.actual_s, "0.5"), _quant(r.pred_s, "0.5")),
                *_vs(_quant(r.actual_s, "0.95"), _quant(r.pred_s, "0.95")),
                "-" if cov is None else f"{cov * 100:.0f}%",
                _hit(r),
            ]
        )
    return _Pane(
        [
            Col("MODEL", min_width=6, max_width=24),
            Col("NODE", min_width=6, max_width=24),
            Col("#", "right", 1),
            Col("Q", "right", 1),
            Col("RUN", "right", 4),
            Col("P50", "right", 5),
            Col("PRED", "right", 5),
            Col("P95", "right", 5),
            Col("PRED", "right", 5),
            Col("COV95", "right", 5),
            Col("HIT", "right", 4),
        ],
        rows,
    )


def _hit(r: ReplicaStats) -> Text:
    """The prefix-cache hit rate the engine reported, else (dim) what the index expected."""
    if r.prefix_hit is not None:
        return Text(f"{r.prefix_hit * 100:.0f}%")
    if r.prefix_hit_est is not None:
        return Text(f"{r.prefix_hit_est * 100:.0f}%", style="dim")
    return Text("-")


def _workflow_key(sort: str) -> Callable[[WorkflowBrief], Any]:
    def progress(w: WorkflowBrief) -> float:
        return (w.steps_done or 0) / w.steps_total if w.steps_total else 0.0

    return {
        "age": lambda w: (-w.age_s, w.id),
        "slack": lambda w: (w.slack_s is None, w.slack_s or 0.0, w.id),
        "progress": lambda w: (progress(w), w.id),
    }[sort]


def workflows_pane(reply: TopReply, sort: str) -> _Pane:
    running = sorted((w for w in reply.workflows if w.state == "running"), key=_workflow_key(sort))
    done = [w for w in reply.workflows if w.state != "running"]
    rows: list[Row] = []
    for w in [*running, *done]:
        if w.state == "running" and w.steps_total:
            frac = (w.steps_done or 0) / w.steps_total
            progress: str | Text = Text.assemble(bar(frac, 5), f" {w.steps_done}/{w.steps_total}")
        elif w.state == "running" and w.steps_done is not None:  # a gateway session: no end known
            progress = f"{w.steps_done} calls"
        else:
            progress = "-"
        slack: str | Text = "-"
        if w.slack_s is not None:
            slack = Text(_secs(w.slack_s), style="red" if w.slack_s < 0 else "green")
        late = w.slo_s is not None and w.state != "running" and w.age_s > w.slo_s
        rows.append(
            [
                w.id,
                w.name,
                Text(w.state, style=_WF_STYLE.get(w.state, "")),
                Text(_secs(w.age_s), style="red" if late else ""),
                slack,
                progress,
                _secs(w.slo_s),
            ]
        )
    return _Pane(
        [
            Col("WORKFLOW", min_width=11),
            Col("NAME", min_width=4, max_width=20),
            Col("STATE", min_width=9),
            Col("AGE/TOOK", "right", 6),
            Col("SLACK", "right", 6),
            Col("PROGRESS", min_width=9),
            Col("SLO", "right", 5),
        ],
        rows,
    )


def decisions_pane(reply: TopReply, sort: str) -> _Pane:
    decisions: Sequence[DecisionView] = reply.decisions
    if sort == "model":
        decisions = sorted(decisions, key=lambda d: (d.model, -d.ts))
    rows: list[Row] = [
        [
            _secs(max(0.0, reply.ts - d.ts)),
            Text(d.kind, style="magenta" if d.kind == "scale" else "blue"),
            d.model,
            d.target.replace(f"/{d.model}", "") if d.kind == "route" else d.target,
            Text(_secs(_quant(d.pred_s, "0.5")), style="cyan"),
            Text(_secs(_quant(d.pred_s, "0.95")), style="cyan"),
            _secs(_quant(d.completion_s, "0.95")),
            d.detail,
        ]
        for d in decisions
    ]
    return _Pane(
        [
            Col("AGO", "right", 5),
            Col("KIND", min_width=5),
            Col("MODEL", min_width=6, max_width=24),
            Col("TARGET", min_width=8, max_width=24),
            Col("P50", "right", 5),
            Col("P95", "right", 5),
            Col("DONE95", "right", 6),
            Col("CALL / REASON", min_width=8, flex=True),
        ],
        rows,
    )


_PANE_BUILDERS: dict[str, Callable[[TopReply, str], _Pane]] = {
    "nodes": nodes_pane,
    "replicas": replicas_pane,
    "workflows": workflows_pane,
    "decisions": decisions_pane,
}
_EMPTY = {
    "nodes": "no nodes registered",
    "replicas": "no replicas",
    "workflows": "no workflows yet",
    "decisions": "no decisions yet",
}


def _table(pane: _Pane, rows: Sequence[Row]) -> Table:
    table = Table(
        box=None,
        padding=(0, 1, 0, 0),
        header_style="bold",
        show_edge=False,
        expand=any(c.flex for c in pane.columns),
    )
    for c in pane.columns:
        table.add_column(
            c.header,
            justify=c.justify,
            no_wrap=True,
            overflow="ellipsis",
            min_width=c.min_width,
            max_width=c.max_width,
            ratio=1 if c.flex else None,
        )
    for row in rows:
        table.add_row(*row)
    return table


# --- frames -------------------------------------------------------------------------------------


def body_rows(screen: Screen, view: View, height: int) -> int:
    """Table rows the active pane has room for in a ``height``-line frame."""
    return max(1, height - len(header(screen, view)) - 3)  # tabs, table header, key line


def pane_rows(screen: Screen, view: View) -> int:
    if screen.reply is None:
        return 0
    name = PANES[view.pane]
    return len(_PANE_BUILDERS[name](screen.reply, view.sort).rows)


def clamp(screen: Screen, view: View, height: int) -> View:
    """``view`` with its scroll offset within the active pane's last page."""
    most = max(0, pane_rows(screen, view) - body_rows(screen, view, height))
    return view if view.offset <= most else dataclasses.replace(view, offset=most)


def render(screen: Screen, view: View, height: int | None = None) -> RenderableType:
    """One frame: ``height`` lines with the active pane paged to fit, or (``None``) the header
    and every pane in full."""
    lines: list[RenderableType] = [*header(screen, view)]
    reply = screen.reply
    if height is None:
        for i, name in enumerate(PANES):
            lines.append(Text(""))
            lines.append(_line((TITLES[i], "bold underline")))
            if reply is None:
                continue
            pane = _PANE_BUILDERS[name](reply, SORTS[name][view.sorts[i]])
            lines.append(_table(pane, pane.rows) if pane.rows else Text(_EMPTY[name], "dim"))
        return Group(*lines)
    room = body_rows(screen, view, height)
    lines.append(_tabs(view))
    name = PANES[view.pane]
    if reply is None:
        lines.append(Text("waiting for the scheduler...", style="dim"))
        footer = ""
        shown = 1
    else:
        pane = _PANE_BUILDERS[name](reply, view.sort)
        start = min(view.offset, max(0, len(pane.rows) - room))
        page = pane.rows[start : start + room]
        if page:
            lines.append(_table(pane, page))
            shown = len(page) + 1
        else:
            lines.append(Text(_EMPTY[name], style="dim"))
            shown = 1
        footer = (
            f"  rows {start + 1}-{start + len(page)} of {len(pane.rows)}"
            if len(pane.rows) > room
            else ""
        )
    lines.extend(Text("") for _ in range(room + 1 - shown))
    lines.append(_line((KEYS_HELP, "dim"), (footer, "bold")))
    return Group(*lines)
