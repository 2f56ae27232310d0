"""The tool reaper: a sidecar process that stops an agent's tools once the agent cannot own them.

Every call's effect must happen at most once. When an agent dies (SIGKILL included) or stalls, the
scheduler re-runs its calls on another node, so the tools it started must not run on. The agent's
`ToolRunner` starts this process (`main`; by hand: ``python -m swarmx.backends.reaper``) with a
pipe to its stdin and writes one line per event:

    + TOKEN [PGID]   a tool tree is starting (again with its process group once spawned)
    - TOKEN          it ended
    .                the agent's event loop is alive (sent every lease/4)

Every well-formed line renews the lease; any other line is counted and ignored. On EOF (the agent
exited: the kernel closes its end of the pipe however it died) or when the agent is no longer its
parent (a forked child of the agent may hold the pipe open), the reaper kills every registered tree
and exits. When no line came for the lease, it writes ``reaped TOKEN GAP_S`` to stdout for each
registered tree (the agent reads them when it resumes and names the cause in the call's error),
kills the trees, logs why, and keeps running.

`kill_trees`, the one implementation of "kill a tool's whole tree", lives here so the agent and the
reaper share it; psutil is imported when something is killed, so the reaper starts on the stdlib.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import select
import signal
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import psutil

log = logging.getLogger("swarmx.backends.reaper")  # the same name when run as __main__

TOKEN_VAR = "SWARMX_TOOL_TOKEN"
"""Environment variable carrying a token unique to one run: every process of the tree inherits
it, including one that left the process group, which is how the kill finds it."""
NODE_VAR = "SWARMX_TOOL_NODE"
"""The name of the node whose agent started the tool."""
AGENT_VAR = "SWARMX_TOOL_AGENT"
"""The pid of the agent that started the tool: a tool whose agent is gone is an orphan."""
KILL_DEADLINE_S = 5.0
"""How long to keep killing a tree that keeps producing processes before logging and giving up."""
PARENT_POLL_S = 0.5
"""How often the reaper checks that the agent is still its parent, besides watching the pipe."""
MAX_LINE_BYTES = 256
"""Longer lines are malformed (a token is 32 characters); the reaper skips them unbuffered."""


def kill_trees(trees: Mapping[str, int | None]) -> None:
    """SIGKILL each tool's process group and every process whose environment carries one of the
    tokens, until a scan finds none: a child that called setsid() left the group but kept the
    token, and children a fork bomb makes during one round are found on the next. ``trees`` maps
    token to process group (None before the spawn returned). Blocking: run it in a thread.
    (A group id cannot be reused while any member lives, and pids are handed out cyclically, so in
    the milliseconds after the leader is reaped it names no one else's group.)"""
    tokens = frozenset(trees)
    groups = [pgid for pgid in trees.values() if pgid is not None]
    _kill_until_gone(groups, lambda env, _: env.get(TOKEN_VAR) in tokens)


def sweep_orphans(node: str) -> int:
    """Kill the tool processes an earlier agent of ``node`` left (its reaper died with it): those
    whose agent pid is gone, or now names a process younger than the tool. Returns how many were
    killed. Blocking: run it in a thread."""
    import psutil

    def orphan(env: dict[str, str], proc: psutil.Process) -> bool:
        if env.get(NODE_VAR) != node:
            return False
        try:
            agent = psutil.Process(int(env.get(AGENT_VAR, "")))
            alive = agent.status() != psutil.STATUS_ZOMBIE
            return not alive or agent.create_time() > proc.create_time()
        except ValueError:  # no agent pid: not started by a runner, leave it
            return False
        except psutil.NoSuchProcess:
            return True
        except psutil.AccessDenied:  # cannot tell: leave it
            return False

    return len(_kill_until_gone([], orphan))


def _kill_until_gone(
    groups: Iterable[int], match: Callable[[dict[str, str], psutil.Process], bool]
) -> set[int]:
    import psutil

    me = os.getpid()
    deadline = time.monotonic() + KILL_DEADLINE_S
    killed: set[int] = set()
    while True:
        for pgid in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        found = []
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error):  # exited, a zombie, or not ours to read
                if proc.pid != me and match(proc.environ(), proc):
                    found.append(proc)
        if not found:
            return killed
        for proc in found:
            with contextlib.suppress(psutil.Error):  # exited since, or not ours to signal
                proc.kill()
                killed.add(proc.pid)
        if time.monotonic() > deadline:
            pids = [p.pid for p in found]
            log.error("tool processes %s survived SIGKILL for %gs", pids, KILL_DEADLINE_S)
            return killed
        time.sleep(0.005)  # let the killed exit before the next scan


