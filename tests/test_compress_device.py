"""Where compression runs: the `compress.device` setting resolved against the machine, the worker
handing that device to the engine, and results stored from the CPU. This machine has no GPU, so the
GPU is simulated (torch.cuda.is_available patched) in the tests whose names say so; the last test
runs the engine on a real GPU where there is one."""

from __future__ import annotations

import pytest
import torch

from tests.fixtures.grpc import make_test_config
from tests.test_compress_job import CONFIG, model_tensors
from tokenmill.common import errors
from tokenmill.common.compress import MethodSpec, compress_model
from tokenmill.common.compress.device import resolve_device
from tokenmill.common.config import ConfigError, load_config
from tokenmill.common.jobs import JobQueue, JobState, JobWorker
from tokenmill.common.runtime import ServiceApp
from tokenmill.services.compress import job as job_module
from tokenmill.services.compress.job import CompressJobHandler
from tokenmill.services.compress.server import JOB_TYPE, build


def _gpu(monkeypatch, present: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: present)


def test_auto_picks_the_gpu_on_a_simulated_gpu_machine_and_cpu_stays_cpu(monkeypatch):
    _gpu(monkeypatch, True)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cpu") == torch.device("cpu")


def test_without_a_gpu_auto_is_the_cpu_and_cuda_is_refused(monkeypatch):
    _gpu(monkeypatch, False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(errors.FailedPrecondition, match="compress.device is 'cuda' but torch sees no GPU"):
        resolve_device("cuda")
    with pytest.raises(errors.InvalidArgument, match="'tpu' is not one of"):
        resolve_device("tpu")


def test_the_device_setting_comes_from_yaml_or_env_and_unknown_values_are_refused(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text(f"data_dir: {tmp_path}\nauth: {{disabled: true}}\ncompress:\n  device: cpu\n")
    assert load_config(path).compress.device == "cpu"
    monkeypatch.setenv("TOKENMILL_COMPRESS__DEVICE", "cuda")
    assert load_config(path).compress.device == "cuda"
    monkeypatch.setenv("TOKENMILL_COMPRESS__DEVICE", "tpu")
    with pytest.raises(ConfigError, match="compress.device"):
        load_config(path)


def test_a_worker_configured_for_cuda_refuses_to_start_without_a_gpu(tmp_path, redis_url, monkeypatch):
    _gpu(monkeypatch, False)
    config = make_test_config(tmp_path, redis_url=redis_url, compress={"device": "cuda"})
    app = ServiceApp("compress", config, port=0, metrics=False)
    with pytest.raises(errors.FailedPrecondition, match="compress.device is 'cuda'"):
        build(config, app)
    build(config, ServiceApp("compress", config, port=0, metrics=False), run_worker=False)  # front end only


@pytest.mark.slow
def test_the_job_hands_the_simulated_gpu_to_the_engine_and_stores_cpu_tensors(
    tmp_path, ckpt, redis_client, monkeypatch
):
    """The worker passes the resolved device (cuda:0 on a simulated GPU) to compress_model; the
    engine here really runs on the CPU, as this machine has no GPU."""
    _gpu(monkeypatch, True)
    seen: list[torch.device] = []

    def on_cpu(*args, device, **kwargs):
        seen.append(device)
        return compress_model(*args, device="cpu", **kwargs)

    monkeypatch.setattr(job_module, "compress_model", on_cpu)
    ckpt.client.save("base", model_tensors(), config=CONFIG.to_dict())
    queue = JobQueue(redis_client, lease_seconds=30.0, max_attempts=1)
    handler = CompressJobHandler(ckpt.new_client, tmp_path, resolve_device("auto"))
    job = queue.submit(JOB_TYPE, {"source": "base", "output_name": "base-int8", "method": "int8"})
    assert JobWorker(queue, JOB_TYPE, handler, heartbeat_seconds=5).run_once(block_seconds=2)
    assert queue.get(job.id).state == JobState.SUCCEEDED, queue.get(job.id).error
    assert seen == [torch.device("cuda", 0)]
    assert "on cuda:0" in " ".join(e.message for e in queue.events(job.id) if e.kind == "log")
    assert "model.layers.0.self_attn.q_proj.qweight" in ckpt.client.load("base-int8:1")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a real GPU (none on this machine)")
@pytest.mark.parametrize(
    "steps",
    [
        [MethodSpec("int4-gptq", group_size=32, act_order=True)],
        [MethodSpec("int4-awq", group_size=32)],
        [MethodSpec("prune-wanda", pattern="2:4"), MethodSpec("int8")],
        [MethodSpec("prune-sparsegpt", pattern="2:4")],
        [MethodSpec("svd", rank_fraction=0.5)],
    ],
    ids=lambda s: "+".join(m.method for m in s),
)
def test_on_a_real_gpu_the_engine_matches_the_cpu_and_returns_cpu_tensors(steps):
    tensors = model_tensors()
    calib = [torch.randint(0, CONFIG.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))]
    cpu = compress_model(tensors, steps, calib, config=CONFIG)
    gpu = compress_model(tensors, steps, calib, config=CONFIG, device="cuda")
    assert cpu.tensors.keys() == gpu.tensors.keys()
    for name, t in gpu.tensors.items():
        assert t.device.type == "cpu" and t.dtype == cpu.tensors[name].dtype
    for layer, errs in cpu.per_layer_errors.items():
        for method, err in errs.items():
            assert gpu.per_layer_errors[layer][method] == pytest.approx(err, rel=0.1, abs=1e-3)
