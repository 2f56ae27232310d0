"""Client for any OpenAI-compatible server (vLLM, SGLang, llama.cpp server, Ollama).

Stdlib only (`swarmx.backends.http1`), so driving a remote engine adds no dependency. Each call
streams one completion on the node's event loop, on a keep-alive connection that later calls
reuse; cancelling the call closes its connection, so the server stops generating for it. A
workflow call's prompt goes as one user message; a gateway call's own request body goes to its
endpoint (chat or completions) as it is, and the server's chunks go back to the caller's
``stream`` as they are.
"""

from __future__ import annotations

import asyncio
import collections
import http.client
import json
import logging
import math
import os
import re
import threading
import time
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from swarmx.backends.base import Api, BackendMetrics, CacheReport, CallOutcome, CallRequest
from swarmx.backends.http1 import HttpClient, ProtocolError, Response
from swarmx.backends.kvevents import EngineBlocks, EventError, decode_batch
from swarmx.clock import time_limit
from swarmx.config import ReplicaConfig
from swarmx.sched.prefix import block_hashes
from swarmx.transport import EventSubscriber, TransportError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 300.0
"""Whole-call limit when the request names none: connect, queue on the server, and generate."""
CONNECT_TIMEOUT_S = 10.0
START_TIMEOUT_S = 10.0
SCRAPE_INTERVAL_S = 1.0
SCRAPE_TIMEOUT_S = 2.0
ERROR_CHARS = 300
"""Server error text kept in a `CallOutcome.error`; bodies can be whole HTML pages."""
ERROR_BYTES = 64 * 1024
"""The most read of an error body."""
MODELS_BYTES = 4 * 1024 * 1024
"""The most read of a ``/models`` answer."""
TOKENIZE_BYTES = 32 * 1024 * 1024
"""The most read of a ``/tokenize`` answer (a 1M-token prompt's ids)."""
TOKENIZE_TIMEOUT_S = 10.0
JOINS_WAITING = 64
"""Finished calls waiting to be joined to the engine's blocks (`_join`); older ones go first."""
_TOKENIZE_KEYS = frozenset(
    {"messages", "prompt", "tools", "chat_template_kwargs", "add_generation_prompt"}
)
"""What of a call's body the engine's tokenizer reads: the same prompt tokens, template and all."""

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


MAX_EVENT_LINE_BYTES = 4 * 1024 * 1024
"""Longest event-stream line accepted: a chunk is a token or a tool call's arguments, not more."""


class SseParser:
    """Incremental server-sent events: bytes in, the ``data`` of each complete event out
    (multi-line data joined by newlines); other fields and ``:`` comment lines are ignored, as
    the SSE spec says."""

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[str] = []

    def feed(self, raw: bytes) -> list[str]:
        *lines, self._buf = (self._buf + raw).split(b"\n")
        if len(self._buf) > MAX_EVENT_LINE_BYTES:
            raise StreamError(f"an event stream line over {MAX_EVENT_LINE_BYTES} bytes")
        events: list[str] = []
        for raw_line in lines:
            line = raw_line.decode("utf-8", "replace").rstrip("\r")
            if not line:
                if self._data:
                    events.append("\n".join(self._data))
                    self._data = []
                continue
            name, _, value = line.partition(":")
            if name == "data":
                self._data.append(value[1:] if value.startswith(" ") else value)
        return events

    def end(self) -> list[str]:
        """The stream ended: an event its server did not finish with a blank line."""
        events = self.feed(b"\n\n") if self._buf or self._data else []
        self._buf, self._data = b"", []
        return events


def iter_sse_data(lines: Iterable[bytes]) -> Iterator[str]:
    """`SseParser` over a body given as pieces (lines, or any split)."""
    parser = SseParser()
    for raw in lines:
        yield from parser.feed(raw)
    yield from parser.end()


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
    cached_tokens: int | None = None
    """``usage.prompt_tokens_details.cached_tokens``: the prompt tokens the server's prefix
    cache served (vLLM with ``--enable-prompt-tokens-details``, SGLang, OpenAI)."""
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
    finish_reason: str = ""
    tool_calls: bool = False
    """A delta carried ``tool_calls``: the output asks for a tool."""

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
            details = usage.get("prompt_tokens_details")
            if isinstance(details, dict):
                self.cached_tokens = _count(details.get("cached_tokens"), self.cached_tokens)
            self.usage_chunk = self.usage_chunk or choices == []
        choice = choices[0] if isinstance(choices, list) and choices else None
        if not isinstance(choice, dict):
            return ""
        reason = choice.get("finish_reason")
        if reason:
            self.finished = True
            self.finish_reason = reason[:64] if isinstance(reason, str) else "other"
        delta = choice.get("delta")
        if not isinstance(delta, dict):  # a text completion's chunk
            text = choice.get("text")
            return self._output(text if isinstance(text, str) else "")
        content = delta.get("content")
        added = self._output(content if isinstance(content, str) else "")
        if delta.get("tool_calls"):
            self.tool_calls = True
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
            cached_tokens=self.cached_tokens,
            stop_reason=self.finish_reason,
            output_kinds=(["text"] if text else []) + (["tool_use"] if self.tool_calls else []),
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


async def _http_error(resp: Response) -> str:
    raw = (await resp.read(ERROR_BYTES)).decode("utf-8", "replace")
    try:
        message = _error_message(json.loads(raw))
    except json.JSONDecodeError:
        message = None
    return _one_line(f"HTTP {resp.status} {resp.reason}: {message or raw or '(empty body)'}")


class OpenAIBackend:
    """A `Backend` for a model served by an OpenAI-compatible HTTP server at ``cfg.url``."""

    def __init__(self, cfg: ReplicaConfig) -> None:
        self._cfg = cfg
        parts = urlsplit(cfg.url)
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._path = parts.path.rstrip("/")
        self._model = cfg.served_model or cfg.model
        self._http = HttpClient(
            parts.scheme,
            self._host,
            self._port,
            max_idle=cfg.concurrency,
            connect_timeout_s=CONNECT_TIMEOUT_S,
        )
        self._closed = False
        self._stop = threading.Event()
        self._scraper: threading.Thread | None = None
        self._metrics = BackendMetrics()
        self._blocks: EngineBlocks | None = EngineBlocks() if cfg.kv_events else None
        """The engine's prefix cache, as its KV events tell (``kv_events``)."""
        self._joins: collections.deque[tuple[str, dict[str, object]]] = collections.deque(
            maxlen=JOINS_WAITING
        )
        self._joined = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Fail fast, with the reason, when the server is down or the API key is missing."""
        env = self._cfg.api_key_env
        if env and not os.environ.get(env):
            raise RuntimeError(f"{self._cfg.model}: api_key_env is {env!r} but ${env} is not set")
        try:
            async with time_limit(START_TIMEOUT_S):
                body = await self._get_models()
        except (OSError, asyncio.IncompleteReadError, ProtocolError, ValueError) as exc:
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
        if self._blocks is not None and not self._tasks:
            self._tasks = [
                asyncio.create_task(self._follow_events(self._blocks), name="kv-events"),
                asyncio.create_task(self._join_loop(self._blocks), name="kv-join"),
            ]

    async def run(self, request: CallRequest) -> CallOutcome:
        """One streamed completion. Cancelling it closes its connection: the server sees the
        client go and stops generating for it."""
        if request.kind != "llm":
            return _failed(f"the openai backend runs llm calls, not {request.kind!r}")
        if self._closed:
            return _failed("backend closed")
        started = time.monotonic()
        try:
            path, payload = self._payload(request)
        except ValueError as exc:
            return _failed(str(exc))
        timeout_s = request.timeout_s or DEFAULT_TIMEOUT_S
        body = json.dumps(payload).encode()
        headers = {**self._headers(), "Accept": "text/event-stream"}
        try:
            async with time_limit(timeout_s):
                resp = await self._http.request("POST", f"{self._path}{path}", headers, body)
                try:
                    outcome = await self._outcome(resp, request, started)
                except BaseException:
                    self._http.discard(resp)
                    raise
            await self._http.release(resp)
            if outcome.ok and self._blocks is not None and request.prompt:
                self._joins.append((request.prompt, payload))
                self._joined.set()
            return outcome
        except StreamError as exc:
            return _failed(str(exc))
        except TimeoutError:
            return _failed(f"no complete response within {timeout_s:g} s")
        except ConnectionRefusedError:
            return _failed(f"connection refused by {self._host}:{self._port}")
        except asyncio.IncompleteReadError:
            return _failed("the server closed the connection mid-answer")
        except (OSError, ProtocolError, ValueError) as exc:
            return _failed(_one_line(f"{type(exc).__name__}: {exc}"))

    def metrics(self) -> BackendMetrics:
        """The latest scrape of ``metrics_url``; all None without one or while it fails."""
        return self._metrics

    def cache_report(self) -> CacheReport | None:
        """What the engine's KV events said since the last report (None without ``kv_events``)."""
        return None if self._blocks is None else self._blocks.report()

    async def _follow_events(self, blocks: EngineBlocks) -> None:
        """Mirror the engine's prefix cache from its KV events. A frame that cannot be read is
        counted and skipped; a gap in the engine's numbering (frames lost, or the engine
        restarted) makes the mirror, and so the scheduler's index, start over."""
        try:
            sub = EventSubscriber(self._cfg.kv_events, self._cfg.kv_events_topic)
        except TransportError as exc:
            log.error("%s: no KV events: %s", self._cfg.model, exc)
            return
        last: int | None = None
        try:
            while True:
                got = await sub.recv()
                try:
                    if got is None:
                        raise EventError("not [topic, sequence number, payload]")
                    seq, payload = got
                    events = decode_batch(payload)
                except EventError as exc:
                    blocks.refused += 1
                    if blocks.refused & (blocks.refused - 1) == 0:  # 1, 2, 4, ...: not a flood
                        log.warning(
                            "%s: unreadable KV-event frame from %s (%d so far): %s",
                            self._cfg.model,
                            self._cfg.kv_events,
                            blocks.refused,
                            exc,
                        )
                    continue
                if last is not None and seq != last + 1:
                    log.info(
                        "%s: KV events %d..%d missed; the prefix index starts over",
                        self._cfg.model,
                        last + 1,
                        seq - 1,
                    )
                    blocks.clear()
                last = seq
                blocks.apply(events)
        finally:
            sub.close()

    async def _join_loop(self, blocks: EngineBlocks) -> None:
        """Join each finished call's prompt to the engine blocks that hold it
        (`EngineBlocks.track`), one at a time, off the calls' path: the engine tokenizes the
        call's own request."""
        while True:
            await self._joined.wait()
            self._joined.clear()
            while self._joins:
                prompt, payload = self._joins.popleft()
                try:
                    tokens = await self._tokenize(payload)
                    blocks.track(block_hashes(prompt), tokens)
                except (
                    OSError,
                    TimeoutError,
                    ProtocolError,
                    ValueError,
                    asyncio.IncompleteReadError,  # the engine hung up mid-answer
                ) as exc:
                    log.debug("%s: tokenize failed: %s", self._cfg.model, exc)
                except Exception:  # a task's boundary: the next call is joined all the same
                    log.exception("%s: joining a prompt to the engine's blocks", self._cfg.model)

    async def _tokenize(self, payload: dict[str, object]) -> list[int]:
        body = {k: v for k, v in payload.items() if k in _TOKENIZE_KEYS}
        body["model"] = self._model
        path = self._path.removesuffix("/v1") + self._cfg.tokenize_path
        async with time_limit(TOKENIZE_TIMEOUT_S):
            answer = await self._json("POST", path, TOKENIZE_BYTES, json.dumps(body).encode())
        tokens = answer.get("tokens") if isinstance(answer, dict) else None
        if not isinstance(tokens, list) or not all(type(t) is int for t in tokens):
            raise ValueError("the tokenizer's answer has no list of token ids")
        return tokens

    async def close(self) -> None:
        self._closed = True
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._http.close()
        if self._scraper is not None:
            await asyncio.to_thread(self._scraper.join, SCRAPE_TIMEOUT_S + 1)

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "User-Agent": "swarmx"}
        key = os.environ.get(self._cfg.api_key_env) if self._cfg.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    async def _get_models(self) -> object:
        return await self._json("GET", f"{self._path}/models", MODELS_BYTES)

    async def _json(self, method: str, path: str, max_bytes: int, body: bytes = b"") -> object:
        """A request whose answer is one JSON document of at most ``max_bytes``; a status
        other than 2xx raises OSError with the server's message."""
        resp = await self._http.request(method, path, self._headers(), body)
        try:
            if not 200 <= resp.status < 300:
                raise OSError(await _http_error(resp))
            answer = json.loads(await resp.read(max_bytes))
        except BaseException:
            self._http.discard(resp)
            raise
        await self._http.release(resp)
        return answer

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

    async def _outcome(self, resp: Response, request: CallRequest, started: float) -> CallOutcome:
        if not 200 <= resp.status < 300:
            return _failed(await _http_error(resp))
        ctype = resp.headers.get("content-type", "")
        if "text/event-stream" not in ctype:
            return _failed(f"expected an event stream, got Content-Type {ctype!r}")
        return await _read_stream(resp, request, started)

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


async def _read_stream(resp: Response, request: CallRequest, started: float) -> CallOutcome:
    """Fold an event stream into the call's outcome, forwarding each chunk to the request's
    ``stream``, then a usage chunk if the server sent none; stops at ``[DONE]`` (what follows is
    the body's end, read when the connection is released)."""
    stream = ChatStream()
    parser = SseParser()
    forward = request.stream
    ttft_s = None
    while not stream.done:
        raw = await resp.read_some()
        for data in parser.feed(raw) if raw else parser.end():
            if stream.feed(data) and ttft_s is None:
                ttft_s = time.monotonic() - started
            if stream.done:
                break
            if forward is not None:
                forward(data)
        if not raw:
            break
    outcome = stream.outcome(request.prompt, ttft_s)
    if outcome.ok and not stream.usage_chunk and forward is not None:
        forward(stream.usage_json(outcome))
    return outcome


def _failed(error: str) -> CallOutcome:
    return CallOutcome(ok=False, output="", error=error)
