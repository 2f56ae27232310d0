"""Client for any OpenAI-compatible server (vLLM, SGLang, llama.cpp server, Ollama).

Stdlib HTTP only, so driving a remote engine adds no dependency. Each call streams one chat
completion in a worker thread, on a keep-alive connection that later calls reuse; cancelling the
awaiting task shuts that socket down, which unblocks the thread and makes the server stop
generating for it (that connection is closed, not reused). A workflow call's prompt goes as one
user message; a gateway call's own request body goes to its endpoint (chat or completions) as it
is, and the server's chunks go back to the caller's ``stream`` as they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import logging
import math
import os
import re
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from swarmx.backends.base import Api, BackendMetrics, CallOutcome, CallRequest
from swarmx.config import ReplicaConfig

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 300.0
"""Whole-call limit when the request names none: connect, queue on the server, and generate."""
CONNECT_TIMEOUT_S = 10.0
START_TIMEOUT_S = 10.0
SCRAPE_INTERVAL_S = 1.0
SCRAPE_TIMEOUT_S = 2.0
ERROR_CHARS = 300
"""Server error text kept in a `CallOutcome.error`; bodies can be whole HTML pages."""
TAIL_BYTES = 64 * 1024
"""The most read of an error body, or of what a stream sends after ``[DONE]`` (the end of a
chunked body), for its connection to be reused."""
TAIL_TIMEOUT_S = 1.0
"""How long the end of a stream's body may take after ``[DONE]``; a slower one closes the
connection rather than delay the call's outcome."""

_QUEUED = ("vllm:num_requests_waiting", "sglang:num_queue_reqs")
_RUNNING = ("vllm:num_requests_running", "sglang:num_running_reqs")
# vLLM renamed gpu_cache_usage_perc to kv_cache_usage_perc; both are 0-1 fractions, like SGLang's.
_KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "sglang:token_usage")
_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_ENDPOINTS: dict[Api, str] = {"chat": "/chat/completions", "completions": "/completions"}
_CHUNK_HEAD = ("id", "object", "created", "model")
"""What a usage chunk that the backend adds takes from the server's chunks."""


