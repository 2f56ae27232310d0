"""NVIDIA GPU readings through NVML, the only place `pynvml` is imported.

Modelled on nvitop's libnvml wrapper: a node without a driver or without GPUs is normal, so a
missing library makes the wrapper report zero GPUs (logged once) instead of failing, and a field a
device does not support becomes None without losing the rest of its sample. Not thread-safe: one
caller (the agent's telemetry loop) at a time.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeVar

import psutil

from swarmx.protocol import GpuInfo, GpuProcess, GpuSample

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class _Device:
    """A cached handle with the identity fields that never change while the driver is loaded."""

    index: int
    handle: Any
    name: str
    uuid: str


class NvmlGpus:
    """Inventory and per-second samples of the local GPUs; initialises NVML on first use.

    ``nvml`` is the NVML binding module (tests inject a fake); None imports `pynvml` lazily, so
    importing this module costs nothing on a node that never asks about GPUs.
    """

    def __init__(self, nvml: ModuleType | None = None) -> None:
        self._nvml = nvml
        self._ready: ModuleType | None = None
        """The binding once nvmlInit succeeded."""
        self._unavailable = False
        self._errors: tuple[type[BaseException], ...] = ()
        self._devices: dict[int, _Device] = {}
        self._warned: set[tuple[str, str]] = set()

    @property
    def available(self) -> bool:
        """Whether NVML could be initialised (tries now if nothing has asked yet)."""
        return self._init() is not None

    def inventory(self) -> list[GpuInfo]:
        nvml = self._init()
        if nvml is None:
            return []
        infos = []
        for device in self._scan(nvml):
            total = self._get(lambda m: int(m.total), nvml.nvmlDeviceGetMemoryInfo, device.handle)
            infos.append(GpuInfo(device.index, device.name, device.uuid, total or 0))
        return infos

    def sample(self) -> list[GpuSample]:
        nvml = self._init()
        if nvml is None:
            return []
        return [self._sample_one(nvml, device) for device in self._scan(nvml)]

    def close(self) -> None:
        """Shut NVML down; a later call initialises it again."""
        if self._ready is None:
            return
        with contextlib.suppress(*self._errors):
            self._ready.nvmlShutdown()
        self._ready = None
        self._devices.clear()

    # --- internals ----------------------------------------------------------------------------

    def _init(self) -> ModuleType | None:
        """The initialised binding, or None for good once NVML has proved unavailable."""
        if self._ready is not None or self._unavailable:
            return self._ready
        try:
            if self._nvml is None:
                import pynvml

                self._nvml = pynvml
            nvml = self._nvml
            nvml.nvmlInit()
        except ImportError as exc:
            self._give_up(exc)
            return None
        except (OSError, nvml.NVMLError) as exc:  # library not found, driver not loaded...
            self._give_up(exc)
            return None
        # NVMLLibraryMismatchError: unversioned calls (process lists) on a driver older than the
        # binding; per field it means "not supported here", like an NVMLError.
        mismatch = getattr(nvml, "NVMLLibraryMismatchError", None)
        self._errors = (nvml.NVMLError,) + ((mismatch,) if mismatch is not None else ())
        self._ready = nvml
        return nvml

    def _give_up(self, exc: BaseException) -> None:
        self._unavailable = True
        logger.info("NVML not available (%s: %s): reporting 0 GPUs", type(exc).__name__, exc)

    def _get(self, convert: Callable[[Any], T], fn: Callable[..., Any], *args: Any) -> T | None:
        """One NVML field: None when the device cannot report it (NotSupported, NoPermission...)."""
        try:
            return convert(fn(*args))
        except self._errors:
            return None

    def _warn_once(self, what: str, exc: BaseException) -> None:
        key = (what, type(exc).__name__)
        if key not in self._warned:
            self._warned.add(key)
            logger.warning("NVML %s failed (%s: %s): reporting the GPUs it can", what, key[1], exc)

    def _scan(self, nvml: ModuleType) -> list[_Device]:
        """Devices present now: the count is re-read so a lost GPU drops out, handles are cached."""
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except self._errors as exc:
            self._warn_once("device count", exc)
            return list(self._devices.values())
        devices = []
        for index in range(count):
            device = self._devices.get(index)
            if device is None:
                try:
                    handle = nvml.nvmlDeviceGetHandleByIndex(index)
                except self._errors as exc:
                    self._warn_once(f"handle lookup of GPU {index}", exc)
                    continue
                device = self._devices[index] = _Device(
                    index=index,
                    handle=handle,
                    name=self._get(_text, nvml.nvmlDeviceGetName, handle) or "",
                    uuid=self._get(_text, nvml.nvmlDeviceGetUUID, handle) or "",
                )
            devices.append(device)
        return devices

    def _sample_one(self, nvml: ModuleType, device: _Device) -> GpuSample:
        handle = device.handle
        util = self._get(
            lambda u: (float(u.gpu), float(u.memory)), nvml.nvmlDeviceGetUtilizationRates, handle
        )
        mem = self._get(lambda m: (int(m.used), int(m.total)), nvml.nvmlDeviceGetMemoryInfo, handle)
        return GpuSample(
            index=device.index,
            name=device.name,
            uuid=device.uuid,
            util_percent=util[0] if util is not None else None,
            mem_util_percent=util[1] if util is not None else None,
            mem_used_bytes=mem[0] if mem is not None else None,
            mem_total_bytes=mem[1] if mem is not None else None,
            power_w=self._get(_milli, nvml.nvmlDeviceGetPowerUsage, handle),
            power_limit_w=self._get(_milli, nvml.nvmlDeviceGetEnforcedPowerLimit, handle),
            temperature_c=self._get(
                float, nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU
            ),
            sm_clock_mhz=self._get(int, nvml.nvmlDeviceGetClockInfo, handle, nvml.NVML_CLOCK_SM),
            processes=self._processes(nvml, handle),
        )

    def _processes(self, nvml: ModuleType, handle: Any) -> list[GpuProcess]:
        """Compute and graphics processes, one entry per pid (a process can be both)."""
        used: dict[int, int | None] = {}
        for fn in (
            nvml.nvmlDeviceGetComputeRunningProcesses,
            nvml.nvmlDeviceGetGraphicsRunningProcesses,
        ):
            for proc in self._get(list, fn, handle) or []:
                pid = int(proc.pid)
                mem = proc.usedGpuMemory
                if used.get(pid) is None:
                    used[pid] = int(mem) if mem is not None else None
        return [GpuProcess(pid, _process_name(pid), mem) for pid, mem in used.items()]


def _text(value: str | bytes) -> str:
    """Older bindings return names and UUIDs as bytes."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _milli(value: int) -> float:
    return value / 1000


def _process_name(pid: int) -> str:
    """Best effort: the pid may have exited, or live in another PID namespace (containers)."""
    try:
        return str(psutil.Process(pid).name())
    except psutil.Error:
        return ""
