"""ToolRunner: real subprocesses in scratch directories, with bounded env, timeouts and kills."""

import asyncio
import os
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from swarmx.backends import tools
from swarmx.backends.base import CallRequest
from swarmx.backends.tools import ToolRunner


def tool(command, call_id="c1", timeout_s=None):
    return CallRequest(call_id, "tool", "tool", command=command, timeout_s=timeout_s)


def run(runner, request):
    return asyncio.run(runner.run(request))


def gone(pid: int, within_s: float = 3.0) -> bool:
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


def wait_for_file(path: Path, within_s: float = 5.0) -> str:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text()
        time.sleep(0.01)
    raise AssertionError(f"{path} never written")


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
    runner = ToolRunner(["PATH"])
    out = run(runner, tool(["sh", "-c", "echo one two three; echo four >&2"]))
    assert out.ok
    assert out.output == "one two three\n"
    assert out.output_tokens == 3
    assert out.error == ""
    assert runner.metrics().running == 0


def test_non_zero_exit_reports_code_and_last_stderr_line():
    script = "echo partial; echo first >&2; echo 'the last line' >&2; exit 3"
    out = run(ToolRunner(["PATH"]), tool(["sh", "-c", script]))
    assert not out.ok
    assert out.output == "partial\n"
    assert out.error == "exit code 3: the last line"


def test_non_zero_exit_without_stderr():
    out = run(ToolRunner(["PATH"]), tool(["sh", "-c", "exit 1"]))
    assert not out.ok
    assert out.error == "exit code 1: (no stderr)"


def test_timeout_kills_the_whole_process_group(tmp_path):
    pidfile = tmp_path / "child.pid"
    script = f"sleep 30 & echo $! > {pidfile}; wait"
    started = time.monotonic()
    out = run(ToolRunner(["PATH"]), tool(["sh", "-c", script], timeout_s=0.3))
    assert time.monotonic() - started < 5
    assert not out.ok
    assert out.error.startswith("timed out after")
    assert "0.3s" in out.error
    child = int(wait_for_file(pidfile))
    assert gone(child), "the tool's child process survived the timeout"


def test_cancelling_the_awaiting_task_kills_the_process(tmp_path):
    pidfile = tmp_path / "pids"
    script = f"sleep 30 & echo $$ $! > {pidfile}; wait"
    runner = ToolRunner(["PATH"])

    async def main():
        task = asyncio.create_task(runner.run(tool(["sh", "-c", script])))
        deadline = time.monotonic() + 5
        while not (pidfile.exists() and pidfile.read_text().strip()):
            assert time.monotonic() < deadline, "tool never started"
            await asyncio.sleep(0.01)
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
    runner = ToolRunner(["PATH", "SWARMX_TEST_PASSED", "SWARMX_TEST_UNSET"])
    out = run(runner, tool(["env"], call_id="call-42"))
    assert out.ok, out.error
    env = dict(line.split("=", 1) for line in out.output.splitlines())
    assert "hunter2" not in out.output
    assert set(env) == {"PATH", "SWARMX_TEST_PASSED", "HOME", "TMPDIR", "SWARMX_CALL_ID"}
    assert env["PATH"] == os.environ["PATH"]
    assert env["SWARMX_TEST_PASSED"] == "visible"
    assert env["SWARMX_CALL_ID"] == "call-42"
    assert env["HOME"] == env["TMPDIR"]


def test_passthrough_is_read_when_the_runner_is_made(monkeypatch):
    monkeypatch.setenv("SWARMX_TEST_PASSED", "before")
    runner = ToolRunner(["PATH", "SWARMX_TEST_PASSED"])
    monkeypatch.setenv("SWARMX_TEST_PASSED", "after")
    out = run(runner, tool(["sh", "-c", 'printf %s "$SWARMX_TEST_PASSED"']))
    assert out.output == "before"


def test_cwd_is_a_fresh_scratch_dir_removed_afterwards(scratch_dirs):
    runner = ToolRunner(["PATH"])
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
    runner = ToolRunner(["PATH"])
    out = run(runner, tool(["/nonexistent/swarmx-no-such-tool", "--flag"]))
    assert not out.ok
    assert out.error.startswith("cannot run '/nonexistent/swarmx-no-such-tool'")
    assert runner.metrics().running == 0
    assert scratch_dirs
    assert not os.path.exists(scratch_dirs[0])


def test_empty_command_or_wrong_kind_is_refused():
    runner = ToolRunner(["PATH"])
    assert not run(runner, tool([])).ok
    llm = CallRequest("c", "llm", "lm", prompt="hi", command=["echo", "hi"])
    out = run(runner, llm)
    assert not out.ok
    assert "non-empty command" in out.error


def test_nul_bytes_in_argv_are_stripped():
    out = run(ToolRunner(["PATH"]), tool(["printf", "%s|%s", "a\0b", "\0c\0"]))
    assert out.ok, out.error
    assert out.output == "ab|c"


def test_huge_output_is_truncated_with_a_marker(monkeypatch):
    monkeypatch.setattr(tools, "MAX_OUTPUT_BYTES", 16)
    script = "head -c 5000 /dev/zero | tr '\\0' x"
    out = run(ToolRunner(["PATH"]), tool(["sh", "-c", script]))
    assert out.ok, out.error
    assert out.output == "x" * 16 + "\n[output truncated]"


def test_output_at_the_limit_is_not_truncated(monkeypatch):
    monkeypatch.setattr(tools, "MAX_OUTPUT_BYTES", 16)
    out = run(ToolRunner(["PATH"]), tool(["printf", "%s", "y" * 16]))
    assert out.output == "y" * 16


def test_invalid_utf8_output_is_replaced_not_raised():
    out = run(ToolRunner(["PATH"]), tool(["printf", "ok \\377\\n"]))
    assert out.ok, out.error
    assert out.output == "ok \ufffd\n"
