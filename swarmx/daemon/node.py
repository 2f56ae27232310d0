"""The node agent: registers with the scheduler, then publishes heartbeats and telemetry.

Collection (psutil, NVML) blocks, so it runs on a one-thread executor and never stalls the loop.
Registration is a small state machine: send ``hello`` each heartbeat until acknowledged; a scheduler
that answers ``unregistered`` (it restarted) or goes silent for 3 heartbeats makes the agent
register again, so the cluster heals by itself after a scheduler restart.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

import msgspec

from swarmx import __version__
from swarmx.clock import Clock, ticks
from swarmx.config import NodeConfig, changed_fields
from swarmx.daemon.lifecycle import SystemdNotifier, run_until_stopped, share_the_gil
from swarmx.daemon.replicas import ReplicaSet, ScaleError
from swarmx.metrics import NodeMetrics, serve
from swarmx.protocol import (
    Ack,
    CancelCalls,
    Chunk,
    Dispatch,
    Envelope,
    Error,
    Goodbye,
    Heartbeat,
    Hello,
    Message,
    Result,
    ScaleCommand,
    Telemetry,
)
from swarmx.security import RateLimitedLog
from swarmx.telemetry.gpu import NvmlGpus
from swarmx.telemetry.host import HostCollector
from swarmx.transport import ClientCurve, DealerChannel, connect_dealer

log = logging.getLogger(__name__)

SCHEDULER_SILENT_AFTER_MISSED = 3
"""Heartbeats without any answer before the agent treats the scheduler as lost."""
RESEND_RESULT_AFTER_S = 2.0
"""A result the scheduler has not acknowledged is sent again (it may have restarted)."""
RECENT_HELLOS = 16
"""Hellos remembered for their acknowledgement (which confirms the drains waiting on it)."""
RELOADABLE = frozenset({"labels", "tool_commands", "drain_timeout_s"})
"""``[node]`` settings a SIGHUP applies; the others need a restart."""
HAND_BACK_KILL_S = 10.0
"""On leaving: how long the calls handed back may take to stop (a tool tree being killed)."""
GOODBYE_WAIT_S = 2.0
"""On leaving: how long to wait for the scheduler to acknowledge the last results and the final
goodbye (it may be gone too)."""

Handler = Callable[[Envelope], Awaitable[None]]


class ResultOutbox:
    """Results sent and not acknowledged yet, by frame seq: sent again every
    `RESEND_RESULT_AFTER_S` until the scheduler acknowledges one (it may have restarted) or
    refuses it (the call is no longer this node's). A result that could not leave at all waits
    under a local negative key for the next round."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._unacked: dict[int, tuple[float, Result]] = {}
        self._unsent_keys = itertools.count(-1, -1)

    def __len__(self) -> int:
        return len(self._unacked)

    async def send(self, channel: DealerChannel, result: Result) -> None:
        seq = await channel.send(result)
        if seq is None:  # not sent: a local key, retried with the next round
            seq = next(self._unsent_keys)
        self._unacked[seq] = (self.clock.monotonic(), result)

    async def resend_due(self, channel: DealerChannel, now: float) -> int:
        """Send again what has waited long enough; returns how many."""
        due = [
            seq for seq, (sent, _) in self._unacked.items() if now - sent >= RESEND_RESULT_AFTER_S
        ]
        for seq in due:
            _, result = self._unacked.pop(seq)
            await self.send(channel, result)
        return len(due)

    async def send_again(self, channel: DealerChannel, call_id: str) -> bool:
        """Send a call's unacknowledged result now (its dispatch came again); False if none."""
        seqs = [seq for seq, (_, r) in self._unacked.items() if r.call_id == call_id]
        for seq in seqs:
            _, result = self._unacked.pop(seq)
            await self.send(channel, result)
        return bool(seqs)

    def acked(self, seq: int) -> None:
        self._unacked.pop(seq, None)

    def refused(self, seq: int) -> Result | None:
        """The result the scheduler refused with frame ``seq``, no longer to be sent."""
        entry = self._unacked.pop(seq, None)
        return None if entry is None else entry[1]


class NodeAgent:
    def __init__(
        self,
        cfg: NodeConfig,
        clock: Clock,
        notifier: SystemdNotifier | None = None,
        gpus: NvmlGpus | None = None,
        curve: ClientCurve | None = None,
    ) -> None:
        self.cfg = cfg
        self.curve = curve
        self.handler_errors = 0
        self._refusal_log = RateLimitedLog(clock.monotonic)
        self.clock = clock
        self.notifier = notifier or SystemdNotifier()
        self.host = HostCollector(clock.monotonic)
        self.gpus = gpus if gpus is not None else (NvmlGpus() if cfg.gpus == "auto" else None)
        self.registered = False
        self._hello_seq: int | None = None
        self._hellos: collections.deque[int] = collections.deque(maxlen=RECENT_HELLOS)
        """Seqs of the hellos sent last (an acknowledgement of any confirms drains)."""
        self._last_answer_mono = clock.monotonic()
        self._started_mono = clock.monotonic()
        self._started_ts = clock.time()
        self._channel: DealerChannel | None = None
        self._latest: Telemetry | None = None
        """Last sample, sent the moment registration is acknowledged so the scheduler never
        shows a registered node without telemetry for a whole interval."""
        launches = any(rc.launch for rc in cfg.replicas) and cfg.engine_gpus is None
        self.replicas = ReplicaSet(
            cfg,
            clock,
            on_change=self._announce,
            confirm_drain=self._scheduler_told,
            gpus=[g.index for g in self.gpus.inventory()] if launches and self.gpus else (),
        )
        self._told: list[tuple[int, asyncio.Future[None]]] = []
        """Drains waiting for the scheduler to acknowledge a hello numbered above the seq they
        hold (see `_scheduler_told`)."""
        self._hello_base: Hello | None = None
        """Registration without the replica lists (host facts collected once)."""
        self.outbox = ResultOutbox(clock)
        self.duplicate_dispatches = 0
        """Dispatches of a call id this node had been given already (answered, not run)."""
        self.leaving = False
        self._goodbye_seq: int | None = None
        self._goodbye_acked = asyncio.Event()
        self._reloads: set[asyncio.Task[None]] = set()
        """Announcements a reload started (held so they are not collected mid-flight)."""
        self.metrics = NodeMetrics(cfg.name)
        self._handlers: dict[type[Message], Handler] = {
            Ack: self._on_ack,
            Error: self._on_error,
            Dispatch: self._on_dispatch,
            CancelCalls: self._on_cancel_calls,
            ScaleCommand: self._on_scale,
        }

    async def run(self, stop: asyncio.Event) -> None:
        share_the_gil()  # torch replicas and the metrics thread: the loop must not wait 5 ms
        loop = asyncio.get_running_loop()
        metrics = serve(self.metrics.registry, self.cfg.metrics_port, self.cfg.metrics_addr)
        if metrics is not None:
            log.info("metrics on %s", metrics.url, extra={"metrics_url": metrics.url})
        try:
            self._channel = channel = connect_dealer(
                self.cfg.scheduler, self.cfg.name, self.clock, curve=self.curve
            )
        except BaseException:
            if metrics is not None:
                metrics.close()
            raise
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="swarmx-collect")
        try:
            await self.replicas.start()
            self._hello_base = await loop.run_in_executor(executor, self._hello)
            hello = self.hello()
            log.info(
                "node agent %s (%s) reporting to %s every %gs: %d cores, %d GPUs",
                self.cfg.name,
                __version__,
                self.cfg.scheduler,
                self.cfg.telemetry_interval_s,
                hello.cpu_cores_logical,
                len(hello.gpus),
            )
            self.notifier.notify("READY=1", f"STATUS=reporting to {self.cfg.scheduler}")
            tasks = [
                asyncio.create_task(self._receive(channel), name="receive"),
                asyncio.create_task(self._heartbeats(channel, executor), name="heartbeat"),
                asyncio.create_task(
                    channel.watch_handshakes(self._handshake_refused), name="handshakes"
                ),
                *self.notifier.start_watchdog(self.clock),
            ]
            if not self._telemetry_on_heartbeat:
                tasks.append(
                    asyncio.create_task(self._telemetry(channel, executor), name="telemetry")
                )
            await run_until_stopped(stop, tasks, on_stop=lambda: self._leave(channel))
        finally:
            self.notifier.notify("STOPPING=1")
            await self.replicas.close()
            channel.close()
            executor.shutdown(wait=True, cancel_futures=True)
            if metrics is not None:
                metrics.close()
            if self.gpus is not None:
                self.gpus.close()
        log.info("node agent %s stopped", self.cfg.name)

    def reload(self, cfg: NodeConfig | None) -> None:
        """SIGHUP: apply the ``[node]`` settings that can change under a running agent (labels,
        the tool allowlist, the drain time) and say which need a restart. ``cfg`` is None when
        the file could not be read (the running settings stay)."""
        if cfg is None:
            return
        changed = changed_fields(self.cfg, cfg)
        live = [name for name in changed if name in RELOADABLE]
        later = [name for name in changed if name not in RELOADABLE]
        self.cfg = dataclasses.replace(self.cfg, **{name: getattr(cfg, name) for name in live})
        if "tool_commands" in live:
            self.replicas.set_tool_commands(self.cfg.tool_commands)
        if "labels" in live and self._hello_base is not None:
            self._hello_base = msgspec.structs.replace(
                self._hello_base, labels=dict(self.cfg.labels)
            )
            task = asyncio.get_running_loop().create_task(self._announce())
            self._reloads.add(task)
            task.add_done_callback(self._reloads.discard)
        log.info(
            "SIGHUP: [node] %s%s",
            f"applied {', '.join(live)}" if live else "nothing to apply",
            f"; {', '.join(later)} changed but need a restart" if later else "",
        )

    def _hello(self) -> Hello:
        info = self.host.static_info()
        return Hello(
            node=self.cfg.name,
            host=socket.gethostname(),
            pid=os.getpid(),
            version=__version__,
            cpu_cores_logical=info.cpu_cores_logical,
            cpu_cores_physical=info.cpu_cores_physical,
            mem_total_bytes=info.mem_total_bytes,
            gpus=self.gpus.inventory() if self.gpus is not None else [],
            replicas=[],
            heartbeat_interval_s=self.cfg.heartbeat_interval_s,
            telemetry_interval_s=self.cfg.telemetry_interval_s,
            started_ts=self._started_ts,
            labels=dict(self.cfg.labels),
        )

    def hello(self) -> Hello:
        """Registration with the replicas as they are now."""
        assert self._hello_base is not None
        return msgspec.structs.replace(
            self._hello_base,
            replicas=self.replicas.infos(),
            pools=self.replicas.pools(),
            running=self.replicas.running(),
        )

    async def _announce(self) -> None:
        """The replica list changed: registered agents say so with a new hello (an agent not
        registered sends the current one with its next heartbeat anyway)."""
        if self._channel is None or self._hello_base is None or not self.registered:
            return
        await self._send_hello(self._channel)

    async def _send_hello(self, channel: DealerChannel) -> None:
        self._hello_seq = await channel.send(self.hello())
        if self._hello_seq is not None:
            self._hellos.append(self._hello_seq)

    def _scheduler_told(self) -> asyncio.Future[None]:
        """Done once the scheduler has acknowledged a hello sent from now on (so one saying which
        replicas drain now). The scheduler applies a hello before it answers and sends to this
        node over one ordered socket, so by then every call it routed to a draining replica has
        arrived, and it routes none there any more: a replica the node picked to drain itself
        (the scheduler only asked for fewer) is closed with no call on its way to it. `_on_scale`
        announces right after scaling; while a drain waits, every heartbeat sends a hello too."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._channel is None:  # not connected: nothing can have been routed here
            done.set_result(None)
        else:
            self._told.append((self._channel.last_seq, done))
        return done

    def _collect(self) -> Telemetry:
        start = self.clock.monotonic()
        host = self.host.sample()
        gpus = self.gpus.sample() if self.gpus is not None else []
        return Telemetry(host, gpus, [], collect_s=self.clock.monotonic() - start)

    def _with_runtime(self, sample: Telemetry) -> Telemetry:
        """Replica state is read on the loop (it lives there), host state in the executor."""
        return Telemetry(sample.host, sample.gpus, self.replicas.runtime(), sample.collect_s)

    # --- loops ------------------------------------------------------------------------------

    @property
    def _telemetry_on_heartbeat(self) -> bool:
        """Telemetry rides on the heartbeat when both have the same interval (the default)."""
        return self.cfg.telemetry_interval_s == self.cfg.heartbeat_interval_s

    async def _heartbeats(self, channel: DealerChannel, executor: ThreadPoolExecutor) -> None:
        interval = self.cfg.heartbeat_interval_s
        async for now in ticks(self.clock, interval):
            silent_s = now - self._last_answer_mono
            if self.registered and silent_s > SCHEDULER_SILENT_AFTER_MISSED * interval:
                log.warning(
                    "scheduler silent for %.1fs; registering again when it answers", silent_s
                )
                self.registered = False
            sample = await self._sample(channel, executor) if self._telemetry_on_heartbeat else None
            if self.registered:
                await channel.send(
                    Heartbeat(
                        now - self._started_mono,
                        channel.stats.unsent,
                        self.replicas.running(),
                        telemetry=sample,
                    )
                )
                await self.outbox.resend_due(channel, now)
            if not self.registered or self._told:  # a drain waits for one (`_scheduler_told`)
                await self._send_hello(channel)

    async def _telemetry(self, channel: DealerChannel, executor: ThreadPoolExecutor) -> None:
        """Telemetry on its own interval, when it differs from the heartbeat's."""
        async for _ in ticks(self.clock, self.cfg.telemetry_interval_s):
            sample = await self._sample(channel, executor)
            if self.registered:
                await channel.send(sample)

    async def _sample(self, channel: DealerChannel, executor: ThreadPoolExecutor) -> Telemetry:
        """Host and GPUs read in the executor (NVML may block), the replicas on the loop."""
        sample = await asyncio.get_running_loop().run_in_executor(executor, self._collect)
        self._latest = self._with_runtime(sample)
        bad = {**channel.stats.dropped, "internal": self.handler_errors}
        self.metrics.publish(self._latest, self.registered, bad, self.replicas.pools())
        return self._latest

    def _handshake_refused(self, reason: str) -> None:
        self._refusal_log.warning(
            reason,
            "the scheduler at %s refused this node's connection (%s): check [security] key "
            "(is its public key in the scheduler's authorized_keys/nodes/?) and scheduler_key",
            self.cfg.scheduler,
            reason,
        )

    async def _receive(self, channel: DealerChannel) -> None:
        while True:
            env = await channel.recv()
            self._last_answer_mono = self.clock.monotonic()
            handler = self._handlers.get(type(env.body))
            if handler is None:
                if not isinstance(env.body, Error):  # an error never answers an error
                    await channel.send(
                        Error(
                            env.seq,
                            "unsupported",
                            f"node agent {__version__} does not handle {env.type!r}",
                        )
                    )
                continue
            try:
                await handler(env)
            except Exception as exc:  # the agent outlives any one bad message
                self.handler_errors += 1
                log.exception("handler for %r failed", env.type)
                await channel.send(Error(env.seq, "internal", f"{type(exc).__name__}: {exc}"))

    async def _leave(self, channel: DealerChannel) -> None:
        """SIGTERM: say goodbye (the scheduler routes nothing new here), let running calls
        finish for up to ``drain_timeout_s``, hand the rest back to be re-run elsewhere at once,
        and wait briefly for the scheduler to take the last results."""
        self.leaving = True
        if not self.registered:
            return
        running = len(self.replicas.running())
        log.info("leaving: %d calls running, %gs to finish them", running, self.cfg.drain_timeout_s)
        self.notifier.notify(f"STATUS=leaving: {running} calls to finish")
        await channel.send(Goodbye(False))
        await self.replicas.wait_idle(self.cfg.drain_timeout_s)
        handed_back = list(self.replicas.running())
        if handed_back:
            log.warning("handing back %d unfinished calls", len(handed_back))
            self.replicas.cancel(handed_back)
            # they run elsewhere the moment the scheduler reads the goodbye: stopped here first
            # (tools' process trees killed), so no call's effect can happen twice
            await self.replicas.wait_idle(HAND_BACK_KILL_S)
        deadline = self.clock.monotonic() + GOODBYE_WAIT_S
        while self.outbox and self.clock.monotonic() < deadline:
            await self.clock.sleep(0.05)
        self._goodbye_seq = await channel.send(Goodbye(True, handed_back))
        if self._goodbye_seq is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                remaining = max(0.0, deadline - self.clock.monotonic()) + 0.5
                await asyncio.wait_for(self._goodbye_acked.wait(), remaining)
        log.info("left the cluster (%d results unacknowledged)", len(self.outbox))

    # --- handlers ---------------------------------------------------------------------------

    async def _send_result(self, result: Result) -> None:
        assert self._channel is not None
        await self.outbox.send(self._channel, result)

    async def _send_chunk(self, chunk: Chunk) -> bool:
        """Streamed output: not kept for re-sending once the transport took it (its result
        is); False when it could not take it (the stream tries again, then gives up)."""
        assert self._channel is not None
        return await self._channel.send(chunk) is not None

    async def _on_dispatch(self, env: Envelope) -> None:
        """Run a call, once: a call id given before is answered with where it stands (its
        result again, if that was never acknowledged), never run a second time."""
        d = env.body
        assert isinstance(d, Dispatch) and self._channel is not None
        if self.leaving:  # sent before the scheduler saw our goodbye: it re-runs it elsewhere
            await self._channel.send(Ack(env.seq, f"leaving: call {d.call_id} not started"))
            return
        seen = self.replicas.seen(d.call_id)
        if seen is None:
            self.replicas.submit(d, self._send_result, self._send_chunk)
            return
        self.duplicate_dispatches += 1
        log.warning(
            "call %s dispatched again (it is %s here); not running it twice", d.call_id, seen
        )
        if not await self.outbox.send_again(self._channel, d.call_id):
            await self._channel.send(Ack(env.seq, f"call {d.call_id} already {seen}"))

    async def _on_cancel_calls(self, env: Envelope) -> None:
        assert isinstance(env.body, CancelCalls)
        n = self.replicas.cancel(env.body.call_ids)
        log.info("cancelled %d of %d calls on request", n, len(env.body.call_ids))

    async def _on_scale(self, env: Envelope) -> None:
        cmd = env.body
        assert isinstance(cmd, ScaleCommand) and self._channel is not None
        try:
            detail = self.replicas.scale(cmd.model, cmd.backend, cmd.target_replicas, cmd.remove)
        except ScaleError as exc:
            log.warning("scale %s to %d refused: %s", cmd.model, cmd.target_replicas, exc)
            await self._channel.send(Error(env.seq, exc.code, str(exc)))
            return
        log.info(
            "scale %s (%s) to %d%s: %s",
            cmd.model,
            cmd.backend,
            cmd.target_replicas,
            f" ({cmd.reason})" if cmd.reason else "",
            detail,
        )
        await self._channel.send(Ack(env.seq, detail))
        await self._announce()  # the new target (and any replica now draining)

    async def _on_ack(self, env: Envelope) -> None:
        assert isinstance(env.body, Ack)
        self.outbox.acked(env.body.ref_seq)
        if env.body.ref_seq == self._goodbye_seq:
            self._goodbye_acked.set()
        if env.body.ref_seq in self._hellos:
            for mark, done in self._told:
                if mark < env.body.ref_seq and not done.done():
                    done.set_result(None)
            self._told = [(mark, done) for mark, done in self._told if not done.done()]
        if not self.registered and env.body.ref_seq == self._hello_seq:
            self.registered = True
            log.info("registered with scheduler %s", self.cfg.scheduler)
            if self._latest is not None and self._channel is not None:
                await self._channel.send(self._latest)

    async def _on_error(self, env: Envelope) -> None:
        assert isinstance(env.body, Error)
        refused = None if env.body.code == "unregistered" else self.outbox.refused(env.body.ref_seq)
        if refused is not None:  # a result for a call no longer ours (fenced): not sent again
            log.warning("scheduler refused the result of %s: %s", refused.call_id, env.body.message)
            return
        if env.body.code == "unregistered":
            if self.registered:
                log.info("scheduler does not know this node (restarted?); registering again")
            self.registered = False
        else:
            log.warning(
                "scheduler refused frame %d: %s: %s",
                env.body.ref_seq,
                env.body.code,
                env.body.message,
            )
