"""NvmlGpus against a fake NVML module (no GPU here), plus the real binding's no-GPU path."""

from __future__ import annotations

import logging
import os
import sys
from types import ModuleType, SimpleNamespace
from typing import Any

import psutil
import pytest

from swarmx.protocol import GpuInfo, GpuProcess
from swarmx.telemetry.gpu import NvmlGpus

GIB = 1024**3
GONE_PID = 2**30  # above Linux's pid_max, so never a live process


class NVMLError(Exception):
    pass


class NVMLError_NotSupported(NVMLError):  # pynvml names its error classes this way
    pass


class NVMLError_LibraryNotFound(NVMLError):
    pass


class NVMLError_GpuIsLost(NVMLError):
    pass


class NVMLLibraryMismatchError(Exception):
    """pynvml's, raised by unversioned calls the driver lacks; not an NVMLError."""


class FakeGpu:
    def __init__(self, name: str | bytes, uuid: str | bytes, total: int) -> None:
        self.name = name
        self.uuid = uuid
        self.fields: dict[str, Any] = {
            "util": SimpleNamespace(gpu=37, memory=12),
            "mem": SimpleNamespace(used=3 * GIB, total=total, free=total - 3 * GIB),
            "power": 215_500,
            "limit": 700_000,
            "temp": 61,
            "clock": 1980,
            "compute": [],
            "graphics": [],
        }


class FakeNvml(ModuleType):
    """The slice of pynvml that NvmlGpus uses; a field set to an exception class raises it."""

    NVMLError = NVMLError
    NVMLLibraryMismatchError = NVMLLibraryMismatchError
    NVML_TEMPERATURE_GPU = 0
    NVML_CLOCK_SM = 1

    def __init__(self, gpus: list[FakeGpu], init_error: BaseException | None = None) -> None:
        super().__init__("fake_pynvml")
        self.gpus = gpus
        self.init_error = init_error
        self.count_error: NVMLError | None = None
        self.handle_errors: dict[int, NVMLError] = {}
        self.calls: list[str] = []

    def _field(self, gpu: FakeGpu, key: str) -> Any:
        value = gpu.fields[key]
        if isinstance(value, type) and issubclass(value, Exception):
            raise value()
        return value

    def nvmlInit(self) -> None:
        self.calls.append("init")
        if self.init_error is not None:
            raise self.init_error

    def nvmlShutdown(self) -> None:
        self.calls.append("shutdown")

    def nvmlDeviceGetCount(self) -> int:
        if self.count_error is not None:
            raise self.count_error
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        self.calls.append(f"handle {index}")
        if index in self.handle_errors:
            raise self.handle_errors[index]
        return self.gpus[index]

    def nvmlDeviceGetName(self, gpu: FakeGpu) -> str | bytes:
        return gpu.name

    def nvmlDeviceGetUUID(self, gpu: FakeGpu) -> str | bytes:
        return gpu.uuid

    def nvmlDeviceGetUtilizationRates(self, gpu: FakeGpu) -> Any:
        return self._field(gpu, "util")

    def nvmlDeviceGetMemoryInfo(self, gpu: FakeGpu) -> Any:
        return self._field(gpu, "mem")

    def nvmlDeviceGetPowerUsage(self, gpu: FakeGpu) -> Any:
        return self._field(gpu, "power")

    def nvmlDeviceGetEnforcedPowerLimit(self, gpu: FakeGpu) -> Any:
        return self._field(gpu, "limit")

    def nvmlDeviceGetTemperature(self, gpu: FakeGpu, sensor: int) -> Any:
        assert sensor == self.NVML_TEMPERATURE_GPU
        return self._field(gpu, "temp")

    def nvmlDeviceGetClockInfo(self, gpu: FakeGpu, clock: int) -> Any:
        assert clock == self.NVML_CLOCK_SM
        return self._field(gpu, "clock")

    def nvmlDeviceGetComputeRunningProcesses(self, gpu: FakeGpu) -> Any:
        return self._field(gpu, "compute")

    def nvmlDeviceGetGraphicsRunningProcesses(self, gpu: FakeGpu) -> Any:
        return self._field(gpu, "graphics")


def two_gpus() -> FakeNvml:
    return FakeNvml(
        [
            FakeGpu("NVIDIA H100 80GB HBM3", "GPU-aaaa", 80 * GIB),
            FakeGpu(b"NVIDIA L4", b"GPU-bbbb", 24 * GIB),
        ]
    )


def proc(pid: int, used: int | None) -> SimpleNamespace:
    return SimpleNamespace(pid=pid, usedGpuMemory=used)


def test_two_gpus_sampled_with_units_converted() -> None:
    gpus = NvmlGpus(two_gpus())
    samples = gpus.sample()
    assert gpus.available
    assert [(s.index, s.name, s.uuid) for s in samples] == [
        (0, "NVIDIA H100 80GB HBM3", "GPU-aaaa"),
        (1, "NVIDIA L4", "GPU-bbbb"),  # bytes from older bindings decoded
    ]
    first = samples[0]
    assert first.util_percent == 37.0
    assert first.mem_util_percent == 12.0
    assert first.mem_used_bytes == 3 * GIB
    assert first.mem_total_bytes == 80 * GIB
    assert first.power_w == 215.5
    assert first.power_limit_w == 700.0
    assert first.temperature_c == 61.0
    assert first.sm_clock_mhz == 1980
    assert first.processes == []
    assert samples[1].mem_total_bytes == 24 * GIB


