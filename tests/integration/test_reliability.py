"""Nothing lost, nothing run twice (docs/reliability.md): real scheduler and node processes whose
tool calls record every start and every completion in a file, under SIGKILL, SIGSTOP, SIGTERM,
SIGHUP, a scheduler that stops answering, and a full scheduler."""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import zmq
from msgspec.structs import replace

from swarmx.protocol import encode_frame
from tests.integration.conftest import FAST_CONFIG, wait_for
from tests.unit.test_protocol import HELLO, TELEMETRY

pytestmark = pytest.mark.integration

TOOL = """
import os, sys, time
log, seconds = sys.argv[1], float(sys.argv[2])
call = os.environ["SWARMX_CALL_ID"]
with open(log, "a") as f:
    f.write(f"start {call} {os.getpid()}\\n")
time.sleep(seconds)
with open(log, "a") as f:
    f.write(f"done {call}\\n")
print("ok")
"""


class Effects:
    """The tool's own record of what ran: the ground truth of "at most once"."""

    def __init__(self, procs) -> None:
        self.path = procs.tmp / "effects.log"
        self.path.touch()
        self.script = procs.tmp / "tool.py"
        self.script.write_text(TOOL)

    def lines(self, kind: str) -> list[str]:
        return [
            line.split()[1]
            for line in self.path.read_text().splitlines()
            if line.startswith(kind + " ")
        ]

    def workflow(self, procs, seconds: float, name: str = "slow") -> str:
        path = procs.tmp / f"{name}.toml"
        path.write_text(
            textwrap.dedent(
                f"""
                name = "{name}"
                [[steps]]
                id = "work"
                kind = "tool"
                command = ["{sys.executable}", "{self.script}", "{self.path}", "{seconds}"]
                """
            )
        )
        return str(path)


def configure(procs, scheduler: dict[str, object] | None = None, **node: object) -> None:
    """The test cluster's config with keys set in ``[scheduler]`` and ``[node]``."""
    text = FAST_CONFIG
    for section, keys in (("scheduler", scheduler or {}), ("node", node)):
        for key, value in keys.items():
            text = re.sub(rf"(?m)^{key} = .*\n", "", text)
            text = text.replace(f"[{section}]\n", f"[{section}]\n{key} = {_toml(value)}\n", 1)
    procs.config.write_text(text)


def _toml(value: object) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


def start(procs, names=("alpha", "beta"), listen="tcp://127.0.0.1:0"):
    sched, endpoint = procs.scheduler(listen=listen)
    nodes = {name: procs.node(endpoint, name) for name in names}
    wait_for(
        lambda: {n for n, v in procs.nodes(endpoint).items() if v["state"] == "live"} == set(names),
        what="the nodes",
    )
    return sched, endpoint, nodes


def submit(procs, endpoint, path, *args, check=True):
    out = procs.cli("submit", path, "--scheduler", endpoint, *args, check=False)
    if check:
        assert out.returncode == 0, out.stderr + out.stdout
    return out


def view(procs, endpoint, wf_id):
    out = procs.cli("status", wf_id, "--json", "--scheduler", endpoint, check=False)
    return json.loads(out.stdout) if out.returncode == 0 else {}


def finished(procs, endpoint, wf_id, timeout_s=40.0):
    return wait_for(
        lambda: (v := view(procs, endpoint, wf_id)).get("state") not in (None, "running") and v,
        timeout_s=timeout_s,
        what=f"workflow {wf_id} to finish",
    )


def node_of(procs, endpoint, wf_id):
    steps = view(procs, endpoint, wf_id).get("steps") or [{}]
    return steps[0].get("node") or None


def scheduler_info(procs, endpoint):
    out = procs.cli("nodes", "--json", "--scheduler", endpoint)
    return json.loads(out.stdout)["scheduler"]


def tool_running(procs, effects: Effects, seconds: float):
    """Two nodes, one workflow whose tool call has started: (endpoint, nodes, workflow id, the
    node running the call)."""
    _, endpoint, nodes = start(procs)
    wf_id = submit(procs, endpoint, effects.workflow(procs, seconds)).stdout.strip()
    wait_for(lambda: effects.lines("start"), what="the tool to start")
    victim = wait_for(lambda: node_of(procs, endpoint, wf_id), what="the call's node")
    return endpoint, nodes, wf_id, victim


def test_a_node_killed_mid_tool_call_runs_the_tool_once(procs):
    configure(procs)
    effects = Effects(procs)
    endpoint, nodes, wf_id, victim = tool_running(procs, effects, 4)
    nodes[victim].send_signal(signal.SIGKILL)  # its tools are orphans now, unless reaped
    nodes[victim].wait()

    assert finished(procs, endpoint, wf_id)["state"] == "succeeded"
    time.sleep(1.0)  # past the first attempt's own end, had it survived
    starts, dones = effects.lines("start"), effects.lines("done")
    assert len(starts) == 2 and starts[0].endswith(":1") and starts[1].endswith(":2")
    assert dones == [starts[1]], "the killed node's tool must not complete"
    out = procs.cli("traces", "export", "--out", "-", "--scheduler", endpoint).stdout
    attempts = [json.loads(line) for line in out.splitlines()]
    assert [(t["attempt"], t["ok"], t["node"]) for t in attempts] == [
        (1, False, victim),
        (2, True, next(n for n in nodes if n != victim)),
    ]
    assert "down" in attempts[0]["error"]