def parse_prometheus(text: str) -> dict[str, list[float]]:
    """Sample values by metric name from the Prometheus text format, one per label set.

    Just enough for the scraper: comments, timestamps, NaN samples and malformed lines are skipped.
    """
    samples: dict[str, list[float]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        name = _METRIC_NAME.match(line)
        if line.startswith("#") or name is None:
            continue
        rest = line[name.end() :]
        if rest.startswith("{"):
            end = _labels_end(rest)
            if end < 0:
                continue
            rest = rest[end + 1 :]
        fields = rest.split()
        try:
            value = float(fields[0]) if fields else math.nan
        except ValueError:
            continue
        if not math.isnan(value):
            samples.setdefault(name.group(), []).append(value)
    return samples


def _labels_end(text: str) -> int:
    """Index of the ``}`` closing the label set that opens ``text``; quoted values may hold one."""
    quoted = escaped = False
    for i, ch in enumerate(text):
        if escaped:
            escaped = False
        elif quoted and ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == "}" and not quoted:
            return i
    return -1


def metrics_from_prometheus(samples: dict[str, list[float]]) -> BackendMetrics:
    """vLLM/SGLang gauges as `BackendMetrics`: request counts summed over label sets (engines,
    data-parallel ranks); KV-cache use averaged over them, since summing fractions exceeds 1."""

    def first(names: tuple[str, ...]) -> list[float] | None:
        return next((samples[n] for n in names if samples.get(n)), None)

    queued, running, kv = first(_QUEUED), first(_RUNNING), first(_KV_USAGE)
    return BackendMetrics(
        queued=round(sum(queued)) if queued else None,
        running=round(sum(running)) if running else None,
        kv_cache_usage=sum(kv) / len(kv) if kv else None,
    )


def iter_sse_data(lines: Iterable[bytes]) -> Iterator[str]:
    """The ``data`` of each server-sent event (multi-line data joined by newlines); other fields
    and ``:`` comment lines are ignored, as the SSE spec says."""
    data: list[str] = []
    for raw in lines:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        name, _, value = line.partition(":")
        if name == "data":
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield "\n".join(data)


class StreamError(Exception):
    """The server sent an error or a non-chunk inside an otherwise successful stream."""


@dataclass
class ChatStream:
    """Folds the chunks of a streamed chat or text completion into text and token counts."""

    parts: list[str] = field(default_factory=list)
    content_chunks: int = 0
    """Chunks that carried generated text: content, completion text or tool-call arguments."""
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    usage_chunk: bool = False
    """A usage-only chunk (``"choices": []``) arrived; servers that ignore ``stream_options``
    (llama-cpp-python) send none."""
    head: dict[str, object] = field(default_factory=dict)
    """The first chunk's id, object, created and model: a usage chunk the backend adds has them."""
    done: bool = False
    """``data: [DONE]`` arrived: nothing more will."""
    finished: bool = False
    """A choice carried a ``finish_reason``: the generation completed. A ``[DONE]`` without one
    is a stream the server cut short (llama-cpp-python does so to run a newer request)."""

    def feed(self, data: str) -> str:
        """Take one event's data; return the text it generates ("" for role-only or usage
        chunks): chat content, completion text, or tool-call arguments. Only the first two are
        the output text; the arguments count as output tokens when the server reports none."""
        if data.strip() == "[DONE]":
            self.done = True
            return ""
        try:
            chunk = json.loads(data)
        except json.JSONDecodeError as exc:
            raise StreamError(f"bad JSON in stream ({exc.msg}): {_one_line(data)}") from None
        if not isinstance(chunk, dict):
            raise StreamError(f"stream chunk is not an object: {_one_line(data)}")
        if "error" in chunk:
            raise StreamError(f"error in stream: {_error_message(chunk) or _one_line(data)}")
        if not self.head:
            self.head = {key: chunk[key] for key in _CHUNK_HEAD if key in chunk}
        usage = chunk.get("usage")
        choices = chunk.get("choices")
        if isinstance(usage, dict):
            self.prompt_tokens = _count(usage.get("prompt_tokens"), self.prompt_tokens)
            self.output_tokens = _count(usage.get("completion_tokens"), self.output_tokens)
            self.usage_chunk = self.usage_chunk or choices == []
        choice = choices[0] if isinstance(choices, list) and choices else None
        if not isinstance(choice, dict):
            return ""
        if choice.get("finish_reason"):
            self.finished = True
        delta = choice.get("delta")
        if not isinstance(delta, dict):  # a text completion's chunk
            text = choice.get("text")
            return self._output(text if isinstance(text, str) else "")
        content = delta.get("content")
        added = self._output(content if isinstance(content, str) else "")
        arguments = "".join(_tool_arguments(delta.get("tool_calls")))
        if arguments and not added:
            self.content_chunks += 1
        return added + arguments

    def usage_json(self, outcome: CallOutcome) -> str:
        """A usage-only chunk with ``outcome``'s counts, under the stream's own id, to end a
        forwarded stream whose server sent none (as the `CallRequest.stream` contract asks)."""
        usage = {
            "prompt_tokens": outcome.prompt_tokens,
            "completion_tokens": outcome.output_tokens,
            "total_tokens": outcome.prompt_tokens + outcome.output_tokens,
        }
        return json.dumps({**self.head, "choices": [], "usage": usage}, separators=(",", ":"))

    def _output(self, text: str) -> str:
        if text:
            self.parts.append(text)
            self.content_chunks += 1
        return text

    def outcome(self, prompt: str, ttft_s: float | None) -> CallOutcome:
        """The call's result. Without a ``usage`` chunk (servers that ignore ``stream_options``),
        each content chunk counts as one output token (servers stream one token per chunk) and
        the prompt is estimated at 4 characters per token."""
        text = "".join(self.parts)
        if not self.finished:
            error = (
                "the server ended the stream without a finish_reason"
                if self.done
                else "stream ended before [DONE]"
            )
            return CallOutcome(ok=False, output=text, error=error)
        return CallOutcome(
            ok=True,
            output=text,
            prompt_tokens=(
                self.prompt_tokens if self.prompt_tokens is not None else len(prompt) // 4
            ),
            output_tokens=(
                self.output_tokens if self.output_tokens is not None else self.content_chunks
            ),
            ttft_s=ttft_s,
        )


def _tool_arguments(tool_calls: object) -> Iterator[str]:
    """The argument text in a chat delta's ``tool_calls``."""
    for call in tool_calls if isinstance(tool_calls, list) else []:
        function = call.get("function") if isinstance(call, dict) else None
        arguments = function.get("arguments") if isinstance(function, dict) else None
        if isinstance(arguments, str):
            yield arguments


def _count(value: object, default: int | None) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _one_line(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= ERROR_CHARS else flat[: ERROR_CHARS - 3] + "..."


def _error_message(body: object) -> str | None:
    """The human part of an error body: OpenAI's ``{"error": {"message"}}``, a bare ``error``
    string, FastAPI's ``detail`` or a top-level ``message``."""
    if not isinstance(body, dict):
        return None
    error = body.get("error")
    if isinstance(error, dict) and error.get("message"):
        return _one_line(str(error["message"]))
    for value in (error, body.get("detail"), body.get("message")):
        if isinstance(value, str) and value:
            return _one_line(value)
        if value:
            return _one_line(json.dumps(value))
    return None


def _http_error(resp: http.client.HTTPResponse) -> str:
    raw = resp.read(TAIL_BYTES).decode("utf-8", "replace")
    try:
        message = _error_message(json.loads(raw))
    except json.JSONDecodeError:
        message = None
    return _one_line(f"HTTP {resp.status} {resp.reason}: {message or raw or '(empty body)'}")


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline passed")
    return left


def _lines(resp: http.client.HTTPResponse, sock: socket.socket, deadline: float) -> Iterator[bytes]:
    """Response lines until EOF, each read bounded by what is left of the call's deadline."""
    while True:
        sock.settimeout(_remaining(deadline))
        line = resp.readline()
        if not line:
            return
        yield line


class _Call:
    """One in-flight request's connection, reachable from the cancelling side, and the way its
    chunks go back to the caller's event loop."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, stream: Callable[[str], None] | None
    ) -> None:
        self._lock = threading.Lock()
        self._conn: http.client.HTTPConnection | None = None
        self._sock: socket.socket | None = None
        """``_conn``'s socket, kept: the connection drops it when an answer says it closes."""
        self._aborted = False
        self._loop = loop
        self._stream = stream
        self._batch: list[str] = []
        """Chunks forwarded and not yet delivered; not empty exactly while a delivery is
        scheduled on the loop."""

    @property
    def aborted(self) -> bool:
        return self._aborted

    def forward(self, chunk: str) -> None:
        """Hand one chunk to the caller's stream on its event loop (called from the pool thread).
        One wake-up of the loop delivers every chunk forwarded until it runs, so a fast stream
        costs far fewer than one per chunk. The call's result takes the same queue later, after
        the last delivery, so chunks arrive in order and before it."""
        if self._stream is None:
            return
        with self._lock:
            self._batch.append(chunk)
            if len(self._batch) > 1:  # the delivery already scheduled takes this one too
                return
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            self._loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            batch, self._batch = self._batch, []
        if self._stream is not None and not self._aborted:  # no chunk reaches a cancelled caller
            for chunk in batch:
                self._stream(chunk)

    def attach(self, conn: http.client.HTTPConnection) -> socket.socket:
        """Make ``conn`` the call's connection, connecting it if it is new; its socket. From
        here a cancel shuts that socket down, and `detach` hands the connection back to be
        closed or kept, whatever happens."""
        with self._lock:
            self._conn = conn
        if conn.sock is None:
            conn.connect()
        sock = conn.sock
        assert isinstance(sock, socket.socket)
        with self._lock:
            self._sock = sock
            if self._aborted:
                raise ConnectionAbortedError("call cancelled")
        return sock

    def detach(self) -> http.client.HTTPConnection | None:
        """Take the connection back from the cancelling side: after this, `aborted` says for
        good whether a cancel shut its socket down."""
        with self._lock:
            conn, self._conn, self._sock = self._conn, None, None
        return conn

    def abort(self) -> None:
        """Shut the socket down: unlike close(), that wakes a thread blocked reading it, and the
        server sees the disconnect and aborts the generation."""
        with self._lock:
            self._aborted = True
            if self._sock is not None:
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RDWR)


class _IdleConnections:
    """Keep-alive connections to the server between calls, the most recently used first.

    Reuse saves a TCP (and TLS) handshake per call, and the sockets each closed connection
    leaves in TIME_WAIT, which at a thousand calls a second run a host out of ephemeral ports.
    At most ``limit`` are kept: the pool's threads never use more at once.
    """

    def __init__(self, limit: int) -> None:
        self._lock = threading.Lock()
        self._idle: list[http.client.HTTPConnection] = []
        self._limit = limit
        self._closed = False

    def take(self) -> http.client.HTTPConnection | None:
        with self._lock:
            return self._idle.pop() if self._idle else None

    def give(self, conn: http.client.HTTPConnection) -> None:
        """Keep ``conn`` (its last response read to the end) for a later call, or close it."""
        with self._lock:
            if not self._closed and len(self._idle) < self._limit:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class OpenAIBackend:
    """A `Backend` for a model served by an OpenAI-compatible HTTP server at ``cfg.url``."""

    def __init__(self, cfg: ReplicaConfig) -> None:
        self._cfg = cfg
        parts = urlsplit(cfg.url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if self._https else 80)
        self._path = parts.path.rstrip("/")
        self._model = cfg.served_model or cfg.model
        self._pool = ThreadPoolExecutor(cfg.concurrency, thread_name_prefix=f"openai-{cfg.model}")
        self._idle = _IdleConnections(cfg.concurrency)
        self._active: set[_Call] = set()
        self._closed = False
        self._stop = threading.Event()
        self._scraper: threading.Thread | None = None
        self._metrics = BackendMetrics()

    async def start(self) -> None:
        """Fail fast, with the reason, when the server is down or the API key is missing."""
        env = self._cfg.api_key_env
        if env and not os.environ.get(env):
            raise RuntimeError(f"{self._cfg.model}: api_key_env is {env!r} but ${env} is not set")
        try:
            body = await asyncio.get_running_loop().run_in_executor(self._pool, self._get_models)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise RuntimeError(
                f"{self._cfg.model}: OpenAI-compatible server not reachable at "
                f"{self._cfg.url}/models: {_one_line(str(exc) or type(exc).__name__)}"
            ) from exc
        data = body.get("data") if isinstance(body, dict) else None
        ids = [m.get("id") for m in data if isinstance(m, dict)] if isinstance(data, list) else []
        log.info("%s: %s serves models %s", self._cfg.model, self._cfg.url, ids)
        if self._model not in ids:
            log.warning(
                "%s: the server does not list %r; calls may fail", self._cfg.model, self._model
            )
        if self._cfg.metrics_url and self._scraper is None:
            self._scraper = threading.Thread(
                target=self._scrape_loop, name=f"openai-metrics-{self._cfg.model}", daemon=True
            )
            self._scraper.start()

    async def run(self, request: CallRequest) -> CallOutcome:
        if request.kind != "llm":
            return _failed(f"the openai backend runs llm calls, not {request.kind!r}")
        if self._closed:
            return _failed("backend closed")
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        call = _Call(loop, request.stream)
        self._active.add(call)
        try:
            return await loop.run_in_executor(self._pool, self._generate, request, call, started)
        except asyncio.CancelledError:
            call.abort()
            raise
        finally:
            self._active.discard(call)

    def metrics(self) -> BackendMetrics:
        """The latest scrape of ``metrics_url``; all None without one or while it fails."""
        return self._metrics

    async def close(self) -> None:
        self._closed = True
        self._stop.set()
        for call in list(self._active):
            call.abort()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._idle.close()
        if self._scraper is not None:
            await asyncio.to_thread(self._scraper.join, SCRAPE_TIMEOUT_S + 1)

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self._cfg.api_key_env) if self._cfg.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _connection(self, timeout_s: float) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        return cls(self._host, self._port, timeout=timeout_s)

    def _get_models(self) -> object:
        conn = self._connection(START_TIMEOUT_S)
        try:
            conn.request("GET", f"{self._path}/models", headers=self._headers())
            resp = conn.getresponse()
            if not 200 <= resp.status < 300:
                raise OSError(_http_error(resp))
            return json.loads(resp.read())
        finally:
            conn.close()

    def _payload(self, request: CallRequest) -> tuple[str, dict[str, object]]:
        """The endpoint and JSON body of a call: a gateway call's own body for its ``api``, or
        a workflow call's prompt as one user message; streamed, with usage, either way."""
        payload: dict[str, object]
        if request.body:
            try:
                payload = json.loads(request.body)
            except json.JSONDecodeError as exc:
                raise ValueError(f"the request body is not JSON: {exc.msg}") from None
            if not isinstance(payload, dict):
                raise ValueError("the request body is not a JSON object")
            path = _ENDPOINTS[request.api]
        else:
            payload = {"messages": [{"role": "user", "content": request.prompt}]}
            if request.max_tokens > 0:
                payload["max_tokens"] = request.max_tokens
            path = _ENDPOINTS["chat"]
        payload |= {
            "model": self._model,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        return path, payload

    def _generate(self, request: CallRequest, call: _Call, started: float) -> CallOutcome:
        """Blocking: one streamed completion, in a pool thread (a client's body can be large)."""
        try:
            path, payload = self._payload(request)
        except ValueError as exc:
            return _failed(str(exc))
        timeout_s = request.timeout_s or DEFAULT_TIMEOUT_S
        deadline = started + timeout_s
        reusable = False
        try:
            resp, sock = self._post(
                f"{self._path}{path}", json.dumps(payload).encode(), call, deadline, timeout_s
            )
            if not 200 <= resp.status < 300:
                outcome = _failed(_http_error(resp))
            elif "text/event-stream" not in (ctype := resp.getheader("Content-Type") or ""):
                outcome = _failed(f"expected an event stream, got Content-Type {ctype!r}")
            else:
                outcome = _read_stream(
                    resp, sock, call, prompt=request.prompt, started=started, deadline=deadline
                )
            reusable = _reusable(resp, sock, deadline)
            return outcome
        except StreamError as exc:
            return _failed(str(exc))
        except TimeoutError:
            return _failed(f"no complete response within {timeout_s:g} s")
        except ConnectionRefusedError:
            return _failed(f"connection refused by {self._host}:{self._port}")
        except (OSError, http.client.HTTPException, ValueError) as exc:
            return _failed(_one_line(f"{type(exc).__name__}: {exc}"))
        finally:
            conn = call.detach()
            if conn is not None and reusable and not call.aborted:
                self._idle.give(conn)
            elif conn is not None:
                conn.close()

    def _post(
        self, url: str, body: bytes, call: _Call, deadline: float, timeout_s: float
    ) -> tuple[http.client.HTTPResponse, socket.socket]:
        """Send the request on an idle keep-alive connection, or a new one, attached to ``call``;
        the response (its headers read) and its socket.

        A reused connection that the server closed while it idled fails on the send or before
        the status line: that request never reached the engine, so it goes once more on a new
        connection (whose own failure is the call's).
        """
        headers = {**self._headers(), "Accept": "text/event-stream"}
        conn = self._idle.take()
        reused = conn is not None
        while True:
            if conn is None:
                conn = self._connection(min(CONNECT_TIMEOUT_S, timeout_s))
            sock = call.attach(conn)
            try:
                sock.settimeout(_remaining(deadline))
                conn.request("POST", url, body, headers)
                return conn.getresponse(), sock
            except (BrokenPipeError, ConnectionResetError) as exc:  # incl. RemoteDisconnected
                if not reused or call.aborted:
                    raise
                log.debug("%s: a kept-alive connection was closed (%s); retrying", url, exc)
            conn.close()
            conn, reused = None, False

    def _scrape_loop(self) -> None:
        failing = False
        url = self._cfg.metrics_url
        while not self._stop.is_set():
            try:
                with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as resp:
                    text = resp.read().decode("utf-8", "replace")
                self._metrics = metrics_from_prometheus(parse_prometheus(text))
                if failing:
                    log.info("%s: scraping %s again", self._cfg.model, url)
                failing = False
            except (OSError, http.client.HTTPException) as exc:
                self._metrics = BackendMetrics()
                if not failing:
                    log.warning("%s: cannot scrape %s: %s", self._cfg.model, url, exc)
                failing = True
            self._stop.wait(SCRAPE_INTERVAL_S)


def _read_stream(
    resp: http.client.HTTPResponse,
    sock: socket.socket,
    call: _Call,
    *,
    prompt: str,
    started: float,
    deadline: float,
) -> CallOutcome:
    """Fold an event stream into the call's outcome, forwarding each chunk to ``call``, then a
    usage chunk if the server sent none; stops at ``[DONE]``."""
    stream = ChatStream()
    ttft_s = None
    for data in iter_sse_data(_lines(resp, sock, deadline)):
        if stream.feed(data) and ttft_s is None:
            ttft_s = time.monotonic() - started
        if stream.done:
            break
        call.forward(data)
    outcome = stream.outcome(prompt, ttft_s)
    if outcome.ok and not stream.usage_chunk:
        call.forward(stream.usage_json(outcome))
    return outcome


def _reusable(resp: http.client.HTTPResponse, sock: socket.socket, deadline: float) -> bool:
    """Whether the response's connection can carry another request: the server keeps it open
    (not after an HTTP/1.0 answer or a ``Connection: close``) and the response is read to its
    end, which takes reading what follows a stream's ``[DONE]`` (a chunked body's last chunk)."""
    if resp.will_close:
        return False
    if not resp.isclosed():
        try:
            sock.settimeout(min(_remaining(deadline), TAIL_TIMEOUT_S))
            resp.read(TAIL_BYTES)
        except (OSError, http.client.HTTPException):
            return False
    return resp.isclosed()


def _failed(error: str) -> CallOutcome:
    return CallOutcome(ok=False, output="", error=error)
