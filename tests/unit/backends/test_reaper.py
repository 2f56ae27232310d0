"""The tool reaper: a tool's effect happens at most once, so no tool outlives its agent (SIGKILL
included) or runs on while the agent is frozen past the lease; and a new agent kills the tools an
earlier one of its node left. Real processes throughout.

A busy machine cannot fail these: tools sleep far longer than any kill takes, so a check that
one never finished needs no timing, and every wait polls for a state with a generous deadline.
The only real-time thresholds left are the leases themselves, the behaviour under test.
"""

import asyncio
import contextlib
import json
import logging
import os
import re
import select
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from swarmx.backends.base import CallRequest
from swarmx.backends.reaper import AGENT_VAR, NODE_VAR, TOKEN_VAR, Lease
from swarmx.backends.tools import ToolRunner
from tests.unit.backends.test_tools import WITHIN_S, gone

TOOL_S = 30.0
"""How long a tool sleeps: it can finish only if nothing kills it."""

TOOL = """
import os, sys, time
started, done, sleep_s = sys.argv[1], sys.argv[2], float(sys.argv[3])
if os.fork() == 0:  # a grandchild that leaves the tool's group, as a daemonising tool would
    os.setsid()
    time.sleep(sleep_s)
    open(done + ".grandchild", "w").write("done")
    os._exit(0)
with open(started + ".tmp", "w") as f:
    f.write(f"{os.getpid()} {os.environ['SWARMX_TOOL_TOKEN']}")
os.rename(started + ".tmp", started)
time.sleep(sleep_s)
open(done, "w").write("done")
"""
AGENT = """
import asyncio, dataclasses, json, sys
from swarmx.backends.base import CallRequest
from swarmx.backends.tools import ToolRunner

async def main():
    runner = ToolRunner(["PATH"], ["*"], node=sys.argv[2], lease_s=float(sys.argv[1]))
    await runner.start()
    try:
        out = await runner.run(CallRequest("c1", "tool", "tool", command=sys.argv[3:]))
    finally:
        await runner.close()
    print(json.dumps(dataclasses.asdict(out)), flush=True)

asyncio.run(main())
"""
FORKING_AGENT = """
import os, subprocess, sys, time
reaper = subprocess.Popen(
    [sys.executable, "-m", "swarmx.backends.reaper", "--lease-s", "30",
     "--agent-pid", str(os.getpid())],
    stdin=subprocess.PIPE, stdout=subprocess.PIPE,
)
assert reaper.stdout.readline() == b"ready\\n"
reaper.stdin.write(f"+ {sys.argv[1]}\\n".encode())
reaper.stdin.flush()
worker = os.fork()
if worker == 0:  # a forked worker that keeps a copy of the pipe to the reaper open
    time.sleep(30)
    os._exit(0)
print(reaper.pid, worker, flush=True)
os._exit(0)
"""


class Procs:
    """Every process a test starts, stopped at teardown (a frozen one is thawed first)."""

    def __init__(self) -> None:
        self.popens: list[subprocess.Popen[bytes]] = []
        self.pids: list[int] = []
        self.tokens: list[str] = []

    def popen(self, argv: list[str], **kwargs) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, **kwargs)
        self.popens.append(proc)
        return proc

    def victim(self, token: str = "", **env: str) -> subprocess.Popen[bytes]:
        """A tool-like ``sleep`` in its own group, carrying ``token`` and ``env``."""
        env = {"PATH": os.environ["PATH"], **env}
        if token:
            env[TOKEN_VAR] = token
            self.tokens.append(token)
        return self.popen(["sleep", "30"], env=env, start_new_session=True)

    def reaper(self, lease_s: float, agent_pid: int | None = None) -> subprocess.Popen[bytes]:
        argv = ["-m", "swarmx.backends.reaper", "--lease-s", str(lease_s)]
        argv += ["--agent-pid", str(agent_pid or os.getpid())]
        proc = self.popen([sys.executable, *argv], stdin=PIPE, stdout=PIPE, stderr=PIPE)
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        return proc

    def agent(self, tmp_path: Path, lease_s: float, sleep_s: float) -> subprocess.Popen[bytes]:
        """A node agent running TOOL through a ToolRunner; prints the outcome as JSON."""
        tool = [sys.executable, "-c", TOOL, str(tmp_path / "started"), str(tmp_path / "done")]
        argv = [sys.executable, "-c", AGENT, str(lease_s), "test-node", *tool, str(sleep_s)]
        return self.popen(argv, stdout=PIPE, stderr=PIPE)

    def stop_all(self) -> None:
        """Loose pids and tool trees first: they may hold a pipe a Popen's communicate reads."""
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for token in self.tokens:
            for proc in carriers(token):
                with contextlib.suppress(psutil.Error):
                    proc.kill()
        for popen in self.popens:
            with contextlib.suppress(ProcessLookupError):
                popen.send_signal(signal.SIGCONT)
                popen.kill()
            popen.wait()
            for pipe in (popen.stdin, popen.stdout, popen.stderr):
                if pipe:
                    with contextlib.suppress(OSError):  # unflushed input to a dead reader
                        pipe.close()


