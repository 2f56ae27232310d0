"""The scheduler daemon: one ROUTER endpoint, the live node table, answers to clients.

An I/O shell: frames come off the transport, go through one dispatch table keyed by message type,
and update pure state (`NodeTable`). Later layers (workflow engine, routers, scalers) plug in here.

About 900 lines, on purpose: the daemon's one dispatch table keeps every handler beside the
others (one table per daemon), and each handler is a thin step into the workflow service, the
node table or the learner; the decisions live in those modules.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import fcntl
import importlib
import json
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from swarmx import __version__
from swarmx.clock import Clock, ticks
from swarmx.cluster import NodeTable
from swarmx.config import (
    PredictorConfig,
    RouterConfig,
    ScalerConfig,
    SchedulerConfig,
    SecurityConfig,
    changed_fields,
)
from swarmx.daemon.gatewaycalls import ForeignChunk, GatewayCalls
from swarmx.daemon.lifecycle import (
    LoopGap,
    SystemdNotifier,
    run_until_stopped,
    settle_heap,
    share_the_gil,
)
from swarmx.daemon.limits import Capacity, Overloaded, QuotaExceeded
from swarmx.daemon.observe import Observer
from swarmx.daemon.scaling import ScaleController
from swarmx.daemon.workflows import INLINE_PARSE_BYTES, WorkflowService
from swarmx.metrics import MetricsServer, SchedulerMetrics, serve
from swarmx.models.online import OnlineLearner, load_model
from swarmx.protocol import (
    AbortCall,
    Ack,
    CancelWorkflow,
    Chunk,
    Envelope,
    Error,
    ExportTraces,
    GatewayCall,
    Goodbye,
    Heartbeat,
    Hello,
    InstallPredictor,
    Message,
    NodesReply,
    PredictorStatus,
    QueryNodes,
    QueryPredictor,
    QueryTop,
    QueryWorkflows,
    Result,
    SchedulerInfo,
    Submit,
    Submitted,
    Telemetry,
    TopReply,
    TracesReply,
    WorkflowsReply,
    from_builtins,
)
from swarmx.sched.router import make_router
from swarmx.sched.scaler import Scaler
from swarmx.security import (
    ANYONE,
    KeyRing,
    NodeNames,
    Peer,
    RateLimitedLog,
    may_send,
    sees_everything,
)
from swarmx.store import Store
from swarmx.transport import (
    NothingWaiting,
    RouterChannel,
    ServerCurve,
    TransportError,
    bind_router,
    load_keypair,
)
from swarmx.workflow.spec import WorkflowError, WorkflowLimits

log = logging.getLogger(__name__)

DB_FILE = "swarmx.db"
STATE_FILE = "scheduler.json"
"""Written to the state directory once bound: the real endpoint (useful with port 0) and pid."""

SWEEP_INTERVAL_S = 0.1
BATCH_FRAMES = 64
BATCH_S = 0.005
"""The receive loop handles at most this many frames, or for this long, before it commits the
journal, sends the replies that waited for that, and yields to the other tasks (pyzmq hands
back finished futures while frames wait, so without this a burst would never let go)."""
RELOADABLE = frozenset(
    {
        *(f.name for f in dataclasses.fields(WorkflowLimits)),
        "max_queued_workflows",
        "max_queued_calls",
        "trace_retention_rows",
        "workflow_retention_days",
    }
)
"""``[scheduler]`` settings a SIGHUP applies; the others need a restart."""
SLOW_HANDLER_S = 0.05
"""A frame whose handling takes longer is logged (at most once per type every 10 s)."""
PARALLEL_PARSES = 4
"""Large workflow files parsed at once (on threads) while the receive loop goes on."""
PRUNE_INTERVAL_S = 60.0
"""How often the journal drops (archives) traces and finished workflows past retention."""
PRUNE_BATCH = 500
"""Rows per prune step (~10 ms); the loop yields between steps."""
SCRAPE_WAIT_S = 2.0
"""How long a scrape waits for the event loop to build a fresh snapshot before it is served
the last one (the loop is stalled)."""
SCALE_REFUSALS = {"unknown_model", "out_of_range"}
"""Error codes a node answers a scale command it cannot carry out with."""

Handler = Callable[[bytes, Envelope, Peer], Awaitable[None]]
NODE_NAMES_FILE = "node_keys.json"
"""Which node name each node key registered with (see `NodeNames`)."""


class Refused(Exception):
    """A frame the sender's key may not send: answered ``forbidden`` and counted by ``reason``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class StateDirBusy(RuntimeError):
    pass


