"""Time as a dependency: daemons get the real clock, tests and the simulator a controlled one."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
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
