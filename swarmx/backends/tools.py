"""Tool steps: subprocesses on the node, each in a fresh scratch directory.

A tool's argv is rendered from workflow inputs and model output, so it is untrusted: the node runs
only the executables it lists (``[node] tool_commands``), under resource limits and optionally
another user (``tool_limits``, ``tool_user``), keeps a bounded part of the output as it streams,
and kills every process the tool started when the call ends, however it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import pwd
import resource
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import psutil

from swarmx.backends.base import BackendMetrics, CallOutcome, CallRequest
from swarmx.config import ToolLimits

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 60.0
MAX_OUTPUT_BYTES = 1 << 20
"""Stdout kept per call; the rest is read, counted and dropped as it arrives, so a runaway tool
floods neither the agent's memory nor the scheduler, and never blocks on a full pipe."""
STDERR_TAIL_BYTES = 4096
"""The end of stderr kept per call, for the error message."""
DRAIN_S = 1.0
"""After the tree is killed, how long its output pipes may stay open (only a process that escaped
the kill keeps them open) before the agent closes its ends."""
KILL_DEADLINE_S = 5.0
"""How long to keep killing a tree that keeps producing processes before logging and giving up."""
TOKEN_VAR = "SWARMX_TOOL_TOKEN"
"""Environment variable carrying a token unique to one run: every process of the tree inherits
it, including one that left the process group, which is how the kill finds it."""
ALL_COMMANDS = "*"
_LIMIT_SIGNALS = {signal.SIGXCPU: "cpu_time_s", signal.SIGXFSZ: "file_bytes"}


@dataclass(frozen=True)
class _Identity:
    """The user tools run as (``[node] tool_user``), resolved once when the runner is made."""

    uid: int
    gid: int
    groups: list[int]


@dataclass
class _Stream:
    """One output stream of a tool: the first ``keep`` bytes, or the last ones with ``tail``."""

    keep: int
    tail: bool = False
    data: bytearray = field(default_factory=bytearray)
    dropped: int = 0

    def add(self, chunk: bytes) -> None:
        if self.tail:
            self.data += chunk
            del self.data[: -self.keep]
            return
        room = self.keep - len(self.data)
        self.data += chunk[:room]
        self.dropped += max(0, len(chunk) - room)

    def text(self) -> str:
        text = self.data.decode(errors="replace")
        if self.dropped:
            text += f"\n[output truncated: {self.dropped} bytes more]"
        return text


