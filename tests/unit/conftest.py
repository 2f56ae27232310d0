"""Shared unit-test fixtures: `zmq_tracker` catches ZeroMQ sockets and contexts a test leaks.

In the manner of pyzmq's own test fixtures: what a test opens for itself (`ZmqTracker.socket`)
is closed for it at teardown, and anything else still open then was leaked by the code under
test: it is closed with linger 0 too, and the test fails naming it. A leak left alone would hang
a later ``Context.term()`` or surface as a ResourceWarning in some unrelated test.
"""

from __future__ import annotations

import threading
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import zmq

TERM_WITHIN_S = 5.0
"""How long a context may take to terminate once its sockets are closed (it takes microseconds;
longer means a socket the tracker never saw is still open)."""
_HERE = str(Path(__file__).resolve())
_ZMQ = str(Path(zmq.__file__).resolve().parent)


def _made_at() -> str:
    """The innermost caller outside pyzmq and this file: where a leaked object came from."""
    for frame in reversed(traceback.extract_stack(limit=16)):
        if not frame.filename.startswith(_ZMQ) and frame.filename != _HERE:
            return f"{Path(frame.filename).name}:{frame.lineno} ({frame.name})"
    return "unknown"


@dataclass
class ZmqTracker:
    """Every zmq context and socket made while `install`\\ed (through any `zmq.Context`, the
    asyncio one and the authenticator's shadow contexts included), with where each was made."""

    sockets: list[tuple[zmq.Socket[Any], str]] = field(default_factory=list)
    contexts: list[tuple[zmq.Context[Any], str]] = field(default_factory=list)
    owned: list[zmq.Socket[Any]] = field(default_factory=list)
    """Sockets the test made for itself (`socket`): closed at teardown, not leaks."""
    term_within_s: float = TERM_WITHIN_S
    _context: zmq.Context[Any] | None = None

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real_init = zmq.Context.__init__
        real_socket = zmq.Context.socket
        tracker = self

        def init(ctx: zmq.Context[Any], io_threads: Any = 1, shadow: Any = 0) -> None:
            real_init(ctx, io_threads, shadow)
            if not (shadow or isinstance(io_threads, zmq.Context)):  # a shadow owns nothing:
                tracker.contexts.append((ctx, _made_at()))  # its sockets are tracked, it is not

        def socket(ctx: zmq.Context[Any], *args: Any, **kwargs: Any) -> zmq.Socket[Any]:
            sock = real_socket(ctx, *args, **kwargs)
            tracker.sockets.append((sock, _made_at()))
            return sock

        monkeypatch.setattr(zmq.Context, "__init__", init)
        monkeypatch.setattr(zmq.Context, "socket", socket)

    def socket(self, kind: int) -> zmq.Socket[Any]:
        """A plain socket for the test's own use (a raw peer), closed at teardown."""
        if self._context is None:
            self._context = zmq.Context()
        sock = self._context.socket(kind)
        sock.linger = 0
        self.owned.append(sock)
        return sock

    def open_sockets(self) -> list[str]:
        """Sockets made by the code under test and not closed, as ``TYPE made at FILE:LINE``."""
        return [
            f"{zmq.SocketType(sock.type).name} socket made at {where}"
            for sock, where in self.sockets
            if not sock.closed and sock not in self.owned
        ]

    def finish(self) -> list[str]:
        """Close and terminate everything still open; return the leaks, described."""
        leaks = self.open_sockets()
        for sock, _ in self.sockets:
            if not sock.closed:
                sock.close(linger=0)
        for ctx, where in self.contexts:
            if ctx is self._context or ctx.closed:
                continue
            leaks.append(f"context made at {where} was never terminated")
            if not _term(ctx, self.term_within_s):
                leaks.append(f"context made at {where} hangs in term(): a socket is still open")
        if self._context is not None and not _term(self._context, self.term_within_s):
            leaks.append("the test's own context hangs in term()")
        return leaks


def _term(ctx: zmq.Context[Any], within_s: float) -> bool:
    """Terminate ``ctx`` on a helper thread, so an unseen open socket fails rather than hangs."""
    thread = threading.Thread(target=ctx.term, name="zmq-term", daemon=True)
    thread.start()
    thread.join(within_s)
    return not thread.is_alive()


@pytest.fixture
def zmq_tracker(monkeypatch: pytest.MonkeyPatch) -> Iterator[ZmqTracker]:
    """Track every zmq socket and context the test makes; fail it if the code under test leaves
    one open (everything is closed with linger 0 either way)."""
    tracker = ZmqTracker()
    tracker.install(monkeypatch)
    yield tracker
    leaks = tracker.finish()
    if leaks:
        pytest.fail("zmq objects left open:\n  " + "\n  ".join(leaks), pytrace=False)
