"""Time as a dependency: daemons get the real clock, tests and the simulator a controlled one."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import sys
import time
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def time(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class RealClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


async def ticks(clock: Clock, interval_s: float) -> AsyncIterator[float]:
    """Yield once per interval, sleeping to a monotonic deadline so work time does not drift the
    period; after a stall, missed ticks are skipped rather than fired in a burst."""
    deadline = clock.monotonic()
    while True:
        now = clock.monotonic()
        if now < deadline:
            await clock.sleep(deadline - now)
            now = clock.monotonic()
        yield now
        deadline += interval_s
        if deadline <= now:
            deadline = now + interval_s


class ManualClock:
    """Virtual time for tests and simulations: it moves only when slept on or set. ``sleep``
    still yields to the event loop, as a real sleep would."""

    def __init__(self, now: float = 100.0, epoch: float = 1.7e9) -> None:
        self.now = now
        self.epoch = epoch

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.epoch + self.now

    async def sleep(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"negative sleep: {seconds}")
        self.now += seconds
        await asyncio.sleep(0)


class SteppedClock(ManualClock):
    """Virtual time that moves only when a test calls `advance`; unlike `ManualClock`, ``sleep``
    waits until then. A test can so hold code mid-sleep (a timeout not yet fired, a replica still
    starting) for as long as it likes, however slow the machine, and then fire it on purpose.
    Use it from the event loop's thread, and move time with `advance`, not by setting ``now``."""

    def __init__(self, now: float = 100.0, epoch: float = 1.7e9) -> None:
        super().__init__(now, epoch)
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        """A heap of (wake-up time, arrival order, the future the sleeper waits on)."""
        self._arrivals = itertools.count()

    @property
    def sleepers(self) -> int:
        """Sleeps in progress: a test waits for the one it means to end before advancing."""
        return sum(not future.done() for _, _, future in self._sleepers)

    async def sleep(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"negative sleep: {seconds}")
        if seconds == 0:
            await asyncio.sleep(0)
            return
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + seconds, next(self._arrivals), future))
        await future  # a cancelled sleeper cancels its future; `advance` skips it

    def wake_next(self) -> None:
        """Advance to the end of the earliest sleep in progress, if any: virtual time passes as
        fast as the code sleeping on it can go (for tests that only want it to pass)."""
        while self._sleepers and self._sleepers[0][2].done():
            heapq.heappop(self._sleepers)
        if self._sleepers:
            self.now = max(self.now, self._sleepers[0][0])
            self._wake()

    def advance(self, seconds: float) -> None:
        """Move time on by ``seconds`` and wake, in order, every sleep that has run its course
        (they resume once the caller next yields to the event loop)."""
        if seconds < 0:
            raise ValueError(f"time cannot go back: {seconds}")
        self.now += seconds
        self._wake()

    def _wake(self) -> None:
        while self._sleepers and self._sleepers[0][0] <= self.now:
            _, _, future = heapq.heappop(self._sleepers)
            if not future.done():
                future.set_result(None)


class _TimeLimit:
    """``asyncio.timeout`` for Python 3.10: past ``delay_s`` the task is cancelled and the block
    raises `TimeoutError` (without `Task.uncancel`, a cancel from outside that lands in the same
    instant reads as the timeout)."""

    def __init__(self, delay_s: float) -> None:
        self._delay_s = delay_s
        self._expired = False
        self._timer: asyncio.TimerHandle | None = None

    async def __aenter__(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._timer = asyncio.get_running_loop().call_later(self._delay_s, self._expire, task)

    def _expire(self, task: asyncio.Task[object]) -> None:
        self._expired = True
        task.cancel()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._expired and exc_type is asyncio.CancelledError:
            raise TimeoutError from exc


if sys.version_info >= (3, 11):
    time_limit = asyncio.timeout
else:
    time_limit = _TimeLimit
