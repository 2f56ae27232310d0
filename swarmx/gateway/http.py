"""A small asyncio HTTP/1.1 server: just what an OpenAI-compatible front door needs.

Stdlib only, so the gateway adds no web framework to a node's install. It speaks keep-alive,
Content-Length and chunked request bodies, ``Expect: 100-continue``, and streams responses with
chunked encoding, flushing each chunk as it comes (server-sent events). Every limit a client could
abuse (head size, body size, slow heads and bodies, idle keep-alive) is bounded and each refusal
is counted. A client that goes away is noticed at once, even while nothing is being written: its
handler is cancelled, or its stream's iterator closed, so the call it made can be aborted.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from ssl import SSLContext
from typing import Any

from swarmx.clock import time_limit
from swarmx.gateway.openai_api import ApiError

log = logging.getLogger(__name__)

_HEX_DIGITS = b"0123456789abcdefABCDEF"
_MAX_LENGTH_DIGITS = 15
"""Longer Content-Length or chunk-size numbers are refused before int() sees them."""


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    """Without the query string."""
    query: str
    headers: Mapping[str, str]
    """Names lower-cased; a repeated header's values joined with ", "."""
    body: bytes
    peer_host: str
    """The client's IP address as the socket reports it."""


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class StreamResponse:
    """Sent with Transfer-Encoding: chunked; each bytes item the iterator yields is written and
    flushed at once (server-sent events).

    The server always ends the iterator: when it is exhausted, or else by cancelling its pending
    ``__anext__`` (the client went away, the server closes) and then calling its ``aclose()``, so
    an async generator's ``finally`` runs. Iteration starts before anything is awaited, so once a
    handler has returned a generator, its body is entered.
    """

    chunks: AsyncIterator[bytes]
    status: int = 200
    content_type: str = "text/event-stream"
    headers: tuple[tuple[str, str], ...] = ()


Handler = Callable[[Request], Awaitable[Response | StreamResponse]]
"""Answers one request. Cancelled (CancelledError) if the client goes away before it returns."""


@dataclass(frozen=True)
class HttpLimits:
    max_header_bytes: int = 64 * 1024
    max_body_bytes: int = 8 * 1024 * 1024
    header_timeout_s: float = 30.0
    """To receive a request's head, from its first byte (or from connecting): slowloris."""
    body_timeout_s: float = 60.0
    idle_timeout_s: float = 75.0
    """How long a keep-alive connection may wait for its next request."""


class _Refusal(Exception):
    """A protocol error: answered with ``status`` and an error body, then the connection closes."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class _Head:
    request: Request
    keep_alive: bool
    chunked: bool
    """Whether the response may use chunked encoding (an HTTP/1.1 client)."""


@dataclass
class _Conn:
    """One client connection's streams and where it stands."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    peer_host: str
    connected_at: float
    idle: bool = False
    """Waiting for a keep-alive connection's next request, not its first."""


@functools.cache
def _status_line(status: int) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    return f"HTTP/1.1 {status} {phrase}\r\nServer: swarmx\r\n".encode()


def _response_head(
    status: int, content_type: str, framing: str, headers: tuple[tuple[str, str], ...], keep: bool
) -> bytes:
    lines = [f"Content-Type: {content_type}\r\n", framing]
    lines.extend(f"{name}: {value}\r\n" for name, value in headers)
    if not keep:
        lines.append("Connection: close\r\n")
    lines.append("\r\n")
    return _status_line(status) + "".join(lines).encode("latin-1")


