"""Model servers the node agent launches itself: an ``openai`` replica with a ``launch`` template.

The node is their process supervisor. Each engine gets a free loopback port and its own GPUs
(`GpuAllocator`: never two engines on one GPU unless ``[node] replicas_per_gpu`` says so), runs
in a process group of its own (so stopping it stops what it forked), dies with the agent
(``PR_SET_PDEATHSIG``), and has its output logged line by line under the replica's name. It is
announced only once its health path answers; a scale-down or a failure stops it with SIGTERM to
its group, then SIGKILL after ``stop_timeout_s``. `EngineLedger` writes each live engine's
process group to the node's state directory, so an agent that was killed finds what its
predecessor left and stops it before launching anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from swarmx.backends.base import BackendMetrics, CacheReport, CallOutcome, CallRequest
from swarmx.backends.http1 import HttpClient, ProtocolError
from swarmx.backends.openai import OpenAIBackend
from swarmx.clock import time_limit
from swarmx.config import ReplicaConfig

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
"""Launched engines listen on loopback: only their node agent calls them."""
HEALTH_INTERVAL_S = 0.25
"""Between health probes while an engine starts."""
PROBE_TIMEOUT_S = 2.0
LOG_LINE_CHARS = 2000
"""An engine's log line is cut at this length (progress bars write long ones)."""
LOG_TAIL_LINES = 20
"""Lines of its output kept to explain an engine that failed to start."""


class EngineError(RuntimeError):
    """An engine could not be started or stopped; the message says why, with its last words."""


def render(parts: Sequence[str], values: Mapping[str, str]) -> list[str]:
    """The template with its placeholders filled in (each one is in ``values``)."""
    return [part.format_map(values) for part in parts]


class NoGpu(EngineError):
    pass


@dataclass
class GpuAllocator:
    """Which of the node's GPUs each launched engine holds."""

    gpus: Sequence[int]
    per_gpu: int = 1
    """Engines one GPU may hold at once."""
    _held: dict[str, list[int]] = field(default_factory=dict)

    def take(self, owner: str, n: int) -> list[int]:
        """``n`` GPUs for ``owner``: the least used first, then the lowest index."""
        if n <= 0:
            return []
        use = {g: 0 for g in self.gpus}
        for held in self._held.values():
            for g in held:
                use[g] = use.get(g, 0) + 1
        free = sorted((u, g) for g, u in use.items() if u < self.per_gpu)
        if len(free) < n:
            busy = (
                ", ".join(
                    f"{g}: {', '.join(o for o, h in self._held.items() if g in h)}"
                    for g in sorted(use)
                    if use[g]
                )
                or "none"
            )
            raise NoGpu(
                f"{owner}: needs {n} GPU(s), {len(free)} free of {len(self.gpus)}"
                f" (held: {busy}; [node] engine_gpus and replicas_per_gpu set the room)"
            )
        self._held[owner] = [g for _, g in free[:n]]
        return self._held[owner]

    def release(self, owner: str) -> None:
        self._held.pop(owner, None)


