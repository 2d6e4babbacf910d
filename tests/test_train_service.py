"""TrainerService end to end: real gRPC, Redis job queue, checkpoint store and worker processes."""

from __future__ import annotations

import json
import time

import pytest
import torch

from tokenmill.common import errors, failpoints
from tokenmill.v1 import common_pb2

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]  # training jobs through the service

SMALL = dict(workers=2, micro_batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2)


def _events(client, job_id):
    return list(client.watch_job(job_id, follow=False))


def _wait_progress(client, job_id, min_step, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get_job(job_id)
        if "step" in job.progress and job.progress["step"] >= min_step:
            return job
        assert job.state not in (common_pb2.JOB_STATE_FAILED, common_pb2.JOB_STATE_SUCCEEDED), job.error
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} made no progress to step {min_step}")


def test_two_workers_lower_loss_through_the_service(trainer_service):
    svc = trainer_service
    job = svc.client.submit("tiny", dataset="stories", steps=10, eval_every=5, checkpoint_every=5, **SMALL)
    done = svc.client.wait(job.id, timeout=300)
    assert done.state == common_pb2.JOB_STATE_SUCCEEDED, done.error
    result = json.loads(json.dumps(dict(done.result.items()), default=list))
    losses = [h["loss"] for h in done.result["history"]]
    assert len(losses) == 10 and losses[-1] < losses[0] - 0.5, losses
    assert result["workers"] == 2 and result["val_loss"] is not None
    ref = done.result["checkpoint"]
    assert [(a.kind, f"{a.name}:{a.version}") for a in done.artifacts] == [("checkpoint", ref)]
    weights = svc.ckpt.client.load(ref, ["model.embed_tokens.weight"])
    assert torch.isfinite(weights["model.embed_tokens.weight"]).all()
    progress = [e for e in _events(svc.client, job.id) if e.kind == "progress"]
    assert progress, "no progress events"
    fields = set(progress[-1].data.keys())
    assert {
        "step",
        "loss",
        "lr",
        "tokens_per_s",
        "memory_bytes",
        "eta_s",
        "val_loss",
        "val_ppl",
        "mfu",
    } <= fields
    assert progress[-1].data["mfu"] is None  # CPU: unset, never invented


def test_bad_requests_are_rejected_before_any_worker_starts(trainer_service):
    c = trainer_service.client
    cases = [
        (errors.NotFound, "dataset 'nope' not found", dict(dataset="nope")),
        (errors.NotFound, "checkpoint 'ghost' not found", dict(dataset="stories", init_checkpoint="ghost")),
        (errors.NotFound, "SFT data", dict(mode="sft", sft_data="missing.jsonl", dataset="stories")),
        (
            errors.InvalidArgument,
            "vocab mismatch",
            dict(dataset="stories", model_overrides={"vocab_size": 100}),
        ),
        (
            errors.InvalidArgument,
            "does not divide hidden_size",
            dict(dataset="stories", model_overrides={"num_heads": 5}),
        ),
        (
            errors.InvalidArgument,
            "over the 0.01 GiB budget",
            dict(dataset="stories", micro_batch_size=64, seq_len=512, memory_budget_bytes=10 << 20),
        ),
        (errors.InvalidArgument, "mode must be one of", dict(dataset="stories", mode="rlhf")),
        (errors.InvalidArgument, "unknown model preset", dict(dataset="stories", model_preset="gpt5")),
        (errors.InvalidArgument, "pretrain needs", dict()),
        (errors.InvalidArgument, "seq_len=1024 exceeds", dict(dataset="stories", seq_len=1024)),
        (
            errors.InvalidArgument,
            "lora needs init_checkpoint",
            dict(mode="lora", sft_data="sft.jsonl", dataset="stories"),
        ),
    ]
    for exc, message, fields in cases:
        with pytest.raises(exc, match=message):
            c.submit("bad", **fields)
        with pytest.raises(exc, match=message):
            c.validate("bad", **fields)
    with pytest.raises(errors.InvalidArgument, match="output_name"):
        c.submit("", dataset="stories")
    # the checkpoint store's rules (tokenmill.common.names), enforced at submit rather than after training
    for bad, message in (("x" * 101, "the limit is 100"), ("a..b", "not a valid checkpoint name")):
        with pytest.raises(errors.InvalidArgument, match=message) as info:
            c.submit(bad, dataset="stories", **SMALL)
        assert info.value.code == "INVALID_ARGUMENT" and "output_name" in info.value.message
    assert not list(c.iter_jobs()), "a rejected request must not queue a job"
    # A model started from a checkpoint has the checkpoint's shapes: an override of them was ignored.
    from tokenmill.common.model.transformer import ModelConfig, Transformer

    base = ModelConfig(
        vocab_size=448, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=2
    )
    hf_json = json.dumps(base.to_hf_config()).encode()
    tensors = dict(Transformer(base).state_dict())
    trainer_service.ckpt.client.save(
        "init-base", tensors, config=base.to_dict(), files={"config.json": hf_json}
    )
    for method in (c.submit, c.validate):
        with pytest.raises(errors.InvalidArgument, match=r"model_overrides \['hidden_size'\] cannot change"):
            method("bad", dataset="stories", init_checkpoint="init-base", model_overrides={"hidden_size": 64})
    assert not list(c.iter_jobs())
    ok = c.validate("fine", dataset="stories", **SMALL)
    assert (
        ok.ok
        and 0.7e6 < ok.parameters < 1.2e6
        and ok.warnings[0].startswith("vocab_size set to 448 from the tokenizer's 406 tokens")
        and ok.estimated_bytes_per_worker > 0
        and ok.flops_per_token > 0
    )


