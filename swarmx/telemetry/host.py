"""Host CPU, memory, disk and network readings as a `HostSample`.

Runs every second on every node, so it reads only system-wide totals (no process iteration, no
per-disk or per-NIC breakdown). Disk and network are reported as rates over the time since the
previous sample, measured on an injectable monotonic clock so tests control time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil

from swarmx.protocol import HostSample


@dataclass(frozen=True)
class HostInfo:
    """What does not change while the node runs; sent once in the registration message."""

    cpu_cores_logical: int
    cpu_cores_physical: int | None
    mem_total_bytes: int


@dataclass(frozen=True)
class _Counters:
    """Cumulative I/O byte counters; None where psutil cannot read them (some containers)."""

    ts: float
    disk_read: int | None
    disk_write: int | None
    net_recv: int | None
    net_sent: int | None


class HostCollector:
    """Samples the host; keeps the previous counters to turn them into rates."""

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._monotonic = monotonic
        # psutil measures CPU use since its previous call: prime it so the first sample means
        # "since construction" rather than "since boot".
        psutil.cpu_percent(interval=None, percpu=True)
        self._previous: _Counters | None = None

    @staticmethod
    def static_info() -> HostInfo:
        return HostInfo(
            cpu_cores_logical=psutil.cpu_count() or 1,
            cpu_cores_physical=psutil.cpu_count(logical=False),
            mem_total_bytes=psutil.virtual_memory().total,
        )

    def sample(self) -> HostSample:
        per_core = [float(p) for p in psutil.cpu_percent(interval=None, percpu=True)]
        load_1m, load_5m, load_15m = psutil.getloadavg()
        mem = psutil.virtual_memory()
        swap = psutil.swap_memory()
        current = self._read_counters()
        previous, self._previous = self._previous, current
        return HostSample(
            cpu_percent=sum(per_core) / len(per_core) if per_core else 0.0,
            cpu_percent_per_core=per_core,
            load_1m=load_1m,
            load_5m=load_5m,
            load_15m=load_15m,
            mem_total_bytes=mem.total,
            mem_used_bytes=mem.total - mem.available,
            mem_available_bytes=mem.available,
            swap_total_bytes=swap.total,
            swap_used_bytes=swap.used,
            disk_read_bytes_per_s=_rate(previous, current, lambda c: c.disk_read),
            disk_write_bytes_per_s=_rate(previous, current, lambda c: c.disk_write),
            net_recv_bytes_per_s=_rate(previous, current, lambda c: c.net_recv),
            net_sent_bytes_per_s=_rate(previous, current, lambda c: c.net_sent),
        )

    def _read_counters(self) -> _Counters:
        ts = self._monotonic()
        # Either may be None (no disks / NICs visible) or fail to parse /proc in odd containers.
        try:
            disk = psutil.disk_io_counters()
        except (OSError, ValueError):
            disk = None
        try:
            net = psutil.net_io_counters()
        except (OSError, ValueError):
            net = None
        return _Counters(
            ts=ts,
            disk_read=disk.read_bytes if disk is not None else None,
            disk_write=disk.write_bytes if disk is not None else None,
            net_recv=net.bytes_recv if net is not None else None,
            net_sent=net.bytes_sent if net is not None else None,
        )


def _rate(
    previous: _Counters | None, current: _Counters, field: Callable[[_Counters], int | None]
) -> float:
    """Bytes/s between two readings; 0.0 when it cannot be known (first sample, missing counter,
    counter reset), since a made-up negative or huge rate would mislead the scheduler."""
    if previous is None:
        return 0.0
    before, after = field(previous), field(current)
    elapsed = current.ts - previous.ts
    if before is None or after is None or after < before or elapsed <= 0:
        return 0.0
    return (after - before) / elapsed