class _Reader(asyncio.Protocol):
    """Feeds a pipe into a `_Stream` as data arrives; no buffer in between."""

    def __init__(self, stream: _Stream) -> None:
        self._stream = stream
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self._stream.add(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


class ToolRunner:
    """The ``tool`` backend of a node: one subprocess tree per call, bounded as the module says."""

    def __init__(
        self,
        env_passthrough: Sequence[str],
        commands: Sequence[str],
        *,
        node: str,
        limits: ToolLimits | None = None,
        user: str = "",
    ) -> None:
        """Raises ValueError for a ``user`` this host lacks or this agent cannot switch to."""
        self._env = {k: os.environ[k] for k in env_passthrough if k in os.environ}
        self._commands = frozenset(commands)
        self._node = node
        self._rlimits = _rlimits(limits or ToolLimits())
        self._identity = _identity(user) if user else None
        self._running = 0

    async def start(self) -> None:
        if not self._commands:
            log.warning(
                "node %s serves tool slots but [node] tool_commands is empty: "
                "every tool call will be refused",
                self._node,
            )

    def metrics(self) -> BackendMetrics:
        return BackendMetrics(running=self._running)

    async def close(self) -> None:
        return None

    async def run(self, request: CallRequest) -> CallOutcome:
        if request.kind != "tool" or not request.command:
            return CallOutcome(False, "", "tool calls need a non-empty command")
        # argv cannot carry NUL bytes, and model output fed into a command may contain them
        argv = [arg.replace("\0", "") for arg in request.command]
        if ALL_COMMANDS not in self._commands and argv[0] not in self._commands:
            error = (
                f"command {argv[0]!r} is not allowed on node {self._node} ([node] tool_commands)"
            )
            return CallOutcome(False, "", error)
        timeout = request.timeout_s or DEFAULT_TIMEOUT_S
        token = uuid.uuid4().hex
        out, err = _Stream(MAX_OUTPUT_BYTES), _Stream(STDERR_TAIL_BYTES, tail=True)
        readers: list[_Reader] = []
        transports: list[asyncio.ReadTransport] = []
        write_fds: list[int] = []
        scratch = tempfile.mkdtemp(prefix="swarmx-tool-")
        self._running += 1
        try:
            loop = asyncio.get_running_loop()
            for stream in (out, err):
                read_fd, write_fd = os.pipe()
                write_fds.append(write_fd)
                pipe = open(read_fd, "rb", buffering=0)  # noqa: SIM115 - its transport closes it
                transport, reader = await loop.connect_read_pipe(
                    functools.partial(_Reader, stream), pipe
                )
                transports.append(transport)
                readers.append(reader)
            try:
                proc = await self._spawn(argv, scratch, token, request.call_id, write_fds)
            except OSError as exc:
                return CallOutcome(False, "", f"cannot run {argv[0]!r}: {exc.strerror}")
            except asyncio.CancelledError:  # asyncio killed the tool; not what it forked since
                await asyncio.to_thread(_kill_tree, None, token)
                raise
            finally:  # the child has its copies; ours would keep the pipes open for ever
                for fd in write_fds:
                    os.close(fd)
                write_fds.clear()
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except asyncio.TimeoutError:
                return CallOutcome(False, "", f"timed out after {timeout:g}s")
            finally:  # exit, timeout or cancellation: nothing the tool started outlives the call
                await asyncio.to_thread(_kill_tree, proc.pid, token)
                await proc.wait()
            _, still_open = await asyncio.wait([r.closed for r in readers], timeout=DRAIN_S)
            if still_open:
                log.warning("tool %s: output pipe still open after its tree was killed", argv[0])
        finally:
            for transport in transports:
                transport.close()
            for fd in write_fds:
                os.close(fd)
            self._running -= 1
            shutil.rmtree(scratch, ignore_errors=True)
        return _outcome(proc.returncode, out, err)

    async def _spawn(
        self, argv: list[str], scratch: str, token: str, call_id: str, fds: list[int]
    ) -> asyncio.subprocess.Process:
        ident = self._identity
        if ident:
            os.chown(scratch, ident.uid, ident.gid)
        env = {
            **self._env,
            "HOME": scratch,
            "TMPDIR": scratch,
            "SWARMX_CALL_ID": call_id,
            TOKEN_VAR: token,
        }
        return await asyncio.create_subprocess_exec(
            *argv,
            cwd=scratch,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            # plain fds, not PIPE: wait() then returns when the tool exits, even while a leftover
            # child still holds the pipes (it is killed right after)
            stdout=fds[0],
            stderr=fds[1],
            start_new_session=True,  # its own process group, killed as a whole
            preexec_fn=self._limit if self._rlimits else None,
            user=ident.uid if ident else None,
            group=ident.gid if ident else None,
            extra_groups=ident.groups if ident else None,
        )

    def _limit(self) -> None:
        """Runs in the forked child before exec: only setrlimit calls, their values precomputed
        (preexec_fn code must not take locks another thread of the agent may have held)."""
        for which, soft, hard in self._rlimits:
            resource.setrlimit(which, (soft, hard))


def _outcome(code: int | None, out: _Stream, err: _Stream) -> CallOutcome:
    output = out.text()
    if code is not None and code < 0:
        return CallOutcome(False, output, _signalled(-code))
    if code != 0:
        last = err.data.decode(errors="replace").strip().splitlines()[-1:] or ["(no stderr)"]
        return CallOutcome(False, output, f"exit code {code}: {last[0][:300]}")
    return CallOutcome(True, output, output_tokens=len(output.split()))


def _kill_tree(pgid: int | None, token: str) -> None:
    """SIGKILL the tool's process group and every process whose environment carries its token,
    until a scan finds none: a child that called setsid() left the group but kept the token, and
    children a fork bomb makes during one round are found on the next. Blocking: run in a thread.
    (The group id cannot be reused while any member lives, and pids are handed out cyclically, so
    in the milliseconds after the leader is reaped it names no one else's group.)"""
    deadline = time.monotonic() + KILL_DEADLINE_S
    while True:
        if pgid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        found = _carriers(token)
        if not found:
            return
        for proc in found:
            with contextlib.suppress(psutil.Error):  # exited since, or not ours to signal
                proc.kill()
        if time.monotonic() > deadline:
            pids = [p.pid for p in found]
            log.error("tool processes %s survived SIGKILL for %gs", pids, KILL_DEADLINE_S)
            return
        time.sleep(0.005)  # let the killed exit before the next scan


def _carriers(token: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):  # exited, a zombie, or not ours to read
            if proc.environ().get(TOKEN_VAR) == token:
                found.append(proc)
    return found


def _rlimits(limits: ToolLimits) -> list[tuple[int, int, int]]:
    """(resource, soft, hard) for each limit set, never above the agent's own hard limit (which
    the tool could not raise anyway, and asking would fail the spawn)."""
    wanted = [
        (resource.RLIMIT_AS, limits.memory_bytes, 0),
        # soft: SIGXCPU, which names the limit in the error; hard one second later: SIGKILL
        (resource.RLIMIT_CPU, limits.cpu_time_s, 1),
        (resource.RLIMIT_FSIZE, limits.file_bytes, 0),
        (resource.RLIMIT_NOFILE, limits.open_files, 0),
    ]
    out = []
    for which, value, grace in wanted:
        if value:
            _, ceiling = resource.getrlimit(which)
            soft = value if ceiling == resource.RLIM_INFINITY else min(value, ceiling - grace)
            out.append((which, soft, soft + grace))
    return out


def _identity(user: str) -> _Identity:
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise ValueError(f"[node] tool_user: no user {user!r} on this host") from None
    if os.geteuid() != 0:
        raise ValueError(
            f"[node] tool_user = {user!r}: running tools as another user needs the agent to run "
            f"as root (it runs as uid {os.geteuid()})"
        )
    return _Identity(entry.pw_uid, entry.pw_gid, os.getgrouplist(user, entry.pw_gid))


def _signalled(signum: int) -> str:
    try:
        sig = signal.Signals(signum)
    except ValueError:
        return f"killed by signal {signum}"
    limit = _LIMIT_SIGNALS.get(sig)
    return f"killed by {sig.name}" + (f" ([node] tool_limits.{limit})" if limit else "")