PIPE = subprocess.PIPE


@pytest.fixture
def procs() -> Iterator[Procs]:
    made = Procs()
    yield made
    made.stop_all()


def carriers(token: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.environ().get(TOKEN_VAR) == token:
                found.append(proc)
    return found


def no_carriers(token: str, within_s: float = WITHIN_S) -> bool:
    deadline = time.monotonic() + within_s
    while carriers(token):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def started_tool(tmp_path: Path, within_s: float = 10.0) -> tuple[int, str]:
    """The tool's pid and token once it is running."""
    path = tmp_path / "started"
    deadline = time.monotonic() + within_s
    while not path.exists():
        assert time.monotonic() < deadline, "the tool never started"
        time.sleep(0.01)
    pid, token = path.read_text().split()
    return int(pid), token


def reaper_of(agent: subprocess.Popen[bytes]) -> psutil.Process:
    children = psutil.Process(agent.pid).children()
    [reaper] = [p for p in children if "swarmx.backends.reaper" in " ".join(p.cmdline())]
    return reaper


def assert_never_done(tmp_path: Path) -> None:
    """Neither the tool nor its grandchild wrote its file. Checked once no process of the tree
    is left (`no_carriers`): nothing can write them any more."""
    assert not (tmp_path / "done").exists()
    assert not (tmp_path / "done.grandchild").exists()


def read_until(pipe, needle: bytes, within_s: float = WITHIN_S) -> bytes:
    """Read ``pipe`` until ``needle`` has come (what was read, for the caller to keep)."""
    fd, seen = pipe.fileno(), b""
    deadline = time.monotonic() + within_s
    while needle not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"{needle!r} never came"
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 65536)
            assert chunk, f"the pipe closed before {needle!r}"
            seen += chunk
    return seen


def tool(command: list[str], timeout_s: float | None = None) -> CallRequest:
    return CallRequest("c1", "tool", "tool", command=command, timeout_s=timeout_s)


# -- the agent dies or freezes mid-call --


def test_a_sigkilled_agent_takes_its_running_tool_tree_with_it(tmp_path, procs):
    agent = procs.agent(tmp_path, lease_s=30, sleep_s=TOOL_S)
    pid, token = started_tool(tmp_path)
    procs.tokens.append(token)
    reaper = reaper_of(agent)
    procs.pids.append(reaper.pid)
    agent.kill()
    agent.wait()
    assert gone(pid), "the tool outlived its SIGKILLed agent"
    assert no_carriers(token), "a process of the tool's tree outlived its agent"
    assert gone(reaper.pid), "the reaper outlived its agent"
    assert_never_done(tmp_path)


def test_a_frozen_agent_loses_its_tools_and_then_learns_why(tmp_path, procs):
    spawned = time.monotonic()
    agent = procs.agent(tmp_path, lease_s=0.5, sleep_s=TOOL_S)
    pid, token = started_tool(tmp_path)
    procs.tokens.append(token)
    os.kill(agent.pid, signal.SIGSTOP)
    try:
        assert gone(pid), "the tool ran on while its agent was frozen past the lease"
        assert no_carriers(token), "a process of the tool's tree ran on"
    finally:
        os.kill(agent.pid, signal.SIGCONT)
    stdout, stderr = agent.communicate(timeout=3 * WITHIN_S)
    lived_s = time.monotonic() - spawned
    assert agent.returncode == 0, stderr.decode()
    out = json.loads(stdout)
    assert not out["ok"]
    assert re.fullmatch(
        r"killed: the node agent stalled for [0-9.]+ s \(tool lease 0\.5 s\), "
        r"so its tools were stopped",
        out["error"],
    )
    stalled_s = float(re.findall(r"stalled for ([0-9.]+) s", out["error"])[0])
    # at least the lease (else no kill); at most the agent's life (0.05: the rounding to 0.1 s)
    # - a loaded machine may stall it longer than the test froze it, never longer than it lived
    assert 0.5 <= stalled_s <= lived_s + 0.05
    assert "sent nothing for" in stderr.decode()  # the reaper says why it killed
    assert_never_done(tmp_path)


