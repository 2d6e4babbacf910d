"""Trainer metrics on the service's Prometheus endpoint: training progress from a real job, GPU
utilisation/memory from NVML (simulated here: this machine has no GPU; the test names say so)."""

from __future__ import annotations

import math
import urllib.request
from types import SimpleNamespace

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.train import running_trainer_service
from tokenmill.services.trainer.metrics import TrainerMetrics, register_gpu_metrics
from tokenmill.v1 import common_pb2


def _samples(text: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


class _NVMLError(Exception):
    pass


def _simulated_nvml(gpus: list[dict] | None, *, init_error: bool = False) -> SimpleNamespace:
    """An object with the pynvml calls the collector makes, answering from `gpus`."""

    def init() -> None:
        if init_error:
            raise _NVMLError("NVML Shared Library Not Found")

    def rates(h):
        if gpus[h].get("broken"):
            raise _NVMLError("GPU is lost")
        return SimpleNamespace(gpu=gpus[h]["util"], memory=0)

    return SimpleNamespace(
        NVMLError=_NVMLError,
        nvmlInit=init,
        nvmlDeviceGetCount=lambda: len(gpus or []),
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetName=lambda h: gpus[h]["name"].encode(),
        nvmlDeviceGetUtilizationRates=rates,
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(
            used=gpus[h]["used"], total=gpus[h]["total"], free=0
        ),
    )


def test_gpu_metrics_from_simulated_nvml():
    gpus = [
        {"name": "NVIDIA H200", "util": 87, "used": 40 << 30, "total": 141 << 30},
        {"name": "NVIDIA H200", "util": 0, "used": 0, "total": 141 << 30, "broken": True},
    ]
    registry = CollectorRegistry()
    assert register_gpu_metrics(registry, _simulated_nvml(gpus)) is not None
    s = _samples(generate_latest(registry).decode())
    [util] = s["tokenmill_gpu_utilization_ratio"]
    assert util.labels == {"gpu": "0", "name": "NVIDIA H200"} and util.value == pytest.approx(0.87)
    assert [x.value for x in s["tokenmill_gpu_memory_used_bytes"]] == [40 << 30]
    assert [x.value for x in s["tokenmill_gpu_memory_total_bytes"]] == [141 << 30]  # the lost GPU is skipped


def test_gpu_metrics_absent_without_nvml_simulated():
    for nvml in (_simulated_nvml(None, init_error=True), _simulated_nvml([])):
        registry = CollectorRegistry()
        assert register_gpu_metrics(registry, nvml) is None
        assert "tokenmill_gpu" not in generate_latest(registry).decode()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path with the real NVML library")
def test_real_nvml_on_a_cpu_machine_exports_no_gpu_series():
    registry = CollectorRegistry()
    assert register_gpu_metrics(registry) is None
    assert "tokenmill_gpu" not in generate_latest(registry).decode()


def test_a_new_job_replaces_the_previous_jobs_series():
    registry = CollectorRegistry()
    metrics = TrainerMetrics(registry)
    metrics.start_job("a")
    metrics.observe("a", {"step": 3, "loss": 2.5, "mfu": None, "val_loss": 2.7})
    metrics.start_job("b")
    metrics.observe("b", {"step": 1, "loss": 4.0})
    s = _samples(generate_latest(registry).decode())
    assert [(x.labels["job"], x.value) for x in s["tokenmill_trainer_step"]] == [("b", 1.0)]
    assert "tokenmill_trainer_val_loss" not in s and "tokenmill_trainer_mfu_ratio" not in s


@pytest.fixture
def trainer_with_metrics(train_data_root, redis_client, start_checkpoint_service, tmp_path):
    """The trainer service in this process with its Prometheus endpoint on (an ephemeral port)."""
    with running_trainer_service(
        train_data_root, redis_client, start_checkpoint_service, tmp_path, metrics=True
    ) as service:
        yield service.app, service.client


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_the_trainer_endpoint_exports_training_progress(trainer_with_metrics):
    app, client = trainer_with_metrics
    job = client.submit(
        "metered", dataset="stories", workers=1, steps=4, eval_every=2, micro_batch_size=4, seq_len=32
    )
    done = client.wait(job.id, timeout=300)
    assert done.state == common_pb2.JOB_STATE_SUCCEEDED, done.error
    with urllib.request.urlopen(f"http://127.0.0.1:{app.metrics_port}/metrics", timeout=10) as resp:
        s = _samples(resp.read().decode())

    def value(name: str) -> float:
        [sample] = s[name]
        assert sample.labels == {"job": job.id}
        return float(sample.value)

    assert value("tokenmill_trainer_step") == 4 and value("tokenmill_trainer_steps_total_planned") == 4
    assert value("tokenmill_trainer_tokens_per_second") > 0
    assert math.isclose(value("tokenmill_trainer_loss"), done.result["final_loss"], rel_tol=1e-9)
    assert math.isclose(value("tokenmill_trainer_val_loss"), done.result["val_loss"], rel_tol=1e-9)
    assert "tokenmill_trainer_mfu_ratio" not in s, "CPU: no peak FLOP/s, so no MFU is invented"
    assert not any(name.startswith("tokenmill_gpu_") for name in s), "no GPU here: no GPU series"