def read_state_file(state_dir: str | Path) -> dict[str, Any] | None:
    """The running scheduler's published endpoint and pid, or None when absent or half-written."""
    try:
        data = json.loads((Path(state_dir) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class SchedulerDaemon:
    def __init__(
        self,
        cfg: SchedulerConfig,
        clock: Clock,
        notifier: SystemdNotifier | None = None,
        predictor: PredictorConfig | None = None,
        *,
        router: RouterConfig | None = None,
        scaler: ScalerConfig | None = None,
        security: SecurityConfig | None = None,
    ) -> None:
        self.cfg = cfg
        self.security = security or SecurityConfig()
        self.keys: KeyRing | None = None
        self.node_names: NodeNames | None = None
        self.auth_refused: collections.Counter[str] = collections.Counter()
        """Frames and handshakes refused, by reason (``swarmx_auth_refused_total``)."""
        self._refusal_log = RateLimitedLog(clock.monotonic)
        self._slow_log = RateLimitedLog(clock.monotonic, logger=log)
        self.predictor_cfg = predictor or PredictorConfig()
        self.router_cfg = router or RouterConfig()
        self.scaler_cfg = scaler or ScalerConfig()
        self.clock = clock
        self.notifier = notifier or SystemdNotifier()
        self.nodes = NodeTable(cfg.stale_after_missed, cfg.down_after_missed)
        self._started_mono = clock.monotonic()
        self._channel: RouterChannel | None = None
        self.workflows: WorkflowService | None = None
        self.scaling: ScaleController | None = None
        self.gateway: GatewayCalls | None = None
        self.learner: OnlineLearner | None = None
        self.observer: Observer | None = None
        self.metrics = SchedulerMetrics()
        self.loop_gap = LoopGap(clock)
        self._after_commit: list[tuple[bytes, Message]] = []
        self._parses = asyncio.Semaphore(PARALLEL_PARSES)
        self._background: set[asyncio.Task[None]] = set()
        """Large submissions being parsed (see `_on_submit`)."""
        """Replies that promise durability (a workflow id, a result taken): sent once the
        journal has committed what they promise."""
        self.handler_errors = 0
        self._handlers: dict[type[Message], Handler] = {
            Hello: self._on_hello,
            Ack: self._on_node_ack,
            Error: self._on_node_error,
            Heartbeat: self._on_heartbeat,
            Goodbye: self._on_goodbye,
            Telemetry: self._on_telemetry,
            Result: self._on_result,
            QueryNodes: self._on_query_nodes,
            Submit: self._on_submit,
            QueryWorkflows: self._on_query_workflows,
            CancelWorkflow: self._on_cancel_workflow,
            ExportTraces: self._on_export_traces,
            QueryPredictor: self._on_query_predictor,
            InstallPredictor: self._on_install_predictor,
            QueryTop: self._on_query_top,
            GatewayCall: self._on_gateway_call,
            AbortCall: self._on_abort_call,
            Chunk: self._on_chunk,
        }

    # --- lifecycle --------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        # forecasts run on the event loop, a few small torch ops each: worker threads only add
        # a wait for a free core (64 candidates: 1.6 ms instead of 0.6 with the other core
        # busy). Set before torch is first imported; training sets its own.
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        state_dir = Path(self.cfg.state_dir)
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        state_dir.chmod(0o700)  # the journal holds prompts and outputs: the owner's only
        curve = self._curve(state_dir)
        with _exclusive(state_dir / "scheduler.lock"):
            store = Store(state_dir / DB_FILE)
            self._build(store, state_dir)
            assert self.workflows is not None and self.learner is not None
            resumed = await self.workflows.recover()
            store.commit()
            if resumed:
                log.info(
                    "resuming %d unfinished workflows from %s (calls wait %gs for their nodes)",
                    resumed,
                    store.path,
                    self.cfg.recovery_grace_s,
                )
            try:
                self._channel = channel = bind_router(
                    self.cfg.listen, "scheduler", self.clock, self.cfg.max_frame_bytes, curve
                )
            except BaseException:
                store.close()
                raise
            metrics: MetricsServer | None = None
            importer: threading.Thread | None = None
            try:
                loop = asyncio.get_running_loop()
                self.metrics.refresh = lambda: self._scrape_snapshot(loop)
                metrics = serve(self.metrics.registry, self.cfg.metrics_port, self.cfg.metrics_addr)
                if metrics is not None:
                    log.info("metrics on %s", metrics.url, extra={"metrics_url": metrics.url})
                _write_json(
                    state_dir / STATE_FILE,
                    {
                        "endpoint": channel.endpoint,
                        "pid": os.getpid(),
                        "version": __version__,
                        "started_ts": self.clock.time(),
                        "public_key": "" if curve is None else curve.keys.public.decode(),
                    },
                )
                log.info(
                    "scheduler %s listening on %s (state %s, %s)",
                    __version__,
                    channel.endpoint,
                    state_dir,
                    "no keys"
                    if self.keys is None
                    else f"CURVE, {len(self.keys)} authorized keys in {self.keys.directory}",
                )
                importer = _settle_for_serving()
                self.notifier.notify("READY=1", f"STATUS=listening on {channel.endpoint}")
                tasks = [
                    asyncio.create_task(self._receive(channel), name="receive"),
                    asyncio.create_task(self._sweep(), name="sweep"),
                    asyncio.create_task(self.loop_gap.run(), name="loop-gap"),
                    asyncio.create_task(self._prune(store, state_dir), name="prune"),
                    asyncio.create_task(
                        channel.watch_handshakes(self._handshake_refused), name="handshakes"
                    ),
                    *self.notifier.start_watchdog(self.clock),
                ]
                if self.keys is not None:
                    tasks.append(asyncio.create_task(self._rescan_keys(), name="keys"))
                if self.scaler_cfg.policy != "none":
                    tasks.append(asyncio.create_task(self._scale(), name="scale"))
                await run_until_stopped(stop, tasks)
            finally:
                self.notifier.notify("STOPPING=1")
                if metrics is not None:
                    metrics.close()
                channel.close()
                store.close()
                self.learner.close()
                with contextlib.suppress(OSError):
                    (state_dir / STATE_FILE).unlink()
                if importer is not None:  # see `_settle_for_serving`
                    importer.join(IMPORT_WAIT_S)
        log.info("scheduler stopped")

    def _curve(self, state_dir: Path) -> ServerCurve | None:
        """Keys, when configured: ours, the authorized ones, and the node name bindings."""
        sec = self.security
        if not sec.enabled:
            return None
        if not sec.authorized_keys:
            raise TransportError("[security] authorized_keys: the scheduler needs a directory")
        self.keys = KeyRing(Path(sec.authorized_keys))
        self.keys.scan()
        self.node_names = NodeNames(state_dir / NODE_NAMES_FILE)
        return ServerCurve(load_keypair(sec.key), self.keys.allow)

    def rescan_keys(self) -> None:
        """Pick up keys added to or removed from the directory (SIGHUP, and every rescan_s)."""
        if self.keys is None:
            return
        try:
            added, removed = self.keys.scan()
        except TransportError as exc:
            log.error("cannot rescan keys: %s", exc)
            return
        if added or removed:
            log.info(
                "authorized keys: %d added, %d removed (%d now)", added, removed, len(self.keys)
            )

    def reload(self, cfg: SchedulerConfig | None) -> None:
        """SIGHUP: rescan the keys, and apply the ``[scheduler]`` settings that can change
        under a running scheduler (limits, capacity, retention); say which need a restart.
        ``cfg`` is None when the file could not be read (the running settings stay)."""
        self.rescan_keys()
        if cfg is None:
            return
        changed = changed_fields(self.cfg, cfg)
        live = [name for name in changed if name in RELOADABLE]
        later = [name for name in changed if name not in RELOADABLE]
        self.cfg = dataclasses.replace(self.cfg, **{name: getattr(cfg, name) for name in live})
        if self.workflows is not None:
            self.workflows.limits = WorkflowLimits.of(self.cfg)
            self.workflows.capacity = dataclasses.replace(
                self.workflows.capacity,
                max_workflows=self.cfg.max_queued_workflows,
                max_queued_calls=self.cfg.max_queued_calls,
            )
        log.info(
            "SIGHUP: [scheduler] %s%s",
            f"applied {', '.join(live)}" if live else "nothing to apply",
            f"; {', '.join(later)} changed but need a restart" if later else "",
        )

    async def _rescan_keys(self) -> None:
        async for _ in ticks(self.clock, self.security.rescan_s):
            await asyncio.to_thread(self.rescan_keys)

    def _handshake_refused(self, reason: str) -> None:
        self.auth_refused[reason] += 1
        self._refusal_log.warning(reason, "refused a connection at the handshake: %s", reason)

    def _peer(self, key: bytes) -> Peer | None:
        if self.keys is None:
            return ANYONE
        return self.keys.peer(key)

    def _check(self, who: Peer | None, env: Envelope) -> Peer:
        """Who sent ``env``, if their key may send it (raises `Refused` otherwise)."""
        if who is None:
            raise Refused("unknown_key", "this key is no longer authorized")
        if not may_send(who, type(env.body)):
            raise Refused(
                "role", f"a {who.role} key ({who.name}) may not send {env.type!r} messages"
            )
        if isinstance(env.body, Hello):
            hello = env.body
            if hello.node != env.sender:
                raise Refused("node_name", f"hello for {hello.node!r} sent as {env.sender!r}")
            prefix = f"{hello.node}/"
            foreign = next(
                (r.replica for r in hello.replicas if not r.replica.startswith(prefix)), None
            )
            if foreign is not None:
                raise Refused("node_name", f"replica {foreign!r} is not named {prefix}...")
        if who.role == "node" and self.node_names is not None:
            if isinstance(env.body, Hello):
                why = self.node_names.claim(who.name, env.body.node)
                if why is not None:
                    raise Refused("node_name", why)
            elif self.node_names.node_of(who.name) != env.sender:
                raise Refused(
                    "node_name", f"key {who.name!r} has not registered as node {env.sender!r}"
                )
        return who

    async def _receive(self, channel: RouterChannel) -> None:
        """Frames in bounded batches: each batch is committed to the journal as one
        transaction, then the replies waiting on it go out, then the loop yields."""
        clock = self.clock
        while True:
            frame = await channel.recv()
            started, handled = clock.monotonic(), 0
            while True:
                if frame is not None:
                    await self._handle(channel, *frame)
                handled += 1
                if handled >= BATCH_FRAMES or clock.monotonic() - started >= BATCH_S:
                    break
                try:
                    frame = await channel.recv_ready()
                except NothingWaiting:
                    break
            await self._commit(channel)
            await asyncio.sleep(0)

    async def _commit(self, channel: RouterChannel) -> None:
        assert self.workflows is not None
        self.workflows.store.commit()
        if self.node_names is not None:
            self.node_names.save()
        replies, self._after_commit = self._after_commit, []
        for peer, body in replies:
            await channel.send(peer, body)

    async def _handle(self, channel: RouterChannel, peer: bytes, env: Envelope, key: bytes) -> None:
        handler = self._handlers.get(type(env.body))
        started = self.clock.monotonic()
        try:
            who = self._check(self._peer(key), env)
            if handler is None:
                await channel.send(
                    peer,
                    Error(env.seq, "unsupported", f"the scheduler does not accept {env.type!r}"),
                )
                return
            await handler(peer, env, who)
        except Refused as exc:
            self.auth_refused[exc.reason] += 1
            self._refusal_log.warning(
                exc.reason, "refused %r from %s: %s", env.type, env.sender, exc
            )
            if not isinstance(env.body, Error):  # an error never answers an error
                await channel.send(peer, Error(env.seq, "forbidden", str(exc)))
        except Exception as exc:  # the daemon outlives any one bad message
            self.handler_errors += 1
            log.exception("handler for %r from %s failed", env.type, env.sender)
            await channel.send(peer, Error(env.seq, "internal", f"{type(exc).__name__}: {exc}"))
        took_s = self.clock.monotonic() - started
        if took_s > SLOW_HANDLER_S:  # it held every other frame (and the loop) that long
            self._slow_log.warning(
                f"slow:{env.type}",
                "handling %r from %s took %.0f ms",
                env.type,
                env.sender,
                took_s * 1000,
            )

    def _build(self, store: Store, state_dir: Path) -> None:
        """The services the handlers step into: calls and workflows, the gateway's calls, the
        scaler, the observer behind `swarmx top` and the metrics, and the learner."""
        self.learner = OnlineLearner(state_dir, self.predictor_cfg)
        rc = self.router_cfg
        self.workflows = WorkflowService(
            store,
            make_router(
                rc.policy,
                seed=rc.seed,
                level=rc.level,
                kv_overlap_weight=rc.kv_overlap_weight,
                capacity_price=rc.capacity_price,
                session_value=rc.session_value,
            ),
            self.nodes,
            self.clock,
            self._send_to_node,
            learner=self.learner,
            order=rc.queue,
            replica_queue=rc.replica_queue,
            max_candidates=rc.max_candidates,
            limits=WorkflowLimits.of(self.cfg),
            capacity=Capacity(
                self.cfg.max_queued_workflows,
                self.cfg.max_queued_calls,
                self.cfg.recovery_grace_s,
            ),
        )
        self.gateway = GatewayCalls(
            self.workflows,
            self._reply,
            self.clock,
            idle_s=self.cfg.session_idle_s,
            max_calls_per_client=self.cfg.max_gateway_calls_per_client,
        )
        self.scaling = ScaleController(
            self.scaler_cfg,
            build_scaler(self.scaler_cfg),
            self.workflows,
            self.clock,
            self._send_to_node,
        )
        self.observer = Observer(
            self.workflows,
            self.nodes,
            self.learner,
            self.clock,
            self.metrics,
            router=rc.policy,
            scaler=self.scaling.scaler.name,
        )
        log.info(
            "router %s (queue %s), scaler %s every %gs",
            rc.policy,
            rc.queue,
            self.scaling.scaler.name,
            self.scaler_cfg.interval_s,
        )

    async def _sweep(self) -> None:
        assert self.workflows is not None
        last = expire_at = self.clock.monotonic()
        async for now in ticks(self.clock, SWEEP_INTERVAL_S):
            stall_s = now - last - SWEEP_INTERVAL_S
            last = now
            if stall_s > SWEEP_INTERVAL_S:  # we were stalled, not our nodes silent
                self.nodes.excuse(stall_s)
            for change in self.nodes.sweep(now):
                level = logging.WARNING if change.new != "live" else logging.INFO
                log.log(
                    level,
                    "node %s: %s -> %s",
                    change.node,
                    change.old,
                    change.new,
                    extra={"node": change.node, "state": change.new},
                )
                await self.workflows.on_node_state(change.node, change.new)
                if change.new == "down":
                    await self.workflows.on_node_down(change.node)
            await self.workflows.check_deadlines()
            if self.gateway is not None and now >= expire_at:
                self.gateway.expire()
                expire_at = now + 1.0
            # what the sweep journaled (calls lost with a node, past their deadline) is durable
            # now, not whenever the next frame comes in (a no-op when it wrote nothing)
            self.workflows.store.commit()
            if self.learner is not None:
                if self.learner.poll():
                    settle_heap()
                self.learner.maybe_retrain()

    async def _prune(self, store: Store, state_dir: Path) -> None:
        """Keep the journal bounded: old traces move to ``STATE/archive/``, finished
        workflows past retention go, a bounded batch at a time."""
        cfg = self.cfg
        if not cfg.trace_retention_rows and not cfg.workflow_retention_days:
            return
        async for _ in ticks(self.clock, PRUNE_INTERVAL_S):
            more = True
            while more:
                result = store.prune(
                    self.clock.time(),
                    batch=PRUNE_BATCH,
                    keep_traces=cfg.trace_retention_rows,
                    keep_finished_s=cfg.workflow_retention_days * 86_400,
                    archive_dir=state_dir / "archive",
                )
                store.commit()
                if result.traces_deleted or result.workflows_deleted:
                    log.info(
                        "journal: archived %d traces, dropped %d finished workflows",
                        result.traces_deleted,
                        result.workflows_deleted,
                    )
                more = result.more
                await asyncio.sleep(0)

    async def _scale(self) -> None:
        assert self.scaling is not None
        first = True
        async for _ in ticks(self.clock, self.scaler_cfg.interval_s):
            if first:  # nothing has happened yet to decide on
                first = False
                continue
            try:
                decisions = await self.scaling.tick()
            except Exception:  # a bad decision must not stop scaling for good
                log.exception("scaling decision failed")
                continue
            if self.observer is not None:
                for decision in decisions:
                    self.observer.scaled(decision)

    def _scrape_snapshot(self, loop: asyncio.AbstractEventLoop) -> TopReply:
        """Called on the metrics server's thread at each scrape: the snapshot, built on the
        event loop (its state lives there) then and only then. Over 1,000 nodes a build takes
        a while, which a scrape every 15 s pays once, not the loop every second."""
        assert self.observer is not None
        observer = self.observer

        async def build() -> TopReply:
            return await observer.snapshot(self._info())

        return asyncio.run_coroutine_threadsafe(build(), loop).result(SCRAPE_WAIT_S)

    async def _send_to_node(self, node: str, body: Message) -> bool:
        assert self._channel is not None
        return await self._channel.send(self.nodes.peer(node), body)

    # --- handlers ---------------------------------------------------------------------------

    def _reply(self, peer: bytes, body: Message) -> Awaitable[bool]:
        assert self._channel is not None
        return self._channel.send(peer, body)

    async def _on_hello(self, peer: bytes, env: Envelope, who: Peer) -> None:
        hello = env.body
        assert isinstance(hello, Hello)
        before = self.nodes.hello(hello.node)
        change = self.nodes.register(hello, peer, self.clock.monotonic(), self.clock.time())
        if before is not None and (before.pid, before.started_ts) == (hello.pid, hello.started_ts):
            # the same agent again: say so only when its replicas changed (it re-sends its hello
            # until acknowledged, and while a drain waits)
            log.log(
                logging.INFO if before.replicas != hello.replicas else logging.DEBUG,
                "node %s replicas: %s",
                hello.node,
                ", ".join(i.replica + (" (draining)" if i.draining else "") for i in hello.replicas)
                or "none",
            )
        else:
            log.info(
                "node %s registered (%s, pid %d, %d cores, %d GPUs, %d replicas)%s",
                hello.node,
                hello.host,
                hello.pid,
                hello.cpu_cores_logical,
                len(hello.gpus),
                len(hello.replicas),
                "" if change is None or change.old is None else f", was {change.old}",
            )
        assert self.workflows is not None and self.scaling is not None
        self.scaling.on_hello(hello)
        self.workflows.leaving.discard(hello.node)
        await self.workflows.on_hello(hello)
        await self.workflows.reconcile(hello.node, hello.running)
        await self._reply(peer, Ack(env.seq, "registered"))

    async def _seen(self, peer: bytes, env: Envelope) -> bool:
        if env.sender not in self.nodes:
            return False
        change = self.nodes.seen(env.sender, peer, self.clock.monotonic(), self.clock.time())
        if change is not None:
            log.info(
                "node %s: %s -> %s",
                change.node,
                change.old,
                change.new,
                extra={"node": change.node, "state": change.new},
            )
            assert self.workflows is not None
            await self.workflows.on_node_state(change.node, change.new)
        return True

    async def _unregistered(self, peer: bytes, env: Envelope) -> None:
        await self._reply(peer, Error(env.seq, "unregistered", f"unknown node {env.sender!r}"))

    async def _on_node_ack(self, peer: bytes, env: Envelope, who: Peer) -> None:
        """A node accepted a command (a scale command: what it does, in words)."""
        if await self._seen(peer, env):
            assert isinstance(env.body, Ack)
            if env.body.detail:
                log.debug("node %s: %s", env.sender, env.body.detail)

    async def _on_node_error(self, peer: bytes, env: Envelope, who: Peer) -> None:
        """A node refused a frame; nothing is answered (an error never answers an error)."""
        assert isinstance(env.body, Error)
        if await self._seen(peer, env):
            log.warning(
                "node %s refused frame %d: %s: %s",
                env.sender,
                env.body.ref_seq,
                env.body.code,
                env.body.message,
            )
            if env.body.code in SCALE_REFUSALS and self.scaling is not None:
                await self.scaling.on_refused(env.sender)

    async def _on_heartbeat(self, peer: bytes, env: Envelope, who: Peer) -> None:
        if not await self._seen(peer, env):
            await self._unregistered(peer, env)
            return
        assert isinstance(env.body, Heartbeat) and self.workflows is not None
        if env.body.telemetry is not None:
            self._telemetry_in(env.sender, env.body.telemetry)
        await self.workflows.reconcile(env.sender, env.body.running)
        await self._reply(peer, Ack(env.seq))

    async def _on_goodbye(self, peer: bytes, env: Envelope, who: Peer) -> None:
        if not await self._seen(peer, env):
            await self._unregistered(peer, env)
            return
        bye = env.body
        assert isinstance(bye, Goodbye) and self.workflows is not None
        rerun = await self.workflows.on_goodbye(env.sender, bye.final, bye.handed_back)
        if bye.final:
            self.nodes.remove(env.sender)
            log.info(
                "node %s left the cluster (%d calls re-run elsewhere)",
                env.sender,
                rerun,
                extra={"node": env.sender, "state": "left"},
            )
        else:
            log.info("node %s is leaving: no new calls", env.sender)
        await self._reply(peer, Ack(env.seq))

    async def _on_telemetry(self, peer: bytes, env: Envelope, who: Peer) -> None:
        if not await self._seen(peer, env):
            await self._unregistered(peer, env)
            return
        assert isinstance(env.body, Telemetry)
        self._telemetry_in(env.sender, env.body)

    def _telemetry_in(self, node: str, telemetry: Telemetry) -> None:
        """A node's telemetry, on its own or riding on a heartbeat (the default)."""
        self.nodes.update_telemetry(node, telemetry)
        if self.workflows is not None:
            self.workflows.on_telemetry(node, telemetry)

    async def _on_result(self, peer: bytes, env: Envelope, who: Peer) -> None:
        if not await self._seen(peer, env):
            await self._unregistered(peer, env)
            return
        assert isinstance(env.body, Result) and self.workflows is not None
        sent_to = self.workflows.dispatched_to(env.body.call_id)
        if sent_to is not None and sent_to != env.sender:
            self.workflows.faults.results_dropped["fenced"] += 1
            raise Refused(
                "foreign_result", f"call {env.body.call_id} was not sent to node {env.sender}"
            )
        await self.workflows.on_result(env.sender, env.body)
        # the node stops re-sending it once acknowledged: only after the journal has it
        self._after_commit.append((peer, Ack(env.seq)))

    async def _on_gateway_call(self, peer: bytes, env: Envelope, who: Peer) -> None:
        assert isinstance(env.body, GatewayCall) and self.gateway is not None
        await self.gateway.on_call(peer, env.body)

    async def _on_abort_call(self, peer: bytes, env: Envelope, who: Peer) -> None:
        assert isinstance(env.body, AbortCall) and self.gateway is not None
        await self.gateway.on_abort(peer, env.body)

    async def _on_chunk(self, peer: bytes, env: Envelope, who: Peer) -> None:
        if not await self._seen(peer, env):
            await self._unregistered(peer, env)
            return
        assert isinstance(env.body, Chunk) and self.gateway is not None
        try:
            await self.gateway.on_chunk(env.sender, env.body)
        except ForeignChunk as exc:
            raise Refused("foreign_result", str(exc)) from None

    async def _on_submit(self, peer: bytes, env: Envelope, who: Peer) -> None:
        """A small workflow is taken inline and its id sent once the batch is committed. A
        large one is parsed on a thread by a task of its own, so the receive loop goes on
        meanwhile (at most `PARALLEL_PARSES` at once; past that the loop waits for one)."""
        assert isinstance(env.body, Submit)
        if len(env.body.text) <= INLINE_PARSE_BYTES:
            reply = await self._submit(env, who)
            if isinstance(reply, Submitted):  # promises durability: after the commit
                self._after_commit.append((peer, reply))
            else:
                await self._reply(peer, reply)
            return
        await self._parses.acquire()
        task = asyncio.create_task(self._submit_large(peer, env, who), name="submit")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _submit_large(self, peer: bytes, env: Envelope, who: Peer) -> None:
        assert self.workflows is not None
        try:
            reply = await self._submit(env, who)
            if isinstance(reply, Submitted):
                self.workflows.store.commit()  # the id goes out only once it is durable
            await self._reply(peer, reply)
        except Exception as exc:  # as `_handle` does for inline handlers
            self.handler_errors += 1
            log.exception("submit from %s failed", env.sender)
            await self._reply(peer, Error(env.seq, "internal", f"{type(exc).__name__}: {exc}"))
        finally:
            self._parses.release()

    async def _submit(self, env: Envelope, who: Peer) -> Message:
        """The reply to a submit: the workflow's id, or why it was refused."""
        assert isinstance(env.body, Submit) and self.workflows is not None
        try:
            wf_id, existing = await self.workflows.submit(env.body, client=who.name)
        except Overloaded as exc:
            self._refusal_log.warning("overloaded", "refused a submit from %r: %s", who.name, exc)
            return Error(env.seq, "overloaded", str(exc))
        except QuotaExceeded as exc:
            self.auth_refused["quota"] += 1
            self._refusal_log.warning("quota", "refused a submit from %r: %s", who.name, exc)
            return Error(env.seq, "quota_exceeded", str(exc))
        except WorkflowError as exc:
            return Error(env.seq, "invalid_workflow", str(exc))
        return Submitted(wf_id, existing)

    async def _on_query_workflows(self, peer: bytes, env: Envelope, who: Peer) -> None:
        q = env.body
        assert isinstance(q, QueryWorkflows) and self.workflows is not None
        if not q.workflow_id:
            mine = None if sees_everything(who) else who.name
            await self._reply(peer, WorkflowsReply(self.workflows.views.recent(q.limit, mine)))
            return
        self._check_owner(who, q.workflow_id)
        view = self.workflows.views.view(q.workflow_id, detailed=True)
        if view is None:
            await self._reply(peer, Error(env.seq, "not_found", f"no workflow {q.workflow_id!r}"))
            return
        await self._reply(peer, WorkflowsReply([view]))

    async def _on_cancel_workflow(self, peer: bytes, env: Envelope, who: Peer) -> None:
        q = env.body
        assert isinstance(q, CancelWorkflow) and self.workflows is not None
        self._check_owner(who, q.workflow_id)
        if await self.workflows.cancel(q.workflow_id):
            await self._reply(peer, Ack(env.seq, "cancelled"))
        elif self.workflows.store.workflow(q.workflow_id) is None:
            await self._reply(peer, Error(env.seq, "not_found", f"no workflow {q.workflow_id!r}"))
        else:
            await self._reply(
                peer, Error(env.seq, "finished", f"workflow {q.workflow_id} has already finished")
            )

    def _check_owner(self, who: Peer, wf_id: str) -> None:
        """Clients act on their own workflows only (an unknown id is left to the handler)."""
        assert self.workflows is not None
        if sees_everything(who):
            return
        owner = self.workflows.client_of(wf_id)
        if owner is not None and owner != who.name:
            raise Refused("not_owner", f"workflow {wf_id} belongs to another client")

    async def _on_export_traces(self, peer: bytes, env: Envelope, who: Peer) -> None:
        q = env.body
        assert isinstance(q, ExportTraces) and self.workflows is not None
        rows = self.workflows.store.traces(q.after_id, min(max(q.limit, 1), 5000))
        last = rows[-1][0] if rows else q.after_id
        await self._reply(peer, TracesReply([r for _, r in rows], last))

    async def _on_query_predictor(self, peer: bytes, env: Envelope, who: Peer) -> None:
        assert self.learner is not None
        await self._reply(peer, from_builtins(PredictorStatus, self.learner.status()))

    async def _on_install_predictor(self, peer: bytes, env: Envelope, who: Peer) -> None:
        assert isinstance(env.body, InstallPredictor) and self.learner is not None
        try:
            # loading imports torch and reads the file: seconds, so off the event loop
            model = await asyncio.to_thread(load_model, Path(env.body.path))
            self.learner.check(model)  # before its file is written
            staged = await asyncio.to_thread(self.learner.stage, model)
            version = self.learner.install_model(model, staged)
        except Exception as exc:  # whatever torch.load raises on a file that is not a model
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            await self._reply(
                peer,
                Error(env.seq, "invalid_model", f"{env.body.path}: cannot load a predictor: {why}"),
            )
            return
        settle_heap()
        log.info("predictor %s installed from %s", version, env.body.path)
        await self._reply(peer, Ack(env.seq, version))

    def _info(self) -> SchedulerInfo:
        assert self._channel is not None and self.workflows is not None
        faults = self.workflows.faults
        return SchedulerInfo(
            endpoint=self._channel.endpoint,
            version=__version__,
            uptime_s=self.clock.monotonic() - self._started_mono,
            bad_frames=dict(self._channel.stats.dropped),
            auth_refused=dict(self.auth_refused),
            handler_errors=self.handler_errors,
            results_dropped=dict(faults.results_dropped),
            fenced_calls=faults.fenced_calls,
            overloaded=faults.overloaded,
            loop_gap_max_s=self.loop_gap.max_s(),
            gateway_calls=self.gateway.in_flight if self.gateway else 0,
            gateway_sessions=self.gateway.sessions if self.gateway else 0,
            gateway_refused=dict(self.gateway.refused) if self.gateway else {},
        )

    async def _on_query_nodes(self, peer: bytes, env: Envelope, who: Peer) -> None:
        await self._reply(peer, NodesReply(self._info(), self.nodes.views(self.clock.monotonic())))

    async def _on_query_top(self, peer: bytes, env: Envelope, who: Peer) -> None:
        assert isinstance(env.body, QueryTop) and self.observer is not None
        await self._reply(peer, await self.observer.snapshot(self._info(), env.body))


IMPORT_WAIT_S = 60.0
"""How long a stopping scheduler waits for its torch import to end (it takes a few seconds)."""


def _settle_for_serving() -> threading.Thread:
    """The process as it serves: long-lived objects out of the collector's way, the GIL handed
    over sooner, and torch imported now, beside the loop. The online learner loads its first
    model after a few hundred calls; importing torch then held the GIL, and so the loop, for
    about 300 ms mid-run (and grew memory by 170 MiB there). At start nothing waits.

    Returns the importing thread: a scheduler stopped while it runs must join it before the
    interpreter finalizes, or torch's half-made C++ state aborts the process (``terminate
    called without an active exception``, exit -6 instead of 0)."""
    settle_heap()
    share_the_gil()

    def load() -> None:
        try:
            importlib.import_module("swarmx.models.predictor")
        except ImportError as exc:  # forecasts fall back to the empirical model
            log.warning("torch is not importable (%s): no trained predictor can run", exc)
        settle_heap()  # torch's objects too

    importer = threading.Thread(target=load, name="swarmx-import-torch", daemon=True)
    importer.start()
    return importer


def build_scaler(cfg: ScalerConfig) -> Scaler:
    """The configured policy (its options were checked when the config was loaded)."""
    return cfg.policy_options.build()


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an flock for the daemon's lifetime so two schedulers never share a state directory."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StateDirBusy(f"another scheduler is using state dir {lock_path.parent}") from None
        yield
    finally:
        os.close(fd)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)