def test_a_stalled_event_loop_gets_the_lease_error_and_a_warning(tmp_path, caplog):
    runner = ToolRunner(["PATH"], ["*"], node="test-node", lease_s=0.3)
    started, done = str(tmp_path / "started"), str(tmp_path / "done")
    command = [sys.executable, "-c", TOOL, started, done, str(TOOL_S)]

    async def main():
        await runner.start()
        try:
            call = asyncio.create_task(runner.run(tool(command)))
            while not (tmp_path / "started").exists():
                await asyncio.sleep(0.01)
            pid, _ = started_tool(tmp_path)
            # blocks the loop (no renewal) until the reaper has stopped the tool
            assert gone(pid), "the reaper never stopped the tool of a stalled loop"
            return await call
        finally:
            await runner.close()

    with caplog.at_level(logging.WARNING, logger="swarmx.backends.tools"):
        out = asyncio.run(main())
    assert not out.ok
    assert "tool lease 0.3 s" in out.error
    assert "event loop stalled for" in caplog.text
    _, token = started_tool(tmp_path)
    assert no_carriers(token)


# -- the runner with a reaper --


def test_calls_through_a_leased_runner_behave_as_before():
    # a 1 s lease: only a loop stalled that long (the behaviour itself) would lose the tools
    runner = ToolRunner(["PATH"], ["*"], node="test-node", lease_s=1.0)

    async def main():
        await runner.start()
        try:
            ok = await runner.run(tool(["sh", "-c", "echo hi"]))
            failed = await runner.run(tool(["sh", "-c", "exit 3"]))
            timed_out = await runner.run(tool(["sleep", "30"], timeout_s=0.2))
            await asyncio.sleep(1.2)  # idle past the lease: renewals keep it
            later = await runner.run(tool(["sh", "-c", "sleep 1.2; echo late"]))
            return ok, failed, timed_out, later
        finally:
            await runner.close()

    ok, failed, timed_out, later = asyncio.run(main())
    assert (ok.ok, ok.output) == (True, "hi\n")
    assert failed.error == "exit code 3: (no stderr)"
    assert timed_out.error == "timed out after 0.2s"
    assert (later.ok, later.output) == (True, "late\n")


def test_a_tool_holds_no_descriptor_but_its_own():
    """The write end of the reaper's pipe must not leak into a tool: it would keep the pipe open
    after the agent died, and the reaper would never see EOF."""
    runner = ToolRunner(["PATH"], ["*"], node="test-node")
    code = "import os; print(' '.join(sorted(os.listdir('/proc/self/fd'))))"

    async def main():
        await runner.start()
        try:
            return await runner.run(tool([sys.executable, "-c", code]))
        finally:
            await runner.close()

    out = asyncio.run(main())
    assert out.ok, out.error
    assert out.output.split() == ["0", "1", "2", "3"]  # 3: the listing's own


def test_a_reaper_that_cannot_start_is_logged_and_calls_still_run(monkeypatch, caplog):
    monkeypatch.setattr(sys, "executable", "/bin/true")
    runner = ToolRunner(["PATH"], ["*"], node="test-node")

    async def main():
        await runner.start()
        try:
            return await runner.run(tool(["echo", "hi"]))
        finally:
            await runner.close()

    with caplog.at_level(logging.ERROR, logger="swarmx.backends.tools"):
        out = asyncio.run(main())
    assert "the tool reaper did not start" in caplog.text
    assert "tools will not be stopped if this agent dies or stalls" in caplog.text
    assert out.output == "hi\n"


def test_a_lease_must_be_positive():
    with pytest.raises(ValueError, match="tool lease must be positive"):
        ToolRunner(["PATH"], ["*"], node="n", lease_s=0)


# -- the reaper process itself --