def test_a_scheduler_killed_and_restarted_adopts_the_calls_in_flight(procs):
    configure(procs)
    effects = Effects(procs)
    sched, endpoint, _ = start(procs)
    path = effects.workflow(procs, 3)
    ids = [submit(procs, endpoint, path).stdout.strip() for _ in range(2)]
    wait_for(lambda: len(effects.lines("start")) == 2, what="both tools to start")
    sched.send_signal(signal.SIGKILL)
    sched.wait()
    procs.scheduler(listen=endpoint)

    for wf_id in ids:
        assert finished(procs, endpoint, wf_id)["state"] == "succeeded"
    assert sorted(effects.lines("start")) == sorted(effects.lines("done"))
    assert len(effects.lines("start")) == 2, "a call in flight ran again after the restart"
    assert procs.log("scheduler").count("adopted") >= 2


def test_a_frozen_node_is_fenced_and_its_tool_stopped(procs):
    configure(procs)
    effects = Effects(procs)
    endpoint, nodes, wf_id, victim = tool_running(procs, effects, 4)
    nodes[victim].send_signal(signal.SIGSTOP)
    try:
        wait_for(lambda: len(effects.lines("start")) == 2, what="the call to run elsewhere")
        assert finished(procs, endpoint, wf_id)["state"] == "succeeded"
    finally:
        nodes[victim].send_signal(signal.SIGCONT)
    wait_for(
        lambda: procs.nodes(endpoint).get(victim, {}).get("state") == "live",
        what="the frozen node to come back",
    )
    time.sleep(1.0)
    starts, dones = effects.lines("start"), effects.lines("done")
    assert dones == [starts[1]], "the frozen node's tool must have been stopped (its lease)"
    assert "lease" in procs.log(victim)


def test_sigterm_hands_running_calls_back_at_once_and_exits_0(procs):
    # heartbeats 1 s and down after 10 missed: re-running on a timeout would take 10 s
    configure(procs, heartbeat_interval_s=1.0, drain_timeout_s=0.5)
    effects = Effects(procs)
    endpoint, nodes, wf_id, victim = tool_running(procs, effects, 5)
    sent = time.monotonic()
    nodes[victim].send_signal(signal.SIGTERM)
    wait_for(lambda: len(effects.lines("start")) == 2, timeout_s=8, what="the call elsewhere")
    rerouted_s = time.monotonic() - sent
    assert nodes[victim].wait(timeout=10) == 0
    assert rerouted_s < 5.0, f"re-routed after {rerouted_s:.1f}s, not at once"
    assert finished(procs, endpoint, wf_id)["state"] == "succeeded"
    assert effects.lines("done") == [effects.lines("start")[1]]
    assert victim not in procs.nodes(endpoint), "a node that left is gone, not down"
    assert "left the cluster" in procs.log("scheduler")


def test_sighup_reloads_what_it_can_and_keeps_the_daemons(procs):
    configure(procs)
    sched, endpoint, nodes = start(procs, names=("alpha",))
    configure(procs, {"max_queued_workflows": 7}, labels={"zone": "b"})
    nodes["alpha"].send_signal(signal.SIGHUP)
    sched.send_signal(signal.SIGHUP)
    wait_for(
        lambda: procs.nodes(endpoint)["alpha"]["hello"]["labels"] == {"zone": "b"},
        what="the new labels",
    )
    wait_for(lambda: "applied max_queued_workflows" in procs.log("scheduler"), what="reload")
    assert nodes["alpha"].poll() is None and sched.poll() is None
    assert "applied labels" in procs.log("alpha")

    procs.config.write_text("[scheduler\n")  # a broken file: both keep what they run with
    nodes["alpha"].send_signal(signal.SIGHUP)
    sched.send_signal(signal.SIGHUP)
    for name in ("alpha", "scheduler"):
        wait_for(lambda n=name: "the running settings stay" in procs.log(n), what="refusal")
    assert nodes["alpha"].poll() is None and sched.poll() is None


