"""What every daemon shares: systemd notification, signal handling and the asyncio entry point.

Signals only set an event (the daemon then closes its sockets and exits 0); a second SIGTERM or
SIGINT while closing exits at once, as Nomad and dask do, so a wedged shutdown is never a trap.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable

from swarmx.clock import Clock, ticks

log = logging.getLogger(__name__)

EXIT_FORCED = 130


GIL_SWITCH_S = 0.0005
"""How long a thread may hold the GIL while another waits for it (Python's default: 5 ms)."""


def settle_heap() -> None:
    """Exempt every object alive now from the cyclic collector (`gc.freeze`). The imports,
    torch and a loaded predictor are long-lived: full collections that walked them held the
    scheduler's loop 100-200 ms every few seconds at 1,000 nodes and found nothing. Frozen
    objects are still freed when their last reference goes (only a cycle among them would
    outlive its use), so this is called when a long-lived set has just been built: at
    start-up and when a predictor goes live."""
    gc.freeze()


def share_the_gil() -> None:
    """Hand the GIL over sooner (`GIL_SWITCH_S`). Each torch op of a forecast releases the GIL;
    while the metrics thread renders a scrape, getting it back cost up to the default 5 ms per
    op, and one forecast on the loop took 80-150 ms at 1,000 nodes. Only while two threads
    want the GIL at once (a scrape) does the shorter interval cost anything."""
    sys.setswitchinterval(GIL_SWITCH_S)


class SystemdNotifier:
    """sd_notify(3) without libsystemd: datagrams to ``$NOTIFY_SOCKET``; a no-op outside systemd."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = env.get("NOTIFY_SOCKET", "")
        if self._address.startswith("@"):  # abstract namespace
            self._address = "\0" + self._address[1:]
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_interval_s: float | None = (
            int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 and mine else None
        )
        """Half of systemd's WatchdogSec, or None when no watchdog is armed for this process."""

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def notify(self, *fields: str) -> bool:
        if not self._address:
            return False
        try:  # never blocks: a full queue (systemd slow to read) drops this one, not the loop
            flags = socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
            with socket.socket(socket.AF_UNIX, flags) as sock:
                sock.sendto("\n".join(fields).encode(), self._address)
        except OSError as exc:
            log.warning("sd_notify to %r failed: %s", self._address, exc)
            return False
        return True

    def start_watchdog(self, clock: Clock) -> list[asyncio.Task[None]]:
        """The watchdog task (none when systemd armed no watchdog). It pings from the event loop
        itself, so a stalled loop is what systemd detects."""
        interval = self.watchdog_interval_s
        if interval is None:
            return []

        async def ping() -> None:
            async for _ in ticks(clock, interval):
                self.notify("WATCHDOG=1")

        return [asyncio.create_task(ping(), name="watchdog")]


def install_stop_signals(
    loop: asyncio.AbstractEventLoop,
    stop: asyncio.Event,
    on_hangup: Callable[[], None] | None = None,
) -> None:
    """SIGTERM and SIGINT stop the daemon (twice: at once); SIGHUP calls ``on_hangup`` (reload
    what can be reloaded) and never kills it."""

    def on_hup() -> None:
        if on_hangup is None:
            log.info("SIGHUP: nothing to reload")
            return
        log.info("SIGHUP: reloading")
        on_hangup()

    loop.add_signal_handler(signal.SIGHUP, on_hup)

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(EXIT_FORCED)
        log.info("%s: shutting down (send again to force)", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)


def run_daemon(
    main: Callable[[asyncio.Event], Awaitable[None]], on_hangup: Callable[[], None] | None = None
) -> None:
    """Run ``main(stop)`` on a fresh event loop with stop signals wired to ``stop``."""

    async def runner() -> None:
        stop = asyncio.Event()
        install_stop_signals(asyncio.get_running_loop(), stop, on_hangup)
        await main(stop)

    asyncio.run(runner())


STOP_TASKS_S = 5.0
"""How long a daemon's tasks have to end once cancelled at stop."""


async def run_until_stopped(
    stop: asyncio.Event,
    tasks: list[asyncio.Task[None]],
    on_stop: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Wait for a stop signal, then run ``on_stop`` (a graceful leave) while the tasks still
    run, then cancel them; a task that dies takes the daemon down loudly, not silently."""
    stopper = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not stopper:
                task.result()  # re-raise its exception
                raise RuntimeError(f"task {task.get_name()} ended unexpectedly")
        if on_stop is not None:
            await on_stop()
    finally:
        for task in [stopper, *tasks]:
            task.cancel()
        _, stuck = await asyncio.wait([stopper, *tasks], timeout=STOP_TASKS_S)
        for task in stuck:  # a task that will not end must not keep the daemon from stopping
            log.error(
                "task %s did not end %g s after it was cancelled", task.get_name(), STOP_TASKS_S
            )
        await asyncio.gather(*(t for t in [stopper, *tasks] if t.done()), return_exceptions=True)


class LoopGap:
    """How long the event loop went without running its callbacks: a probe wakes every
    ``interval_s`` and records how late it woke. The longest gap of each second is kept for
    ``window_s``, so the figure is the worst stall of the recent past, not since start."""

    def __init__(self, clock: Clock, interval_s: float = 0.02, window_s: float = 10.0) -> None:
        self.clock = clock
        self.interval_s = interval_s
        self._window = int(window_s)
        self._worst: collections.deque[tuple[int, float]] = collections.deque()
        """(second, its longest gap), oldest first."""

    def record(self, gap_s: float) -> None:
        second = int(self.clock.monotonic())
        if self._worst and self._worst[-1][0] == second:
            if gap_s > self._worst[-1][1]:
                self._worst[-1] = (second, gap_s)
        else:
            self._worst.append((second, gap_s))
        while self._worst and self._worst[0][0] <= second - self._window:
            self._worst.popleft()

    def max_s(self) -> float:
        horizon = int(self.clock.monotonic()) - self._window
        return max((gap for second, gap in self._worst if second > horizon), default=0.0)

    async def run(self) -> None:
        while True:
            due = self.clock.monotonic() + self.interval_s
            await self.clock.sleep(self.interval_s)
            self.record(max(0.0, self.clock.monotonic() - due))
