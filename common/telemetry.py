"""GPU telemetry from NVML (nvidia-ml-py), as plain data and as Prometheus gauges.

Why NVML and not torch.cuda: NVML reads the driver's counters without creating a CUDA context, so a
service can report GPU state (including GPUs it does not use) without allocating device memory, and the
same numbers match what `nvidia-smi` and the DCGM exporter show.

Every entry point degrades to "no GPUs" instead of raising: a CPU box, a container without the driver
mounted, or a missing `pynvml` module gives an empty list (logged once), because telemetry must never
take a service down. A single unsupported field (e.g. power on some boards) becomes `None`; a GPU that
fails entirely (fell off the bus) is skipped and logged, the others are still reported.
"""

from __future__ import annotations

import atexit
import logging
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeVar

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector, CollectorRegistry

log = logging.getLogger(__name__)

_T = TypeVar("_T")

METRIC_PREFIX = "tokenmill:gpu_"


@dataclass(frozen=True)
class GpuStat:
    """One GPU at one instant. Units are SI-ish and explicit in the names; None = not supported."""

    index: int
    name: str
    uuid: str
    utilization_percent: float | None  # share of the last sample period a kernel was running (0-100)
    memory_used_bytes: int | None
    memory_total_bytes: int | None
    temperature_celsius: float | None
    power_watts: float | None  # NVML reports mW; a 1 s average on Ampere and newer
    power_limit_watts: float | None

    @property
    def memory_used_fraction(self) -> float | None:
        if self.memory_used_bytes is None or not self.memory_total_bytes:
            return None
        return self.memory_used_bytes / self.memory_total_bytes