def _parse_head(head: bytes) -> tuple[str, str, str, dict[str, str], str]:
    """Method, path, query, headers and HTTP version, from a head ending in CRLF CRLF."""
    crlf = head.count(b"\r\n")
    if head.count(b"\n") != crlf or head.count(b"\r") != crlf:
        raise _Refusal(400, "bad_request", "a bare CR or LF in the request head")
    request_line, *lines = head.decode("latin-1").split("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise _Refusal(400, "bad_request", f"malformed request line: {request_line[:80]!r}")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        if version.startswith("HTTP/"):
            raise _Refusal(505, "unsupported_version", f"{version[:20]} is not supported: use 1.1")
        raise _Refusal(400, "bad_request", f"malformed request line: {request_line[:80]!r}")
    if not target.startswith("/") and target != "*":
        raise _Refusal(400, "bad_request", f"unsupported request target: {target[:80]!r}")
    path, _, query = target.partition("?")
    headers: dict[str, str] = {}
    for line in lines:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name[0] in " \t" or name[-1] in " \t":
            raise _Refusal(400, "bad_request", f"malformed header line: {line[:80]!r}")
        name = name.lower()
        value = value.strip(" \t")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return method, path, query, headers, version


def _gone(watch: asyncio.Task[bytes]) -> bool:
    """Whether a finished watch read saw the client leave (EOF or reset), not its next request."""
    return watch.exception() is not None or not watch.result()


class HttpServer:
    """Serves ``handler`` over HTTP/1.1 (over TLS when given an SSLContext)."""

    def __init__(
        self, handler: Handler, limits: HttpLimits = HttpLimits(), *, ssl: SSLContext | None = None
    ) -> None:
        self._handler = handler
        self._limits = limits
        self._ssl = ssl
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[Any]] = set()
        self._closing = False
        self.refused: Counter[str] = Counter()
        """Protocol-level refusals by reason: bad_request, too_large, header_too_large, timeout,
        unsupported_version, handler_error."""
        self.connections = 0
        self.requests = 0

    async def start(self, host: str, port: int) -> None:
        """Listen on ``host:port`` (0: an ephemeral port, then read `port`)."""
        if self._server is not None:
            raise RuntimeError("the HTTP server is already started")
        self._server = await asyncio.start_server(
            self._accept, host, port, limit=self._limits.max_header_bytes, ssl=self._ssl
        )

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the HTTP server is not listening")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def close(self) -> None:
        """Stop accepting, close every connection and cancel its handler or stream. Idempotent."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        connections = list(self._connections)
        for task in connections:
            task.cancel()
        if connections:
            await asyncio.wait(connections)
        if self._server is not None:
            await self._server.wait_closed()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Start serving a new connection. Called as it is made, not in a task of its own, so
        `close` knows every connection it has to end, even one accepted a moment before."""
        if self._closing:
            writer.close()
            return
        self.connections += 1
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Requests on one connection, one after another, until either side closes it.

        One pending ``reader.read(1)`` (the watch) spans each exchange and the wait after it: if it
        completes while a response is produced, the client went away (EOF or reset) or sent its
        next request early; after the response it is the next request's first byte. So keep-alive
        costs no extra read, and a disconnect is seen even while nothing is being written.
        """
        peer = writer.get_extra_info("peername")
        loop = asyncio.get_running_loop()
        conn = _Conn(reader, writer, str(peer[0]) if isinstance(peer, tuple) else "", loop.time())
        watch = loop.create_task(reader.read(1))
        work: asyncio.Task[bool] | None = None
        try:
            while not self._closing:
                head = await self._next_head(conn, watch)
                if head is None:
                    return
                self.requests += 1
                watch = loop.create_task(reader.read(1))
                work = loop.create_task(self._respond(head, writer))
                await asyncio.wait((work, watch), return_when=asyncio.FIRST_COMPLETED)
                if not work.done():
                    if _gone(watch):
                        return  # the finally cancels the handler, or closes the stream
                    await asyncio.wait((work,))  # a pipelined request: its first byte is in hand
                if not self._keep_alive(work):
                    return
                work = None
                conn.idle = True
        except OSError:  # reset by the peer; a TLS error
            return
        finally:
            writer.close()
            pending = [t for t in (watch, work) if t is not None]
            for t in pending:
                t.cancel()
            await asyncio.wait(pending)
            for t in pending:
                if not t.cancelled():
                    t.exception()  # retrieved: a read reset by a client that left is no news
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _next_head(self, conn: _Conn, watch: asyncio.Task[bytes]) -> _Head | None:
        """The connection's next request, its first byte awaited on ``watch``; None when the
        connection is to close (a protocol error is answered here first)."""
        limits = self._limits
        loop = asyncio.get_running_loop()
        # A first head counts from the connect; a later one from its first byte.
        deadline = conn.connected_at + limits.header_timeout_s
        try:
            if watch.done():
                first = watch.result()
            else:
                wait_s = limits.idle_timeout_s if conn.idle else deadline - loop.time()
                first = await asyncio.wait_for(watch, wait_s)
        except asyncio.TimeoutError:
            if not conn.idle:
                await self._refuse(conn.writer, _Refusal(408, "timeout", "no request came"))
            return None
        if not first:
            return None
        if conn.idle:
            deadline = loop.time() + limits.header_timeout_s
        try:
            return await self._read_request(conn, first, deadline)
        except _Refusal as refusal:
            await self._refuse(conn.writer, refusal)
        except asyncio.IncompleteReadError:  # the client left halfway through
            pass
        return None

    async def _read_request(self, conn: _Conn, first: bytes, deadline: float) -> _Head:
        limits = self._limits
        try:  # a time limit, not wait_for: no task of its own, no extra turn of the loop
            async with time_limit(deadline - asyncio.get_running_loop().time()):
                rest = await conn.reader.readuntil(b"\r\n\r\n")
        except (TimeoutError, asyncio.TimeoutError):
            raise _Refusal(408, "timeout", "the request head took too long") from None
        except asyncio.LimitOverrunError:
            message = f"the request head is over {limits.max_header_bytes} bytes"
            raise _Refusal(431, "header_too_large", message) from None
        method, path, query, headers, version = _parse_head(first + rest)
        expect_continue = (
            version == "HTTP/1.1" and headers.get("expect", "").lower() == "100-continue"
        )
        body = await self._read_body(conn, headers, expect_continue)
        keep = version == "HTTP/1.1" and "close" not in headers.get("connection", "").lower()
        request = Request(method, path, query, headers, body, conn.peer_host)
        return _Head(request, keep_alive=keep, chunked=version == "HTTP/1.1")

    async def _read_body(
        self, conn: _Conn, headers: Mapping[str, str], expect_continue: bool
    ) -> bytes:
        """The body by Content-Length or chunks; 100 Continue is sent once its size passed."""
        limits = self._limits
        coding, length = headers.get("transfer-encoding"), headers.get("content-length")
        read: Awaitable[bytes]
        if coding is not None:
            if length is not None:
                message = "both Content-Length and Transfer-Encoding are set"
                raise _Refusal(400, "bad_request", message)
            if coding.lower() != "chunked":
                message = f"unsupported Transfer-Encoding: {coding[:40]!r}"
                raise _Refusal(400, "bad_request", message)
            read = self._read_chunked(conn.reader)
        elif length is not None:
            if not (length.isascii() and length.isdigit()):
                raise _Refusal(400, "bad_request", f"malformed Content-Length: {length[:40]!r}")
            if len(length) > _MAX_LENGTH_DIGITS or int(length) > limits.max_body_bytes:
                raise _Refusal(413, "too_large", self._too_large())
            if not int(length):
                return b""
            read = conn.reader.readexactly(int(length))
        else:
            return b""
        if expect_continue:
            conn.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            async with time_limit(limits.body_timeout_s):
                return await read
        except (TimeoutError, asyncio.TimeoutError):
            raise _Refusal(408, "timeout", "the request body took too long") from None
        except asyncio.LimitOverrunError:
            raise _Refusal(400, "bad_request", "a chunk-size line is too long") from None

    async def _read_chunked(self, reader: asyncio.StreamReader) -> bytes:
        parts: list[bytes] = []
        total = 0
        while True:
            line = await reader.readuntil(b"\r\n")
            size = line[:-2].split(b";", 1)[0].strip(b" \t")
            if not size or len(size) > _MAX_LENGTH_DIGITS or size.translate(None, _HEX_DIGITS):
                raise _Refusal(400, "bad_request", f"malformed chunk size: {size[:20]!r}")
            if not (n := int(size, 16)):
                break
            total += n
            if total > self._limits.max_body_bytes:
                raise _Refusal(413, "too_large", self._too_large())
            data = await reader.readexactly(n + 2)
            if data[-2:] != b"\r\n":
                raise _Refusal(400, "bad_request", "a chunk's data is not followed by CRLF")
            parts.append(data[:-2])
        trailers = 0
        while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
            trailers += len(line)
            if trailers > self._limits.max_header_bytes:
                raise _Refusal(431, "header_too_large", "the chunked body's trailers are too long")
        return b"".join(parts)

    def _too_large(self) -> str:
        return f"the request body is over {self._limits.max_body_bytes} bytes"

    async def _refuse(self, writer: asyncio.StreamWriter, refusal: _Refusal) -> None:
        """Answer a protocol error; the caller then closes the connection."""
        self.refused[refusal.reason] += 1
        body = ApiError(refusal.status, refusal.message).body()
        framing = f"Content-Length: {len(body)}\r\n"
        writer.write(_response_head(refusal.status, "application/json", framing, (), False) + body)
        with contextlib.suppress(OSError):
            await writer.drain()

    def _keep_alive(self, work: asyncio.Task[bool]) -> bool:
        """Whether the connection may carry another request after this exchange."""
        if work.cancelled():
            return False
        exc = work.exception()
        if exc is None:
            return work.result()
        if not isinstance(exc, OSError):  # not the client leaving: a response that broke
            log.error("writing a response failed", exc_info=exc)
            self.refused["handler_error"] += 1
        return False

    async def _respond(self, head: _Head, writer: asyncio.StreamWriter) -> bool:
        """Run the handler and write its response; whether the connection may be kept."""
        request = head.request
        try:
            response = await self._handler(request)
        except Exception as exc:
            log.exception("the handler failed on %s %s", request.method, request.path)
            self.refused["handler_error"] += 1
            error = ApiError(500, f"internal error: {type(exc).__name__}", type="server_error")
            response = Response(500, error.body())
        if isinstance(response, StreamResponse):
            return await self._stream(response, writer, head)
        framing = f"Content-Length: {len(response.body)}\r\n"
        writer.write(
            _response_head(
                response.status, response.content_type, framing, response.headers, head.keep_alive
            )
            + (b"" if request.method == "HEAD" else response.body)
        )
        await writer.drain()
        return head.keep_alive

    async def _stream(
        self, response: StreamResponse, writer: asyncio.StreamWriter, head: _Head
    ) -> bool:
        """Write each chunk as it comes; the iterator is ended whatever happens (see
        StreamResponse). Nothing is awaited before the first ``__anext__``."""
        chunks = response.chunks
        framed = head.chunked  # an HTTP/1.0 client reads to the close instead
        keep = framed and head.keep_alive
        framing = "Transfer-Encoding: chunked\r\n" if framed else ""
        try:
            writer.write(
                _response_head(
                    response.status, response.content_type, framing, response.headers, keep
                )
            )
            while True:
                try:
                    chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    break
                except Exception:
                    request = head.request
                    log.exception("the stream failed on %s %s", request.method, request.path)
                    self.refused["handler_error"] += 1
                    return False  # no last chunk: the client sees the response cut short
                if chunk:
                    writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if framed else chunk)
                    await writer.drain()
            if framed:
                writer.write(b"0\r\n\r\n")
            await writer.drain()
            return keep
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()