def free_port(host: str = HOST) -> int:
    """A port nothing listens on now (the kernel's pick); the engine binds it moments later."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Backoff:
    """Delays between restarts of a failing engine: ``first_s`` doubling to ``max_s``; an
    engine that stayed up ``reset_after_s`` starts over from ``first_s``."""

    first_s: float = 1.0
    max_s: float = 60.0
    reset_after_s: float = 300.0
    failures: int = 0

    def next_s(self, up_s: float) -> float:
        """The wait before the next start, after an engine that ran ``up_s`` failed."""
        if up_s >= self.reset_after_s:
            self.failures = 0
        delay = min(self.max_s, self.first_s * 2.0**self.failures)
        self.failures += 1
        return delay


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the agent that launched it dies, however."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclass(frozen=True)
class EngineSpec:
    name: str
    """The replica it serves (for logs)."""
    argv: list[str]
    env: dict[str, str]
    health_url: tuple[str, int, str]
    """(host, port, path) answered with 2xx once the engine serves."""
    ready_timeout_s: float
    stop_timeout_s: float


class Engine:
    """One launched engine process."""

    def __init__(self, spec: EngineSpec, ledger: EngineLedger | None = None) -> None:
        self.spec = spec
        self.ledger = ledger
        self.proc: asyncio.subprocess.Process | None = None
        self.started_mono = 0.0
        self._tail: list[str] = []
        self._logger: asyncio.Task[None] | None = None
        host, port, _ = spec.health_url
        self._http = HttpClient("http", host, port, max_idle=1, connect_timeout_s=PROBE_TIMEOUT_S)

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    async def start(self) -> float:
        """Launch it and wait until its health path answers; returns the seconds that took.
        Raises `EngineError` (with its last output) when it exits or is not ready in time."""
        spec = self.spec
        self.started_mono = time.monotonic()
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *spec.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env={**os.environ, **spec.env},
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        except OSError as exc:
            raise EngineError(f"{spec.name}: cannot launch {spec.argv[0]!r}: {exc}") from exc
        if self.ledger is not None:
            self.ledger.add(spec.name, self.proc.pid)
        self._logger = asyncio.create_task(self._log_output(), name=f"log {spec.name}")
        log.info("engine %s: launched pid %d: %s", spec.name, self.proc.pid, " ".join(spec.argv))
        try:
            async with time_limit(spec.ready_timeout_s):
                while not await self.healthy():
                    if self.proc.returncode is not None:
                        raise EngineError(self._why(f"exited with {self.proc.returncode}"))
                    await asyncio.sleep(HEALTH_INTERVAL_S)
        except TimeoutError:
            await self.stop()
            raise EngineError(
                self._why(f"not ready after {spec.ready_timeout_s:g} s (ready_timeout_s)")
            ) from None
        except BaseException:
            await self.stop()
            raise
        ready_s = time.monotonic() - self.started_mono
        log.info("engine %s: ready in %.1f s", spec.name, ready_s)
        return ready_s

    def _why(self, what: str) -> str:
        tail = "\n".join(self._tail[-LOG_TAIL_LINES:])
        return f"engine {self.spec.name} {what}" + (f"; its last output:\n{tail}" if tail else "")

    async def healthy(self) -> bool:
        """One probe of the health path: a 2xx answer within `PROBE_TIMEOUT_S`."""
        _, _, path = self.spec.health_url
        try:
            async with time_limit(PROBE_TIMEOUT_S):
                resp = await self._http.request("GET", path, {"User-Agent": "swarmx"})
                ok = 200 <= resp.status < 300
                self._http.discard(resp)  # no body read: a fresh connection each probe
                return ok
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ProtocolError):
            return False

    async def wait(self) -> int:
        """Until the process exits; its exit status."""
        assert self.proc is not None
        return await self.proc.wait()

    async def stop(self) -> None:
        """SIGTERM to its process group, SIGKILL after ``stop_timeout_s``; idempotent."""
        proc = self.proc
        if proc is not None and proc.returncode is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                async with time_limit(self.spec.stop_timeout_s):
                    await proc.wait()
            except TimeoutError:
                log.warning(
                    "engine %s: still running %g s after SIGTERM: SIGKILL",
                    self.spec.name,
                    self.spec.stop_timeout_s,
                )
        if proc is not None:
            _signal_group(proc.pid, signal.SIGKILL)  # what it forked, whether or not it exited
            await proc.wait()
            await _group_gone(proc.pid)
        if self._logger is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._logger
        await self._http.close()
        if self.ledger is not None and proc is not None:
            self.ledger.remove(self.spec.name)

    async def _log_output(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        out = self.proc.stdout
        while True:
            try:
                raw = await out.readline()
            except ValueError:  # a line past the stream's limit: take what is there
                raw = await out.read(64 * 1024)
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip()[:LOG_LINE_CHARS]
            if line:
                self._tail = [*self._tail[-LOG_TAIL_LINES + 1 :], line]
                log.info("[%s] %s", self.spec.name, line, extra={"replica": self.spec.name})


GROUP_GONE_S = 5.0
"""How long a stop waits for the last of an engine's processes to go after SIGKILL."""