def test_a_retried_submit_returns_the_same_workflow(procs):
    configure(procs)
    effects = Effects(procs)
    sched, endpoint, _ = start(procs, names=("alpha",))
    path = effects.workflow(procs, 0.1)
    sched.send_signal(signal.SIGSTOP)  # busy, not down: requests wait unanswered
    lines: list[str] = []
    try:
        with subprocess.Popen(
            [sys.executable, "-m", "swarmx", "submit", path, "--retry", "--idempotency-key",
             "k-1", "--scheduler", endpoint, "--config", str(procs.config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ) as retrying:  # fmt: skip
            assert retrying.stdout is not None and retrying.stderr is not None
            errors = retrying.stderr
            reader = threading.Thread(target=lambda: lines.extend(errors), daemon=True)
            reader.start()
            # the first try times out (2 s) and the second is sent: however long the client
            # took to start on a loaded machine
            wait_for(lambda: any("retrying" in line for line in lines), 60.0, "a retry")
            sched.send_signal(signal.SIGCONT)
            retrying.wait(timeout=30)  # its output is one id: the pipe never fills
            reader.join(timeout=10)
            wf_id = retrying.stdout.read().strip()
    finally:
        sched.send_signal(signal.SIGCONT)
    assert retrying.returncode == 0, "".join(lines)
    again = submit(procs, endpoint, path, "--idempotency-key", "k-1")
    assert again.stdout.strip() == wf_id and "already submitted" in again.stderr
    listed = json.loads(procs.cli("status", "--json", "--scheduler", endpoint).stdout)
    assert [w["id"] for w in listed["workflows"]] == [wf_id]
    assert finished(procs, endpoint, wf_id)["state"] == "succeeded"
    assert len(effects.lines("done")) == 1


def test_a_full_scheduler_refuses_at_once_and_keeps_what_it_accepted(procs):
    configure(procs, {"max_queued_workflows": 2})
    effects = Effects(procs)
    _, endpoint, _ = start(procs, names=("alpha",))
    path = effects.workflow(procs, 6)  # still running at the third submit on a loaded machine
    ids = [submit(procs, endpoint, path).stdout.strip() for _ in range(2)]
    refused = submit(procs, endpoint, path, check=False)
    assert refused.returncode == 3, refused.stderr
    assert "full" in refused.stderr and "nothing was accepted" in refused.stderr
    for wf_id in ids:
        assert finished(procs, endpoint, wf_id)["state"] == "succeeded"
    assert scheduler_info(procs, endpoint)["overloaded"] == 1
    assert len(effects.lines("done")) == 2


def test_workflow_ids_given_out_survive_a_scheduler_killed_mid_burst(procs):
    configure(procs)
    effects = Effects(procs)
    sched, endpoint, _ = start(procs, names=("alpha",))
    path = effects.workflow(procs, 0.1)
    clients = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "swarmx",
                "submit",
                path,
                "--scheduler",
                endpoint,
                "--config",
                str(procs.config),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(6)
    ]
    time.sleep(1.2)  # some answered, some on their way
    sched.send_signal(signal.SIGKILL)
    sched.wait()
    given = [c.communicate(timeout=30)[0].strip() for c in clients]
    given = [g for g, c in zip(given, clients, strict=True) if c.returncode == 0]
    procs.scheduler(listen=endpoint)
    for wf_id in given:
        assert finished(procs, endpoint, wf_id)["state"] == "succeeded"


def test_a_saturated_scheduler_still_breathes(procs):
    """Frames faster than the scheduler can take them: its watchdog pings keep their interval,
    it answers a query, and the loop's longest stall stays short (it yields between batches)."""
    configure(procs)
    notify_path = procs.tmp / "notify"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(0.05)
    # WATCHDOG_USEC 400 ms: a ping every 200 ms from the event loop itself
    env = {"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "400000"}
    sched, endpoint = procs.scheduler(env=env)
    stop = threading.Event()
    sent = [0]

    def flood() -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.connect(endpoint)
        sock.send(encode_frame("flood", 1, time.time(), replace(HELLO, node="flood", replicas=[])))
        sock.recv()  # registered
        frame = encode_frame("flood", 2, time.time(), TELEMETRY)
        while not stop.is_set():
            try:
                sock.send(frame, zmq.NOBLOCK)
                sent[0] += 1
            except zmq.Again:
                time.sleep(0.0005)
        sock.close(linger=0)
        ctx.term()

    pings: list[float] = []
    flooder = threading.Thread(target=flood)
    flooder.start()
    try:
        until = time.monotonic() + 6.0
        while time.monotonic() < until:
            with contextlib.suppress(TimeoutError):
                if b"WATCHDOG=1" in notify.recv(4096):
                    pings.append(time.monotonic())
        answered = procs.cli("nodes", "--json", "--scheduler", endpoint, check=False)
    finally:
        stop.set()
        flooder.join()
        notify.close()
    info = json.loads(answered.stdout)["scheduler"]
    assert sent[0] > 20_000, "the flood must outrun the scheduler"
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert len(pings) >= 15 and max(gaps) < 1.5, f"watchdog pings {len(pings)}, gaps {gaps}"
    assert info["loop_gap_max_s"] < 1.0
    assert sched.poll() is None
