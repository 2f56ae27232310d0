"""The gateway's HTTP server, over real loopback sockets: raw asyncio streams where the bytes on
the wire matter, the stdlib's http.client (in a thread) as an ordinary client would use it."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest

from swarmx.gateway.http import (
    Handler,
    HttpLimits,
    HttpServer,
    Request,
    Response,
    StreamResponse,
)

T = TypeVar("T")
DEFAULT_LIMITS = HttpLimits()
WAIT_S = 10.0
"""Bound on any wait for an event the server should cause; reached only when it fails to."""


def run(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(main())


async def echo(request: Request) -> Response:
    """Everything the server parsed, sent back as JSON."""
    seen = {
        "method": request.method,
        "path": request.path,
        "query": request.query,
        "headers": dict(request.headers),
        "body": request.body.decode(),
        "peer_host": request.peer_host,
    }
    return Response(200, json.dumps(seen).encode(), headers=(("X-Seen", "1"),))


@contextlib.asynccontextmanager
async def serving(
    handler: Handler = echo, limits: HttpLimits = DEFAULT_LIMITS
) -> AsyncIterator[HttpServer]:
    """A started server, closed afterwards; closing must leave no task of its own behind."""
    server = HttpServer(handler, limits)
    await server.start("127.0.0.1", 0)
    try:
        yield server
    finally:
        await server.close()
    assert asyncio.all_tasks() == {asyncio.current_task()}


@contextlib.asynccontextmanager
async def connected(
    server: HttpServer,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    raw_body: bytes
    """The body as framed on the wire (chunks and all)."""

    def json(self) -> Any:
        return json.loads(self.body)


async def read_reply(reader: asyncio.StreamReader) -> Reply:
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in filter(None, lines):
        name, _, value = line.partition(":")
        headers[name.lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        raw = body = b""
        while True:
            size_line = await reader.readuntil(b"\r\n")
            data = await reader.readexactly(int(size_line, 16) + 2)
            raw += size_line + data
            body += data[:-2]
            if data == b"\r\n":
                break
    else:
        raw = body = await reader.readexactly(int(headers["content-length"]))
    return Reply(int(status_line.split(" ")[1]), headers, body, raw)


async def exchange(server: HttpServer, data: bytes) -> tuple[Reply, bytes]:
    """Send ``data`` on a fresh connection: the first reply, and whatever came after it up to the
    server's close (a refusal always closes)."""
    async with connected(server) as (reader, writer):
        writer.write(data)
        reply = await read_reply(reader)
        return reply, await asyncio.wait_for(reader.read(), WAIT_S)


def test_keep_alive_serves_requests_one_after_another_on_one_connection() -> None:
    def two_requests(port: int) -> list[tuple[int, dict[str, Any], str]]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT_S)
        try:
            out = []
            for path, body in [("/v1/models?x=1&y=2", None), ("/v1/chat/completions", b"{}")]:
                conn.request("POST" if body else "GET", path, body=body)
                response = conn.getresponse()
                out.append(
                    (response.status, json.loads(response.read()), response.headers["X-Seen"])
                )
            return out
        finally:
            conn.close()

    async def main() -> tuple[list[tuple[int, dict[str, Any], str]], int, int]:
        async with serving() as server:
            out = await asyncio.to_thread(two_requests, server.port)
            return out, server.connections, server.requests

    out, connections, requests = run(main)
    (status1, seen1, _), (status2, seen2, extra) = out
    assert (status1, seen1["method"], seen1["path"], seen1["query"]) == (
        200,
        "GET",
        "/v1/models",
        "x=1&y=2",
    )
    assert (status2, seen2["method"], seen2["body"], extra) == (200, "POST", "{}", "1")
    assert seen1["peer_host"] == "127.0.0.1"
    assert (connections, requests) == (1, 2)


def test_header_names_are_lower_cased_and_repeated_headers_joined() -> None:
    async def main() -> tuple[Reply, bytes]:
        async with serving() as server:
            request = (
                b"GET / HTTP/1.1\r\nHost: x\r\nX-Tag:  a \r\nx-tag: b\r\nConnection: close\r\n\r\n"
            )
            return await exchange(server, request)

    reply, rest = run(main)
    assert reply.json()["headers"] == {"host": "x", "x-tag": "a, b", "connection": "close"}
    assert (reply.headers["connection"], reply.headers["server"], rest) == ("close", "swarmx", b"")


