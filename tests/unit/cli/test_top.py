"""`swarmx top`'s frames from hand-made snapshots: what an operator sees at 80x24 and with 200
nodes, keys, and the one-shot modes' errors."""

from __future__ import annotations

import io
import socket

import msgspec
import pytest
from rich.console import Console
from typer.testing import CliRunner

from swarmx.cli.main import app
from swarmx.cli.topview import (
    PANES,
    Screen,
    View,
    body_rows,
    clamp,
    pane_rows,
    parse_keys,
    render,
)
from swarmx.protocol import (
    DecisionView,
    GpuInfo,
    GpuSample,
    Hello,
    HostSample,
    ModelStats,
    NodeView,
    ReplicaInfo,
    ReplicaPool,
    ReplicaRuntime,
    ReplicaStats,
    Telemetry,
    TopReply,
    WorkflowBrief,
    WorkflowSummary,
)
from tests.unit.test_protocol import PREDICTOR, TOP

GIB = 1 << 30


def gpu(i: int, util: float) -> GpuSample:
    return GpuSample(
        i,
        "NVIDIA H100 80GB HBM3",
        f"GPU-{i}",
        util,
        10.0,
        61 * GIB,
        80 * GIB,
        412.0,
        700.0,
        67.0,
        1980,
    )


def node(i: int, gpus: int, state: str = "live", cpu: float = 45.0) -> NodeView:
    name = f"gpu-node-{i:03d}"
    hello = Hello(
        name,
        "host",
        100 + i,
        "0.1.0",
        64,
        32,
        512 * GIB,
        [GpuInfo(g, "NVIDIA H100", f"GPU-{g}", 80 * GIB) for g in range(gpus)],
        [ReplicaInfo(f"{name}/llama-8b#0", "llama-8b", "openai", "gpu", 32)],
        1.0,
        1.0,
        0.0,
    )
    host = HostSample(
        cpu, [cpu] * 4, 1.0, 1.0, 1.0, 512 * GIB, 200 * GIB, 300 * GIB, 0, 0, 0, 0, 0, 0
    )
    runtime = [ReplicaRuntime(f"{name}/llama-8b#0", "llama-8b", 2, 30, 900, 3)]
    tel = Telemetry(host, [gpu(g, 50.0 + g) for g in range(gpus)], runtime, 0.003)
    return NodeView(name, state, 1000.0, 0.4, 10.0, 99, hello, tel)  # type: ignore[arg-type]


def replica(n: NodeView, actual95: float, pred95: float) -> ReplicaStats:
    return ReplicaStats(
        replica=f"{n.name}/llama-8b#0",
        node=n.name,
        model="llama-8b",
        device="gpu",
        concurrency=32,
        state="serving",
        outstanding=31,
        queued=2,
        inflight=30,
        completed=900,
        failed=3,
        calls=200,
        actual_s={"0.5": 1.2, "0.95": actual95},
        pred_s={"0.5": 1.3, "0.95": pred95},
        covered={"0.5": 0.52, "0.95": 0.93},
        prefix_hit=0.61 if n.name.endswith("2") else None,
        prefix_hit_est=0.4,
    )