async def _group_gone(pgid: int) -> None:
    """Until no process is left in the group (a worker it forked dies a moment after its
    SIGKILL, and holds its GPU's memory until then: a restart on that GPU must not start
    before). Zombies count until their parent reaps them."""
    deadline = time.monotonic() + GROUP_GONE_S
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        await asyncio.sleep(0.01)
    log.warning("process group %d still has processes %g s after SIGKILL", pgid, GROUP_GONE_S)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class EngineLedger:
    """The engines this node runs, on disk: replica -> (pid, its start time). An agent that
    was killed leaves it behind; the next one stops what it names (`sweep`) before launching."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: dict[str, tuple[int, float]] = {}
        self._warned = False

    def add(self, name: str, pid: int) -> None:
        try:
            created = psutil.Process(pid).create_time()
        except psutil.Error:
            return  # already gone
        self._entries[name] = (pid, created)
        self._write()

    def remove(self, name: str) -> None:
        if self._entries.pop(name, None) is not None:
            self._write()

    def _write(self) -> None:
        """Best effort: an unwritable state directory costs the sweep after a crash, not the
        engines (their leaders die with the agent anyway), and is said once."""
        data = {n: {"pid": p, "created": c} for n, (p, c) in self._entries.items()}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data))
            os.replace(tmp, self.path)
        except OSError as exc:
            if not self._warned:
                log.warning(
                    "cannot record launched engines in %s (%s): an agent after this one will"
                    " not find any it leaves behind ([node] state_dir)",
                    self.path,
                    exc,
                )
                self._warned = True

    def sweep(self, stop_timeout_s: float = 10.0) -> list[str]:
        """Stop the engines a previous agent recorded and left running, with everything in
        their process groups (an engine's leader may be gone and its workers not); a process
        counts only if it started no earlier than the engine did (a pid reused since is
        someone else's). Returns their replica names."""
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            log.warning(
                "%s: unreadable (%s): no engine left by an agent is stopped", self.path, exc
            )
            return []
        stopped: list[str] = []
        for name, entry in data.items() if isinstance(data, dict) else ():
            try:
                pgid, created = int(entry["pid"]), float(entry["created"])
            except (KeyError, TypeError, ValueError):
                continue
            if pgid <= 1 or pgid == os.getpgrp() or created < psutil.boot_time():
                continue  # never init's group, the agent's own, or a time before this boot
            procs = _group(pgid, created)
            if not procs:
                continue
            log.warning(
                "engine %s (process group %d, %d processes) was left by an agent before this"
                " one: stopping it",
                name,
                pgid,
                len(procs),
            )
            _signal_group(pgid, signal.SIGTERM)
            _, alive = psutil.wait_procs(procs, timeout=stop_timeout_s)
            if alive:
                _signal_group(pgid, signal.SIGKILL)
                psutil.wait_procs(alive, timeout=stop_timeout_s)
            stopped.append(name)
        self._entries.clear()
        self._write()
        return stopped


def _group(pgid: int, created: float) -> list[psutil.Process]:
    """The processes of a process group that started no earlier than ``created``."""
    out = []
    for proc in psutil.process_iter(["create_time"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["create_time"] >= created - 0.01:
                out.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return out


HEALTH_CHECK_S = 5.0
"""Between health probes of a serving engine."""
DEATH_GRACE_S = 0.5
"""How long a failed call waits to learn whether its engine died (then it runs elsewhere)."""
HEALTH_FAILURES = 3
"""Probes in a row that fail before a serving engine counts as failed (it hangs)."""


class LaunchedEngine:
    """The `Backend` of an ``openai`` replica with ``launch``: the engine process the node
    starts, and an `OpenAIBackend` on its port."""

    def __init__(
        self,
        cfg: ReplicaConfig,
        replica: str,
        gpus: GpuAllocator,
        ledger: EngineLedger | None = None,
    ) -> None:
        self.cfg = cfg
        self.replica = replica
        self.gpus = gpus
        self.ledger = ledger
        self.warmup_s: float | None = None
        """Launch to ready, once started."""
        self.engine: Engine | None = None
        self.client: OpenAIBackend | None = None
        self.gpu_ids: list[int] = []
        """The GPUs (NVML indices) it holds, once started."""

    async def start(self) -> None:
        cfg = self.cfg
        port = free_port()
        kv_port = free_port()
        while kv_port == port:  # the kernel may hand the same free port out twice in a row
            kv_port = free_port()
        ids = self.gpu_ids = self.gpus.take(self.replica, cfg.gpus_per_replica)
        values = {
            "port": str(port),
            "gpu": ",".join(map(str, ids)),
            "model": cfg.model,
            "served_model": cfg.served_model or cfg.model,
            "replica": self.replica,
            "host": HOST,
            "kv_port": str(kv_port),
        }
        env = {k: v.format_map(values) for k, v in cfg.env.items()}
        if ids:  # NVML numbers GPUs in PCI order; CUDA, unless told, fastest first
            env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        url = (cfg.url or "http://{host}:{port}/v1").format_map(values)
        self.engine = Engine(
            EngineSpec(
                self.replica,
                render(cfg.launch, values),
                env,
                (HOST, port, cfg.health_path),
                cfg.ready_timeout_s,
                cfg.stop_timeout_s,
            ),
            self.ledger,
        )
        try:
            self.warmup_s = await self.engine.start()
            metrics = f"http://{HOST}:{port}{cfg.metrics_path}" if cfg.metrics_path else ""
            events = cfg.kv_events.format_map(values)
            self.client = OpenAIBackend(
                dataclasses.replace(cfg, url=url, metrics_url=metrics, kv_events=events)
            )
            await self.client.start()
        except BaseException:
            await self.close()
            raise

    async def run(self, request: CallRequest) -> CallOutcome:
        if self.client is None:
            return CallOutcome(False, "", "engine not started", infra=True)
        outcome = await self.client.run(request)
        if not outcome.ok and await self._exited(DEATH_GRACE_S):
            return dataclasses.replace(
                outcome, infra=True, error=f"the engine died mid-call: {outcome.error}"
            )
        return outcome

    async def _exited(self, within_s: float) -> bool:
        """Whether the engine's process exits within ``within_s`` (a call that failed because
        it died sees its connection drop a moment before its exit is known)."""
        proc = None if self.engine is None else self.engine.proc
        if proc is None:
            return False
        try:
            async with time_limit(within_s):
                await proc.wait()
        except TimeoutError:
            return False
        return True

    def metrics(self) -> BackendMetrics:
        return self.client.metrics() if self.client is not None else BackendMetrics()

    def cache_report(self) -> CacheReport | None:
        return self.client.cache_report() if self.client is not None else None

    async def close(self) -> None:
        """Stop taking calls, stop the engine (its calls still running fail), free its GPUs."""
        if self.client is not None:
            await self.client.close()
        if self.engine is not None:
            await self.engine.stop()
        self.gpus.release(self.replica)

    async def failure(self) -> str:
        """Returns, with the reason, once the engine has exited or stopped answering its
        health path `HEALTH_FAILURES` times in a row."""
        engine = self.engine
        assert engine is not None
        exited = asyncio.ensure_future(engine.wait())
        try:
            failed = 0
            while True:
                done, _ = await asyncio.wait({exited}, timeout=HEALTH_CHECK_S)
                if done:
                    return f"engine exited with status {exited.result()}"
                failed = 0 if await engine.healthy() else failed + 1
                if failed >= HEALTH_FAILURES:
                    return f"engine stopped answering {self.cfg.health_path} ({failed} probes)"
        finally:
            exited.cancel()
