"""Real processes on loopback: every daemon a test starts is tracked here and killed at teardown,
so a failing test never leaks a process or a port."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from swarmx.clock import RealClock
from swarmx.daemon.scheduler import read_state_file
from swarmx.protocol import Message, QueryWorkflows, Submit, Submitted, WorkflowsReply
from swarmx.transport import request

FAST_CONFIG = """
[scheduler]
# 0.6 s and 2 s at these heartbeats: a loaded 2-core CI machine stalls agents for longer than
# the defaults (3 missed) would allow at 0.2 s
stale_after_missed = 3
down_after_missed = 10

[node]
heartbeat_interval_s = 0.2
telemetry_interval_s = 0.2
gpus = "auto"
tool_slots = 2
tool_commands = ["*"]
tool_lease_s = 1.5

[[node.replicas]]
model = "lm"
backend = "emulated"
gpu = "H100"
concurrency = 4

[client]
timeout_s = 2.0
"""


def needs_llama() -> None:
    """At a module's top: skip it where llama-cpp-python's server is not installed, or fail
    in CI, where the test setup installs it."""
    if not all(importlib.util.find_spec(m) for m in ("llama_cpp", "gguf")):
        message = "llama-cpp-python[server] or gguf is not installed: run scripts/setup-test.sh"
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message, allow_module_level=True)


def ask(endpoint: str, body: Message) -> Message:
    """One request to the scheduler as an unauthenticated client on loopback."""
    return request(endpoint, body, "test", RealClock(), 5.0).body


def submit_text(endpoint: str, source: str, text: str) -> str:
    reply = ask(endpoint, Submit(source, text))
    assert isinstance(reply, Submitted), reply
    return reply.workflow_id


def states(endpoint: str, ids: list[str], limit: int = 100) -> dict[str, str]:
    """The states of these workflows, as the scheduler lists them."""
    reply = ask(endpoint, QueryWorkflows("", limit))
    assert isinstance(reply, WorkflowsReply)
    return {v.id: v.state for v in reply.workflows if v.id in ids}


def free_port() -> int:
    """A loopback port free now (for servers that cannot be told port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate, timeout_s=15.0, what="condition"):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.05)


class Procs:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.config = tmp_path / "swarmx.toml"
        self.config.write_text(FAST_CONFIG)
        self.started: list[subprocess.Popen[bytes]] = []

    def spawn(
        self, *args: str, log: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        logfile = open(self.tmp / f"{log}.log", "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            [sys.executable, "-m", "swarmx", *args, "--config", str(self.config)],
            stdout=logfile,
            stderr=subprocess.STDOUT,
            env={**os.environ, "COLUMNS": "200", **(env or {})},
        )
        logfile.close()
        self.started.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text()

    def scheduler(
        self, listen: str = "tcp://127.0.0.1:0", env: dict[str, str] | None = None
    ) -> tuple[subprocess.Popen[bytes], str]:
        state = self.tmp / "state"
        proc = self.spawn(
            "scheduler",
            "start",
            "--listen",
            listen,
            "--state-dir",
            str(state),
            "--log-level",
            "debug",
            log="scheduler",
            env=env,
        )

        def endpoint():
            assert proc.poll() is None, self.log("scheduler")
            data = read_state_file(state)
            return data["endpoint"] if data and data["pid"] == proc.pid else None

        return proc, wait_for(endpoint, what="scheduler endpoint")

    def node(
        self, endpoint: str, name: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        return self.spawn(
            "node",
            "start",
            "--scheduler",
            endpoint,
            "--name",
            name,
            "--log-level",
            "debug",
            log=name,
            env=env,
        )

    def gateway(self, endpoint: str, *args: str, name: str = "gateway") -> str:
        """A `swarmx gateway` on an ephemeral loopback port; returns its base URL (``.../v1``)."""
        proc = self.spawn(
            "gateway",
            "--listen",
            "http://127.0.0.1:0",
            "--scheduler",
            endpoint,
            "--log-level",
            "debug",
            *args,
            log=name,
        )

        def url() -> str | None:
            assert proc.poll() is None, self.log(name)
            found = re.search(r"serving the OpenAI API on (\S+/v1)", self.log(name))
            return found.group(1) if found else None

        return wait_for(url, what="the gateway's address")

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        out = subprocess.run(
            [sys.executable, "-m", "swarmx", *args, "--config", str(self.config)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            env={**os.environ, "COLUMNS": "200"},
        )
        if check:
            assert out.returncode == 0, out.stderr
        return out

    def nodes(self, endpoint: str) -> dict[str, dict]:
        out = self.cli("nodes", "--json", "--scheduler", endpoint, check=False)
        if out.returncode != 0:
            return {}
        return {n["name"]: n for n in json.loads(out.stdout)["nodes"]}

    def close(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
            proc.wait()


UP_STATE = "up-state"
"""Where the tests' `swarmx up` clusters keep their state (and keys)."""


@pytest.fixture
def procs(tmp_path, monkeypatch):
    # The CLI finds a `swarmx up` cluster's keys through SWARMX_STATE_DIR, as users do.
    monkeypatch.setenv("SWARMX_STATE_DIR", str(tmp_path / UP_STATE))
    p = Procs(tmp_path)
    yield p
    p.close()
