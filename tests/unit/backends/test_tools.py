"""ToolRunner: real subprocesses in scratch directories, with bounded env, an allowlist, resource
limits, streamed output caps, timeouts and whole-tree kills.

No check depends on the machine's speed: a timeout runs on a `SteppedClock` the test advances
once the tool is set up, and waits poll for a state with a generous deadline.
"""

import asyncio
import logging
import os
import pwd
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

from swarmx.backends import tools
from swarmx.backends.base import CallRequest
from swarmx.backends.tools import ToolRunner
from swarmx.clock import SteppedClock
from swarmx.config import ToolLimits

NODE = "node-1"
WITHIN_S = 10.0
"""How long a wait polls before it fails: far beyond what any step here takes."""
GRANDCHILD = """
import os, sys, time
pid = os.fork()
if pid == 0:  # the grandchild: leaves the tool's process group and session, then lingers
    os.setsid()
    time.sleep(30)
    os._exit(0)
with open(sys.argv[1], "w") as f:
    f.write(str(pid))
print("parent done", flush=True)
if sys.argv[2] == "stay":
    time.sleep(30)
"""


def make(env=("PATH",), commands=("*",), **kwargs):
    return ToolRunner(list(env), list(commands), node=NODE, **kwargs)


def tool(command, call_id="c1", timeout_s=None):
    return CallRequest(call_id, "tool", "tool", command=command, timeout_s=timeout_s)


def run(runner, request):
    return asyncio.run(runner.run(request))


