"""GPU telemetry: the real CPU path (no driver here), a simulated NVML, and a real GPU when present."""

from __future__ import annotations

import logging
import sys
import types
from collections import namedtuple

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tokenmill.common import telemetry
from tokenmill.common.telemetry import GpuCollector, GpuStat, NvmlSampler, gpu_stats, register_gpu_collector

_real_nvml = NvmlSampler()
HAVE_GPU = bool(_real_nvml.sample())


def _metrics(registry: CollectorRegistry) -> dict[str, list]:
    text = generate_latest(registry).decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


# --- real path on this (GPU-less) machine -------------------------------------------------------------


@pytest.mark.skipif(HAVE_GPU, reason="this host has a working NVML; the no-driver path cannot be observed")
def test_no_driver_gives_empty_list_and_logs_once(caplog):
    sampler = NvmlSampler()
    with caplog.at_level(logging.INFO, logger="tokenmill.common.telemetry"):
        assert sampler.sample() == []
        assert sampler.sample() == []
        assert not sampler.available
    disabled = [r for r in caplog.records if "GPU telemetry disabled" in r.getMessage()]
    assert len(disabled) == 1
    assert "NVML" in sampler.unavailable_reason
    assert gpu_stats() == []  # the module-level entry point degrades the same way


def test_missing_binding_module_degrades(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    sampler = NvmlSampler()
    with caplog.at_level(logging.INFO, logger="tokenmill.common.telemetry"):
        assert sampler.sample() == []
    assert "ImportError" in sampler.unavailable_reason or "ModuleNotFoundError" in sampler.unavailable_reason


@pytest.mark.skipif(HAVE_GPU, reason="this host has GPUs")
def test_collector_on_cpu_host_exports_zero_gpus():
    registry = CollectorRegistry()
    assert register_gpu_collector(registry, NvmlSampler()) is not None
    assert register_gpu_collector(registry, NvmlSampler()) is None  # idempotent per registry
    metrics = _metrics(registry)
    assert metrics["tokenmill:gpu_count"][0].value == 0.0
    assert metrics["tokenmill:gpu_power_watts"] == []


# --- simulated NVML ------------------------------------------------------------------------------------

Memory = namedtuple("Memory", "total free used")
Util = namedtuple("Util", "gpu memory")


def _fake_nvml(gpus: list[dict], *, init_error: bool = False) -> types.ModuleType:
    """A stand-in for nvidia-ml-py's `pynvml` with its real names, error classes and units (mW, bytes)."""
    nvml = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    class NVMLError_NotSupported(NVMLError):  # noqa: N801 - pynvml's own spelling
        pass

    class NVMLError_GpuIsLost(NVMLError):  # noqa: N801
        pass

    class NVMLError_DriverNotLoaded(NVMLError):  # noqa: N801
        pass

    nvml.NVMLError = NVMLError
    nvml.NVMLError_NotSupported = NVMLError_NotSupported
    nvml.NVMLError_GpuIsLost = NVMLError_GpuIsLost
    nvml.NVMLError_DriverNotLoaded = NVMLError_DriverNotLoaded
    nvml.NVML_TEMPERATURE_GPU = 0
    nvml.calls = {"init": 0, "shutdown": 0}

    def init():
        nvml.calls["init"] += 1
        if init_error:
            raise NVMLError_DriverNotLoaded("Driver Not Loaded")

    def shutdown():
        nvml.calls["shutdown"] += 1

    def field(handle, key):
        value = gpus[handle][key]
        if isinstance(value, type) and issubclass(value, Exception):
            raise value(key)
        return value

    def handle_by_index(index):
        if gpus[index].get("lost"):
            raise NVMLError_GpuIsLost("GPU is lost")
        return index

    def temperature(handle, sensor):
        assert sensor == nvml.NVML_TEMPERATURE_GPU
        return field(handle, "temp")

    nvml.nvmlInit = init
    nvml.nvmlShutdown = shutdown
    nvml.nvmlDeviceGetCount = lambda: len(gpus)
    nvml.nvmlDeviceGetHandleByIndex = handle_by_index
    nvml.nvmlDeviceGetName = lambda h: field(h, "name")
    nvml.nvmlDeviceGetUUID = lambda h: field(h, "uuid")
    nvml.nvmlDeviceGetUtilizationRates = lambda h: Util(field(h, "util"), 10)
    nvml.nvmlDeviceGetMemoryInfo = lambda h: Memory(field(h, "total"), 0, field(h, "used"))
    nvml.nvmlDeviceGetTemperature = temperature
    nvml.nvmlDeviceGetPowerUsage = lambda h: field(h, "power_mw")
    nvml.nvmlDeviceGetEnforcedPowerLimit = lambda h: field(h, "limit_mw")
    return nvml


H100 = {
    "name": "NVIDIA H100 80GB HBM3",
    "uuid": "GPU-aaaa",
    "util": 87,
    "total": 85_520_809_984,
    "used": 42_760_404_992,
    "temp": 61,
    "power_mw": 512_345,
    "limit_mw": 700_000,
}


def test_sampler_reads_every_field_simulated_gpu():
    old_board = dict(H100, name=b"Tesla T4", uuid=b"GPU-bbbb", power_mw=None, limit_mw=None)
    nvml = _fake_nvml([H100, old_board])
    nvml.nvmlDeviceGetPowerUsage = lambda h: (
        H100["power_mw"] if h == 0 else (_ for _ in ()).throw(nvml.NVMLError_NotSupported("Not Supported"))
    )
    nvml.nvmlDeviceGetEnforcedPowerLimit = lambda h: (
        H100["limit_mw"] if h == 0 else (_ for _ in ()).throw(nvml.NVMLError_NotSupported("Not Supported"))
    )
    sampler = NvmlSampler(nvml)
    first, second = sampler.sample()
    assert first == GpuStat(
        index=0,
        name="NVIDIA H100 80GB HBM3",
        uuid="GPU-aaaa",
        utilization_percent=87.0,
        memory_used_bytes=42_760_404_992,
        memory_total_bytes=85_520_809_984,
        temperature_celsius=61.0,
        power_watts=512.345,
        power_limit_watts=700.0,
    )
    assert first.memory_used_fraction == pytest.approx(0.5)
    # bytes names (old bindings) are decoded; unsupported power is None, not an error
    assert (second.name, second.uuid, second.power_watts, second.power_limit_watts) == (
        "Tesla T4",
        "GPU-bbbb",
        None,
        None,
    )
    sampler.sample()
    assert nvml.calls["init"] == 1  # initialised once, not per sample
    sampler.shutdown()
    assert nvml.calls["shutdown"] == 1


def test_lost_gpu_is_skipped_others_reported_simulated_gpu(caplog):
    nvml = _fake_nvml([dict(H100, lost=True), dict(H100, uuid="GPU-cccc")])
    with caplog.at_level(logging.WARNING, logger="tokenmill.common.telemetry"):
        stats = NvmlSampler(nvml).sample()
    assert [(s.index, s.uuid) for s in stats] == [(1, "GPU-cccc")]
    assert any("GPU 0" in r.getMessage() for r in caplog.records)


def test_lost_gpu_during_field_read_skips_device_simulated_gpu():
    nvml = _fake_nvml([H100])
    nvml.nvmlDeviceGetTemperature = lambda h, s: (_ for _ in ()).throw(nvml.NVMLError_GpuIsLost("lost"))
    assert NvmlSampler(nvml).sample() == []


def test_driver_not_loaded_degrades_once_simulated_gpu(caplog):
    nvml = _fake_nvml([H100], init_error=True)
    sampler = NvmlSampler(nvml)
    with caplog.at_level(logging.INFO, logger="tokenmill.common.telemetry"):
        assert sampler.sample() == [] and sampler.sample() == []
    assert nvml.calls["init"] == 1
    assert "NVMLError_DriverNotLoaded" in sampler.unavailable_reason
    assert len([r for r in caplog.records if "disabled" in r.getMessage()]) == 1


def test_default_entry_point_uses_pynvml_module_simulated_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml([H100, H100]))
    monkeypatch.setattr(telemetry, "_default_sampler", None)
    stats = gpu_stats()
    assert [s.index for s in stats] == [0, 1]
    assert telemetry.default_sampler() is telemetry.default_sampler()


