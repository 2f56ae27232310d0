"""Chaos run (issue 18): real scheduler and node agents under random SIGKILLs, counting every tool
execution.

    .venv/bin/python bench/chaos.py --nodes 4 --seconds 60 --kill-every 10 --json

A real scheduler and ``--nodes`` real node agents (``swarmx node start``, CURVE keys, emulated
LLM replicas, tool slots) on loopback, with the default failure detection (heartbeat 1 s, down
after 3 missed) and tool lease (2 s). For ``--seconds`` this process submits workflows at
``--rate`` per second (an LLM call, then a tool that sleeps 1-3 s and records its completion,
then another LLM call), each with an idempotency key and retried while the scheduler is down.
Meanwhile, every ``--kill-every`` seconds a random node is SIGKILLed and started again a second
later, and half-way through the scheduler is SIGKILLed once and started again on the same state
directory. Then it waits for every workflow to end.

Every tool run appends ``done CALL_ID`` to a file when it completes; a logical call (the call id
without its attempt) done twice is an effect that happened twice. ``--json`` prints::

    {"nodes", "seconds", "submitted", "accepted", "succeeded", "failed", "lost",
     "tool_effects", "duplicated", "node_kills", "scheduler_kills", "failures": {reason: n}}

where ``lost`` counts accepted workflows still running after the drain, and ``failed`` those
that ended failed (with their reasons in ``failures``).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from swarmx.clock import RealClock
from swarmx.daemon.scheduler import read_state_file
from swarmx.protocol import Error, Message, QueryWorkflows, Submit, Submitted, WorkflowsReply
from swarmx.security import local_client_curve, make_local_keys
from swarmx.transport import ClientCurve, TransportError, request

TOOL = """
import os, sys, time
time.sleep(float(sys.argv[2]))
with open(sys.argv[1], "a") as f:
    f.write(f"done {os.environ['SWARMX_CALL_ID']}\\n")
print("ok")
"""

CONFIG = """
[node]
tool_slots = 4
tool_commands = ["*"]
gpus = "off"

[[node.replicas]]
model = "lm"
backend = "emulated"
gpu = "H100"
concurrency = 8
"""

WORKFLOW = """
name = "chaos"
[inputs]
pause = "{pause}"

[[steps]]
id = "ask"
kind = "llm"
model = "lm"
prompt = "plan a change"
max_tokens = 16

[[steps]]
id = "act"
kind = "tool"
after = ["ask"]
command = ["{python}", "{tool}", "{effects}", "{{inputs.pause}}"]
timeout_s = 30

