"""The replicas a node serves: backends behind a per-replica admission queue.

The node, not the backend, owns queueing and timing, so every backend reports the same figures:
``queue_s`` is the wait for one of the replica's ``concurrency`` slots, ``latency_s`` the time
inside the backend. Backends are imported only when configured, so a tool host never loads torch.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import itertools
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import psutil

from swarmx.backends.base import Backend, CallOutcome, CallRequest, ReportsCache
from swarmx.backends.tools import ToolRunner
from swarmx.clock import Clock
from swarmx.config import NodeConfig, ReplicaConfig
from swarmx.daemon.engines import Backoff, EngineLedger, GpuAllocator, LaunchedEngine
from swarmx.protocol import (
    MAX_REMOVED,
    MAX_WARMUPS,
    Chunk,
    Dispatch,
    ReplicaInfo,
    ReplicaPool,
    ReplicaRuntime,
    Result,
    replica_index,
    replica_name,
)

log = logging.getLogger(__name__)

TOOL_MODEL = "tool"
"""The model name under which a node's tool slots appear to the scheduler."""
RECENT_LATENCIES = 32
_TOKEN = re.compile(r'"(?:content|text|arguments)":\s*"[^"]')
"""A chunk that carries output (text, or a tool call's arguments), not just a role."""
STREAM_WINDOW_S = 0.01
"""A gateway call's output after its first chunk leaves in frames this far apart at most
often (tokens that come faster share one)."""
CHUNK_RETRY_S = 0.02
"""A chunk frame the transport could not take (no connection, its queue full) goes again
this much later..."""
CHUNK_GIVE_UP_S = 2.0
"""...for this long in all; then its chunks are lost and the call ends as failed, so the
client sees an error rather than a stream with text missing."""
ENDED_CALLS = 65_536
"""Call ids remembered after they end, so a dispatch of one again (a scheduler that restarted,
a frame sent twice) is answered instead of run a second time; ~5 MB at most."""


def make_backend(cfg: ReplicaConfig, clock: Clock) -> Backend:
    if cfg.backend == "torch":
        from swarmx.backends.torch_lm import TorchLM, TorchVision

        return TorchLM(cfg) if cfg.arch == "lm" else TorchVision(cfg)
    if cfg.backend == "openai":
        from swarmx.backends.openai import OpenAIBackend

        return OpenAIBackend(cfg)
    from swarmx.backends.emulated import EmulatedServer

    return EmulatedServer(cfg, clock)


def _device(rc: ReplicaConfig) -> str:
    return f"emulated:{rc.gpu}" if rc.backend == "emulated" else rc.device


def _finished(replica: Replica) -> None:
    replica.pending -= 1
    if replica.pending == 0:
        replica.idle.set()


@dataclass
class Replica:
    info: ReplicaInfo
    backend: Backend
    slots: asyncio.Semaphore
    queued: int = 0
    inflight: int = 0
    completed: int = 0
    failed: int = 0
    recent_latencies_s: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=RECENT_LATENCIES)
    )
    pending: int = 0
    """Calls submitted and not finished (counted from submission, before they queue)."""
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    """Set while ``pending`` is 0 (a drain waits on it)."""
    cache_overflows: int = 0
    """Engine cache reports with more evictions than a frame carries: each is sent as a reset
    (the scheduler's index starts over, which is what so many evictions amount to)."""

    def __post_init__(self) -> None:
        self.idle.set()

    def runtime(self) -> ReplicaRuntime:
        m = self.backend.metrics()
        report = self.backend.cache_report() if isinstance(self.backend, ReportsCache) else None
        if report is not None and len(report.removed) > MAX_REMOVED:
            self.cache_overflows += 1
            report.removed = []
        return ReplicaRuntime(
            self.info.replica,
            self.info.model,
            self.queued,
            self.inflight,
            self.completed,
            self.failed,
            list(self.recent_latencies_s),
            m.queued,
            m.running,
            m.kv_cache_usage,
            [] if report is None else report.removed,
            self.cache_overflows + (0 if report is None else report.resets),
            None if report is None else report.capacity_tokens,
            0 if report is None else report.refused,
        )


