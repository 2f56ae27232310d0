"""`swarmx up`: a whole local cluster from one command, and nothing left behind when it stops."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from swarmx.daemon.scheduler import read_state_file
from tests.integration.conftest import free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


def start_up(procs, nodes=2, *extra):
    state = procs.tmp / "up-state"
    up = procs.spawn(
        "up",
        "--nodes",
        str(nodes),
        "--listen",
        "tcp://127.0.0.1:0",
        "--state-dir",
        str(state),
        *extra,
        log="up",
    )
    endpoint = wait_for(
        lambda: (s := read_state_file(state)) and s["endpoint"], what="scheduler endpoint"
    )
    names = {f"node-{i}" for i in range(1, nodes + 1)}
    wait_for(
        lambda: {n for n, v in procs.nodes(endpoint).items() if v["state"] == "live"} == names,
        what=f"{nodes} live nodes",
    )
    wait_for(lambda: "local cluster up" in procs.log("up"), what="the ready message")
    children = psutil.Process(up.pid).children(recursive=True)
    daemons = [c for c in children if "swarmx.backends.reaper" not in " ".join(c.cmdline())]
    gateways = 1 if "--gateway-port" in extra else 0
    assert len(daemons) == nodes + 1 + gateways  # and each node's tool reaper (reliability.md)
    return up, endpoint, children


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_up_serves_nodes_and_stops_everything(procs, sig):
    up, endpoint, children = start_up(procs)
    assert "node-1" in procs.log("up")  # it printed the node table
    up.send_signal(sig)
    assert up.wait(timeout=20) == 0
    _gone, alive = psutil.wait_procs(children, timeout=5)
    assert alive == []
    assert "local cluster stopped" in procs.log("up")
    assert procs.nodes(endpoint) == {}


def test_children_die_with_a_killed_supervisor(procs):
    up, _, children = start_up(procs, nodes=1)
    up.kill()  # no chance to clean up: the kernel's parent-death signal must do it
    up.wait()
    _, alive = psutil.wait_procs(children, timeout=10)
    assert alive == []


def test_a_crashed_node_is_restarted(procs):
    up, endpoint, children = start_up(procs, nodes=1)
    node = next(c for c in children if "node" in c.cmdline())
    node.kill()
    wait_for(lambda: "node-1 exited with code -9; restarting" in procs.log("up"), what="restart")
    wait_for(
        lambda: (
            (n := procs.nodes(endpoint).get("node-1"))
            and n["hello"]["pid"] != node.pid
            and n["state"] == "live"
        ),
        what="the restarted node registered",
    )
    up.send_signal(signal.SIGTERM)
    assert up.wait(timeout=20) == 0


def test_up_serves_the_openai_api_and_the_example_agent_runs(procs):
    port = free_port()
    up, endpoint, children = start_up(procs, 1, "--gateway-port", str(port))
    url = f"http://127.0.0.1:{port}/v1"
    assert url in procs.log("up")
    model = ["--model", "lm"]  # the tests' config serves the emulated "lm" on every node
    agent = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "agent.py"),
            "--base-url",
            url,
            "--turns",
            "2",
            *model,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert agent.returncode == 0, agent.stderr
    assert "turn 1: tool count_words ->" in agent.stdout
    session = agent.stdout.split()[1]
    rows = [
        json.loads(line)
        for line in procs.cli(
            "traces", "export", "--out", "-", "--scheduler", endpoint
        ).stdout.splitlines()
    ]
    assert [r["turn"] for r in rows if r["session"] == session] == [0, 1, 2]
    up.send_signal(signal.SIGTERM)
    assert up.wait(timeout=20) == 0
    _, alive = psutil.wait_procs(children, timeout=5)
    assert alive == []