def test_malformed_lines_are_counted_and_ignored(procs):
    reaper = procs.reaper(lease_s=30)
    token = uuid.uuid4().hex
    victim = procs.victim(token)
    garbage = b"hello\n+\n+ tok nope\n+ tok 1\n- a b\n\xff\xfe\n" + b"x" * 1000 + b"\n"
    assert reaper.stdin is not None
    reaper.stdin.write(garbage + f"+ {token} {victim.pid}\n".encode())
    reaper.stdin.flush()
    assert reaper.stderr is not None
    logged = read_until(reaper.stderr, b"ignoring a malformed line")  # it has read the garbage
    assert reaper.poll() is None
    _, rest = reaper.communicate(timeout=WITHIN_S)  # closes its stdin: the agent is gone
    stderr = logged + rest
    assert reaper.returncode == 0
    assert gone(victim.pid), "the registered tree survived the agent"
    assert "ignored 7 malformed line(s)" in stderr.decode()
    assert "the agent closed the pipe: killing its 1 running tool(s)" in stderr.decode()


def test_a_lapsed_lease_kills_reports_and_keeps_running(procs):
    reaper = procs.reaper(lease_s=0.3)
    first, second = uuid.uuid4().hex, uuid.uuid4().hex
    victim = procs.victim(first)
    setsid_child = procs.victim(first)  # another process of the tree, outside its group
    assert reaper.stdin is not None and reaper.stdout is not None
    reaper.stdin.write(f"+ {first} {victim.pid}\n".encode())
    reaper.stdin.flush()
    line = reaper.stdout.readline().decode()
    word, token, gap = line.split()
    assert (word, token) == ("reaped", first)
    assert float(gap) >= 0.3
    assert gone(victim.pid)
    assert gone(setsid_child.pid)
    assert reaper.poll() is None  # the agent may resume
    survivor = procs.victim(second)
    reaper.stdin.write(f"+ {second} {survivor.pid}\n".encode())
    _, stderr = reaper.communicate(timeout=WITHIN_S)  # flushes, then closes its stdin
    assert reaper.returncode == 0
    assert gone(survivor.pid)
    assert "sent nothing for" in stderr.decode()


def test_the_reaper_exits_when_its_agent_dies_though_a_fork_holds_the_pipe(procs):
    token = uuid.uuid4().hex
    victim = procs.victim(token)
    agent = procs.popen([sys.executable, "-c", FORKING_AGENT, token], stdout=PIPE)
    assert agent.stdout is not None
    reaper_pid, worker_pid = map(int, agent.stdout.readline().split())
    procs.pids += [reaper_pid, worker_pid]
    agent.wait()
    assert gone(reaper_pid), "the reaper outlived its agent"
    assert gone(victim.pid)


def test_lease_renews_on_every_well_formed_line():
    lease = Lease(1.0, now=0.0)
    lease.feed(b"+ abc\n", now=0.9)
    assert not lease.due(1.5)
    lease.feed(b"junk\n", now=1.8)  # a malformed line renews nothing
    assert lease.due(2.0)
    assert lease.lapse() == {"abc": None}
    assert not lease.due(5.0)  # lapsed once: nothing more to kill until the agent speaks
    lease.feed(b"+ abc 42\n- ab", now=6.0)  # a partial line waits for its end
    assert lease.trees == {"abc": 42}
    lease.feed(b"c\n", now=6.1)
    assert lease.trees == {}
    assert lease.malformed == 1


# -- orphans of an earlier agent --


def test_start_kills_tools_a_dead_agent_of_this_node_left_and_nothing_else(procs, caplog):
    node = f"test-node-{uuid.uuid4().hex[:8]}"
    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan = procs.victim(**{NODE_VAR: node, AGENT_VAR: str(dead.pid)})
    other_node = procs.victim(**{NODE_VAR: f"{node}-other", AGENT_VAR: str(dead.pid)})
    live_agent = procs.victim(**{NODE_VAR: node, AGENT_VAR: str(os.getpid())})
    runner = ToolRunner(["PATH"], ["*"], node=node, lease_s=None)
    with caplog.at_level(logging.WARNING, logger="swarmx.backends.tools"):
        asyncio.run(runner.start())
    assert gone(orphan.pid), "the orphan survived"
    assert other_node.poll() is None, "a tool of another node was killed"
    assert live_agent.poll() is None, "a tool of a live agent was killed"
    assert f"killed 1 tool process(es) an earlier agent of node {node} left" in caplog.text