class Lease:
    """What the reaper knows: the registered trees and when the agent last spoke. Pure: lines and
    times in, decisions out; `main` does the I/O."""

    def __init__(self, lease_s: float, now: float) -> None:
        self.lease_s = lease_s
        self.trees: dict[str, int | None] = {}
        self.renewed_at = now
        self.lapsed = False
        self.malformed = 0
        self._partial = b""
        self._skipping = False

    def feed(self, chunk: bytes, now: float) -> None:
        """Handle the complete lines in ``chunk``, keeping a partial last line for the next."""
        *lines, rest = (self._partial + chunk).split(b"\n")
        for line in lines:
            if self._skipping:  # the end of an overlong line
                self._skipping = False
            else:
                self.handle(line, now)
        self._partial = rest
        if len(rest) > MAX_LINE_BYTES:
            self.malformed += 1
            self._partial, self._skipping = b"", True

    def handle(self, line: bytes, now: float) -> None:
        if not self._apply(line.split()):
            self.malformed += 1
            if self.malformed == 1:
                log.warning("ignoring a malformed line from the agent: %r", line[:80])
            return
        self.renewed_at = now
        self.lapsed = False

    def _apply(self, words: list[bytes]) -> bool:
        if words == [b"."]:
            return True
        if len(words) not in (2, 3) or words[0] not in (b"+", b"-"):
            return False
        token = words[1].decode("ascii", "replace")
        if not token.isalnum() or not token.isascii():
            return False
        if words[0] == b"-":
            if len(words) != 2:
                return False
            self.trees.pop(token, None)
            return True
        pgid = int(words[2]) if len(words) == 3 and words[2].isdigit() else None
        if len(words) == 3 and not (pgid and 1 < pgid < 1 << 31):  # killpg(0) hits our group
            return False
        self.trees[token] = pgid if pgid is not None else self.trees.get(token)
        return True

    def due(self, now: float) -> bool:
        """No line for the lease: the agent is frozen or its loop stalled."""
        return not self.lapsed and now - self.renewed_at >= self.lease_s

    def lapse(self) -> dict[str, int | None]:
        """The trees to kill now; the lease stays lapsed (nothing more to kill) until a line."""
        self.lapsed = True
        trees, self.trees = self.trees, {}
        return trees

    def wait_s(self, now: float) -> float:
        """How long to wait for input before something is due."""
        if self.lapsed:
            return PARENT_POLL_S
        return max(0.0, min(self.renewed_at + self.lease_s - now, PARENT_POLL_S))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m swarmx.backends.reaper")
    parser.add_argument("--lease-s", type=float, required=True)
    parser.add_argument("--agent-pid", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s"
    )
    # it lives exactly as long as the agent's pipe: a Ctrl-C or a SIGTERM meant for the agent
    # must not leave the agent's tools unguarded while the agent shuts down
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    os.set_blocking(stdout, False)  # a frozen agent must not block the reaper on a full pipe
    lease = Lease(args.lease_s, time.monotonic())
    _say(stdout, b"ready\n")
    why = "the agent closed the pipe"
    while True:
        ready, _, _ = select.select([stdin], [], [], lease.wait_s(time.monotonic()))
        if ready:
            chunk = os.read(stdin, 65536)
            if not chunk:
                break
            lease.feed(chunk, time.monotonic())
        if os.getppid() != args.agent_pid:
            why = f"the agent (pid {args.agent_pid}) is gone"
            break
        now = time.monotonic()
        if lease.due(now):
            gap = now - lease.renewed_at
            trees = lease.lapse()
            log.warning(
                "agent pid %d sent nothing for %.1f s (tool lease %g s): it is frozen or its "
                "event loop stalled; %s",
                args.agent_pid,
                gap,
                args.lease_s,
                f"killing its {len(trees)} running tool(s)" if trees else "no tool was running",
            )
            for token in trees:  # before the kill: the agent learns why as soon as it sees it
                _say(stdout, f"reaped {token} {gap:.3f}\n".encode())
            kill_trees(trees)
    if lease.trees:
        log.warning("%s: killing its %d running tool(s)", why, len(lease.trees))
        kill_trees(lease.trees)
    if lease.malformed:
        log.warning("ignored %d malformed line(s) from the agent", lease.malformed)
    return 0


def _say(fd: int, line: bytes) -> None:
    """One short line, written whole (below PIPE_BUF) or not at all."""
    try:
        os.write(fd, line)
    except BlockingIOError:
        log.warning("the agent is not reading: dropped %r", line)
    except BrokenPipeError:  # the agent is gone; EOF on stdin follows
        pass


if __name__ == "__main__":
    sys.exit(main())
