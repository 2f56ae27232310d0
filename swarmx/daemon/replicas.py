"""The replicas a node serves: backends behind a per-replica admission queue.

The node, not the backend, owns queueing and timing, so every backend reports the same figures:
``queue_s`` is the wait for one of the replica's ``concurrency`` slots, ``latency_s`` the time
inside the backend. Backends are imported only when configured, so a tool host never loads torch.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import psutil

from swarmx.backends.base import Backend, CallOutcome, CallRequest
from swarmx.backends.tools import ToolRunner
from swarmx.clock import Clock
from swarmx.config import NodeConfig, ReplicaConfig
from swarmx.protocol import Dispatch, ReplicaInfo, ReplicaRuntime, Result

log = logging.getLogger(__name__)

TOOL_MODEL = "tool"
"""The model name under which a node's tool slots appear to the scheduler."""
RECENT_LATENCIES = 32


def make_backend(cfg: ReplicaConfig, clock: Clock) -> Backend:
    if cfg.backend == "torch":
        from swarmx.backends.torch_lm import TorchLM, TorchVision

        return TorchLM(cfg) if cfg.arch == "lm" else TorchVision(cfg)
    if cfg.backend == "openai":
        from swarmx.backends.openai import OpenAIBackend

        return OpenAIBackend(cfg)
    from swarmx.backends.emulated import EmulatedServer

    return EmulatedServer(cfg, clock)


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

    def runtime(self) -> ReplicaRuntime:
        m = self.backend.metrics()
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
        )


class ReplicaSet:
    def __init__(self, cfg: NodeConfig, clock: Clock) -> None:
        self.clock = clock
        self.replicas: dict[str, Replica] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._configs: list[tuple[ReplicaInfo, Callable[[], Backend]]] = []
        for rc in cfg.replicas:
            device = f"emulated:{rc.gpu}" if rc.backend == "emulated" else rc.device
            for i in range(rc.count):
                info = ReplicaInfo(
                    f"{cfg.name}/{rc.model}#{i}", rc.model, rc.backend, device, rc.concurrency
                )
                self._configs.append((info, functools.partial(make_backend, rc, clock)))
        slots = (psutil.cpu_count() or 1) if cfg.tool_slots == -1 else cfg.tool_slots
        if slots > 0:
            info = ReplicaInfo(f"{cfg.name}/{TOOL_MODEL}", TOOL_MODEL, "tool", "cpu", slots)
            self._configs.append((info, lambda: ToolRunner(cfg.tool_env)))

    async def start(self) -> None:
        """Start every backend; one that fails is logged and left out, the others serve."""

        async def one(info: ReplicaInfo, factory: Callable[[], Backend]) -> None:
            try:
                backend = factory()
                await backend.start()
            except Exception as exc:  # any backend's start failure: keep the node serving
                log.error("replica %s (%s) failed to start: %s", info.replica, info.backend, exc)
                return
            self.replicas[info.replica] = Replica(
                info, backend, asyncio.Semaphore(info.concurrency)
            )
            log.info(
                "replica %s ready (%s on %s, %d slots)",
                info.replica,
                info.backend,
                info.device,
                info.concurrency,
            )

        await asyncio.gather(*(one(info, factory) for info, factory in self._configs))

    def infos(self) -> list[ReplicaInfo]:
        return [r.info for r in sorted(self.replicas.values(), key=lambda r: r.info.replica)]

    def runtime(self) -> list[ReplicaRuntime]:
        return [r.runtime() for r in self.replicas.values()]

    def submit(self, dispatch: Dispatch, reply: Callable[[Result], Awaitable[object]]) -> None:
        """Run the call in the background and ``reply`` with its result (unless cancelled)."""
        task = asyncio.create_task(self._run(dispatch, reply), name=dispatch.call_id)
        self._tasks[dispatch.call_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(dispatch.call_id, None))

    def cancel(self, call_ids: list[str]) -> int:
        cancelled = 0
        for call_id in call_ids:
            task = self._tasks.get(call_id)
            if task is not None:
                task.cancel()
                cancelled += 1
        return cancelled

    async def _run(self, d: Dispatch, reply: Callable[[Result], Awaitable[object]]) -> None:
        replica = self.replicas.get(d.replica)
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
                    outcome = await self._call(replica.backend, d)
                finally:
                    replica.inflight -= 1
                ended = self.clock.monotonic()
        finally:
            if not admitted:  # cancelled while waiting for a slot
                replica.queued -= 1
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
            )
        )

    @staticmethod
    async def _call(backend: Backend, d: Dispatch) -> CallOutcome:
        request = CallRequest(
            d.call_id, d.kind, d.model, d.prompt, d.max_tokens, d.inputs, d.command, d.timeout_s
        )
        try:
            return await backend.run(request)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a backend bug fails the call, not the node
            log.exception("replica %s failed on %s", d.replica, d.call_id)
            return CallOutcome(False, "", f"{type(exc).__name__}: {exc}")

    async def close(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        await asyncio.gather(
            *(r.backend.close() for r in self.replicas.values()), return_exceptions=True
        )
