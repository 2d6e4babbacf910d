"""The trainer's Prometheus series: training progress of the running job and, where NVML finds GPUs,
their utilisation and memory (read at scrape time, so they are fresh whether or not a job runs).

Training series carry the job id and stay at the last job's values until the next job starts (a
scrape just after a short job still sees how it ended). GPU series are absent on machines without
an NVIDIA driver: a CPU-only trainer exports no made-up zeros.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("tokenmill.trainer")

# progress-event field -> (series name, help)
PROGRESS_SERIES = {
    "step": ("tokenmill_trainer_step", "Optimizer steps the running job has completed."),
    "steps": ("tokenmill_trainer_steps_total_planned", "Optimizer steps the running job will run."),
    "tokens_per_s": ("tokenmill_trainer_tokens_per_second", "Training throughput, tokens/s over all workers."),
    "mfu": ("tokenmill_trainer_mfu_ratio", "Model FLOPs utilisation (PaLM), 0-1; absent where the peak is unknown."),
    "loss": ("tokenmill_trainer_loss", "Training loss of the last step (nats/token)."),
    "val_loss": ("tokenmill_trainer_val_loss", "Validation loss at the last evaluation (nats/token)."),
    "memory_bytes": ("tokenmill_trainer_device_memory_bytes", "Device memory rank 0 holds (torch allocator)."),
}  # fmt: skip


class TrainerMetrics:
    """Gauges per job, fed from the job's progress events."""

    def __init__(self, registry: CollectorRegistry):
        self.gauges = {
            key: Gauge(name, doc, ["job"], registry=registry) for key, (name, doc) in PROGRESS_SERIES.items()
        }
        self._job = ""
        self._lock = threading.Lock()

    def start_job(self, job_id: str) -> None:
        """Drop the previous job's series: the trainer reports on the job it runs now."""
        with self._lock:
            if self._job and self._job != job_id:
                for gauge in self.gauges.values():
                    with contextlib.suppress(KeyError):  # a series the old job never set
                        gauge.remove(self._job)
            self._job = job_id

    def observe(self, job_id: str, progress: dict[str, Any]) -> None:
        for key, gauge in self.gauges.items():
            value = progress.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                gauge.labels(job=job_id).set(value)


class NvmlCollector(Collector):
    """GPU utilisation and memory per device through NVML (``nvidia-ml-py``, imported as pynvml)."""

    def __init__(self, nvml: Any):
        self.nvml = nvml
        self.handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["gpu", "name"]
        util = GaugeMetricFamily(
            "tokenmill_gpu_utilization_ratio",
            "Fraction of the last sample period a kernel ran (NVML).",
            labels=labels,
        )
        used = GaugeMetricFamily(
            "tokenmill_gpu_memory_used_bytes", "GPU memory in use (NVML).", labels=labels
        )
        total = GaugeMetricFamily(
            "tokenmill_gpu_memory_total_bytes", "GPU memory installed (NVML).", labels=labels
        )
        for index, handle in enumerate(self.handles):
            try:
                name = self.nvml.nvmlDeviceGetName(handle)
                name = name.decode() if isinstance(name, bytes) else str(name)
                rates = self.nvml.nvmlDeviceGetUtilizationRates(handle)
                memory = self.nvml.nvmlDeviceGetMemoryInfo(handle)
            except self.nvml.NVMLError as exc:  # a GPU fallen off the bus: skip it, keep the scrape
                log.warning("NVML: GPU %d unreadable: %s", index, exc)
                continue
            key = [str(index), name]
            util.add_metric(key, rates.gpu / 100.0)
            used.add_metric(key, float(memory.used))
            total.add_metric(key, float(memory.total))
        yield from (util, used, total)


def register_gpu_metrics(registry: CollectorRegistry, nvml: Any = None) -> NvmlCollector | None:
    """Add the NVML collector when NVML answers with at least one GPU; None (and no series) otherwise."""
    if nvml is None:
        try:
            import pynvml
        except ImportError:
            return None
        nvml = pynvml
    try:
        nvml.nvmlInit()
        if nvml.nvmlDeviceGetCount() == 0:
            return None
        collector = NvmlCollector(nvml)
    except nvml.NVMLError as exc:  # no driver / no GPU: the usual case on CPU machines
        log.info("no GPU metrics: NVML unavailable (%s)", exc)
        return None
    registry.register(collector)
    return collector
