"""Tool steps: subprocesses on the node, each in a fresh scratch directory.

A tool's argv is rendered from workflow inputs and model output, so it is untrusted: the node runs
only the executables it lists (``[node] tool_commands``), under resource limits and optionally
another user (``tool_limits``, ``tool_user``), keeps a bounded part of the output as it streams,
and kills every process the tool started when the call ends, however it ends.

The call ends also when the agent cannot own it any more: a reaper sidecar (`reaper`) kills the
running tools when the agent dies or its event loop stalls past the tool lease, before the
scheduler runs the call elsewhere, and `start` kills those an earlier agent of the node left.
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
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import swarmx
from swarmx.backends.base import BackendMetrics, CallOutcome, CallRequest
from swarmx.backends.reaper import (
    AGENT_VAR,
    KILL_DEADLINE_S,
    NODE_VAR,
    TOKEN_VAR,
    kill_trees,
    sweep_orphans,
)
from swarmx.clock import Clock, RealClock
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
REAPER_READY_S = 5.0
"""How long the reaper sidecar may take to start before the runner goes on without a lease."""
REAPER_CLOSE_S = KILL_DEADLINE_S + 1.0
"""How long `close` waits for the reaper to kill what is left and exit before killing it."""
ALL_COMMANDS = "*"
_LIMIT_SIGNALS = {signal.SIGXCPU: "cpu_time_s", signal.SIGXFSZ: "file_bytes"}
_REAPER_MAIN = (
    "import sys; sys.path.append(sys.argv.pop(1)); "
    "from swarmx.backends.reaper import main; sys.exit(main())"
)
"""The reaper's entry point, with the directory this agent's swarmx came from as a last resort
on its path (appended: PYTHONPATH would put it before the standard library)."""
_UNGUARDED = "tools will not be stopped if this agent dies or stalls"


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


class _Reaper:
    """The agent's side of the reaper sidecar (`reaper`): tells it each tree as it starts and ends,
    renews the lease from the event loop (a stalled loop stops renewing: that is the point), and
    learns which trees it killed because the lease lapsed."""

    def __init__(self, proc: asyncio.subprocess.Process, lease_s: float) -> None:
        self._proc = proc
        self._lease_s = lease_s
        self._renewed_at = time.monotonic()
        self._stall = (0.0, 0.0)
        """The last stall of the loop past the lease: (length_s, ended_at)."""
        self._live: set[str] = set()
        self._reaped: dict[str, float] = {}
        """Token -> the gap the reaper saw when it killed the tree, for running calls only."""
        self._up = True
        self._renewer = asyncio.create_task(self._renew())
        self._listener = asyncio.create_task(self._listen())

    @classmethod
    async def start(cls, lease_s: float) -> _Reaper | None:
        """The reaper, started and ready; None, logged, if it cannot start."""
        argv = [
            sys.executable,
            "-c",
            _REAPER_MAIN,
            str(Path(swarmx.__file__).resolve().parent.parent),
            "--lease-s",
            repr(lease_s),
            "--agent-pid",
            str(os.getpid()),
        ]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                start_new_session=True,  # a Ctrl-C or SIGSTOP sent to the agent's group spares it
            )
        except OSError as exc:
            log.error("cannot start the tool reaper: %s; %s", exc, _UNGUARDED)
            return None
        assert proc.stdin is not None and proc.stdout is not None
        try:
            ready = await asyncio.wait_for(proc.stdout.readline(), REAPER_READY_S)
        except asyncio.TimeoutError:
            ready = b""
        if ready != b"ready\n":
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            code = await proc.wait()
            log.error("the tool reaper did not start (exit code %s); %s", code, _UNGUARDED)
            return None
        # EOF on its stdin is how it learns the agent died: no tool may hold a copy of this end
        # (asyncio closes other fds in children; this makes sure exec drops it anyway)
        os.set_inheritable(proc.stdin.transport.get_extra_info("pipe").fileno(), False)
        return cls(proc, lease_s)

    def register(self, token: str, pgid: int | None = None) -> None:
        """A tree is starting (``pgid`` None: before its spawn returned, found by its token)."""
        self._live.add(token)
        self._send(f"+ {token}\n" if pgid is None else f"+ {token} {pgid}\n")

    def unregister(self, token: str) -> None:
        self._live.discard(token)
        self._reaped.pop(token, None)
        self._send(f"- {token}\n")

    def stalled(self, token: str, since: float) -> str | None:
        """The error of a call whose tree the reaper killed because the lease lapsed, else None."""
        gap = self._reaped.get(token)
        if gap is None:
            return None
        stall_s, ended_at = self._stall
        # the reaper saw the start of the stall; this loop sees (or is about to see) its length
        stalled = max(gap, time.monotonic() - self._renewed_at, stall_s if ended_at >= since else 0)
        return (
            f"killed: the node agent stalled for {stalled:.1f} s (tool lease {self._lease_s:g} s), "
            "so its tools were stopped"
        )

    async def close(self) -> None:
        """Close its stdin, so it kills what is left and exits; kill it if it takes too long."""
        self._up = False
        self._renewer.cancel()
        await asyncio.wait([self._renewer])
        assert self._proc.stdin is not None
        self._proc.stdin.close()
        try:
            await asyncio.wait_for(self._proc.wait(), REAPER_CLOSE_S)
        except asyncio.TimeoutError:
            log.error(
                "the tool reaper did not exit within %gs of close: killing it", REAPER_CLOSE_S
            )
            self._proc.kill()
            await self._proc.wait()
        await self._listener

    def _send(self, line: str) -> None:
        if self._up:
            assert self._proc.stdin is not None
            self._proc.stdin.write(line.encode())

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self._lease_s / 4)
            now = time.monotonic()
            gap = now - self._renewed_at
            if gap >= self._lease_s:
                self._stall = (gap, now)
                log.warning(
                    "the agent's event loop stalled for %.1f s, past the tool lease (%g s): "
                    "the reaper stopped the tools that were running",
                    gap,
                    self._lease_s,
                )
            self._renewed_at = now
            self._send(".\n")

    async def _listen(self) -> None:
        """Reads ``reaped TOKEN GAP_S`` lines until the reaper exits."""
        assert self._proc.stdout is not None
        async for line in self._proc.stdout:
            words = line.decode(errors="replace").split()
            try:
                if len(words) != 3 or words[0] != "reaped":
                    raise ValueError
                gap = float(words[2])
            except ValueError:
                log.warning("unexpected line from the tool reaper: %r", line[:80])
                continue
            if words[1] in self._live:
                self._reaped[words[1]] = gap
        code = await self._proc.wait()
        if self._up:
            self._up = False
            log.error("the tool reaper exited (code %s); %s", code, _UNGUARDED)


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
        lease_s: float | None = 2.0,
        clock: Clock | None = None,
    ) -> None:
        """``lease_s``: how long the agent's event loop may stall before a reaper sidecar kills
        its running tools (None: no sidecar). Keep it below the time after which the scheduler
        declares the node down and re-runs its calls. ``clock`` times each call's ``timeout_s``
        (the real one unless a test steps its own; the lease watches real stalls, so it keeps
        real time). Raises ValueError for a ``user`` this host lacks or this agent cannot switch
        to, or a ``lease_s`` that is not positive."""
        if lease_s is not None and not lease_s > 0:
            raise ValueError(f"tool lease must be positive, got {lease_s!r}")
        self._env = {k: os.environ[k] for k in env_passthrough if k in os.environ}
        self._commands = frozenset(commands)
        self._node = node
        self._rlimits = _rlimits(limits or ToolLimits())
        self._identity = _identity(user) if user else None
        self._running = 0
        self._lease_s = lease_s
        self._reaper: _Reaper | None = None
        self._clock = clock or RealClock()

    async def start(self) -> None:
        if not self._commands:
            log.warning(
                "node %s serves tool slots but [node] tool_commands is empty: "
                "every tool call will be refused",
                self._node,
            )
        killed = await asyncio.to_thread(sweep_orphans, self._node)
        if killed:
            log.warning(
                "killed %d tool process(es) an earlier agent of node %s left running",
                killed,
                self._node,
            )
        else:
            log.info("no tool process of an earlier agent of node %s was running", self._node)
        if self._lease_s is not None and self._reaper is None:
            self._reaper = await _Reaper.start(self._lease_s)

    def set_commands(self, commands: Sequence[str]) -> None:
        """A new allowlist (the agent's SIGHUP): calls started from now on are checked against
        it; running ones go on."""
        self._commands = frozenset(commands)

    def metrics(self) -> BackendMetrics:
        return BackendMetrics(running=self._running)

    async def close(self) -> None:
        reaper, self._reaper = self._reaper, None
        if reaper:
            await reaper.close()

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
        token = uuid.uuid4().hex
        reaper = self._reaper
        scratch = tempfile.mkdtemp(prefix="swarmx-tool-")
        self._running += 1
        if reaper:
            reaper.register(token)
        try:
            return await self._execute(argv, request, scratch, token, reaper)
        finally:
            self._running -= 1
            shutil.rmtree(scratch, ignore_errors=True)
            if reaper:
                reaper.unregister(token)

    async def _execute(
        self,
        argv: list[str],
        request: CallRequest,
        scratch: str,
        token: str,
        reaper: _Reaper | None,
    ) -> CallOutcome:
        timeout = request.timeout_s or DEFAULT_TIMEOUT_S
        started = time.monotonic()
        out, err = _Stream(MAX_OUTPUT_BYTES), _Stream(STDERR_TAIL_BYTES, tail=True)
        readers: list[_Reader] = []
        transports: list[asyncio.ReadTransport] = []
        write_fds: list[int] = []
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
                await asyncio.to_thread(kill_trees, {token: None})
                raise
            finally:  # the child has its copies; ours would keep the pipes open for ever
                for fd in write_fds:
                    os.close(fd)
                write_fds.clear()
            if reaper:
                reaper.register(token, proc.pid)
            timed_out = False
            try:
                timed_out = not await _within(proc.wait(), timeout, self._clock)
            finally:  # exit, timeout or cancellation: nothing the tool started outlives the call
                await asyncio.to_thread(kill_trees, {token: proc.pid})
                await proc.wait()
            # the reaper's kill, not a timeout, when it killed the tree for a stalled agent
            killed = (proc.returncode or 0) < 0
            stalled = reaper.stalled(token, started) if reaper and killed else None
            if timed_out and not stalled:
                return CallOutcome(False, "", f"timed out after {timeout:g}s")
            _, still_open = await asyncio.wait([r.closed for r in readers], timeout=DRAIN_S)
            if still_open:
                log.warning("tool %s: output pipe still open after its tree was killed", argv[0])
        finally:
            for transport in transports:
                transport.close()
            for fd in write_fds:
                os.close(fd)
        if stalled:
            return CallOutcome(False, out.text(), stalled)
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
            NODE_VAR: self._node,
            AGENT_VAR: str(os.getpid()),
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


async def _within(work: Awaitable[object], timeout_s: float, clock: Clock) -> bool:
    """Await ``work`` for up to ``timeout_s`` on ``clock``: True if it finished (its exception
    raised here), False if the time ran out first (``work`` is then cancelled), as
    `asyncio.wait_for` does on the event loop's own clock."""
    task = asyncio.ensure_future(work)
    timer = asyncio.ensure_future(clock.sleep(max(0.0, timeout_s)))
    try:
        await asyncio.wait({task, timer}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # cancelled, timed out or done: neither goes on waiting
        timer.cancel()
        finished = task.done()
        if not finished:
            task.cancel()
    if finished:
        task.result()
    return finished


def _outcome(code: int | None, out: _Stream, err: _Stream) -> CallOutcome:
    output = out.text()
    if code is not None and code < 0:
        return CallOutcome(False, output, _signalled(-code))
    if code != 0:
        last = err.data.decode(errors="replace").strip().splitlines()[-1:] or ["(no stderr)"]
        return CallOutcome(False, output, f"exit code {code}: {last[0][:300]}")
    return CallOutcome(True, output, output_tokens=len(output.split()))


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