def test_http_1_0_gets_its_response_and_the_connection_closes() -> None:
    async def main() -> tuple[Reply, bytes]:
        async with serving() as server:
            return await exchange(server, b"GET /a HTTP/1.0\r\n\r\n")

    reply, rest = run(main)
    assert (reply.status, reply.json()["path"], reply.headers["connection"], rest) == (
        200,
        "/a",
        "close",
        b"",
    )


def test_pipelined_requests_are_answered_in_order() -> None:
    async def main() -> list[str]:
        async with serving() as server, connected(server) as (reader, writer):
            writer.write(b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\nGET /3 HTTP/1.1\r\n\r\n")
            return [(await read_reply(reader)).json()["path"] for _ in range(3)]

    assert run(main) == ["/1", "/2", "/3"]


def test_a_chunked_request_body_is_reassembled() -> None:
    def post(port: int) -> dict[str, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT_S)
        try:
            conn.request("POST", "/", body=iter([b'{"a":', b"", b" 1}"]), encode_chunked=True)
            result: dict[str, Any] = json.loads(conn.getresponse().read())
            return result
        finally:
            conn.close()

    async def main() -> tuple[dict[str, Any], Reply]:
        async with serving() as server:
            seen = await asyncio.to_thread(post, server.port)
            # extensions on a chunk-size line, and a trailer, are allowed and skipped
            raw = (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                b"3;ext=1\r\nabc\r\nA\r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\n"
            )
            reply, _ = await exchange(server, raw)
            return seen, reply

    seen, reply = run(main)
    assert (seen["body"], seen["headers"]["transfer-encoding"]) == ('{"a": 1}', "chunked")
    assert reply.json()["body"] == "abc0123456789"


def test_expect_100_continue_is_answered_before_the_body_is_sent() -> None:
    async def main() -> tuple[bytes, Reply]:
        async with serving() as server, connected(server) as (reader, writer):
            writer.write(b"POST / HTTP/1.1\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
            interim = await reader.readuntil(b"\r\n\r\n")
            writer.write(b"hello")
            return interim, await read_reply(reader)

    interim, reply = run(main)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert (reply.status, reply.json()["body"]) == (200, "hello")


LIMITS = HttpLimits(max_header_bytes=1024, max_body_bytes=16)


@pytest.mark.parametrize(
    ("request_bytes", "status", "reason"),
    [
        (b"GET /\r\n\r\n", 400, "bad_request"),
        (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", 400, "bad_request"),
        (b"GET / HTTP/1.1\r\n folded: x\r\n\r\n", 400, "bad_request"),
        (b"GET / HTTP/1.1\r\nA: b\nC: d\r\n\r\n", 400, "bad_request"),
        (b"GET http://example.com/ HTTP/1.1\r\n\r\n", 400, "bad_request"),
        (b"POST / HTTP/1.1\r\nContent-Length: 1x\r\n\r\n", 400, "bad_request"),
        (
            b"POST / HTTP/1.1\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
            400,
            "bad_request",
        ),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 400, "bad_request"),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400, "bad_request"),
        (b"GET / HTTP/2.0\r\n\r\n", 505, "unsupported_version"),
        (b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 2048 + b"\r\n\r\n", 431, "header_too_large"),
        (b"POST / HTTP/1.1\r\nContent-Length: 17\r\n\r\n", 413, "too_large"),
        (b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n", 413, "too_large"),
        # too large before any of the body is read: no 100 Continue first
        (
            b"POST / HTTP/1.1\r\nContent-Length: 17\r\nExpect: 100-continue\r\n\r\n",
            413,
            "too_large",
        ),
        (
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n9\r\n123456789\r\n9\r\n",
            413,
            "too_large",
        ),
    ],
)
def test_protocol_errors_are_answered_in_openai_shape_counted_and_the_connection_closed(
    request_bytes: bytes, status: int, reason: str
) -> None:
    async def main() -> tuple[Reply, bytes, dict[str, int], int]:
        async with serving(limits=LIMITS) as server:
            reply, rest = await exchange(server, request_bytes)
            return reply, rest, dict(server.refused), server.requests

    reply, rest, refused, requests = run(main)
    assert (reply.status, reply.headers["connection"], rest) == (status, "close", b"")
    error = reply.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", None, None)
    assert error["message"]
    assert (refused, requests) == ({reason: 1}, 0)


def test_a_head_that_never_ends_times_out_with_408() -> None:
    async def main() -> tuple[Reply, bytes, dict[str, int]]:
        async with serving(limits=HttpLimits(header_timeout_s=0.05)) as server:
            reply, rest = await exchange(server, b"GET / HTTP/1.1\r\nHost: x")
            return reply, rest, dict(server.refused)

    reply, rest, refused = run(main)
    assert (reply.status, rest, refused) == (408, b"", {"timeout": 1})


def test_a_handler_that_raises_answers_500_and_the_server_serves_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def handler(request: Request) -> Response:
        if request.path == "/boom":
            raise RuntimeError("kaput")
        return await echo(request)

    async def main() -> tuple[Reply, Reply, dict[str, int]]:
        async with serving(handler) as server, connected(server) as (reader, writer):
            writer.write(b"GET /boom HTTP/1.1\r\n\r\n")
            failed = await read_reply(reader)
            writer.write(b"GET /fine HTTP/1.1\r\n\r\n")
            return failed, await read_reply(reader), dict(server.refused)

    with caplog.at_level(logging.ERROR, logger="swarmx.gateway.http"):
        failed, fine, refused = run(main)
    assert failed.status == 500
    assert failed.json()["error"]["message"] == "internal error: RuntimeError"
    assert (fine.status, fine.json()["path"], refused) == (200, "/fine", {"handler_error": 1})
    assert [r.exc_info[0] for r in caplog.records if r.exc_info] == [RuntimeError]


def test_a_stream_is_sent_chunk_by_chunk_in_order_and_ends_properly() -> None:
    async def events() -> AsyncIterator[bytes]:
        for i in range(3):
            yield b"data: %d\n\n" % i
        yield b""  # nothing to send: skipped, never mistaken for the last chunk
        yield b"data: [DONE]\n\n"

    async def handler(request: Request) -> Response | StreamResponse:
        if request.path == "/stream":
            return StreamResponse(events(), headers=(("Cache-Control", "no-cache"),))
        return await echo(request)

    def read_stream(port: int) -> tuple[int, str, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT_S)
        try:
            conn.request("POST", "/stream", body=b"{}")
            response = conn.getresponse()
            return response.status, response.headers["Content-Type"], response.read()
        finally:
            conn.close()

    async def main() -> tuple[tuple[int, str, bytes], Reply, Reply]:
        async with serving(handler) as server:
            via_client = await asyncio.to_thread(read_stream, server.port)
            async with connected(server) as (reader, writer):
                writer.write(b"GET /stream HTTP/1.1\r\n\r\n")
                streamed = await read_reply(reader)
                writer.write(b"GET /after HTTP/1.1\r\n\r\n")  # the connection is still good
                return via_client, streamed, await read_reply(reader)

    via_client, streamed, after = run(main)
    assert via_client == (
        200,
        "text/event-stream",
        b"data: 0\n\ndata: 1\n\ndata: 2\n\ndata: [DONE]\n\n",
    )
    assert (streamed.headers["transfer-encoding"], streamed.headers["cache-control"]) == (
        "chunked",
        "no-cache",
    )
    assert streamed.raw_body == (
        b"9\r\ndata: 0\n\n\r\n9\r\ndata: 1\n\n\r\n9\r\ndata: 2\n\n\r\n"
        b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n"
    )
    assert (after.status, after.json()["path"]) == (200, "/after")


def test_a_stream_that_raises_is_cut_short_counted_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"
        raise ValueError("engine lost")

    async def handler(request: Request) -> StreamResponse:
        return StreamResponse(broken())

    async def main() -> tuple[bytes, dict[str, int]]:
        async with serving(handler) as server, connected(server) as (reader, writer):
            writer.write(b"GET / HTTP/1.1\r\n\r\n")
            return await asyncio.wait_for(reader.read(), WAIT_S), dict(server.refused)

    with caplog.at_level(logging.ERROR, logger="swarmx.gateway.http"):
        received, refused = run(main)
    assert received.endswith(b"\r\n\r\n9\r\ndata: 1\n\n\r\n")  # then the close: no last chunk
    assert refused == {"handler_error": 1}
    assert [r.exc_info[0] for r in caplog.records if r.exc_info] == [ValueError]


@dataclass
class Watched:
    """Events an endless stream sets: it started, and its ``finally`` ran."""

    started: asyncio.Event
    ended: asyncio.Event

    async def waiting(self) -> AsyncIterator[bytes]:
        """Sends one event, then waits forever for the next (as a call waits on its engine)."""
        try:
            yield b"data: first\n\n"
            self.started.set()
            await asyncio.Event().wait()
            yield b"never"
        finally:
            self.ended.set()

    async def flooding(self) -> AsyncIterator[bytes]:
        """Sends as fast as it may, never waiting on anything but the writes."""
        try:
            while True:
                yield b"data: %s\n\n" % (b"x" * 1000)
                self.started.set()
        finally:
            self.ended.set()


@pytest.mark.parametrize("kind", ["waiting", "flooding"])
def test_a_client_that_disconnects_ends_the_stream_and_runs_its_finally(kind: str) -> None:
    async def main() -> tuple[bytes, bool]:
        watched = Watched(asyncio.Event(), asyncio.Event())

        async def handler(request: Request) -> StreamResponse:
            return StreamResponse(getattr(watched, kind)())

        async with serving(handler) as server:
            async with connected(server) as (reader, writer):
                writer.write(b"GET / HTTP/1.1\r\n\r\n")
                head = await reader.readuntil(b"\r\n\r\n")
                await asyncio.wait_for(watched.started.wait(), WAIT_S)
            await asyncio.wait_for(watched.ended.wait(), WAIT_S)
            return head, watched.ended.is_set()

    head, ended = run(main)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert ended


def test_a_client_that_disconnects_cancels_a_handler_still_working() -> None:
    async def main() -> bool:
        cancelled, entered = asyncio.Event(), asyncio.Event()

        async def handler(request: Request) -> Response:
            entered.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return Response(200)

        async with serving(handler) as server:
            async with connected(server) as (_, writer):
                writer.write(b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")
                await asyncio.wait_for(entered.wait(), WAIT_S)
            await asyncio.wait_for(cancelled.wait(), WAIT_S)
            return cancelled.is_set()

    assert run(main)


def test_close_ends_open_streams_and_idle_connections() -> None:
    async def main() -> tuple[bytes, bytes, bool, int]:
        watched = Watched(asyncio.Event(), asyncio.Event())

        async def handler(request: Request) -> Response | StreamResponse:
            return Response(200) if request.path == "/fine" else StreamResponse(watched.waiting())

        server = HttpServer(handler)
        await server.start("127.0.0.1", 0)
        async with connected(server) as (reader, writer), connected(server) as idle:
            idle[1].write(b"GET /fine HTTP/1.1\r\n\r\n")
            await read_reply(idle[0])  # then idle, waiting for a next request
            writer.write(b"GET / HTTP/1.1\r\n\r\n")
            await asyncio.wait_for(watched.started.wait(), WAIT_S)
            await server.close()
            await server.close()  # idempotent
            rest = await asyncio.wait_for(reader.read(), WAIT_S)
            idle_rest = await asyncio.wait_for(idle[0].read(), WAIT_S)
        assert asyncio.all_tasks() == {asyncio.current_task()}
        return rest, idle_rest, watched.ended.is_set(), server.connections

    rest, idle_rest, ended, connections = run(main)
    assert rest.endswith(b"data: first\n\n\r\n")  # cut short: no last chunk
    assert (idle_rest, ended, connections) == (b"", True, 2)
