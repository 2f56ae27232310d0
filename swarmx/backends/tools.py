"""Tool steps: subprocesses on the node, each in a fresh scratch directory, with a bounded
environment, a timeout, and captured output and exit code."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile

from swarmx.backends.base import BackendMetrics, CallOutcome, CallRequest

DEFAULT_TIMEOUT_S = 60.0
MAX_OUTPUT_BYTES = 1 << 20
"""Output beyond this is cut (and said so): a runaway tool must not flood the scheduler."""


class ToolRunner:
    def __init__(self, env_passthrough: list[str]) -> None:
        self._env = {k: os.environ[k] for k in env_passthrough if k in os.environ}
        self._running = 0

    async def start(self) -> None:
        return None

    def metrics(self) -> BackendMetrics:
        return BackendMetrics(running=self._running)

    async def close(self) -> None:
        return None

    async def run(self, request: CallRequest) -> CallOutcome:
        if request.kind != "tool" or not request.command:
            return CallOutcome(False, "", "tool calls need a non-empty command")
        # argv cannot carry NUL bytes, and model output fed into a command may contain them
        argv = [arg.replace("\0", "") for arg in request.command]
        scratch = tempfile.mkdtemp(prefix="swarmx-tool-")
        env = {**self._env, "HOME": scratch, "TMPDIR": scratch, "SWARMX_CALL_ID": request.call_id}
        timeout = request.timeout_s or DEFAULT_TIMEOUT_S
        self._running += 1
        try:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    cwd=scratch,
                    env=env,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                    start_new_session=True,  # its own process group, killed as a whole
                )
            except OSError as exc:
                return CallOutcome(False, "", f"cannot run {argv[0]!r}: {exc.strerror}")
            try:
                stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout)
            except (asyncio.TimeoutError, asyncio.CancelledError) as exc:
                _kill_group(proc)
                await proc.wait()
                if isinstance(exc, asyncio.CancelledError):
                    raise
                return CallOutcome(False, "", f"timed out after {timeout:g}s")
        finally:
            self._running -= 1
            shutil.rmtree(scratch, ignore_errors=True)
        output = _text(stdout)
        if proc.returncode != 0:
            last = _text(stderr).strip().splitlines()[-1:] or ["(no stderr)"]
            return CallOutcome(False, output, f"exit code {proc.returncode}: {last[0][:300]}")
        return CallOutcome(True, output, output_tokens=len(output.split()))


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _text(data: bytes) -> str:
    if len(data) > MAX_OUTPUT_BYTES:
        return data[:MAX_OUTPUT_BYTES].decode(errors="replace") + "\n[output truncated]"
    return data.decode(errors="replace")