def test_inventory() -> None:
    assert NvmlGpus(two_gpus()).inventory() == [
        GpuInfo(0, "NVIDIA H100 80GB HBM3", "GPU-aaaa", 80 * GIB),
        GpuInfo(1, "NVIDIA L4", "GPU-bbbb", 24 * GIB),
    ]


def test_unsupported_field_is_none_and_the_rest_is_kept() -> None:
    nvml = two_gpus()
    nvml.gpus[1].fields.update(power=NVMLError_NotSupported, util=NVMLError_NotSupported)
    sample = NvmlGpus(nvml).sample()[1]
    assert sample.power_w is None
    assert sample.util_percent is None
    assert sample.mem_util_percent is None
    assert sample.power_limit_w == 700.0
    assert sample.temperature_c == 61.0
    assert sample.mem_used_bytes == 3 * GIB


def test_processes_deduplicated_with_unknown_memory() -> None:
    nvml = two_gpus()
    nvml.gpus[0].fields.update(
        compute=[proc(os.getpid(), None), proc(GONE_PID, 2 * GIB)],
        graphics=[proc(os.getpid(), GIB), proc(GONE_PID, 5)],
    )
    nvml.gpus[1].fields.update(compute=[proc(GONE_PID, None)], graphics=NVMLError_NotSupported)
    first, second = NvmlGpus(nvml).sample()
    me = psutil.Process(os.getpid()).name()
    assert first.processes == [GpuProcess(os.getpid(), me, GIB), GpuProcess(GONE_PID, "", 2 * GIB)]
    assert second.processes == [GpuProcess(GONE_PID, "", None)]


def test_process_calls_missing_from_an_old_driver_give_no_processes() -> None:
    nvml = two_gpus()
    nvml.gpus[0].fields.update(compute=NVMLLibraryMismatchError, graphics=[proc(GONE_PID, GIB)])
    sample = NvmlGpus(nvml).sample()[0]
    assert sample.processes == [GpuProcess(GONE_PID, "", GIB)]
    assert sample.power_w == 215.5


def test_handles_are_cached() -> None:
    nvml = two_gpus()
    gpus = NvmlGpus(nvml)
    gpus.inventory()
    gpus.sample()
    gpus.sample()
    assert nvml.calls == ["init", "handle 0", "handle 1"]


@pytest.mark.parametrize(
    "error", [NVMLError_LibraryNotFound(), OSError("libnvidia-ml.so.1: cannot open")]
)
def test_init_failure_is_unavailable_and_logged_once(
    error: BaseException, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="swarmx.telemetry.gpu")
    nvml = FakeNvml([], init_error=error)
    gpus = NvmlGpus(nvml)
    assert gpus.sample() == []
    assert gpus.inventory() == []
    assert gpus.sample() == []
    assert gpus.available is False
    gpus.close()
    assert nvml.calls == ["init"]
    assert len(caplog.records) == 1
    record = caplog.records[0]
    assert record.levelno == logging.INFO
    assert "NVML not available" in record.getMessage()
    assert "reporting 0 GPUs" in record.getMessage()


def test_missing_binding_is_unavailable(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="swarmx.telemetry.gpu")
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    gpus = NvmlGpus()
    assert gpus.sample() == []
    assert gpus.available is False
    assert [r.levelno for r in caplog.records] == [logging.INFO]


def test_lost_gpu_warns_once_per_failure_and_reports_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    nvml = two_gpus()
    nvml.handle_errors[1] = NVMLError_GpuIsLost()
    gpus = NvmlGpus(nvml)
    assert [s.index for s in gpus.sample()] == [0]
    assert [s.index for s in gpus.sample()] == [0]
    nvml.count_error = NVMLError_GpuIsLost()
    assert [s.index for s in gpus.sample()] == [0]  # the handles it already had
    assert [s.index for s in gpus.sample()] == [0]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "handle lookup of GPU 1" in warnings[0]
    assert "device count" in warnings[1]


def test_close_shuts_down_and_a_later_call_reinitialises() -> None:
    nvml = two_gpus()
    gpus = NvmlGpus(nvml)
    gpus.close()  # never initialised: nothing to shut down
    gpus.sample()
    gpus.close()
    assert len(gpus.sample()) == 2
    assert nvml.calls == [
        "init",
        "handle 0",
        "handle 1",
        "shutdown",
        "init",
        "handle 0",
        "handle 1",
    ]


def test_real_binding(caplog: pytest.LogCaptureFixture) -> None:
    """Against the installed pynvml: on a GPU-less machine it reports nothing; with a driver, the
    inventory and the sample agree."""
    caplog.set_level(logging.INFO, logger="swarmx.telemetry.gpu")
    gpus = NvmlGpus()
    try:
        samples = gpus.sample()
        if not gpus.available:
            assert samples == []
            assert gpus.inventory() == []
            assert len(caplog.records) == 1
            return
        inventory = gpus.inventory()
        assert [(g.index, g.uuid) for g in inventory] == [(s.index, s.uuid) for s in samples]
        for sample in samples:
            assert sample.name
            assert sample.mem_total_bytes is None or sample.mem_total_bytes > 0
            assert sample.util_percent is None or 0.0 <= sample.util_percent <= 100.0
    finally:
        gpus.close()