def test_cancel_mid_run_ends_cancelled_with_a_checkpoint(trainer_service):
    svc = trainer_service
    job = svc.client.submit("cancel-me", dataset="stories", steps=500, **SMALL)
    _wait_progress(svc.client, job.id, 2)
    svc.client.cancel_job(job.id, "test cancel")
    done = svc.client.wait(job.id, timeout=180)
    assert done.state == common_pb2.JOB_STATE_CANCELLED
    assert len(done.artifacts) == 1 and done.artifacts[0].name == "cancel-me"
    ref = f"cancel-me:{done.artifacts[0].version}"
    state = json.loads(svc.ckpt.client.load_files(ref, ["train_state.json"])["train_state.json"])
    assert 2 <= state["step"] < 500


def test_killed_worker_is_retried_and_resumes(trainer_service, monkeypatch):
    svc = trainer_service
    kill = {"action": "kill", "when": {"step": 4, "rank": 1, "attempt": 1}}
    monkeypatch.setenv(failpoints.ENV, failpoints.env_value({"trainer.after_step": kill}))
    job = svc.client.submit("resume", dataset="stories", steps=6, checkpoint_every=3, **SMALL)
    done = svc.client.wait(job.id, timeout=400)
    assert done.state == common_pb2.JOB_STATE_SUCCEEDED, done.error
    assert done.attempts == 2
    logs = [e.message for e in _events(svc.client, job.id) if e.kind == "log"]
    assert any("resumed from resume:1 at step 3" in m for m in logs), logs
    assert [h["step"] for h in done.result["history"]] == [1, 2, 3, 4, 5, 6]


def test_nan_loss_fails_with_reason_and_keeps_last_good_checkpoint(trainer_service, monkeypatch):
    svc = trainer_service
    nan = {"action": "trigger", "when": {"step": 4, "attempt": 1}}
    monkeypatch.setenv(failpoints.ENV, failpoints.env_value({"trainer.loss": nan}))
    job = svc.client.submit("diverge", dataset="stories", steps=8, checkpoint_every=2, **SMALL)
    done = svc.client.wait(job.id, timeout=300)
    assert done.state == common_pb2.JOB_STATE_FAILED
    assert "non-finite" in done.error and "step 4" in done.error and "diverge:1" in done.error
    assert done.attempts == 1, "divergence is not retried"
    assert [(a.name, a.version) for a in done.artifacts] == [("diverge", "1")]


def test_ray_backend_two_workers_lower_loss(trainer_service, ray_local):
    svc = trainer_service
    job = svc.client.submit("ray-tiny", dataset="stories", backend="ray", steps=8, **SMALL)
    done = svc.client.wait(job.id, timeout=400)
    assert done.state == common_pb2.JOB_STATE_SUCCEEDED, done.error
    losses = [h["loss"] for h in done.result["history"]]
    assert losses[-1] < losses[0] - 0.5 and done.result["workers"] == 2


def test_two_workers_lower_loss_on_an_ingested_code_corpus(trainer_service, code_dataset):
    svc = trainer_service
    ok = svc.client.validate("code", dataset=code_dataset, **SMALL)
    assert ok.ok
    job = svc.client.submit("code", dataset=code_dataset, steps=10, eval_every=10, **{**SMALL, "seq_len": 64})
    done = svc.client.wait(job.id, timeout=300)
    assert done.state == common_pb2.JOB_STATE_SUCCEEDED, done.error
    losses = [h["loss"] for h in done.result["history"]]
    assert losses[-1] < losses[0] - 0.5, losses


def test_the_job_attempt_reaches_the_workers():
    """Failpoints say `when={"attempt": 1}`: the handler hands the job's attempt to the workers."""
    from types import SimpleNamespace

    from tokenmill.common.trainer.config import TrainConfig
    from tokenmill.services.trainer.server import TrainJobHandler

    planner = SimpleNamespace(plan=lambda spec: SimpleNamespace(config=TrainConfig()))
    handler = TrainJobHandler(planner, {"kind": "local", "root": "/nonexistent"})
    seen = []

    def launch(cfg, io_spec, **kw):
        seen.append((cfg.run_id, cfg.attempt))
        return {"status": "completed", "step": 1, "final_loss": 1.0, "val_loss": None, "parameters": 1,
                "trainable_parameters": 1, "workers": 1, "history": []}  # fmt: skip

    handler._backend = lambda name: launch
    ctx = SimpleNamespace(
        job=SimpleNamespace(id="job-1", spec={}), attempt=2, log=lambda m: None, cancelled=False
    )
    handler(ctx)
    assert seen == [("job-1", 2)]
