"""Elastic resume through the TrainerService: a run stopped on 2 workers continues on 1, then on 3
(real service, real worker processes, real gloo process groups), and follows the loss curve of the
same run left uninterrupted; bad resume requests are refused before anything is queued."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tokenmill.common import errors, failpoints
from tokenmill.services.trainer.resume import config_to_spec, split_batch
from tokenmill.v1 import common_pb2

# 12 sequences per optimizer step: divisible by 1, 2 and 3 workers.
RUN = dict(dataset="stories", steps=12, micro_batch_size=6, seq_len=32, lr=3e-3, warmup_steps=2)
RUN["checkpoint_every"] = 2


def _losses(job) -> list[float]:
    return [h["loss"] for h in job.result["history"]]


def _stop_at(step: int, workers: int) -> dict:
    """A non-finite loss injected at `step` on runs of `workers` workers: the job fails at once
    (divergence is never retried), keeping the checkpoint written at step - 1."""
    return {"trainer.loss": {"action": "trigger", "when": {"step": step, "workers": workers}}}


def test_split_batch_keeps_the_global_batch_on_any_worker_count():
    assert split_batch(12, 1, 6) == (6, 2, "")  # one worker: accumulate rather than grow the micro-batch
    assert split_batch(12, 2, 6) == (6, 1, "")
    assert split_batch(12, 3, 6) == (4, 1, "")
    assert split_batch(12, 12, 6) == (1, 1, "")
    micro, accum, warning = split_batch(12, 5, 6)
    assert (micro, accum) == (3, 1) and "from 12 to 15 sequences" in warning


def test_a_recorded_train_config_becomes_a_spec():
    cfg = {"mode": "pretrain", "dataset_name": "stories", "dataset_path": "/x", "workers": 2, "steps": 9,
           "model_overrides": {"vocab_size": 448}, "run_id": "j", "attempt": 2, "lora": {"rank": 8}}  # fmt: skip
    assert config_to_spec(cfg) == {
        "mode": "pretrain",
        "dataset": "stories",
        "workers": 2,
        "steps": 9,
        "model_overrides": {"vocab_size": 448},
    }


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_resume_two_then_one_then_three_workers_follows_the_uninterrupted_curve(trainer_service, monkeypatch):
    svc = trainer_service
    full = svc.client.wait(svc.client.submit("whole", workers=2, **RUN).id, timeout=400)
    assert full.state == common_pb2.JOB_STATE_SUCCEEDED, full.error

    monkeypatch.setenv(failpoints.ENV, failpoints.env_value({**_stop_at(5, 2)}))
    first = svc.client.wait(svc.client.submit("elastic", workers=2, **RUN).id, timeout=400)
    assert first.state == common_pb2.JOB_STATE_FAILED and "step 5" in first.error, first.error

    monkeypatch.setenv(failpoints.ENV, failpoints.env_value(_stop_at(9, 1)))
    second = svc.client.wait(svc.client.submit("", resume=first.id, workers=1).id, timeout=400)
    assert second.state == common_pb2.JOB_STATE_FAILED and "step 9" in second.error, second.error
    spec = svc.queue.get(second.id).spec
    assert (spec["micro_batch_size"], spec["grad_accum_steps"]) == (6, 2), "global batch kept on 1 worker"

    monkeypatch.delenv(failpoints.ENV)
    third = svc.client.wait(svc.client.submit("", resume=second.id, workers=3).id, timeout=400)
    assert third.state == common_pb2.JOB_STATE_SUCCEEDED, third.error
    assert third.result["workers"] == 3 and third.result["steps"] == 12

    logs = [e.message for e in svc.client.watch_job(third.id, follow=False) if e.kind == "log"]
    assert any("resumed from elastic:" in m and "at step 8 (saved by 1 workers)" in m for m in logs), logs
    curve, elastic = _losses(full), _losses(third)
    assert [h["step"] for h in third.result["history"]] == list(range(1, 13))
    diff = float(np.max(np.abs(np.array(curve) - np.array(elastic))))
    print(f"elastic 2->1->3 workers vs uninterrupted: max |loss difference| = {diff:.3e}")
    np.testing.assert_allclose(elastic, curve, rtol=1e-4)
    # the sampler continued where each run stopped: 12 steps x 12 sequences drawn in all
    ref = third.result["checkpoint"]
    state = json.loads(svc.ckpt.client.load_files(ref, ["train_state.json"])["train_state.json"])
    assert state["sampler"]["consumed"] == 12 * 12 and state["world_size"] == 3


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bad_resume_requests_are_refused(trainer_service):
    svc = trainer_service
    c = svc.client
    done = c.wait(c.submit("short", workers=1, **{**RUN, "steps": 2}).id, timeout=300)
    assert done.state == common_pb2.JOB_STATE_SUCCEEDED, done.error
    ref = done.result["checkpoint"]
    limit = svc.config.trainer.max_workers
    cases = [
        (errors.NotFound, "no train job or checkpoint", dict(resume="job-that-never-was")),
        (errors.NotFound, "no train job or checkpoint", dict(resume="short:999")),
        (errors.InvalidArgument, "another shape: hidden_size=", dict(resume=ref, model_overrides={"hidden_size": 256})),
        (errors.InvalidArgument, "seq_len cannot change", dict(resume=done.id, seq_len=64)),
        (errors.InvalidArgument, f"workers=0 is outside [1, {limit}]", dict(resume=done.id, workers=0)),
        (errors.InvalidArgument, f"outside [1, {limit}]", dict(resume=ref, workers=limit + 1)),
        (errors.InvalidArgument, f"outside [1, {limit}]", dict(dataset="stories", workers=limit + 1)),
    ]  # fmt: skip
    for exc, text, fields in cases:
        with pytest.raises(exc, match=text.replace("[", r"\[")):
            c.submit(fields.pop("output", ""), **fields)
    # a checkpoint resumes as its run was specified: from the checkpoint ref, more steps
    more = c.wait(c.submit("", resume=ref, steps=3, workers=2).id, timeout=300)
    assert more.state == common_pb2.JOB_STATE_SUCCEEDED, more.error
    assert [h["step"] for h in more.result["history"]] == [1, 2, 3] and more.result["workers"] == 2