[[steps]]
id = "report"
kind = "llm"
after = ["act"]
model = "lm"
prompt = "report on {{steps.act.output}}"
max_tokens = 16
"""


class Cluster:
    def __init__(self, work: Path, nodes: int) -> None:
        self.work = work
        self.state = work / "state"
        self.names = [f"node-{i}" for i in range(1, nodes + 1)]
        self.keys = make_local_keys(self.state, self.names)
        self.config = work / "swarmx.toml"
        self.config.write_text(CONFIG)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.endpoint = "tcp://127.0.0.1:0"
        os.environ["SWARMX_STATE_DIR"] = str(self.state)

    def _spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.work / f"{name}.log", "ab")  # noqa: SIM115 - the child holds it
        proc = subprocess.Popen(
            [sys.executable, "-m", "swarmx", *args, "--config", str(self.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.procs[name] = proc
        return proc

    def start_scheduler(self) -> None:
        proc = self._spawn(
            "scheduler",
            "scheduler",
            "start",
            "--listen",
            self.endpoint,
            "--state-dir",
            str(self.state),
            "--key",
            str(self.keys.secret("scheduler")),
            "--authorized-keys",
            str(self.keys.authorized),
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            data = read_state_file(self.state)
            if data and data.get("pid") == proc.pid:
                self.endpoint = str(data["endpoint"])
                return
            if proc.poll() is not None:
                raise SystemExit(f"scheduler exited: {(self.work / 'scheduler.log').read_text()}")
            time.sleep(0.05)
        raise SystemExit("scheduler did not start")

    def start_node(self, name: str) -> None:
        self._spawn(
            name,
            "node",
            "start",
            "--scheduler",
            self.endpoint,
            "--name",
            name,
            "--key",
            str(self.keys.secret(name)),
            "--scheduler-key",
            str(self.keys.public("scheduler")),
        )

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def curve(self) -> ClientCurve | None:
        data = read_state_file(self.state) or {}
        return local_client_curve(self.state, str(data.get("public_key") or ""))

    def ask(self, body: Message, timeout_s: float = 2.0) -> Message | None:
        try:
            env = request(self.endpoint, body, "chaos", RealClock(), timeout_s, curve=self.curve())
        except (TimeoutError, TransportError):
            return None
        return env.body

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--rate", type=float, default=1.0, help="workflows per second")
    ap.add_argument("--kill-every", type=float, default=10.0)
    ap.add_argument("--drain-s", type=float, default=120.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="swarmx-chaos-"))
    effects = work / "effects.log"
    effects.touch()
    tool = work / "tool.py"
    tool.write_text(TOOL)
    cluster = Cluster(work, args.nodes)
    stats: collections.Counter[str] = collections.Counter()
    try:
        cluster.start_scheduler()
        for name in cluster.names:
            cluster.start_node(name)
        time.sleep(3.0)  # the nodes register
        accepted = _load(args, cluster, tool, effects, stats)
        states = _drain(cluster, accepted, args.drain_s)
        time.sleep(4.0)  # past any tool a killed node might still have been running
    finally:
        cluster.close()
    out = _report(args, stats, accepted=accepted, states=states, effects=effects, work=work)
    if args.json:
        print(json.dumps(out))
    else:
        for key, value in out.items():
            print(f"{key:>16}: {value}")
    if out["duplicated"] == 0 and out["lost"] == 0:
        for log in work.glob("*.log"):
            log.unlink()


def _load(
    args: argparse.Namespace,
    cluster: Cluster,
    tool: Path,
    effects: Path,
    stats: collections.Counter[str],
) -> list[str]:
    """Submit at the rate while killing nodes (and once the scheduler); the accepted ids."""
    rng = random.Random(args.seed)
    accepted: list[str] = []
    started = time.monotonic()
    next_kill, next_submit = started + args.kill_every, started
    sched_kill = started + args.seconds / 2
    while (now := time.monotonic()) < started + args.seconds:
        if now >= next_kill:
            victim = rng.choice(cluster.names)
            cluster.kill(victim)
            stats["node_kills"] += 1
            time.sleep(1.0)
            cluster.start_node(victim)
            next_kill += args.kill_every
        if now >= sched_kill:
            cluster.kill("scheduler")
            stats["scheduler_kills"] += 1
            time.sleep(1.0)
            cluster.start_scheduler()
            sched_kill = float("inf")
        if now >= next_submit:
            text = WORKFLOW.format(
                pause=f"{rng.uniform(1, 3):.2f}", python=sys.executable, tool=tool, effects=effects
            )
            msg = Submit("chaos.toml", text, {}, uuid.uuid4().hex)
            stats["submitted"] += 1
            for _ in range(20):  # the scheduler may be down: same key, no duplicate
                reply = cluster.ask(msg)
                if isinstance(reply, Submitted):
                    accepted.append(reply.workflow_id)
                    break
                if isinstance(reply, Error):
                    stats[f"refused_{reply.code}"] += 1
                    break
                time.sleep(0.5)
            next_submit += 1.0 / args.rate
        time.sleep(0.02)
    return accepted


def _drain(cluster: Cluster, accepted: list[str], drain_s: float) -> dict[str, tuple[str, str]]:
    """How each accepted workflow ended (state, reason), waiting up to ``drain_s``."""
    states: dict[str, tuple[str, str]] = {}
    deadline = time.monotonic() + drain_s
    while time.monotonic() < deadline:
        for wf_id in accepted:
            if states.get(wf_id, ("running", ""))[0] != "running":
                continue
            reply = cluster.ask(QueryWorkflows(wf_id))
            if isinstance(reply, WorkflowsReply) and reply.workflows:
                states[wf_id] = (reply.workflows[0].state, reply.workflows[0].reason)
        if all(states.get(w, ("running", ""))[0] != "running" for w in accepted):
            break
        time.sleep(1.0)
    return states


def _report(
    args: argparse.Namespace,
    stats: collections.Counter[str],
    *,
    accepted: list[str],
    states: dict[str, tuple[str, str]],
    effects: Path,
    work: Path,
) -> dict[str, object]:
    done = [line.split()[1] for line in effects.read_text().splitlines()]
    logical = collections.Counter(call.rpartition(":")[0] for call in done)
    final = collections.Counter(states.get(w, ("running", ""))[0] for w in accepted)
    failures = collections.Counter(
        reason.split(":")[0] for state, reason in states.values() if state == "failed"
    )
    return {
        "nodes": args.nodes,
        "seconds": args.seconds,
        "submitted": stats["submitted"],
        "accepted": len(accepted),
        "succeeded": final["succeeded"],
        "failed": final["failed"],
        "lost": final["running"],
        "tool_effects": len(done),
        "duplicated": sum(1 for n in logical.values() if n > 1),
        "node_kills": stats["node_kills"],
        "scheduler_kills": stats["scheduler_kills"],
        "failures": dict(failures),
        "refused": {k: v for k, v in stats.items() if k.startswith("refused_")},
        "workdir": str(work),
    }


if __name__ == "__main__":
    main()
