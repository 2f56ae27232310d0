"""`swarmx top`: a live full-screen view of the cluster, the predictions and the decisions.

The I/O around the pure frames of `swarmx.cli.topview`: one query (`fetch`) asks the scheduler
for a snapshot; a thread repeats it every interval so a slow or lost scheduler never freezes the
keys; the main thread reads keys from the terminal in cbreak mode and redraws a Rich `Live` on the
alternate screen (no flicker: each frame overwrites the last). ``--once`` prints one frame with
every pane, ``--json`` the snapshot itself.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import termios
import threading
import time
import tty
from collections.abc import Iterator
from types import FrameType
from typing import Annotated

import typer
from rich.console import Console
from rich.live import Live

from swarmx.cli.common import (
    EXIT_UNAVAILABLE,
    ConfigOpt,
    JsonOpt,
    SchedulerOpt,
    curve_for,
    fail,
    load,
    print_json,
)
from swarmx.cli.topview import Screen, View, body_rows, clamp, parse_keys, render
from swarmx.clock import RealClock
from swarmx.config import ClientConfig, ConfigError, override
from swarmx.protocol import Error, QueryTop, TopReply
from swarmx.schema import encode
from swarmx.transport import ClientCurve, TransportError, request

LIVE_QUERY = QueryTop(workflows=200, decisions=200)
KEY_POLL_S = 0.05
"""How long the loop waits for a key before checking for a new snapshot or a resize."""
ONCE_QUERY = QueryTop(workflows=20, decisions=10)


class TopError(RuntimeError):
    """No snapshot: the scheduler is unreachable or refused; the message says which."""


def fetch(client: ClientConfig, query: QueryTop, curve: ClientCurve | None = None) -> TopReply:
    """The one scheduler query behind every frame."""
    try:
        env = request(client.scheduler, query, "top", RealClock(), client.timeout_s, curve=curve)
    except (TimeoutError, TransportError) as exc:
        raise TopError(str(exc)) from None
    if isinstance(env.body, Error):
        raise TopError(f"scheduler refused {query.TYPE!r}: {env.body.code}: {env.body.message}")
    if not isinstance(env.body, TopReply):
        raise TopError(f"unexpected reply {env.body.TYPE!r} from the scheduler")
    return env.body


def top(
    config: ConfigOpt = None,
    scheduler: SchedulerOpt = None,
    once: Annotated[
        bool, typer.Option("--once", help="Print one frame with every pane and exit.")
    ] = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes.")] = 1.0,
    json: JsonOpt = False,
) -> None:
    """A live view of nodes, replicas (actual vs predicted latency), workflows and the router's
    and scaler's decisions. Keys: q quit, tab or 1-4 pane, s sort, p pause, arrows scroll."""
    cfg = load(config)
    try:
        client = override(cfg.client, scheduler=scheduler)
    except ConfigError as exc:
        fail(str(exc))
    if not interval > 0:
        fail(f"--interval: must be > 0, got {interval:g}")
    curve = curve_for(cfg)
    if once or json:
        try:
            reply = fetch(client, ONCE_QUERY if once and not json else QueryTop(), curve)
        except TopError as exc:
            fail(str(exc), EXIT_UNAVAILABLE)
        if json:
            print_json(encode(reply))
        else:
            Console().print(render(Screen(client.scheduler, reply), View()))
        return
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        fail("swarmx top needs a terminal; use --once or --json in scripts")
    _run(client, interval, curve)


class _Fetcher(threading.Thread):
    """Fetches a snapshot every ``interval_s`` unless paused; ``fresh`` is set on each answer or
    failure, so the main loop redraws at once."""

    def __init__(self, client: ClientConfig, interval_s: float, curve: ClientCurve | None) -> None:
        super().__init__(name="swarmx-top-fetch", daemon=True)
        self.client = client
        self.curve = curve
        self.interval_s = interval_s
        self.paused = threading.Event()
        self.stopped = threading.Event()
        self.fresh = threading.Event()
        self._lock = threading.Lock()
        self._reply: TopReply | None = None
        self._got_mono = 0.0
        self._error = ""

    def run(self) -> None:
        while not self.stopped.is_set():
            if not self.paused.is_set():
                try:
                    reply, error = fetch(self.client, LIVE_QUERY, self.curve), ""
                except TopError as exc:
                    reply, error = None, str(exc)
                with self._lock:
                    if reply is not None:
                        self._reply, self._got_mono = reply, time.monotonic()
                    self._error = error
                self.fresh.set()
            self.stopped.wait(self.interval_s)

    def screen(self) -> Screen:
        with self._lock:
            age = time.monotonic() - self._got_mono if self._reply is not None else 0.0
            return Screen(self.client.scheduler, self._reply, self._error, age)


@contextlib.contextmanager
def _terminal() -> Iterator[None]:
    """cbreak input (keys arrive one by one, Ctrl-C still interrupts) and SIGTERM as a clean
    exit, so the terminal is restored whatever ends the view."""
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)

    def on_term(_signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(0)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        tty.setcbreak(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        signal.signal(signal.SIGTERM, previous)


def _run(client: ClientConfig, interval_s: float, curve: ClientCurve | None) -> None:
    """Redraw on a new snapshot, a key, a resize, or every ``interval_s`` (ages move on)."""
    fetcher = _Fetcher(client, interval_s, curve)
    console = Console()
    view = View()
    frozen: Screen | None = None
    """The screen shown while paused."""
    drawn: tuple[View, tuple[int, int], float] | None = None
    try:
        with (
            _terminal(),
            Live(console=console, screen=True, auto_refresh=False, redirect_stderr=False) as live,
        ):
            fetcher.start()
            while True:
                size = (console.size.width, console.size.height)
                now = time.monotonic()
                if (
                    drawn is None
                    or fetcher.fresh.is_set()
                    or drawn[:2] != (view, size)
                    or now - drawn[2] >= interval_s
                ):
                    fetcher.fresh.clear()
                    screen = frozen or fetcher.screen()
                    view = clamp(screen, view, size[1])
                    live.update(render(screen, view, size[1]), refresh=True)
                    drawn = (view, size, now)
                ready, _, _ = select.select([sys.stdin], [], [], KEY_POLL_S)
                if not ready:
                    continue
                screen = frozen or fetcher.screen()
                for key in parse_keys(os.read(sys.stdin.fileno(), 1024)):
                    pressed = view.press(key, body_rows(screen, view, size[1]))
                    if pressed is None:
                        return
                    view = pressed
                if view.paused:
                    fetcher.paused.set()
                    frozen = frozen or screen
                else:
                    fetcher.paused.clear()
                    frozen = None
    except KeyboardInterrupt:
        pass
    finally:
        fetcher.stopped.set()
