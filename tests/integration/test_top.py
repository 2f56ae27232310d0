"""`swarmx top` against a live `swarmx up`: driven in a real terminal (tmux) and read off the
screen, through a lost and recovered scheduler; and its one-shot ``--once`` and ``--json``."""

from __future__ import annotations

import json
import shlex
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest

from tests.integration.conftest import wait_for
from tests.integration.test_up import start_up
from tests.integration.test_workflows import FAN

pytestmark = pytest.mark.integration


def finished_workflow(procs, endpoint: str) -> str:
    wf = procs.tmp / "fan.toml"
    wf.write_text(FAN)
    out = procs.cli("submit", str(wf), "--wait", "--json", "--scheduler", endpoint)
    view = json.loads(out.stdout)
    assert view["state"] == "succeeded"
    return view["id"]


class Tmux:
    """A private tmux server (its own socket), killed when the test ends."""

    def __init__(self) -> None:
        self.socket = f"swarmx-test-{uuid.uuid4().hex[:12]}"

    def __call__(self, *args: str) -> str:
        out = subprocess.run(
            ["tmux", "-u", "-L", self.socket, *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return out.stdout

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "top")

    def wait_screen(self, *texts: str, timeout_s: float = 20.0) -> str:
        return wait_for(
            lambda: (s := self.screen()) and all(t in s for t in texts) and s,
            timeout_s=timeout_s,
            what=f"{texts} on screen",
        )

    def kill(self) -> None:
        """Stop the server and remove its socket file (tmux leaves it behind)."""
        where = subprocess.run(
            ["tmux", "-L", self.socket, "display-message", "-p", "#{socket_path}"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, check=False)
        if where:
            Path(where).unlink(missing_ok=True)


@pytest.fixture
def tmux():
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed: the live view needs a real terminal to drive")
    server = Tmux()
    yield server
    server.kill()


def test_top_live_in_a_terminal(procs, tmux):
    up, endpoint, children = start_up(procs)
    wf_id = finished_workflow(procs, endpoint)
    top = [sys.executable, "-m", "swarmx", "top", "--scheduler", endpoint]
    command = (
        f"{shlex.join([*top, '--config', str(procs.config)])} 2>{procs.tmp / 'top.err'}; "
        'echo "top exited $?"; sleep 60'
    )
    tmux("new-session", "-d", "-s", "top", "-x", "100", "-y", "30", command)

    screen = tmux.wait_screen("● live", "node-1", "node-2", "sort: name")
    lines = screen.splitlines()
    assert lines[0].startswith(f"SwarmX ● live  {endpoint}")
    assert "nodes 2 up · 0 stale · 0 down   replicas lm " in screen
    assert "1 finished" in screen and "SLO 100% of 1" in screen
    assert any(line.startswith("node-1") and " live " in line for line in lines)

    tmux("send-keys", "-t", "top", "2")
    screen = tmux.wait_screen("sort: model", "P95  PRED COV95")
    lm_rows = [line.split() for line in screen.splitlines() if line.startswith("lm ")]
    assert {row[1] for row in lm_rows} == {"node-1", "node-2"}  # (the scaler may add one)
    tmux("send-keys", "-t", "top", "s")
    tmux.wait_screen("sort: queue")

    tmux("send-keys", "-t", "top", "Tab")
    screen = tmux.wait_screen("sort: age", wf_id)
    row = next(line for line in screen.splitlines() if line.startswith(wf_id))
    assert row.split()[1:3] == ["fan", "succeeded"]

    tmux("send-keys", "-t", "top", "4")
    screen = tmux.wait_screen("sort: newest", f"{wf_id}:join:0:1")
    assert "route" in screen

    tmux("send-keys", "-t", "top", "p")
    tmux.wait_screen("❚❚ paused")
    tmux("send-keys", "-t", "top", "p")
    tmux.wait_screen("● live")

    scheduler = next(c for c in children if "scheduler" in c.cmdline())
    scheduler.send_signal(signal.SIGSTOP)
    try:
        screen = tmux.wait_screen(
            "✖ disconnected, retrying", f"no scheduler answered at {endpoint}"
        )
        assert f"{wf_id}:join:0:1" in screen  # the last data stays up
    finally:
        scheduler.send_signal(signal.SIGCONT)
    tmux.wait_screen("● live")

    tmux("send-keys", "-t", "top", "q")
    tmux.wait_screen("top exited 0")
    assert (procs.tmp / "top.err").read_text() == ""
    up.send_signal(signal.SIGTERM)
    assert up.wait(timeout=30) == 0
    _, alive = psutil.wait_procs(children, timeout=5)
    assert alive == []


def test_top_once_and_json(procs):
    up, endpoint, _ = start_up(procs)
    wf_id = finished_workflow(procs, endpoint)

    text = procs.cli("top", "--once", "--scheduler", endpoint).stdout
    lines = text.splitlines()
    assert lines[0].startswith(f"SwarmX ● live  {endpoint}")
    for title in ("Nodes", "Replicas", "Workflows", "Decisions"):
        assert title in lines
    nodes = lines[lines.index("Nodes") + 1 : lines.index("Replicas")]
    assert {line.split()[0] for line in nodes[1:] if line} == {"node-1", "node-2"}
    replicas = lines[lines.index("Replicas") + 1 : lines.index("Workflows")]
    assert {tuple(line.split()[:2]) for line in replicas[1:] if line} == {
        ("lm", "node-1"),
        ("lm", "node-2"),
        ("tool", "node-1"),
        ("tool", "node-2"),
    }
    workflows = lines[lines.index("Workflows") + 1 : lines.index("Decisions")]
    assert any(line.split()[:3] == [wf_id, "fan", "succeeded"] for line in workflows)
    decisions = lines[lines.index("Decisions") + 1 :]
    assert any(f"{wf_id}:write:" in line and " route " in line for line in decisions)

    snap = json.loads(procs.cli("top", "--json", "--scheduler", endpoint).stdout)
    assert {n["name"] for n in snap["nodes"]} == {"node-1", "node-2"}
    assert snap["scheduler"]["endpoint"] == endpoint
    assert {(r["model"], r["state"]) for r in snap["replicas"]} == {
        ("lm", "serving"),
        ("tool", "serving"),
    }
    lm_calls = sum(r["calls"] for r in snap["replicas"] if r["model"] == "lm")
    assert lm_calls == 3  # FAN writes about three items
    [done] = [w for w in snap["workflows"] if w["id"] == wf_id]
    assert done["state"] == "succeeded" and done["age_s"] < done["slo_s"]
    assert snap["summary"]["finished"] == 1
    assert snap["summary"]["window_slo_met"] == 1
    routes = [d for d in snap["decisions"] if d["kind"] == "route"]
    assert len(routes) == 5  # plan, three writes, join
    assert all(set(d["pred_s"]) == {"0.5", "0.9", "0.95", "0.99"} for d in routes)
    assert snap["predictor"]["kind"] == "fallback"
    up.send_signal(signal.SIGTERM)
    assert up.wait(timeout=30) == 0