def cluster(nodes: int, gpus: int = 2) -> TopReply:
    views = [node(i, gpus, "down" if i == 1 else "live", cpu=float(i % 100)) for i in range(nodes)]
    running = [
        WorkflowBrief(
            f"wf-run{i:04d}",
            "research",
            "running",
            900.0 + i,
            100.0 - i,
            120.0,
            20.0 - i,
            i % 5,
            5,
            3,
        )
        for i in range(30)
    ]
    done = [
        WorkflowBrief("wf-done0001", "codegen", "succeeded", 800.0, 42.5, 60.0, None, None, None)
    ]
    decisions = [
        DecisionView(
            999.0, "scale", "llama-8b", "4 -> 6", "tail: 12 waiting", {"0.5": 1.3, "0.95": 7.0}
        ),
        DecisionView(
            998.5,
            "route",
            "llama-8b",
            "gpu-node-003/llama-8b#0",
            "wf-run0003:plan:0:1",
            {"0.5": 1.25, "0.95": 6.5},
            {"0.5": 2.0, "0.95": 9.0},
        ),
    ]
    return msgspec.structs.replace(
        TOP,
        ts=1000.0,
        nodes=views,
        models=[ModelStats("llama-8b", nodes, 12, 200, {}, {}, {})],
        replicas=[replica(n, 5.0 + n.hello.pid % 3, 6.0) for n in views],
        workflows=[*running, *done],
        summary=WorkflowSummary(30, 1234, 300.0, 60, 50, 47, 30.0, 80.5, 110.2),
        predictor=PREDICTOR,
        decisions=decisions,
    )


def frame(reply: TopReply | None, view: View, width: int, height: int | None, **screen) -> str:
    console = Console(
        width=width, height=height or 1000, record=True, color_system=None, file=io.StringIO()
    )
    console.print(render(Screen("tcp://10.0.0.5:7700", reply, **screen), view, height))
    return console.export_text()


def check_fits(text: str, width: int, height: int) -> list[str]:
    lines = text.rstrip("\n").split("\n")
    assert len(lines) == height, text
    assert max(len(line) for line in lines) <= width, text
    return lines


def test_a_small_cluster_fits_80x24_on_every_pane():
    reply = cluster(3, gpus=1)
    seen = {}
    for pane in range(len(PANES)):
        seen[PANES[pane]] = text = frame(reply, View(pane=pane), 80, 24)
        lines = check_fits(text, 80, 24)
        assert (
            lines[0]
            == "SwarmX ● live  tcp://10.0.0.5:7700  up 0m05s  router tail · scaler tail  v0.1.0"
        )
        assert "nodes 2 up · 0 stale · 1 down" in text
        assert "replicas llama-8b 3" in text and "waiting llama-8b 12" in text
        assert "30 running · 1234 finished" in text
        assert "SLO 94.0% of 50 · p95 80.5s p99 1m50s" in text
        assert "predictor v1 (trained) · 0.9 coverage 0.88" in text
        assert lines[-1].startswith("q quit")
    assert "gpu-node-000 live" in seen["nodes"]
    assert "gpu-node-001 down" in seen["nodes"]
    assert "0 H100 50% 61/80G 412W 67C" in seen["nodes"]
    replicas = seen["replicas"]
    assert "P50  PRED   P95  PRED COV95  HIT" in replicas
    assert "llama-8b gpu-node-002 0 2 30/32 1.20s 1.30s 5.00s 6.00s   93%  61%" in replicas
    assert "llama-8b gpu-node-001 0 2 30/32 1.20s 1.30s 7.00s 6.00s   93%  40%" in replicas
    workflows = seen["workflows"]
    assert "wf-run0000  research running" in workflows
    assert "rows 1-" in workflows  # 31 workflows do not fit: paged
    decisions = seen["decisions"]
    assert "scale llama-8b 4 -> 6" in decisions
    assert "route llama-8b gpu-node-003#0 1.25s 6.50s  9.00s wf-run0003:plan:0:1" in decisions


def test_200_nodes_page_through_every_node_and_gpu():
    reply = cluster(200, gpus=2)
    view = View()
    total = pane_rows(Screen("x", reply), view)
    assert total == 400  # a line per node, and one for its second GPU
    room = body_rows(Screen("x", reply), view, 24)
    names: set[str] = set()
    offsets = []
    while True:
        view = clamp(Screen("x", reply), view, 24)
        lines = check_fits(frame(reply, view, 80, 24), 80, 24)
        names |= {line.split()[0] for line in lines if line.startswith("gpu-node-")}
        offsets.append(view.offset)
        if view.offset + room >= total:
            break
        view = view.press("pgdn", room)
    assert names == {f"gpu-node-{i:03d}" for i in range(200)}
    assert offsets == sorted(set(offsets))  # each page moves on
    assert f"rows {total - room + 1}-{total} of {total}" in lines[-1]
    end = clamp(Screen("x", reply), View().press("end", room), 24)
    assert end.offset == total - room
    assert end.press("home", room).offset == 0


