"""`swarmx gateway`: an OpenAI-compatible HTTP endpoint in front of the scheduler.

Agents decide their next call at run time and speak the OpenAI API to a ``base_url``; this daemon
is that URL. Each request becomes one `GatewayCall` to the scheduler, which routes it like a
workflow call (same router, queue and traces); the engine's output comes back as `Chunk` frames
and leaves as server-sent events as it arrives. Several gateways may run beside one scheduler:
each is a client of it, holding only the calls its own HTTP clients wait for.

Who may call: with ``api_keys``, holders of a key (the key names the client: quotas, traces);
without, callers on this host only. Off loopback it serves HTTPS only (``tls_cert``), unless
told ``--insecure``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import json
import logging
import math
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from swarmx import __version__
from swarmx.clock import Clock, ticks
from swarmx.config import GatewayConfig, check_http_listen
from swarmx.daemon.lifecycle import SystemdNotifier, run_until_stopped
from swarmx.gateway.apikeys import ApiKeys
from swarmx.gateway.http import HttpLimits, HttpServer, Request, Response, StreamResponse
from swarmx.gateway.openai_api import (
    SSE_DONE,
    Api,
    ApiError,
    Folder,
    ParsedCall,
    models_body,
    parse_request,
    sse_event,
    usage_only,
)
from swarmx.metrics import GatewayMetrics, serve
from swarmx.protocol import (
    AbortCall,
    CallEnded,
    Chunk,
    Envelope,
    Error,
    GatewayCall,
    Message,
    NodesReply,
    QueryNodes,
)
from swarmx.transport import ClientCurve, DealerChannel, connect_dealer

log = logging.getLogger(__name__)

SESSION_HEADER = "x-swarmx-session"
SLO_HEADER = "x-swarmx-slo-s"
PRIORITY_HEADER = "x-swarmx-priority"
MAX_NAME = 256
"""Longest session or model name (the wire's limit for names)."""
MODELS_TTL_S = 2.0
"""How long a `/v1/models` answer is reused before the scheduler is asked again."""
MODELS_WAIT_S = 3.0
WATCH_S = 5.0
"""How often the gateway checks that the scheduler it waits on is the one it sent calls to."""
RESTART_SLACK_S = 2.0
"""A scheduler start time estimated this much later than before is a restart, not jitter."""
TOOL_POOL = "tool"

Event = Chunk | CallEnded


@dataclass
class _Pending:
    """A call this gateway waits on: what the scheduler sent for it, in order."""

    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    seq: int = 0
    ended: bool = False
    timer: asyncio.TimerHandle | None = None
    """Ends the call with 504 at its deadline (one timer per call, not a wait per event)."""


class GatewayDaemon:
    def __init__(
        self,
        cfg: GatewayConfig,
        clock: Clock,
        *,
        curve: ClientCurve | None = None,
        keys: ApiKeys | None = None,
        tls: ssl.SSLContext | None = None,
        name: str = "gateway",
        notifier: SystemdNotifier | None = None,
    ) -> None:
        self.cfg = cfg
        self.clock = clock
        self.curve = curve
        self.keys = keys
        self.tls = tls
        self.name = name
        self.notifier = notifier or SystemdNotifier()
        self.metrics = GatewayMetrics()
        self.url = ""
        """Where it listens, once it does (``http://127.0.0.1:PORT``)."""
        self.ready = asyncio.Event()
        self._channel: DealerChannel | None = None
        self._ids = itertools.count(1)
        self._pending: dict[str, _Pending] = {}
        self._by_seq: dict[int, str] = {}
        """Frame seq of each call's `GatewayCall` -> the call (an `Error` names only the seq)."""
        self._models: tuple[float, list[str]] | None = None
        self._scheduler_started: float | None = None
        """The scheduler's start on our monotonic clock, from its uptime in `NodesReply`."""
        self._models_wait: dict[int, asyncio.Future[NodesReply]] = {}
        self._routes: dict[
            tuple[str, str], Callable[[Request], Awaitable[Response | StreamResponse]]
        ] = {
            ("POST", "/v1/chat/completions"): lambda r: self._complete("chat", r),
            ("POST", "/v1/completions"): lambda r: self._complete("completions", r),
            ("GET", "/v1/models"): self._list_models,
            ("GET", "/health"): self._health,
        }
        self._frames: dict[type[Message], Callable[[Envelope], None]] = {
            Chunk: self._on_event,
            CallEnded: self._on_event,
            Error: self._on_error,
            NodesReply: self._on_nodes,
        }

    # --- lifecycle --------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        host, port = check_http_listen(self.cfg.listen)
        self._channel = channel = connect_dealer(
            self.cfg.scheduler, self.name, self.clock, curve=self.curve
        )
        server = HttpServer(
            self._handle, HttpLimits(max_body_bytes=self.cfg.max_body_bytes), ssl=self.tls
        )
        metrics = None
        try:
            await server.start(host, port)
            scheme = "https" if self.tls is not None else "http"
            shown = f"[{host}]" if ":" in host else host
            self.url = f"{scheme}://{shown}:{server.port}"
            metrics = serve(self.metrics.registry, self.cfg.metrics_port, self.cfg.metrics_addr)
            log.info(
                "gateway %s serving the OpenAI API on %s/v1 for the scheduler at %s (%s)",
                __version__,
                self.url,
                self.cfg.scheduler,
                f"{len(self.keys)} API keys"
                if self.keys is not None
                else "this host's callers only",
                extra={"url": self.url},
            )
            self.ready.set()
            self.notifier.notify("READY=1", f"STATUS=serving {self.url}")
            tasks = [
                asyncio.create_task(self._receive(channel), name="receive"),
                asyncio.create_task(self._watch(), name="watch"),
                *self.notifier.start_watchdog(self.clock),
            ]
            await run_until_stopped(stop, tasks)
        finally:
            self.notifier.notify("STOPPING=1")
            await server.close()
            for call_id in list(self._pending):
                await self._abort(call_id)
            if metrics is not None:
                metrics.close()
            channel.close()
        log.info("gateway stopped")

    async def _receive(self, channel: DealerChannel) -> None:
        while True:
            env = await channel.recv()
            handler = self._frames.get(type(env.body))
            if handler is None:
                log.warning("ignored %r from the scheduler", env.type)
                continue
            handler(env)

    def _on_event(self, env: Envelope) -> None:
        assert isinstance(env.body, (Chunk, CallEnded))
        pending = self._pending.get(env.body.call_id)
        if pending is not None:
            pending.events.put_nowait(env.body)

    def _on_error(self, env: Envelope) -> None:
        """The scheduler refused a frame: end the call it was, or fail a models query."""
        err = env.body
        assert isinstance(err, Error)
        log.warning("the scheduler refused frame %d: %s: %s", err.ref_seq, err.code, err.message)
        call_id = self._by_seq.get(err.ref_seq)
        pending = self._pending.get(call_id) if call_id is not None else None
        if pending is not None and call_id is not None:
            status = 403 if err.code == "forbidden" else 500
            pending.events.put_nowait(CallEnded(call_id, False, status, err.message))
        waiter = self._models_wait.pop(err.ref_seq, None)
        if waiter is not None and not waiter.done():
            waiter.set_exception(ApiError(503, err.message, type="server_error"))

    def _on_nodes(self, env: Envelope) -> None:
        assert isinstance(env.body, NodesReply)
        # the reply carries no seq of ours: it answers the oldest query (one at a time)
        if self._models_wait:
            seq = min(self._models_wait)
            waiter = self._models_wait.pop(seq)
            if not waiter.done():
                waiter.set_result(env.body)

    # --- HTTP -------------------------------------------------------------------------------

    async def _handle(self, req: Request) -> Response | StreamResponse:
        route = self._routes.get((req.method, req.path))
        try:
            if route is None:
                known = any(path == req.path for _, path in self._routes)
                raise ApiError(
                    405 if known else 404,
                    f"{req.method} {req.path}: "
                    + ("method not allowed" if known else "no such route"),
                )
            response = await route(req)
        except ApiError as exc:
            response = _error(exc)
        self.metrics.requests.labels(req.path if route else "other", str(response.status)).inc()
        return response

    async def _health(self, req: Request) -> Response:
        body = {"status": "ok", "version": __version__, "calls": len(self._pending)}
        return Response(200, json.dumps(body).encode())

    async def _list_models(self, req: Request) -> Response:
        self._caller(req)
        return Response(200, models_body(await self.models(), int(self.clock.time())))

    async def models(self) -> list[str]:
        """The models the cluster serves (replicas of them run somewhere), briefly cached."""
        now = self.clock.monotonic()
        if self._models is not None and now - self._models[0] < MODELS_TTL_S:
            return self._models[1]
        return await self._ask_nodes()

    async def _watch(self) -> None:
        """Ask the scheduler how it is every `WATCH_S`: calls of a scheduler that restarted
        will never end (it does not journal them), so they end now with 503."""
        async for _ in ticks(self.clock, WATCH_S):
            with contextlib.suppress(ApiError):
                await self._ask_nodes()

    def _check_restart(self, reply: NodesReply) -> None:
        started = self.clock.monotonic() - reply.scheduler.uptime_s
        before, self._scheduler_started = self._scheduler_started, started
        if before is None or started - before < RESTART_SLACK_S:
            return
        log.warning("the scheduler restarted: ending %d open calls", len(self._pending))
        for call_id, pending in list(self._pending.items()):
            pending.events.put_nowait(
                CallEnded(call_id, False, 503, "the scheduler restarted; retry the call")
            )

    async def _ask_nodes(self) -> list[str]:
        now = self.clock.monotonic()
        assert self._channel is not None
        seq = await self._channel.send(QueryNodes())
        if seq is None:
            raise ApiError(503, "the scheduler is not reachable", type="server_error")
        waiter: asyncio.Future[NodesReply] = asyncio.get_running_loop().create_future()
        self._models_wait[seq] = waiter
        try:
            reply = await asyncio.wait_for(waiter, MODELS_WAIT_S)
        except asyncio.TimeoutError:
            raise ApiError(503, "the scheduler did not answer", type="server_error") from None
        finally:
            self._models_wait.pop(seq, None)
        self._check_restart(reply)
        models = sorted(
            {
                r.model
                for n in reply.nodes
                if n.state == "live"
                for r in n.hello.replicas
                if r.model != TOOL_POOL
            }
        )
        self._models = (now, models)
        return models

    def _caller(self, req: Request) -> str:
        """The client the request's API key names ("" without keys); refusals are counted."""
        if self.keys is None:
            if not _loopback(req.peer_host):
                self.metrics.refused.labels("not_loopback").inc()
                raise ApiError(
                    403,
                    "this gateway has no API keys: it serves callers on its own host only",
                    type="permission_error",
                )
            return ""
        scheme, _, token = req.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            self.metrics.refused.labels("missing_key").inc()
            raise ApiError(
                401,
                "no API key: send Authorization: Bearer KEY",
                type="invalid_request_error",
                code="invalid_api_key",
            )
        client = self.keys.client(token.strip())
        if client is None:
            self.metrics.refused.labels("unknown_key").inc()
            raise ApiError(
                401, "incorrect API key", type="invalid_request_error", code="invalid_api_key"
            )
        return client

    async def _complete(self, api: Api, req: Request) -> Response | StreamResponse:
        client = self._caller(req)
        parsed = parse_request(api, req.body)
        if len(parsed.model) > MAX_NAME:
            raise ApiError(400, f"model: longer than {MAX_NAME} characters", param="model")
        msg = GatewayCall(
            call_id=str(next(self._ids)),
            session=_session(req, parsed),
            client=client,
            model=parsed.model,
            api=api,
            body=parsed.engine_body,
            prompt=parsed.prompt,
            max_tokens=parsed.max_tokens,
            input_kinds=list(parsed.input_kinds),
            slo_s=_slo(req),
            priority=_priority(req),
            timeout_s=self.cfg.call_timeout_s,
        )
        received = self.clock.monotonic()
        pending = await self._start(msg)
        try:
            first = await self._next(msg.call_id, pending)
            if isinstance(first, CallEnded) and not first.ok:
                raise _ended_error(first)
        except BaseException:
            await self._abort(msg.call_id)
            raise
        if parsed.stream:
            self.metrics.ttft.observe(self.clock.monotonic() - received)
            return StreamResponse(self._events(msg.call_id, pending, parsed, first))
        return await self._fold(msg.call_id, pending, parsed, first)

    async def _start(self, msg: GatewayCall) -> _Pending:
        assert self._channel is not None
        pending = self._pending[msg.call_id] = _Pending()
        seq = await self._channel.send(msg)
        if seq is None:
            self._pending.pop(msg.call_id, None)
            raise ApiError(503, "the scheduler is not reachable", type="server_error")
        pending.seq = seq
        self._by_seq[seq] = msg.call_id
        late = CallEnded(msg.call_id, False, 504, f"no end within {self.cfg.call_timeout_s:g} s")
        pending.timer = asyncio.get_running_loop().call_later(
            self.cfg.call_timeout_s, pending.events.put_nowait, late
        )
        return pending

    async def _next(self, call_id: str, pending: _Pending) -> Event:
        event = await pending.events.get()
        if isinstance(event, CallEnded):
            self._finish(call_id, pending)
        return event

    def _finish(self, call_id: str, pending: _Pending) -> None:
        pending.ended = True
        if pending.timer is not None:
            pending.timer.cancel()
        self._pending.pop(call_id, None)
        self._by_seq.pop(pending.seq, None)

    async def _abort(self, call_id: str) -> None:
        """Stop a call whose client is gone (or whose answer is late) on the engine."""
        pending = self._pending.get(call_id)
        if pending is None or pending.ended:
            return
        self._finish(call_id, pending)
        self.metrics.aborted.inc()
        if self._channel is not None:
            await self._channel.send(AbortCall(call_id))

    async def _events(
        self, call_id: str, pending: _Pending, parsed: ParsedCall, first: Event
    ) -> AsyncIterator[bytes]:
        """Server-sent events as the engine's chunks come; stops the call if the client goes."""
        event = first
        try:
            while True:
                if isinstance(event, CallEnded):
                    if not event.ok:
                        yield sse_event(_ended_error(event).body().decode())
                    yield SSE_DONE
                    return
                yield b"".join(  # one write for all the chunks of a frame
                    sse_event(data)
                    for data in event.data
                    if parsed.include_usage or not usage_only(data)
                )
                event = await self._next(call_id, pending)
        finally:
            await self._abort(call_id)

    async def _fold(
        self, call_id: str, pending: _Pending, parsed: ParsedCall, first: Event
    ) -> Response:
        folder = Folder(
            parsed.api, _response_id(parsed.api, call_id), parsed.model, int(self.clock.time())
        )
        event = first
        try:
            while not isinstance(event, CallEnded):
                for data in event.data:
                    folder.feed(data)
                event = await self._next(call_id, pending)
        finally:
            await self._abort(call_id)
        if not event.ok:
            raise _ended_error(event)
        return Response(200, folder.response(event.prompt_tokens, event.output_tokens))


def _response_id(api: Api, call_id: str) -> str:
    return f"{'chatcmpl' if api == 'chat' else 'cmpl'}-{call_id}"


def _error(exc: ApiError) -> Response:
    headers: tuple[tuple[str, str], ...] = ()
    if exc.status in (429, 503):  # busy, or no replica now: both pass
        headers = (("Retry-After", "1"),)
    return Response(exc.status, exc.body(), headers=headers)


_ERROR_TYPES = {
    403: "permission_error",
    404: "invalid_request_error",
    429: "rate_limit_exceeded",
    504: "timeout",
}
_ERROR_CODES = {404: "model_not_found", 429: "rate_limit_exceeded"}


def _ended_error(ended: CallEnded) -> ApiError:
    return ApiError(
        ended.status,
        ended.error or "the call failed",
        type=_ERROR_TYPES.get(ended.status, "server_error"),
        code=_ERROR_CODES.get(ended.status),
    )


def _session(req: Request, parsed: ParsedCall) -> str:
    header = req.headers.get(SESSION_HEADER, "").strip()
    session = header or parsed.user
    if len(session) > MAX_NAME:
        field = "X-SwarmX-Session" if header else "user"
        raise ApiError(
            400,
            f"{field}: longer than {MAX_NAME} characters (a session name)",
            param=SESSION_HEADER if header else "user",
        )
    return session


def _slo(req: Request) -> float | None:
    text = req.headers.get(SLO_HEADER)
    if text is None:
        return None
    try:
        slo = float(text)
    except ValueError:
        slo = math.nan
    if not 0 < slo <= 1e7:
        raise ApiError(400, f"X-SwarmX-SLO-S: expected seconds > 0, got {text!r}", param=SLO_HEADER)
    return slo


def _priority(req: Request) -> int:
    text = req.headers.get(PRIORITY_HEADER)
    if text is None:
        return 0
    try:
        value = int(text)
    except ValueError:
        value = 1 << 30
    if not -1000 <= value <= 1000:
        raise ApiError(
            400,
            f"X-SwarmX-Priority: expected an integer -1000..1000, got {text!r}",
            param=PRIORITY_HEADER,
        )
    return value


def _loopback(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host.split("%", maxsplit=1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback
