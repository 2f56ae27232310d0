"""OpenAIBackend's parsers on canned text, and its HTTP handling against a stdlib fake server."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from swarmx.backends.base import BackendMetrics, CallOutcome, CallRequest
from swarmx.backends.openai import (
    MAX_EVENT_LINE_BYTES,
    ChatStream,
    OpenAIBackend,
    SseParser,
    StreamError,
    iter_sse_data,
    metrics_from_prometheus,
    parse_prometheus,
)
from swarmx.config import ReplicaConfig

VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 2.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 7.0
vllm:num_requests_waiting{engine="1",model_name="m"} 0.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.25
vllm:prompt_tokens_total{model_name="m"} 1.234e+04 1700000000000
"""

SGLANG_METRICS = """\
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="m",tp_rank="0"} 4.0
sglang:num_queue_reqs{model_name="m",tp_rank="0"} 1.0
sglang:token_usage{model_name="m",tp_rank="0"} 0.125
"""

STREAM = (
    b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}],"usage":null}\n'
    b"\n"
    b": keep-alive comment\n"
    b"\n"
    b'data: {"choices":[{"index":0,"delta":{"content":"Hel"}}],"usage":null}\r\n'
    b"\r\n"
    b'data: {"choices":[{"index":0,"delta":{"content":"lo"},"finish_reason":null}]}\n'
    b"\n"
    b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}\n'
    b"\n"
    b'data: {"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11}}\n'
    b"\n"
    b"data: [DONE]\n"
    b"\n"
)
STREAM_HEAD = STREAM[: STREAM.index(b'data: {"choices":[{"index":0,"delta":{},')]
COMPLETIONS_STREAM = (
    b'data: {"id":"cmpl-1","object":"text_completion","created":17,"model":"tiny",'
    b'"choices":[{"index":0,"text":"Hel","finish_reason":null,"logprobs":null}]}\n'
    b"\n"
    b'data: {"id":"cmpl-1","object":"text_completion","created":17,"model":"tiny",'
    b'"choices":[{"index":0,"text":"lo","finish_reason":"stop","logprobs":null}]}\n'
    b"\n"
    b"data: [DONE]\n"
    b"\n"
)
"""No usage chunk: llama-cpp-python ignores ``stream_options``."""
TOOL_CALL_STREAM = (
    b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":null,"tool_calls":'
    b'[{"index":0,"id":"call_1","type":"function","function":{"name":"weather","arguments":""}}]'
    b"}}]}\n"
    b"\n"
    b'data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":'
    b'{"arguments":"{\\"city\\":"}}]}}]}\n'
    b"\n"
    b'data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":'
    b'{"arguments":"\\"Oslo\\"}"}}]}}]}\n'
    b"\n"
    b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}\n'
    b"\n"
    b"data: [DONE]\n"
    b"\n"
)
WITHIN_S = 10.0
"""How long a wait polls before it fails: far beyond what any step here takes."""


def feed_all(raw: bytes) -> ChatStream:
    stream = ChatStream()
    for data in iter_sse_data(raw.splitlines(keepends=True)):
        stream.feed(data)
    return stream


def test_prometheus_vllm_sums_counts_and_averages_kv_use():
    samples = parse_prometheus(VLLM_METRICS)
    assert samples["vllm:num_requests_running"] == [3.0, 2.0]
    assert samples["vllm:prompt_tokens_total"] == [12340.0]  # the timestamp is not the value
    assert metrics_from_prometheus(samples) == BackendMetrics(
        queued=7, running=5, kv_cache_usage=0.375
    )


def test_prometheus_sglang_and_the_old_vllm_name():
    assert metrics_from_prometheus(parse_prometheus(SGLANG_METRICS)) == BackendMetrics(
        queued=1, running=4, kv_cache_usage=0.125
    )
    old = parse_prometheus('vllm:gpu_cache_usage_perc{model_name="m"} 0.9\n')
    assert metrics_from_prometheus(old) == BackendMetrics(kv_cache_usage=0.9)


def test_prometheus_tricky_lines():
    text = (
        'a{path="/x}y",q="say \\"hi}\\""} 1\n'  # braces and escaped quotes inside label values
        "b 2 1700000000\n"
        "c NaN\n"
        "d not-a-number\n"
        "e{unclosed 4\n"
        "f +Inf\n"
        "   \n"
        "# a comment 5\n"
    )
    assert parse_prometheus(text) == {"a": [1.0], "b": [2.0], "f": [float("inf")]}
    assert metrics_from_prometheus({}) == BackendMetrics()


def test_sse_events_and_multiline_data():
    raw = [b"event: x\n", b"data: one\n", b"data:two\n", b"\n", b"id: 3\n", b"data: tail"]
    assert list(iter_sse_data(raw)) == ["one\ntwo", "tail"]


def test_an_event_stream_line_without_end_is_refused_not_buffered_forever():
    """A broken or hostile engine sends data with no newline: past `MAX_EVENT_LINE_BYTES` the
    stream fails, rather than the node holding all of it; one split over many reads is fine."""
    parser = SseParser()
    piece = b"x" * (1 << 20)
    for _ in range(MAX_EVENT_LINE_BYTES // len(piece)):
        parser.feed(piece)  # at the limit: still buffered
    with pytest.raises(StreamError, match="an event stream line over"):
        parser.feed(piece)
    whole = SseParser()
    events = [e for chunk in (b"data: he", b"llo\r", b"\n", b"\n") for e in whole.feed(chunk)]
    assert events == ["hello"]


def test_stream_with_usage():
    stream = feed_all(STREAM)
    assert stream.done
    outcome = stream.outcome("a prompt", ttft_s=0.5)
    assert outcome.ok
    assert outcome.output == "Hello"
    assert (outcome.prompt_tokens, outcome.output_tokens, outcome.ttft_s) == (9, 2, 0.5)
    assert outcome.cached_tokens is None  # the server did not say


def test_cached_prompt_tokens_are_read_from_the_usage_details() -> None:
    usage = {
        "prompt_tokens": 900,
        "completion_tokens": 1,
        "prompt_tokens_details": {"cached_tokens": 768},
    }
    stream = ChatStream()
    stream.feed(json.dumps({"choices": [{"delta": {"content": "x"}, "finish_reason": "stop"}]}))
    stream.feed(json.dumps({"choices": [], "usage": usage}))
    outcome = stream.outcome("p", ttft_s=0.1)
    assert (outcome.prompt_tokens, outcome.cached_tokens) == (900, 768)


def test_completions_stream_folds_its_text() -> None:
    stream = feed_all(COMPLETIONS_STREAM)
    outcome = stream.outcome("x" * 41, ttft_s=None)
    assert (outcome.ok, outcome.output, outcome.prompt_tokens, outcome.output_tokens) == (
        True,
        "Hello",
        10,
        2,
    )
    assert not stream.usage_chunk
    assert json.loads(stream.usage_json(outcome)) == {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 17,
        "model": "tiny",
        "choices": [],
        "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12},
    }


def test_tool_call_arguments_count_as_output_without_being_content() -> None:
    stream = ChatStream()
    added = [stream.feed(data) for data in iter_sse_data(TOOL_CALL_STREAM.splitlines(True))]
    assert added == ["", '{"city":', '"Oslo"}', "", ""]  # what a time to first token sees
    outcome = stream.outcome("weather in Oslo?", ttft_s=0.1)
    assert (outcome.ok, outcome.output, outcome.output_tokens) == (True, "", 2)
    assert (outcome.stop_reason, outcome.output_kinds) == ("tool_calls", ["tool_use"])
    text = feed_all(STREAM).outcome("x", ttft_s=None)  # the session's next call reads these
    assert (text.stop_reason, text.output_kinds) == ("length", ["text"])


def test_stream_without_usage_counts_chunks_and_estimates_the_prompt():
    raw = b"".join(line for line in STREAM.splitlines(keepends=True) if b'usage":{' not in line)
    outcome = feed_all(raw).outcome("x" * 41, ttft_s=None)
    assert outcome.ok
    assert (outcome.prompt_tokens, outcome.output_tokens) == (10, 2)


@pytest.mark.parametrize(
    ("tail", "error"),
    [
        (b"", "stream ended before [DONE]"),
        (b"data: [DONE]\n\n", "the server ended the stream without a finish_reason"),
    ],
)
def test_stream_cut_short_is_an_error(tail, error):
    stream = feed_all(b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n' + tail)
    outcome = stream.outcome("p", ttft_s=0.1)
    assert (outcome.ok, outcome.output, outcome.error) == (False, "Hi", error)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("{not json", "bad JSON in stream"),
        ("[1, 2]", "not an object"),
        ('{"error": {"message": "KV cache\\nexhausted", "code": 500}}', "KV cache exhausted"),
    ],
)
def test_stream_errors(data, message):
    with pytest.raises(StreamError, match=message):
        ChatStream().feed(data)


LONG_CHUNKS = 300


def long_stream_events() -> list[bytes]:
    """A stream of many numbered chunks, each sent on its own, without a usage chunk."""
    events = [
        b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"%d "}}]}\n\n' % i
        for i in range(LONG_CHUNKS)
    ]
    return [*events, b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n']


class FakeServer(BaseHTTPRequestHandler):
    """Answers like an OpenAI-compatible server; ``mode`` picks the chat endpoint's behaviour.

    It keeps connections alive (HTTP/1.1, streams in chunked encoding) as engines do, unless
    ``protocol_version`` is set to HTTP/1.0: then a stream ends when the connection does.
    """

    protocol_version = "HTTP/1.1"
    mode = "stream"
    seen: list[dict[str, object]]
    peers: list[tuple[str, int]]
    """The address of each connection accepted, in order."""
    streaming: threading.Event
    """Set once a ``hang`` response is under way (the client's socket is attached by then)."""
    disconnected: threading.Event

    def log_message(self, format, *args):  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        self.peers.append(self.client_address)

    @property
    def chunked(self) -> bool:
        return self.protocol_version == "HTTP/1.1"

    def start_events(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        if self.chunked:
            self.send_header("Transfer-Encoding", "chunked")
        if self.mode == "close":
            self.send_header("Connection", "close")
        self.end_headers()

    def write_events(self, raw: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(raw), raw) if self.chunked else raw)
        self.wfile.flush()

    def end_events(self) -> None:
        if self.chunked:
            self.wfile.write(b"0\r\n\r\n")
        if self.mode == "idle_close":  # as a server does whose keep-alive timeout passed
            self.close_connection = True

    def send_body(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/v1/models":
            self.send_body(200, b'{"object":"list","data":[{"id":"tiny"}]}')
        elif self.path == "/metrics":
            self.send_body(200, VLLM_METRICS.encode(), "text/plain; version=0.0.4")
        else:
            self.send_body(404, b'{"detail":"Not Found"}')

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append(
            {"path": self.path, "body": body, "auth": self.headers.get("Authorization")}
        )
        if self.mode == "error":
            message = "This model's maximum context length is 256 tokens. " + "x" * 1000
            error = {"error": {"message": message, "type": "BadRequestError", "code": 400}}
            self.send_body(400, json.dumps(error).encode())
            return
        self.start_events()
        if self.path == "/v1/completions":
            self.write_events(COMPLETIONS_STREAM)
        elif self.mode == "long":
            for event in long_stream_events():
                self.write_events(event)
            self.write_events(b"data: [DONE]\n\n")
        else:
            self.write_events(STREAM_HEAD if self.mode in {"truncated", "hang"} else STREAM)
        if self.mode == "hang":  # keep generating until the client goes away
            self.streaming.set()
            try:
                while True:
                    time.sleep(0.02)
                    self.write_events(b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n')
            except OSError:
                self.disconnected.set()
                return
        self.end_events()


@pytest.fixture
def server() -> Iterator[tuple[str, type[FakeServer]]]:
    events = {"streaming": threading.Event(), "disconnected": threading.Event()}
    handler = type("Handler", (FakeServer,), {"seen": [], "peers": [], **events})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def backend(url: str, concurrency: int = 2, **kw: str) -> OpenAIBackend:
    return OpenAIBackend(
        ReplicaConfig(
            model="tiny", backend="openai", concurrency=concurrency, url=f"{url}/v1", **kw
        )
    )


def llm(prompt: str = "hello there", **kw: float) -> CallRequest:
    return CallRequest(call_id="c1", kind="llm", model="tiny", prompt=prompt, max_tokens=8, **kw)


async def run_closing(b: OpenAIBackend, request: CallRequest, start: bool = False):
    if start:
        await b.start()
    try:
        return await b.run(request)
    finally:
        await b.close()


def test_streams_a_chat_completion_with_the_key(server, monkeypatch):
    url, handler = server
    monkeypatch.setenv("TINY_KEY", "sekrit")
    b = backend(url, served_model="tiny", api_key_env="TINY_KEY")
    outcome = asyncio.run(run_closing(b, llm(), start=True))
    assert outcome.ok, outcome.error
    assert (outcome.output, outcome.prompt_tokens, outcome.output_tokens) == ("Hello", 9, 2)
    assert outcome.ttft_s is not None
    assert outcome.ttft_s > 0
    assert handler.seen == [
        {
            "path": "/v1/chat/completions",
            "body": {
                "model": "tiny",
                "messages": [{"role": "user", "content": "hello there"}],
                "max_tokens": 8,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
            "auth": "Bearer sekrit",
        }
    ]


class Collector:
    """A `CallRequest.stream` that keeps each chunk and notes whether it came on the loop's
    thread, as the contract says."""

    def __init__(self) -> None:
        self.chunks: list[str] = []
        self.off_loop = 0
        self.loop_thread = threading.get_ident()

    def __call__(self, chunk: str) -> None:
        self.chunks.append(chunk)
        self.off_loop += threading.get_ident() != self.loop_thread


def sse_data(raw: bytes) -> list[str]:
    return [d for d in iter_sse_data(raw.splitlines(keepends=True)) if d != "[DONE]"]


def test_a_gateway_chat_body_goes_as_is_and_its_chunks_come_back_as_they_are(
    server: tuple[str, type[FakeServer]],
) -> None:
    url, handler = server
    body = {
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        "temperature": 0.2,
        "tools": [{"type": "function", "function": {"name": "weather", "parameters": {}}}],
    }
    got = Collector()
    request = CallRequest(
        "c1", "llm", "tiny", prompt="flattened", max_tokens=8, body=json.dumps(body), stream=got
    )
    outcome = asyncio.run(run_closing(backend(url, served_model="tiny-served"), request))
    assert (outcome.ok, outcome.output, outcome.output_tokens) == (True, "Hello", 2)
    assert handler.seen == [
        {
            "path": "/v1/chat/completions",
            "body": {
                **body,
                "model": "tiny-served",
                "stream": True,
                "stream_options": {"include_usage": True},
            },
            "auth": None,
        }
    ]  # no max_tokens of its own: the client's body says what it wants
    assert got.chunks == sse_data(STREAM)  # the server's usage chunk ends it
    assert got.off_loop == 0


def test_a_gateway_completions_body_gets_a_usage_chunk_the_server_did_not_send(
    server: tuple[str, type[FakeServer]],
) -> None:
    url, handler = server
    got = Collector()
    request = CallRequest(
        "c1",
        "llm",
        "tiny",
        prompt="x" * 41,
        api="completions",
        body='{"prompt": "Once upon", "max_tokens": 2}',
        stream=got,
    )
    outcome = asyncio.run(run_closing(backend(url), request))
    assert (outcome.ok, outcome.output, outcome.prompt_tokens, outcome.output_tokens) == (
        True,
        "Hello",
        10,
        2,
    )
    assert handler.seen[0]["path"] == "/v1/completions"
    assert handler.seen[0]["body"] == {
        "prompt": "Once upon",
        "max_tokens": 2,
        "model": "tiny",
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert got.chunks[:-1] == sse_data(COMPLETIONS_STREAM)
    assert json.loads(got.chunks[-1])["choices"] == []
    assert json.loads(got.chunks[-1])["usage"]["completion_tokens"] == 2
    assert got.off_loop == 0


def test_a_cut_stream_forwards_what_came_and_no_usage(server: tuple[str, type[FakeServer]]) -> None:
    url, handler = server
    handler.mode = "truncated"
    got = Collector()
    request = CallRequest("c1", "llm", "tiny", prompt="hi", stream=got)
    outcome = asyncio.run(run_closing(backend(url), request))
    assert not outcome.ok
    assert got.chunks == sse_data(STREAM_HEAD)


@pytest.mark.parametrize(
    ("body", "error"),
    [("[1, 2]", "the request body is not a JSON object"), ("{", "the request body is not JSON")],
)
def test_a_bad_body_fails_the_call_before_any_request(
    server: tuple[str, type[FakeServer]], body: str, error: str
) -> None:
    url, handler = server
    outcome = asyncio.run(run_closing(backend(url), CallRequest("c1", "llm", "tiny", body=body)))
    assert not outcome.ok
    assert outcome.error.startswith(error)
    assert handler.seen == []


def test_http_error_carries_status_and_message(server):
    url, handler = server
    handler.mode = "error"
    outcome = asyncio.run(run_closing(backend(url), llm()))
    assert not outcome.ok
    assert outcome.error.startswith("HTTP 400 Bad Request: This model's maximum context length")
    assert len(outcome.error) <= 300
    assert "\n" not in outcome.error


def test_truncated_stream_is_not_ok(server):
    url, handler = server
    handler.mode = "truncated"
    outcome = asyncio.run(run_closing(backend(url), llm()))
    assert not outcome.ok
    assert outcome.error == "stream ended before [DONE]"


def test_connection_refused_is_an_outcome_and_start_raises():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    b = backend(f"http://127.0.0.1:{port}")
    outcome = asyncio.run(run_closing(b, llm()))
    assert not outcome.ok
    assert outcome.error == f"connection refused by 127.0.0.1:{port}"
    with pytest.raises(RuntimeError, match=f"not reachable at http://127.0.0.1:{port}/v1/models"):
        asyncio.run(run_closing(backend(f"http://127.0.0.1:{port}"), llm(), start=True))


def test_timeout_is_an_outcome(server):
    url, handler = server
    handler.mode = "hang"
    outcome = asyncio.run(run_closing(backend(url), llm(timeout_s=0.3)))
    assert not outcome.ok
    assert outcome.error == "no complete response within 0.3 s"


def test_cancel_closes_the_connection(server):
    """How soon the caller is free again is a benchmark's concern; here: cancelling raises in
    the caller, and the server sees the client go (so it stops generating)."""
    url, handler = server
    handler.mode = "hang"
    b = backend(url)

    async def go() -> None:
        task = asyncio.create_task(b.run(llm()))
        await mid_stream(handler)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(b.close(), WITHIN_S)

    asyncio.run(go())
    assert handler.disconnected.wait(WITHIN_S)


async def mid_stream(handler: type[FakeServer]) -> None:
    """Wait until a ``hang`` call is mid-stream, not still connecting."""
    assert await asyncio.to_thread(handler.streaming.wait, WITHIN_S), "no stream started"


def test_sequential_calls_share_one_kept_alive_connection(
    server: tuple[str, type[FakeServer]],
) -> None:
    """Calls reuse a connection the server keeps alive, after an HTTP error answer too (its body
    read to the end), and whichever endpoint they call."""
    url, handler = server
    completions = CallRequest("c2", "llm", "tiny", api="completions", body='{"prompt": "Once"}')

    async def go() -> list[CallOutcome]:
        b = backend(url)
        try:
            outcomes = [await b.run(llm())]
            handler.mode = "error"
            outcomes.append(await b.run(llm()))
            handler.mode = "stream"
            return [*outcomes, await b.run(completions), await b.run(llm())]
        finally:
            await b.close()

    outcomes = asyncio.run(go())
    assert [(o.ok, o.output) for o in outcomes] == [
        (True, "Hello"),
        (False, ""),
        (True, "Hello"),
        (True, "Hello"),
    ]
    assert len(handler.seen) == 4
    assert len(handler.peers) == 1


@pytest.mark.parametrize(("protocol", "mode"), [("HTTP/1.0", "stream"), ("HTTP/1.1", "close")])
def test_a_server_closing_after_each_answer_serves_each_call_on_a_new_connection(
    server: tuple[str, type[FakeServer]], protocol: str, mode: str
) -> None:
    """An HTTP/1.0 stream ends with its connection; ``Connection: close`` says it will."""
    url, handler = server
    handler.protocol_version = protocol
    handler.mode = mode

    async def go() -> list[CallOutcome]:
        b = backend(url)
        try:
            return [await b.run(llm()), await b.run(llm())]
        finally:
            await b.close()

    assert [(o.ok, o.output, o.error) for o in asyncio.run(go())] == [(True, "Hello", "")] * 2
    assert len(handler.peers) == 2


def test_a_connection_the_server_closed_while_idle_is_replaced(
    server: tuple[str, type[FakeServer]],
) -> None:
    """The server closes each connection after its answer without saying so (its keep-alive
    timeout passing between calls looks the same): the next call's request, sent on it, fails
    before any answer and goes again on a new connection."""
    url, handler = server
    handler.mode = "idle_close"

    async def go() -> list[CallOutcome]:
        b = backend(url)
        try:
            return [await b.run(llm()), await b.run(llm())]
        finally:
            await b.close()

    assert [(o.ok, o.output, o.error) for o in asyncio.run(go())] == [(True, "Hello", "")] * 2
    assert len(handler.seen) == 2  # the request on the closed connection reached no one
    assert len(handler.peers) == 2


def test_a_cancel_stops_a_call_on_a_reused_connection_and_drops_it(
    server: tuple[str, type[FakeServer]],
) -> None:
    url, handler = server
    b = backend(url, concurrency=1)  # a call starts once the one before let go of its connection

    async def go() -> tuple[CallOutcome, int, CallOutcome]:
        first = await b.run(llm())
        handler.mode = "hang"
        task = asyncio.create_task(b.run(llm()))
        await mid_stream(handler)
        peers_mid_stream = len(handler.peers)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        handler.mode = "stream"
        after = await b.run(llm())
        await b.close()
        return first, peers_mid_stream, after

    first, peers_mid_stream, after = asyncio.run(go())
    assert peers_mid_stream == 1  # the cancelled call reused the first call's connection
    assert handler.disconnected.wait(WITHIN_S)  # and the cancel reached the server
    assert (first.ok, after.ok) == (True, True)
    assert len(handler.peers) == 2


def test_many_chunks_arrive_in_order_and_before_the_outcome(
    server: tuple[str, type[FakeServer]],
) -> None:
    """Chunks reach the loop in batches: two concurrent streams of many chunks each arrive
    whole, in order, on the loop's thread, before their call returns."""
    url, handler = server
    handler.mode = "long"
    expected = [data for event in long_stream_events() for data in sse_data(event)]

    async def one(b: OpenAIBackend) -> tuple[CallOutcome, Collector, list[str]]:
        got = Collector()
        outcome = await b.run(CallRequest("c", "llm", "tiny", prompt="hi", stream=got))
        return outcome, got, list(got.chunks)  # as they stand when the call returns

    async def go() -> list[tuple[CallOutcome, Collector, list[str]]]:
        b = backend(url)
        try:
            return await asyncio.gather(one(b), one(b))
        finally:
            await b.close()

    for outcome, got, chunks in asyncio.run(go()):
        assert (outcome.ok, outcome.output_tokens) == (True, LONG_CHUNKS)
        assert chunks == got.chunks
        assert chunks[:-1] == expected
        assert json.loads(chunks[-1])["usage"]["completion_tokens"] == LONG_CHUNKS
        assert got.off_loop == 0


def test_missing_api_key_fails_start(server, monkeypatch):
    url, _ = server
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    with pytest.raises(RuntimeError, match=r"\$NO_SUCH_KEY is not set"):
        asyncio.run(backend(url, api_key_env="NO_SUCH_KEY").start())


def test_metrics_are_scraped_in_the_background(server):
    url, _ = server
    b = backend(url, metrics_url=f"{url}/metrics")
    assert b.metrics() == BackendMetrics()

    async def go() -> BackendMetrics:
        await b.start()
        deadline = time.monotonic() + WITHIN_S
        while b.metrics() == BackendMetrics() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        got = b.metrics()
        await b.close()
        await b.close()  # idempotent
        return got

    assert asyncio.run(go()) == BackendMetrics(queued=7, running=5, kv_cache_usage=0.375)
    outcome = asyncio.run(b.run(llm()))
    assert (outcome.ok, outcome.error) == (False, "backend closed")