def gone(pid: int, within_s: float = WITHIN_S) -> bool:
    """The process has exited (a zombie awaiting its reaper counts as gone)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.02)
    return False


def written(path: Path) -> bool:
    return path.exists() and bool(path.read_text().strip())


def wait_for_file(path: Path, within_s: float = WITHIN_S) -> str:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if written(path):
            return path.read_text()
        time.sleep(0.01)
    raise AssertionError(f"{path} never written")


async def until(predicate, what: str, within_s: float = WITHIN_S) -> None:
    """Poll, from the event loop, until ``predicate()`` holds; fail after ``within_s``."""
    deadline = time.monotonic() + within_s
    while not predicate():
        assert time.monotonic() < deadline, f"{what} never happened"
        await asyncio.sleep(0.01)


def timed_out(runner: ToolRunner, clock: SteppedClock, request: CallRequest, ready):
    """Run ``request``, let its timeout fire once ``ready()`` holds, and return the outcome.
    The call must then end without waiting for what its tool left running."""

    async def main():
        call = asyncio.create_task(runner.run(request))
        await until(lambda: ready() and clock.sleepers == 1, "the tool's start")
        assert request.timeout_s is not None
        clock.advance(request.timeout_s)
        return await asyncio.wait_for(call, WITHIN_S)

    return asyncio.run(main())


@pytest.fixture
def scratch_dirs(monkeypatch):
    """Record every scratch directory the runner creates."""
    made: list[str] = []
    real = tempfile.mkdtemp

    def spy(*args, **kwargs):
        path = real(*args, **kwargs)
        made.append(path)
        return path

    monkeypatch.setattr(tools.tempfile, "mkdtemp", spy)
    return made


def test_success_captures_stdout_and_counts_tokens():
    runner = make()
    out = run(runner, tool(["sh", "-c", "echo one two three; echo four >&2"]))
    assert out.ok
    assert out.output == "one two three\n"
    assert out.output_tokens == 3
    assert out.error == ""
    assert runner.metrics().running == 0


def test_non_zero_exit_reports_code_and_last_stderr_line():
    script = "echo partial; echo first >&2; echo 'the last line' >&2; exit 3"
    out = run(make(), tool(["sh", "-c", script]))
    assert not out.ok
    assert out.output == "partial\n"
    assert out.error == "exit code 3: the last line"


def test_non_zero_exit_without_stderr():
    out = run(make(), tool(["sh", "-c", "exit 1"]))
    assert not out.ok
    assert out.error == "exit code 1: (no stderr)"


def test_timeout_kills_the_whole_process_group(tmp_path):
    pidfile = tmp_path / "child.pid"
    script = f"sleep 30 & echo $! > {pidfile}; wait"
    clock = SteppedClock()
    request = tool(["sh", "-c", script], timeout_s=0.3)
    out = timed_out(make(clock=clock), clock, request, lambda: written(pidfile))
    assert not out.ok
    assert out.error.startswith("timed out after")
    assert "0.3s" in out.error
    child = int(wait_for_file(pidfile))
    assert gone(child), "the tool's child process survived the timeout"


def test_cancelling_the_awaiting_task_kills_the_process(tmp_path):
    pidfile = tmp_path / "pids"
    script = f"sleep 30 & echo $$ $! > {pidfile}; wait"
    runner = make()

    async def main():
        task = asyncio.create_task(runner.run(tool(["sh", "-c", script])))
        await until(lambda: written(pidfile), "the tool's start")
        assert runner.metrics().running == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    shell, child = (int(p) for p in pidfile.read_text().split())
    assert gone(shell)
    assert gone(child)
    assert runner.metrics().running == 0


def test_environment_is_bounded(monkeypatch):
    monkeypatch.setenv("SWARMX_TEST_SECRET", "hunter2")
    monkeypatch.setenv("SWARMX_TEST_PASSED", "visible")
    monkeypatch.delenv("SWARMX_TEST_UNSET", raising=False)
    runner = make(["PATH", "SWARMX_TEST_PASSED", "SWARMX_TEST_UNSET"])
    out = run(runner, tool(["env"], call_id="call-42"))
    assert out.ok, out.error
    env = dict(line.split("=", 1) for line in out.output.splitlines())
    assert "hunter2" not in out.output
    assert set(env) == {
        "PATH",
        "SWARMX_TEST_PASSED",
        "HOME",
        "TMPDIR",
        "SWARMX_CALL_ID",
        "SWARMX_TOOL_TOKEN",
        "SWARMX_TOOL_NODE",
        "SWARMX_TOOL_AGENT",
    }
    assert env["SWARMX_TOOL_NODE"] == NODE  # with the agent's pid: how a later agent finds orphans
    assert env["SWARMX_TOOL_AGENT"] == str(os.getpid())
    assert env["PATH"] == os.environ["PATH"]
    assert env["SWARMX_TEST_PASSED"] == "visible"
    assert env["SWARMX_CALL_ID"] == "call-42"
    assert env["HOME"] == env["TMPDIR"]


def test_passthrough_is_read_when_the_runner_is_made(monkeypatch):
    monkeypatch.setenv("SWARMX_TEST_PASSED", "before")
    runner = make(["PATH", "SWARMX_TEST_PASSED"])
    monkeypatch.setenv("SWARMX_TEST_PASSED", "after")
    out = run(runner, tool(["sh", "-c", 'printf %s "$SWARMX_TEST_PASSED"']))
    assert out.output == "before"


def test_cwd_is_a_fresh_scratch_dir_removed_afterwards(scratch_dirs):
    runner = make()
    script = 'pwd; echo "$HOME"; echo "$TMPDIR"; ls -A | wc -l; echo data > left-behind'
    first = run(runner, tool(["sh", "-c", script]))
    second = run(runner, tool(["sh", "-c", script]))
    assert first.ok, first.error
    assert second.ok, second.error
    assert len(scratch_dirs) == 2
    for out, made in zip([first, second], scratch_dirs, strict=True):
        cwd, home, tmpdir, entries = out.output.split()
        assert os.path.realpath(cwd) == os.path.realpath(made)
        assert home == tmpdir == made
        assert os.path.basename(made).startswith("swarmx-tool-")
        assert entries == "0"  # fresh: empty when the tool starts
        assert not os.path.exists(made)
    assert scratch_dirs[0] != scratch_dirs[1]


def test_missing_executable_cannot_run(scratch_dirs):
    runner = make()
    out = run(runner, tool(["/nonexistent/swarmx-no-such-tool", "--flag"]))
    assert not out.ok
    assert out.error.startswith("cannot run '/nonexistent/swarmx-no-such-tool'")
    assert runner.metrics().running == 0
    assert scratch_dirs
    assert not os.path.exists(scratch_dirs[0])


def test_empty_command_or_wrong_kind_is_refused():
    runner = make()
    assert not run(runner, tool([])).ok
    llm = CallRequest("c", "llm", "lm", prompt="hi", command=["echo", "hi"])
    out = run(runner, llm)
    assert not out.ok
    assert "non-empty command" in out.error


def test_nul_bytes_in_argv_are_stripped():
    out = run(make(), tool(["printf", "%s|%s", "a\0b", "\0c\0"]))
    assert out.ok, out.error
    assert out.output == "ab|c"


def test_huge_output_is_truncated_with_a_marker(monkeypatch):
    monkeypatch.setattr(tools, "MAX_OUTPUT_BYTES", 16)
    script = "head -c 5000 /dev/zero | tr '\\0' x"
    out = run(make(), tool(["sh", "-c", script]))
    assert out.ok, out.error
    assert out.output == "x" * 16 + "\n[output truncated: 4984 bytes more]"


def test_output_at_the_limit_is_not_truncated(monkeypatch):
    monkeypatch.setattr(tools, "MAX_OUTPUT_BYTES", 16)
    out = run(make(), tool(["printf", "%s", "y" * 16]))
    assert out.output == "y" * 16


def test_invalid_utf8_output_is_replaced_not_raised():
    out = run(make(), tool(["printf", "ok \\377\\n"]))
    assert out.ok, out.error
    assert out.output == "ok \ufffd\n"


def grandchild_tool(pidfile: Path, mode: str, timeout_s=None):
    return tool([sys.executable, "-c", GRANDCHILD, str(pidfile), mode], timeout_s=timeout_s)


# -- the allowlist ([node] tool_commands) --


def test_a_command_not_listed_is_refused_before_anything_runs(scratch_dirs):
    runner = make(commands=["echo"])
    out = run(runner, tool(["curl", "http://example.com"]))
    assert not out.ok
    assert out.error == "command 'curl' is not allowed on node node-1 ([node] tool_commands)"
    assert scratch_dirs == []
    assert runner.metrics().running == 0


def test_a_listed_name_runs_from_path_and_matches_that_name_only():
    runner = make(commands=["echo"])
    out = run(runner, tool(["echo", "hi"]))
    assert out.ok, out.error
    assert out.output == "hi\n"
    by_path = run(runner, tool([shutil.which("echo"), "hi"]))
    assert not by_path.ok
    assert "is not allowed" in by_path.error


def test_an_absolute_entry_matches_that_path_only():
    echo = shutil.which("echo")
    runner = make(commands=[echo])
    assert run(runner, tool([echo, "hi"])).output == "hi\n"
    assert "is not allowed" in run(runner, tool(["echo", "hi"])).error


def test_the_allowlist_sees_argv0_after_nul_bytes_are_stripped():
    out = run(make(commands=["echo"]), tool(["ec\0ho", "hi"]))
    assert out.ok, out.error
    assert out.output == "hi\n"


def test_star_runs_any_command():
    out = run(make(commands=["*"]), tool(["sh", "-c", "echo any"]))
    assert out.ok, out.error
    assert out.output == "any\n"


def test_no_commands_refuses_every_call_and_warns_at_start(caplog):
    runner = make(commands=[])

    async def start_and_close():
        await runner.start()
        await runner.close()

    with caplog.at_level(logging.WARNING, logger="swarmx.backends.tools"):
        asyncio.run(start_and_close())
    assert "node-1" in caplog.text
    assert "tool_commands is empty" in caplog.text
    out = run(runner, tool(["echo", "hi"]))
    assert out.error == "command 'echo' is not allowed on node node-1 ([node] tool_commands)"


# -- output is capped while it streams --


def test_huge_output_streams_through_a_bounded_buffer():
    total = 200_000_000
    me = psutil.Process()
    before = me.memory_info().rss
    peak = before
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, me.memory_info().rss)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        out = run(make(), tool(["head", "-c", str(total), "/dev/zero"], timeout_s=60))
    finally:
        done.set()
        sampler.join()
    assert out.ok, out.error
    marker = f"\n[output truncated: {total - tools.MAX_OUTPUT_BYTES} bytes more]"
    assert out.output == "\0" * tools.MAX_OUTPUT_BYTES + marker
    # the whole output held at once would be 200 MB; a few MiB of buffers and the result remain
    assert peak - before < 48 << 20, f"RSS grew by {(peak - before) >> 20} MiB"


def test_only_the_tail_of_stderr_is_kept(monkeypatch):
    monkeypatch.setattr(tools, "STDERR_TAIL_BYTES", 64)
    script = "head -c 100000 /dev/zero | tr '\\0' e >&2; echo >&2; echo 'the end' >&2; exit 2"
    out = run(make(), tool(["sh", "-c", script]))
    assert out.error == "exit code 2: the end"


# -- resource limits ([node] tool_limits) --


def python(code: str, *args: str):
    return tool([sys.executable, "-c", code, *args], timeout_s=30)


def test_memory_limit_fails_a_tool_that_allocates_past_it():
    runner = make(limits=ToolLimits(memory_bytes=256 << 20))
    assert run(runner, python("bytearray(16 << 20)")).ok
    out = run(runner, python("bytearray(512 << 20)"))
    assert not out.ok
    assert out.error == "exit code 1: MemoryError"


def test_file_limit_kills_a_tool_writing_past_it():
    runner = make(limits=ToolLimits(file_bytes=1 << 20))
    small = run(runner, tool(["sh", "-c", "head -c 1000 /dev/zero > f && wc -c < f"]))
    assert small.output.strip() == "1000"
    out = run(runner, tool(["sh", "-c", "exec head -c 2000000 /dev/zero > big"]))
    assert not out.ok
    assert out.error == "killed by SIGXFSZ ([node] tool_limits.file_bytes)"


def test_cpu_limit_kills_a_spinning_tool():
    # a limit that did not hold would end the call at its 30 s timeout, with another error
    out = run(make(limits=ToolLimits(cpu_time_s=1)), python("while True: pass"))
    assert not out.ok
    assert out.error == "killed by SIGXCPU ([node] tool_limits.cpu_time_s)"


def test_open_files_limit_fails_a_tool_opening_more():
    code = "import os; fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(64)]"
    out = run(make(limits=ToolLimits(open_files=32)), python(code))
    assert not out.ok
    assert "Too many open files" in out.error


def test_limits_are_set_soft_and_hard_and_zero_means_none():
    code = (
        "import resource as r\n"
        "for n in ('AS', 'CPU', 'FSIZE', 'NOFILE'):\n"
        "    print(*r.getrlimit(getattr(r, 'RLIMIT_' + n)))"
    )
    limits = ToolLimits(memory_bytes=1 << 30, cpu_time_s=50, file_bytes=1 << 20, open_files=100)
    out = run(make(limits=limits), python(code))
    assert out.output.split("\n")[:4] == [
        f"{1 << 30} {1 << 30}",
        "50 51",
        "1048576 1048576",
        "100 100",
    ]
    unlimited = run(make(limits=ToolLimits(0, 0, 0, 0)), python(code))
    mine = [
        resource.getrlimit(getattr(resource, "RLIMIT_" + n))
        for n in ("AS", "CPU", "FSIZE", "NOFILE")
    ]
    assert unlimited.output.split("\n")[:4] == [f"{soft} {hard}" for soft, hard in mine]


def test_a_limit_above_the_agents_own_hard_limit_is_clamped_to_it():
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    code = "import resource as r; print(*r.getrlimit(r.RLIMIT_NOFILE))"
    out = run(make(limits=ToolLimits(open_files=hard + 100)), python(code))
    assert out.ok, out.error
    assert out.output == f"{hard} {hard}\n"


# -- [node] tool_user --


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_tools_run_as_the_configured_user_in_a_scratch_dir_they_own():
    nobody = pwd.getpwnam("nobody")
    out = run(make(user="nobody"), tool(["sh", "-c", "id -u; id -G; echo x > f && cat f"]))
    assert out.ok, out.error
    uid, groups, written = out.output.splitlines()
    assert int(uid) == nobody.pw_uid
    assert set(map(int, groups.split())) == set(os.getgrouplist("nobody", nobody.pw_gid))
    assert written == "x"


def test_an_unknown_user_is_a_clear_error():
    with pytest.raises(ValueError, match="tool_user: no user 'swarmx-no-such-user' on this host"):
        make(user="swarmx-no-such-user")


def test_switching_users_without_root_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(tools.os, "geteuid", lambda: 1000)
    with pytest.raises(ValueError, match="needs the agent to run as root"):
        make(user="nobody")


# -- the whole process tree is killed --


def left_the_session(pidfile: Path) -> bool:
    """The grandchild has written its pid and made its own session."""
    if not written(pidfile):
        return False
    pid = int(pidfile.read_text())
    try:
        return os.getsid(pid) == pid
    except ProcessLookupError:
        return False


def test_timeout_kills_a_grandchild_that_left_the_session(tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    clock = SteppedClock()
    request = grandchild_tool(pidfile, "stay", timeout_s=1)
    out = timed_out(make(clock=clock), clock, request, lambda: left_the_session(pidfile))
    assert out.error == "timed out after 1s"
    assert gone(int(wait_for_file(pidfile))), "the setsid grandchild survived the timeout"


def test_cancelling_kills_a_grandchild_that_left_the_session(tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    runner = make()

    async def main():
        task = asyncio.create_task(runner.run(grandchild_tool(pidfile, "stay")))
        await until(lambda: left_the_session(pidfile), "the grandchild's setsid")
        grandchild = int(pidfile.read_text())
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return grandchild

    assert gone(asyncio.run(main())), "the setsid grandchild survived cancellation"
    assert runner.metrics().running == 0


def test_leftovers_are_killed_when_the_tool_exits(tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    out = run(make(), grandchild_tool(pidfile, "exit", timeout_s=20))
    # the grandchild holds the output pipe open (and sleeps 30 s): the call still ends when the
    # tool exits, well before its 20 s timeout would fail it
    assert out.ok, out.error
    assert out.output == "parent done\n"
    assert gone(int(wait_for_file(pidfile))), "the tool's leftover outlived it"