def test_sort_cycles_per_pane_and_orders_rows():
    reply = cluster(12, gpus=1)
    by_cpu = View().press("s", 10)
    assert by_cpu.sort == "cpu"
    lines = frame(reply, by_cpu, 100, 24).splitlines()
    rows = [line.split()[0] for line in lines if line.startswith("gpu-node-")]
    assert rows[:3] == ["gpu-node-011", "gpu-node-010", "gpu-node-009"]  # busiest first
    by_state = View(sorts=(4, 0, 0, 0))
    lines = frame(reply, by_state, 100, 24).splitlines()
    rows = [line.split()[0] for line in lines if line.startswith("gpu-node-")]
    assert rows[:2] == ["gpu-node-001", "gpu-node-000"]  # the down node first
    slack = View(pane=2).press("s", 10)
    assert slack.sort == "slack"
    text = frame(reply, slack, 100, 24)
    first = next(line for line in text.splitlines() if line.startswith("wf-"))
    assert first.startswith("wf-run0029")  # least slack (most negative) first
    assert View(pane=2).press("s", 1).press("s", 1).press("s", 1).sort == "age"  # wraps


def test_keys_switch_panes_pause_and_quit():
    view = View()
    assert view.press("tab", 10).pane == 1
    assert view.press("btab", 10).pane == len(PANES) - 1
    assert view.press("3", 10).pane == 2
    assert view.press("9", 10) == view
    assert view.press("²", 10) == view  # a digit to str.isdigit, not a pane
    assert view.press("down", 10).press("down", 10).press("up", 10).offset == 1
    assert view.press("up", 10).offset == 0
    assert view.press("down", 10).press("tab", 10).offset == 0  # a new pane starts at the top
    paused = view.press("p", 10)
    assert paused.paused and not paused.press("p", 10).paused
    assert view.press("q", 10) is None


def test_terminal_bytes_become_key_names():
    assert parse_keys(b"q") == ["q"]
    assert parse_keys(b"\t2s") == ["\t", "2", "s"]
    assert parse_keys(b"\x1b[A\x1b[B\x1b[5~\x1b[6~\x1bOH\x1b[F\x1b[Z") == [
        "up",
        "down",
        "pgup",
        "pgdn",
        "home",
        "end",
        "btab",
    ]
    assert parse_keys(b"\x1b[15~p") == ["p"]  # F5: unknown, skipped whole
    assert parse_keys(b"\x1b") == []
    assert View().press(parse_keys(b"\t")[0], 10).pane == 1


def test_pause_and_a_lost_scheduler_are_shown():
    reply = cluster(2, gpus=1)
    paused = frame(reply, View(paused=True), 80, 24)
    assert paused.splitlines()[0].startswith("SwarmX ❚❚ paused")
    lost = frame(
        reply, View(), 80, 24, error="no scheduler answered at tcp://10.0.0.5:7700", age_s=12.0
    )
    lines = check_fits(lost, 80, 24)
    assert lines[0].startswith("SwarmX ✖ disconnected, retrying")
    assert lines[1] == "data 12.0s old · no scheduler answered at tcp://10.0.0.5:7700"
    assert "gpu-node-001" in lost  # the last data stays on screen
    never = frame(None, View(), 80, 24, error="no scheduler answered")
    assert "waiting for the scheduler" in never
    assert check_fits(never, 80, 24)[:2] == [
        "SwarmX ✖ disconnected, retrying  tcp://10.0.0.5:7700",
        "no scheduler answered",
    ]
    first = check_fits(frame(None, View(), 80, 24), 80, 24)
    assert first[0] == "SwarmX … connecting  tcp://10.0.0.5:7700"