def test_collector_exports_gauges_simulated_gpu():
    no_temp = dict(H100, uuid="GPU-dddd", util=3)
    nvml = _fake_nvml([H100, no_temp])
    nvml.nvmlDeviceGetTemperature = lambda h, s: (
        61 if h == 0 else (_ for _ in ()).throw(nvml.NVMLError_NotSupported("Not Supported"))
    )
    registry = CollectorRegistry()
    registry.register(GpuCollector(NvmlSampler(nvml)))
    metrics = _metrics(registry)
    assert metrics["tokenmill:gpu_count"][0].value == 2.0
    util = {s.labels["uuid"]: s.value for s in metrics["tokenmill:gpu_utilization_percent"]}
    assert util == {"GPU-aaaa": 87.0, "GPU-dddd": 3.0}
    (power,) = [s for s in metrics["tokenmill:gpu_power_watts"] if s.labels["gpu"] == "0"]
    assert power.value == pytest.approx(512.345)
    assert power.labels["name"] == "NVIDIA H100 80GB HBM3"
    temps = metrics["tokenmill:gpu_temperature_celsius"]
    assert [(s.labels["gpu"], s.value) for s in temps] == [("0", 61.0)]  # unsupported -> no sample
    assert metrics["tokenmill:gpu_memory_total_bytes"][0].value == float(H100["total"])
    # scrape-time sampling: a changed reading shows up on the next scrape
    H100_hot = dict(H100, util=12)
    nvml2 = _fake_nvml([H100_hot])
    registry2 = CollectorRegistry()
    sampler = NvmlSampler(nvml2)
    registry2.register(GpuCollector(sampler))
    assert _metrics(registry2)["tokenmill:gpu_utilization_percent"][0].value == 12.0
    H100_hot["util"] = 99
    assert _metrics(registry2)["tokenmill:gpu_utilization_percent"][0].value == 99.0


# --- a real GPU (runs only where NVML works, e.g. on the GPU machine) ----------------------------------


@pytest.mark.skipif(not HAVE_GPU, reason="no NVIDIA GPU/driver on this host")
def test_real_gpu_readings_are_plausible():
    stats = gpu_stats()
    assert stats
    for stat in stats:
        assert stat.name and stat.uuid.startswith(("GPU-", "MIG-"))
        assert stat.memory_total_bytes and stat.memory_total_bytes > 1 << 30
        assert 0 <= (stat.memory_used_bytes or 0) <= stat.memory_total_bytes
        assert stat.utilization_percent is None or 0.0 <= stat.utilization_percent <= 100.0
        assert stat.temperature_celsius is None or 5.0 < stat.temperature_celsius < 110.0
        assert stat.power_watts is None or 1.0 < stat.power_watts < 1500.0
    registry = CollectorRegistry()
    register_gpu_collector(registry)
    assert _metrics(registry)["tokenmill:gpu_count"][0].value == float(len(stats))