class NvmlSampler:
    """Reads GPU state through an NVML binding; initialises lazily, once, and never raises.

    `nvml` is the binding module (`pynvml` from nvidia-ml-py by default); tests pass a fake one.
    """

    def __init__(self, nvml: ModuleType | None = None) -> None:
        self._nvml = nvml
        self._lock = threading.Lock()
        self._state: str = "new"  # new -> ready | unavailable
        self._reason = ""

    @property
    def available(self) -> bool:
        """True when NVML initialised; triggers the (one-time) initialisation."""
        with self._lock:
            return self._ensure_init()

    @property
    def unavailable_reason(self) -> str:
        return self._reason

    def sample(self) -> list[GpuStat]:
        """The current state of every GPU NVML can see; [] without a usable driver."""
        with self._lock:
            if not self._ensure_init():
                return []
            nvml = self._nvml
            assert nvml is not None
            try:
                count = int(nvml.nvmlDeviceGetCount())
            except nvml.NVMLError as exc:
                log.warning("NVML device count failed (%s); reporting no GPUs this time", exc)
                return []
            stats = []
            for index in range(count):
                try:
                    stats.append(self._read_device(nvml, index))
                except nvml.NVMLError as exc:
                    log.warning("NVML read of GPU %d failed (%s); skipping it in this sample", index, exc)
            return stats

    def shutdown(self) -> None:
        with self._lock:
            if self._state == "ready" and self._nvml is not None:
                try:
                    self._nvml.nvmlShutdown()
                except Exception as exc:  # shutdown at interpreter exit must not raise
                    log.debug("nvmlShutdown failed: %s", exc)
            self._state = "new"

    def _ensure_init(self) -> bool:
        if self._state == "ready":
            return True
        if self._state == "unavailable":
            return False
        try:
            if self._nvml is None:
                import pynvml  # nvidia-ml-py

                self._nvml = pynvml
            self._nvml.nvmlInit()
        except Exception as exc:  # ImportError, NVMLError_LibraryNotFound/DriverNotLoaded, OSError
            self._state = "unavailable"
            self._reason = f"{type(exc).__name__}: {exc}"
            log.info("GPU telemetry disabled: NVML unavailable (%s); reporting no GPUs", self._reason)
            return False
        self._state = "ready"
        log.debug("NVML initialised")
        return True

    @staticmethod
    def _read_device(nvml: Any, index: int) -> GpuStat:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)

        def optional(read: Callable[[], _T]) -> _T | None:
            # Only "not supported"-style errors degrade to None; a lost GPU propagates and skips the device.
            try:
                return read()
            except nvml.NVMLError as exc:
                if _is_lost(nvml, exc):
                    raise
                return None

        utilization = optional(lambda: float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu))
        memory = optional(lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
        temperature = optional(
            lambda: float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
        )
        power_mw = optional(lambda: float(nvml.nvmlDeviceGetPowerUsage(handle)))
        limit_mw = optional(lambda: float(nvml.nvmlDeviceGetEnforcedPowerLimit(handle)))
        return GpuStat(
            index=index,
            name=_text(nvml.nvmlDeviceGetName(handle)),
            uuid=_text(optional(lambda: nvml.nvmlDeviceGetUUID(handle)) or ""),
            utilization_percent=utilization,
            memory_used_bytes=None if memory is None else int(memory.used),
            memory_total_bytes=None if memory is None else int(memory.total),
            temperature_celsius=temperature,
            power_watts=None if power_mw is None else power_mw / 1000.0,
            power_limit_watts=None if limit_mw is None else limit_mw / 1000.0,
        )


def _is_lost(nvml: Any, exc: Exception) -> bool:
    lost = tuple(
        cls
        for cls in (
            getattr(nvml, "NVMLError_GpuIsLost", None),
            getattr(nvml, "NVMLError_Uninitialized", None),
        )
        if isinstance(cls, type)
    )
    return bool(lost) and isinstance(exc, lost)


def _text(value: str | bytes) -> str:
    # nvidia-ml-py < 11.515 returned bytes.
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


_default_sampler: NvmlSampler | None = None
_default_lock = threading.Lock()


def default_sampler() -> NvmlSampler:
    """The process-wide sampler (one nvmlInit per process, nvmlShutdown at exit)."""
    global _default_sampler
    with _default_lock:
        if _default_sampler is None:
            _default_sampler = NvmlSampler()
            atexit.register(_default_sampler.shutdown)
        return _default_sampler


def gpu_stats() -> list[GpuStat]:
    """State of every visible GPU; [] (never an exception) without a GPU, driver or nvidia-ml-py."""
    return default_sampler().sample()


class GpuCollector(Collector):
    """Prometheus collector: samples NVML at scrape time, so the gauges are never stale.

    Labels: `gpu` (NVML index), `name`, `uuid` (joins with the DCGM exporter's UUID label).
    `tokenmill:gpu_count` is always exported (0 on CPU hosts) so dashboards can tell "no GPU" from
    "exporter down".
    """

    def __init__(self, sampler: NvmlSampler | None = None) -> None:
        self._sampler = sampler

    def describe(self) -> list[GaugeMetricFamily]:
        # Registration-time description without touching NVML (keeps `register` cheap and side-effect free).
        return [family for family, _ in self._families()]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        stats = (self._sampler or default_sampler()).sample()
        families = self._families()
        count = GaugeMetricFamily(f"{METRIC_PREFIX}count", "Number of GPUs visible to NVML on this host.")
        count.add_metric([], float(len(stats)))
        yield count
        for family, field in families:
            for stat in stats:
                value = getattr(stat, field)
                if value is not None:
                    family.add_metric([str(stat.index), stat.name, stat.uuid], float(value))
            yield family

    @staticmethod
    def _families() -> list[tuple[GaugeMetricFamily, str]]:
        labels = ["gpu", "name", "uuid"]
        spec = [
            (
                "utilization_percent",
                "GPU busy time in the last sample period (NVML), percent.",
                "utilization_percent",
            ),
            ("memory_used_bytes", "GPU framebuffer memory in use, bytes.", "memory_used_bytes"),
            ("memory_total_bytes", "GPU framebuffer memory installed, bytes.", "memory_total_bytes"),
            ("temperature_celsius", "GPU core temperature, degrees Celsius.", "temperature_celsius"),
            ("power_watts", "GPU board power draw, watts.", "power_watts"),
            ("power_limit_watts", "Enforced GPU power limit, watts.", "power_limit_watts"),
        ]
        return [
            (GaugeMetricFamily(f"{METRIC_PREFIX}{name}", doc, labels=labels), field)
            for name, doc, field in spec
        ]


_registered: weakref.WeakSet[CollectorRegistry] = weakref.WeakSet()


def register_gpu_collector(
    registry: CollectorRegistry = REGISTRY, sampler: NvmlSampler | None = None
) -> GpuCollector | None:
    """Adds the GPU gauges to `registry` once (idempotent per registry); returns the collector if added."""
    with _default_lock:
        if registry in _registered:
            return None
        collector = GpuCollector(sampler)
        registry.register(collector)
        _registered.add(registry)
        return collector