def test_once_frame_shows_every_pane_in_full():
    text = frame(cluster(40, gpus=1), View(), 80, None)
    for title in ("Nodes", "Replicas", "Workflows", "Decisions"):
        assert f"\n{title}\n" in text
    assert all(f"gpu-node-{i:03d}" in text for i in range(40))
    assert "wf-done0001 codegen  succeeded" in text
    assert max(len(line) for line in text.splitlines()) <= 80


def test_once_without_a_scheduler_exits_1_on_one_line(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp_path / "c.toml"
    cfg.write_text("[client]\ntimeout_s = 0.3\n")
    for extra in (["--once"], ["--json"]):
        result = CliRunner().invoke(
            app, ["top", *extra, "--config", str(cfg), "--scheduler", f"tcp://127.0.0.1:{port}"]
        )
        assert result.exit_code == 1
        assert result.stderr.strip().splitlines() == [
            f"error: no scheduler answered at tcp://127.0.0.1:{port} within 0.3 s"
        ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "swarmx top needs a terminal; use --once or --json in scripts"),
        (["--interval", "0"], "--interval: must be > 0, got 0"),
        (["--scheduler", "tcp://h"], "--scheduler: expected tcp://HOST:PORT"),
    ],
)
def test_bad_use_exits_2_on_one_line(args, message):
    result = CliRunner().invoke(app, ["top", *args])
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {message}")


def test_a_gateway_session_shows_its_calls_so_far_not_a_fraction() -> None:
    session = WorkflowBrief(
        "ses-0a1b2c3d4e5f", "agent-7", "running", 990.0, 10.0, 30.0, 20.0, 4, None, 1
    )
    reply = msgspec.structs.replace(cluster(1, gpus=1), workflows=[session])
    text = frame(reply, View(pane=PANES.index("workflows")), 100, 24)
    assert "ses-0a1b2c3d4e5f agent-7 running" in " ".join(text.split())
    assert "4 calls" in text


def test_the_header_shows_the_warm_up_of_each_model_live_nodes_can_scale() -> None:
    reply = cluster(3, gpus=1)
    assert "warm-up" not in frame(reply, View(), 80, 24)  # no node can scale anything
    pools = [
        ReplicaPool("llama-8b", "openai", "gpu", 32, 1, 4, 1),
        ReplicaPool("qwen-3b", "openai", "gpu", 8, 0, 2, 0),
    ]
    nodes = [
        msgspec.structs.replace(n, hello=msgspec.structs.replace(n.hello, pools=pools))
        if n.state == "live"
        else n
        for n in reply.nodes
    ]
    down_only = ReplicaPool("mistral-7b", "openai", "gpu", 8, 0, 2, 0)
    nodes[1] = msgspec.structs.replace(
        nodes[1], hello=msgspec.structs.replace(nodes[1].hello, pools=[down_only])
    )
    models = [
        ModelStats("llama-8b", 3, 12, 200, {}, {}, {}, warmup_p90_s=42.0),
        ModelStats("mistral-7b", 0, 0, 0, {}, {}, {}, warmup_p90_s=75.0),
        ModelStats("qwen-3b", 0, 0, 0, {}, {}, {}, engine_restarts=2),
        ModelStats("tool", 2, 0, 9, {}, {}, {}),
    ]
    scaled = msgspec.structs.replace(reply, nodes=nodes, models=models)
    for pane in range(len(PANES)):
        lines = check_fits(frame(scaled, View(pane=pane), 80, 24), 80, 24)
        assert lines[1].startswith("nodes 2 up")
        assert (
            lines[2] == "warm-up p90 llama-8b 42.0s · qwen-3b - (2 restarts)"
        )  # mistral: on a down node
    assert "warm-up p90 llama-8b 42.0s · qwen-3b - (2 restarts)" in frame(scaled, View(), 80, None)
