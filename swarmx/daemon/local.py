"""`swarmx up`: a scheduler, N node agents (and a gateway) as child processes of one foreground
supervisor.

Children are real daemons (the same commands systemd runs), so a local cluster exercises the same
code as a real one. They get SIGTERM if the supervisor dies (PR_SET_PDEATHSIG on Linux), a crashed
child is restarted with backoff, and `stop()` leaves no orphans: SIGTERM, wait, then SIGKILL.

Metrics: with ``metrics_port`` N the scheduler serves on N and node ``node-i`` on N + i; without,
every child is told 0 (off), so a config's ``[node] metrics_port`` cannot make local agents
fight over one port.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from swarmx.clock import Clock
from swarmx.daemon.scheduler import read_state_file
from swarmx.protocol import NodesReply, QueryNodes
from swarmx.security import LOCAL_ADMIN_KEY, LOCAL_GATEWAY_KEY, LocalKeys, make_local_keys
from swarmx.transport import (
    ClientCurve,
    TransportError,
    load_keypair,
    load_public_key,
    request,
)

log = logging.getLogger(__name__)

POLL_S = 0.1
MAX_RESTARTS = 5
"""Restarts of one child within RESTART_WINDOW_S before the supervisor gives up."""
RESTART_WINDOW_S = 60.0


class ClusterError(RuntimeError):
    pass


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=1.0) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def connectable(endpoint: str) -> str:
    """A bound wildcard address as clients on this host should dial it."""
    for wildcard in ("tcp://0.0.0.0:", "tcp://*:", "tcp://[::]:"):
        if endpoint.startswith(wildcard):
            return "tcp://127.0.0.1:" + endpoint[len(wildcard) :]
    return endpoint


@dataclass
class _Child:
    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    restarts: list[float] = field(default_factory=list)

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, preexec_fn=_die_with_parent)  # noqa: PLW1509

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class LocalCluster:
    def __init__(
        self,
        nodes: int,
        listen: str,
        state_dir: Path,
        clock: Clock,
        *,
        config: Path | None = None,
        log_level: str | None = None,
        log_format: str | None = None,
        preset: str = "none",
        metrics_port: int = 0,
        gateway_port: int | None = None,
        ready_timeout_s: float = 60.0,
    ) -> None:
        self.n_nodes = nodes
        self.listen = listen
        self.state_dir = state_dir
        self.clock = clock
        self.ready_timeout_s = ready_timeout_s
        self.preset = preset
        self.metrics_port = metrics_port
        self.gateway_url = "" if gateway_port is None else f"http://127.0.0.1:{gateway_port}"
        """The OpenAI-compatible gateway's address, when one is asked for."""
        self._common = [
            *(["--config", str(config)] if config else []),
            *(["--log-level", log_level] if log_level else []),
            *(["--log-format", log_format] if log_format else []),
        ]
        self.endpoint = ""
        self.node_names = [f"node-{i}" for i in range(1, nodes + 1)]
        self._children: list[_Child] = []
        self.curve: ClientCurve | None = None
        """The CLI's (admin) keys for this cluster, once `start` has made them."""

    def _swarmx(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "swarmx", *args, *self._common]

    def start(self) -> str:
        """Start everything and wait until every node is registered; returns the scheduler's
        address. Raises ClusterError (after stopping what it started) if that does not happen."""
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            keys = make_local_keys(self.state_dir, self.node_names)
            self.curve = ClientCurve(
                load_keypair(keys.secret(LOCAL_ADMIN_KEY)),
                load_public_key(keys.public("scheduler")),
            )
            scheduler = _Child(
                "scheduler",
                self._swarmx(
                    "scheduler",
                    "start",
                    "--listen",
                    self.listen,
                    "--state-dir",
                    str(self.state_dir),
                    "--metrics-port",
                    str(self.metrics_port),
                    "--key",
                    str(keys.secret("scheduler")),
                    "--authorized-keys",
                    str(keys.authorized),
                ),
            )
            self._children.append(scheduler)
            scheduler.start()
            self.endpoint = connectable(self._wait_for_endpoint(scheduler))
            # Restarts must come back on the same port, even if the first bind asked for port 0.
            scheduler.argv[scheduler.argv.index("--listen") + 1] = self.endpoint
            for i, name in enumerate(self.node_names, 1):
                node = _Child(
                    name,
                    self._swarmx(
                        "node",
                        "start",
                        "--scheduler",
                        self.endpoint,
                        "--name",
                        name,
                        "--preset",
                        self.preset,
                        "--metrics-port",
                        str(self.metrics_port + i if self.metrics_port else 0),
                        "--key",
                        str(keys.secret(name)),
                        "--scheduler-key",
                        str(keys.public("scheduler")),
                        "--tool-commands",
                        "*",
                    ),
                )
                self._children.append(node)
                node.start()
            self._wait_for_nodes()
            if self.gateway_url:
                self._start_gateway(keys)
        except BaseException:
            self.stop()
            raise
        return self.endpoint

    def _deadline_passed(self, deadline: float, what: str) -> None:
        for child in self._children:
            if not child.running:
                assert child.proc is not None
                raise ClusterError(
                    f"{child.name} exited with code {child.proc.returncode} before {what}; "
                    "see its log above"
                )
        if self.clock.monotonic() > deadline:
            raise ClusterError(f"timed out after {self.ready_timeout_s:g}s waiting for {what}")
        time.sleep(POLL_S)

    def _wait_for_endpoint(self, scheduler: _Child) -> str:
        assert scheduler.proc is not None
        deadline = self.clock.monotonic() + self.ready_timeout_s
        while True:
            state = read_state_file(self.state_dir)
            if state and state.get("pid") == scheduler.proc.pid:
                return str(state["endpoint"])
            self._deadline_passed(deadline, "the scheduler was listening")

    def _start_gateway(self, keys: LocalKeys) -> None:
        """A gateway on loopback with no API keys: this host's callers only."""
        gateway = _Child(
            "gateway",
            self._swarmx(
                "gateway",
                "--listen",
                self.gateway_url,
                "--scheduler",
                self.endpoint,
                "--key",
                str(keys.secret(LOCAL_GATEWAY_KEY)),
                "--scheduler-key",
                str(keys.public("scheduler")),
                "--metrics-port",
                "0",
            ),
        )
        self._children.append(gateway)
        gateway.start()
        deadline = self.clock.monotonic() + self.ready_timeout_s
        while not _healthy(self.gateway_url):
            self._deadline_passed(deadline, f"the gateway to serve {self.gateway_url}")

    def query_nodes(self, timeout_s: float = 2.0) -> NodesReply | None:
        try:
            env = request(
                self.endpoint, QueryNodes(), "up", self.clock, timeout_s, curve=self.curve
            )
        except (TimeoutError, TransportError):
            return None
        return env.body if isinstance(env.body, NodesReply) else None

    def _wait_for_nodes(self) -> None:
        deadline = self.clock.monotonic() + self.ready_timeout_s
        while True:
            reply = self.query_nodes()
            live = {n.name for n in reply.nodes if n.state == "live"} if reply else set()
            if live >= set(self.node_names):
                return
            self._deadline_passed(deadline, f"{self.n_nodes} nodes to register")

    def supervise_once(self) -> None:
        """Restart children that died; raise ClusterError when one keeps dying."""
        now = self.clock.monotonic()
        for child in self._children:
            if child.running:
                continue
            assert child.proc is not None
            child.restarts = [t for t in child.restarts if now - t < RESTART_WINDOW_S]
            if len(child.restarts) >= MAX_RESTARTS:
                raise ClusterError(
                    f"{child.name} exited {MAX_RESTARTS} times within {RESTART_WINDOW_S:g}s "
                    f"(last code {child.proc.returncode}); giving up"
                )
            log.warning("%s exited with code %s; restarting", child.name, child.proc.returncode)
            child.restarts.append(now)
            child.start()

    @property
    def pids(self) -> list[int]:
        return [c.proc.pid for c in self._children if c.proc is not None]

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM nodes, then the scheduler; SIGKILL whatever outlives ``timeout_s``."""
        for child in reversed(self._children):
            if child.running:
                assert child.proc is not None
                child.proc.send_signal(signal.SIGTERM)
        deadline = self.clock.monotonic() + timeout_s
        for child in reversed(self._children):
            if child.proc is None:
                continue
            try:
                child.proc.wait(timeout=max(0.0, deadline - self.clock.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %gs; killing it", child.name, timeout_s)
                child.proc.kill()
                child.proc.wait()