class ScaleError(ValueError):
    """A scale command this node cannot carry out; ``code`` goes into the `Error` reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class _Pool:
    """The replicas of one model and backend: what the node may scale."""

    template: ReplicaConfig
    device: str
    declared: int
    max_count: int
    starting: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    """Replicas being started (a scale-up, or a failed engine's restart)."""
    warmups: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=MAX_WARMUPS)
    )
    """Measured times from start to ready of the replicas it started while serving (scale-ups,
    restarts), oldest first: the lead time of the next."""
    restarts: int = 0
    """Engines of this pool that failed and were started again."""

    @property
    def key(self) -> tuple[str, str]:
        return self.template.model, self.template.backend


Changed = Callable[[], Awaitable[object]]
Confirm = Callable[[], asyncio.Future[None]]


class ReplicaSet:
    def __init__(
        self,
        cfg: NodeConfig,
        clock: Clock,
        on_change: Changed | None = None,
        confirm_drain: Confirm | None = None,
        gpus: Sequence[int] = (),
    ) -> None:
        """``gpus``: the GPU indices launched engines may take (``[node] engine_gpus``, else
        every GPU the node has)."""
        self.node = cfg.name
        self.clock = clock
        self.gpus = GpuAllocator(
            list(cfg.engine_gpus if cfg.engine_gpus is not None else gpus), cfg.replicas_per_gpu
        )
        self.ledger = (
            EngineLedger(Path(cfg.state_dir) / f"engines-{cfg.name}.json")
            if any(rc.launch for rc in cfg.replicas)
            else None
        )
        self._watchers: dict[str, asyncio.Task[None]] = {}
        """Launched replica -> the task that restarts its engine when it fails."""
        self._backoffs: dict[str, Backoff] = {}
        """Launched replica -> the delays between its restarts."""
        self.on_change = on_change
        """Awaited after a replica started by `scale` is ready or a drained one has closed (the
        node announces its new replica list)."""
        self.confirm_drain = confirm_drain
        """Called the moment `scale` marks replicas draining; a drained replica closes only once
        the future it returns is done, and then once its calls are. The node agent's is done
        when the scheduler has seen the mark (see `NodeAgent`): a replica the node picked
        itself may have calls on their way to it until then, which must find it open."""
        self.replicas: dict[str, Replica] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._running: dict[str, str] = {}
        """Call id -> replica, for the calls submitted and not ended (what `Heartbeat` says)."""
        self._ended: collections.OrderedDict[str, None] = collections.OrderedDict()
        """The most recent `ENDED_CALLS` call ids that ended, however (finished or cancelled)."""
        self._configs: list[tuple[ReplicaInfo, Callable[[], Backend]]] = []
        self._pools: dict[tuple[str, str], _Pool] = {}
        self._lifecycle: set[asyncio.Task[None]] = set()
        """Replica start and drain tasks (cancelled on close)."""
        per_model: collections.Counter[str] = collections.Counter()
        for rc in cfg.replicas:
            device = _device(rc)
            pool = self._pools.get((rc.model, rc.backend))
            if pool is None:
                self._pools[(rc.model, rc.backend)] = _Pool(rc, device, rc.count, rc.scale_max)
            else:  # a second entry for the same model and backend adds to the first's pool
                pool.declared += rc.count
                pool.max_count += rc.scale_max
            for _ in range(rc.count):
                info = ReplicaInfo(
                    replica_name(cfg.name, rc.model, per_model[rc.model]),
                    rc.model,
                    rc.backend,
                    device,
                    rc.concurrency,
                )
                per_model[rc.model] += 1
                self._configs.append((info, functools.partial(self._backend, rc, info.replica)))
        slots = (psutil.cpu_count() or 1) if cfg.tool_slots == -1 else cfg.tool_slots
        if slots > 0:
            info = ReplicaInfo(f"{cfg.name}/{TOOL_MODEL}", TOOL_MODEL, "tool", "cpu", slots)
            tools = functools.partial(
                ToolRunner,
                cfg.tool_env,
                cfg.tool_commands,
                node=cfg.name,
                limits=cfg.tool_limits,
                user=cfg.tool_user,
                lease_s=cfg.tool_lease_s or None,
            )
            self._configs.append((info, tools))

    def _backend(self, rc: ReplicaConfig, replica: str) -> Backend:
        if rc.launch:
            return LaunchedEngine(rc, replica, self.gpus, self.ledger)
        return make_backend(rc, self.clock)

    async def start(self) -> None:
        """Start every backend; one that fails is logged and left out, the others serve (a
        launched engine that fails is started again, as one that fails later would be).
        First, engines an agent before this one left running are stopped."""
        if self.ledger is not None:
            await asyncio.to_thread(self.ledger.sweep)

        async def one(info: ReplicaInfo, factory: Callable[[], Backend]) -> None:
            backend: Backend | None = None
            began = self.clock.monotonic()
            try:
                backend = factory()
                await backend.start()
            except Exception as exc:  # any backend's start failure: keep the node serving
                log.error("replica %s (%s) failed to start: %s", info.replica, info.backend, exc)
                if isinstance(backend, LaunchedEngine):
                    self._restart_later(self._pools[(info.model, info.backend)], info.replica, 0.0)
                return
            assert backend is not None
            if isinstance(backend, LaunchedEngine):  # a real start-up (others: their delay)
                self._pools[(info.model, info.backend)].warmups.append(
                    self.clock.monotonic() - began
                )
            self._add(info, backend)

        await asyncio.gather(*(one(info, factory) for info, factory in self._configs))

    def _add(self, info: ReplicaInfo, backend: Backend) -> None:
        if isinstance(backend, LaunchedEngine) and backend.gpu_ids:  # its GPU's telemetry
            info = msgspec.structs.replace(info, device=f"cuda:{backend.gpu_ids[0]}")
        self.replicas[info.replica] = Replica(info, backend, asyncio.Semaphore(info.concurrency))
        if isinstance(backend, LaunchedEngine):
            pool = self._pools[(info.model, info.backend)]
            watcher = asyncio.create_task(
                self._supervise(pool, info.replica, backend), name=f"supervise {info.replica}"
            )
            self._watchers[info.replica] = watcher
        log.info(
            "replica %s ready (%s on %s, %d slots)",
            info.replica,
            info.backend,
            info.device,
            info.concurrency,
        )

    # --- scaling ----------------------------------------------------------------------------

    def _serving(self, pool: _Pool) -> list[Replica]:
        """The pool's ready replicas that are not draining."""
        return [
            r
            for r in self.replicas.values()
            if (r.info.model, r.info.backend) == pool.key and not r.info.draining
        ]

    def _target(self, pool: _Pool) -> int:
        return len(self._serving(pool)) + len(pool.starting)

    def pools(self) -> list[ReplicaPool]:
        return [
            ReplicaPool(
                pool.template.model,
                pool.template.backend,
                pool.device,
                pool.template.concurrency,
                pool.declared,
                pool.max_count,
                self._target(pool),
                pool.template.startup_delay_s,
                list(pool.warmups),
                pool.restarts,
            )
            for _, pool in sorted(self._pools.items())
        ]

    def scale(self, model: str, backend: str, target: int, remove: Sequence[str] = ()) -> str:
        """Start or stop replicas of ``model`` until ``target`` run or are starting; returns
        what it does, in words. Scale-down cancels replicas still starting (newest first), then
        drains ``remove``, then the least busy; a drained replica closes once its calls are
        done. Raises `ScaleError` for a model this node cannot scale or a target out of range."""
        pool = self._pools.get((model, backend))
        if pool is None:
            known = ", ".join(f"{m} ({b})" for m, b in sorted(self._pools)) or "none"
            raise ScaleError(
                "unknown_model",
                f"node {self.node} declares no {backend} replicas of {model!r}"
                f" (scalable here: {known})",
            )
        if not 0 <= target <= pool.max_count:
            raise ScaleError(
                "out_of_range",
                f"{model}: target {target} outside 0..{pool.max_count} (max_count) on {self.node}",
            )
        current = self._target(pool)
        if target > current:
            names = self._new_names(model, target - current)
            for name in names:
                task = asyncio.create_task(self._start_one(pool, name), name=f"start {name}")
                pool.starting[name] = task
                self._track(task)
            return f"starting {', '.join(names)}"
        excess = current - target
        done: list[str] = []
        for name in sorted(pool.starting, key=replica_index, reverse=True)[:excess]:
            pool.starting.pop(name).cancel()
            done.append(f"cancelled {name}")
        excess -= len(done)
        serving = {r.info.replica: r for r in self._serving(pool)}
        chosen = [serving[n] for n in dict.fromkeys(remove) if n in serving][:excess]
        rest = sorted(
            (r for n, r in serving.items() if r not in chosen),
            key=lambda r: (r.pending, -replica_index(r.info.replica)),
        )
        chosen += rest[: excess - len(chosen)]
        confirmed = self.confirm_drain() if chosen and self.confirm_drain is not None else None
        for replica in chosen:
            replica.info = msgspec.structs.replace(replica.info, draining=True)
            drain = self._drain(replica, confirmed)
            self._track(asyncio.create_task(drain, name=f"drain {replica.info}"))
            done.append(f"draining {replica.info.replica} ({replica.pending} calls left)")
        return "; ".join(done) or "nothing to do"

    def _new_names(self, model: str, n: int) -> list[str]:
        taken = {replica_index(r) for r in self.replicas if r.startswith(f"{self.node}/{model}#")}
        for pool in self._pools.values():
            if pool.template.model == model:
                taken |= {replica_index(r) for r in pool.starting}
        free = (i for i in itertools.count() if i not in taken)
        return [replica_name(self.node, model, next(free)) for _ in range(n)]

    def _track(self, task: asyncio.Task[None]) -> None:
        self._lifecycle.add(task)
        task.add_done_callback(self._lifecycle.discard)

    async def _changed(self) -> None:
        if self.on_change is not None:
            await self.on_change()

    async def _start_one(self, pool: _Pool, name: str, delay_s: float = 0.0) -> None:
        """Start one replica (after ``delay_s``). A launched engine that fails to start is
        tried again after a backoff; any other failed start lowers the target, which the
        scheduler sees."""
        rc = pool.template
        info = ReplicaInfo(name, rc.model, rc.backend, pool.device, rc.concurrency)
        backend: Backend | None = None
        try:
            if delay_s > 0:
                await self.clock.sleep(delay_s)
            backend = self._backend(rc, name)
            began = self.clock.monotonic()
            await backend.start()
            if rc.startup_delay_s > 0 and not rc.launch:  # a launched engine's is measured
                await self.clock.sleep(rc.startup_delay_s)
            pool.warmups.append(self.clock.monotonic() - began)
        except asyncio.CancelledError:
            if backend is not None:
                await backend.close()
            log.info("replica %s: start cancelled", name)
            raise
        except Exception as exc:
            log.error("replica %s (%s) failed to start: %s", name, rc.backend, exc)
            pool.starting.pop(name, None)
            if backend is not None:
                await backend.close()
            if rc.launch:
                self._restart_later(pool, name, 0.0)
                return
            await self._changed()
            return
        pool.starting.pop(name, None)
        self._add(info, backend)
        await self._changed()

    async def _drain(self, replica: Replica, confirmed: asyncio.Future[None] | None) -> None:
        name = replica.info.replica
        log.info("replica %s draining: %d calls to finish", name, replica.pending)
        if confirmed is not None:  # calls routed here before the mark was seen count as pending
            await asyncio.shield(confirmed)
        backend = replica.backend
        if isinstance(backend, LaunchedEngine):
            limit_s = backend.cfg.drain_timeout_s
            try:
                await asyncio.wait_for(replica.idle.wait(), limit_s)
            except TimeoutError:
                log.warning(
                    "replica %s: %d calls still running after %g s (drain_timeout_s): stopping"
                    " its engine; they fail and run elsewhere",
                    name,
                    replica.pending,
                    limit_s,
                )
        else:
            await replica.idle.wait()
        self.replicas.pop(name, None)
        await self._unwatch(name)
        await replica.backend.close()
        log.info("replica %s stopped", name)
        await self._changed()

    # --- supervision of launched engines ---------------------------------------------------

    async def _unwatch(self, name: str) -> None:
        watcher = self._watchers.pop(name, None)
        if watcher is not None and watcher is not asyncio.current_task():
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)

    async def _supervise(self, pool: _Pool, name: str, backend: LaunchedEngine) -> None:
        """Wait for the engine to fail; then take the replica out at once (its running calls
        fail and run elsewhere, the scheduler routes nothing more here) and start it again."""
        up_since = self.clock.monotonic()
        reason = await backend.failure()
        replica = self.replicas.get(name)
        if replica is None or replica.backend is not backend or replica.info.draining:
            return  # being stopped on purpose
        log.error("replica %s failed: %s; restarting it", name, reason)
        self._watchers.pop(name, None)
        self.replicas.pop(name, None)
        pool.restarts += 1
        await backend.close()
        self._restart_later(pool, name, self.clock.monotonic() - up_since)
        await self._changed()

    def _restart_later(self, pool: _Pool, name: str, up_s: float) -> None:
        """Start the replica again after a backoff; it counts as starting meanwhile, so a
        scale-down may cancel it."""
        backoff = self._backoffs.setdefault(name, Backoff())
        delay_s = backoff.next_s(up_s)
        log.info("replica %s: next start in %g s", name, delay_s)
        task = asyncio.create_task(self._start_one(pool, name, delay_s), name=f"restart {name}")
        pool.starting[name] = task
        self._track(task)

    # --- calls ------------------------------------------------------------------------------

    def set_tool_commands(self, commands: Sequence[str]) -> None:
        """A new tool allowlist (SIGHUP): calls started from now on are checked against it."""
        for replica in self.replicas.values():
            if isinstance(replica.backend, ToolRunner):
                replica.backend.set_commands(commands)

    def infos(self) -> list[ReplicaInfo]:
        return [r.info for r in sorted(self.replicas.values(), key=lambda r: r.info.replica)]

    def runtime(self) -> list[ReplicaRuntime]:
        return [r.runtime() for r in self.replicas.values()]

    def seen(self, call_id: str) -> str | None:
        """``running`` or ``ended`` for a call id this node was given before, else None."""
        if call_id in self._tasks:
            return "running"
        return "ended" if call_id in self._ended else None

    def running(self) -> dict[str, str]:
        """The calls submitted and not ended, with their replicas."""
        return dict(self._running)

    def submit(
        self,
        dispatch: Dispatch,
        reply: Callable[[Result], Awaitable[object]],
        chunks: Callable[[Chunk], Awaitable[bool]] | None = None,
    ) -> None:
        """Run the call in the background and ``reply`` with its result (unless cancelled);
        a gateway call's output goes to ``chunks`` as it streams, before its result.
        A call id is run once: the caller checks `seen` first."""
        call_id = dispatch.call_id
        replica = self.replicas.get(dispatch.replica)
        stream = (
            _Stream(call_id, chunks, self.clock.monotonic)
            if dispatch.api and chunks is not None
            else None
        )
        task = asyncio.create_task(self._run(dispatch, reply, replica, stream), name=call_id)
        self._tasks[call_id] = task
        self._running[call_id] = dispatch.replica
        task.add_done_callback(lambda _: self._ended_call(call_id))
        if replica is not None:  # counted now, so a drain that starts next waits for it
            replica.pending += 1
            replica.idle.clear()
            task.add_done_callback(lambda _: _finished(replica))

    def _ended_call(self, call_id: str) -> None:
        self._tasks.pop(call_id, None)
        self._running.pop(call_id, None)
        self._ended[call_id] = None
        if len(self._ended) > ENDED_CALLS:
            self._ended.popitem(last=False)

    async def wait_idle(self, timeout_s: float) -> None:
        """Until no call runs, or ``timeout_s`` has passed."""
        tasks = list(self._tasks.values())
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)

    def cancel(self, call_ids: list[str]) -> int:
        cancelled = 0
        for call_id in call_ids:
            task = self._tasks.get(call_id)
            if task is not None:
                task.cancel()
                cancelled += 1
        return cancelled

    async def _run(
        self,
        d: Dispatch,
        reply: Callable[[Result], Awaitable[object]],
        replica: Replica | None,
        stream: _Stream | None = None,
    ) -> None:
        if replica is None:
            await reply(
                Result(
                    d.call_id,
                    d.replica,
                    False,
                    "",
                    f"no replica {d.replica!r} on this node",
                    0.0,
                    0.0,
                    None,
                    0,
                    0,
                )
            )
            return
        arrived = self.clock.monotonic()
        replica.queued += 1
        admitted = False
        try:
            async with replica.slots:
                replica.queued -= 1
                admitted = True
                replica.inflight += 1
                started = self.clock.monotonic()
                try:
                    outcome = await self._call(replica.backend, d, stream)
                finally:
                    replica.inflight -= 1
                ended = self.clock.monotonic()
        finally:
            if not admitted:  # cancelled while waiting for a slot
                replica.queued -= 1
        if stream is not None:
            await stream.drain()  # every chunk goes out before the result
            if stream.lost and outcome.ok:
                error = f"{stream.lost} streamed chunks could not reach the scheduler"
                outcome = dataclasses.replace(outcome, ok=False, error=error)
        latency = ended - started
        replica.recent_latencies_s.append(latency)
        if outcome.ok:
            replica.completed += 1
        else:
            replica.failed += 1
        await reply(
            Result(
                d.call_id,
                d.replica,
                outcome.ok,
                outcome.output,
                outcome.error,
                started - arrived,
                latency,
                outcome.ttft_s,
                outcome.prompt_tokens,
                outcome.output_tokens,
                outcome.cached_tokens,
                outcome.infra,
                outcome.stop_reason[:64],
                [k[:64] for k in outcome.output_kinds[:8]],
            )
        )

    @staticmethod
    async def _call(backend: Backend, d: Dispatch, stream: _Stream | None) -> CallOutcome:
        request = CallRequest(
            d.call_id,
            d.kind,
            d.model,
            d.prompt,
            d.max_tokens,
            d.inputs,
            d.command,
            d.timeout_s,
            api=d.api or "chat",
            body=d.body,
            stream=None if stream is None else stream.put,
        )
        try:
            return await backend.run(request)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a backend bug fails the call, not the node
            log.exception("replica %s failed on %s", d.replica, d.call_id)
            return CallOutcome(False, "", f"{type(exc).__name__}: {exc}")

    async def close(self) -> None:
        tasks = [*self._tasks.values(), *self._lifecycle, *self._watchers.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(
            *(r.backend.close() for r in self.replicas.values()), return_exceptions=True
        )


class _Stream:
    """A gateway call's output on its way to the scheduler. Until the first token has left,
    every chunk leaves at once (engines often send a role-only chunk first, and the time to
    first token is what agents wait on); later ones leave together every `STREAM_WINDOW_S`, so
    a fast engine costs the node, the scheduler and the gateway a frame per window, not one per
    token."""

    def __init__(
        self,
        call_id: str,
        send: Callable[[Chunk], Awaitable[bool]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.call_id = call_id
        self._send = send
        self._clock = clock
        self.lost = 0
        """Chunks given up on: the call's result says it failed."""
        self._pending: list[str] = []
        self._flusher: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._first_token = False

    def put(self, data: str) -> None:
        """One chunk's JSON (the backend calls this on the loop thread, in order)."""
        self._pending.append(data)
        if not self._first_token:
            self._first_token = _TOKEN.search(data) is not None
            if self._timer is None:
                self._go()
        elif self._flusher is None and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(STREAM_WINDOW_S, self._go)

    def _go(self) -> None:
        self._timer = None
        if self._flusher is None and self._pending:
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        """Send what is pending, in order; a frame the transport refuses goes again (the chunks
        put meanwhile join it) until `CHUNK_GIVE_UP_S`, then every chunk after it is lost too:
        a stream with a hole is worth nothing."""
        failing_since: float | None = None
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                if self.lost:
                    self.lost += len(batch)
                    continue
                if await self._send(Chunk(self.call_id, batch)):
                    failing_since = None
                    continue
                now = self._clock()
                failing_since = now if failing_since is None else failing_since
                if now - failing_since >= CHUNK_GIVE_UP_S:
                    self.lost += len(batch)
                    log.warning(
                        "call %s: stream chunks lost (the scheduler is unreachable)", self.call_id
                    )
                    continue
                self._pending = batch + self._pending
                await asyncio.sleep(CHUNK_RETRY_S)
        finally:
            self._flusher = None

    async def drain(self) -> None:
        """Until every chunk put so far has been handed to the transport (the call ended: the
        last window is not waited for)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._flusher is not None:
            await asyncio.shield(self._flusher)
        if self._pending:
            await self._flush()
