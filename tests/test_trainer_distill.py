"""Distillation trainer mode: the loss against a plain torch reference over `transformers` models,
teachers in any stored format, learning, beating the same student trained from scratch, exact
resume, 2 workers vs 1, and the service's gRPC path with every bad input."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.fixtures.hf_models import engine_model, hf_model, save_hf
from tests.fixtures.train import assert_workers_agree_and_resume_is_exact
from tokenmill.common import errors
from tokenmill.common.trainer.backends.local import run_local
from tokenmill.common.trainer.config import TrainConfig
from tokenmill.common.trainer.distill import Distillation, load_teacher, student_config
from tokenmill.common.trainer.local_io import LocalCheckpointIO
from tokenmill.v1 import common_pb2

transformers = pytest.importorskip("transformers")

METRICS = ("kl", "ce", "teacher_ce")
STUDENT = {"hidden_size": 64, "intermediate_size": 128, "num_layers": 2, "num_heads": 2, "num_kv_heads": 2}


# --------------------------------------------------------------------------------------------- fast
@pytest.mark.parametrize(("temperature", "alpha"), [(2.0, 0.0), (1.0, 1.0), (4.0, 0.3)])
def test_engine_distill_loss_equals_plain_torch(temperature, alpha):
    """alpha * CE + (1 - alpha) * T² * KL(p_T || q_T) over labelled tokens, written out by hand over a
    transformers teacher and a smaller transformers student."""
    teacher, student = hf_model(seed=1), hf_model(hidden=32, layers=1, seed=2)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 448, (3, 24), generator=g)
    y = torch.randint(0, 448, (3, 24), generator=g)
    y[0, :5] = -100  # unlabelled positions carry no loss
    objective = Distillation(engine_model(teacher), temperature, alpha, torch.device("cpu"))
    with torch.no_grad():
        loss, metrics = objective(engine_model(student), (x, y))
        s, t = student(x).logits.double(), teacher(x).logits.double()
    keep = y != -100
    p = torch.softmax(t / temperature, -1)[keep]
    log_q = torch.log_softmax(s / temperature, -1)[keep]
    kl = (p * (p.log() - log_q)).sum(-1).mean()
    ce = -torch.log_softmax(s, -1)[keep].gather(-1, y[keep][:, None]).mean()
    teacher_ce = -torch.log_softmax(t, -1)[keep].gather(-1, y[keep][:, None]).mean()
    expected = alpha * ce + (1 - alpha) * temperature**2 * kl
    assert float(loss) == pytest.approx(float(expected), rel=1e-4)
    assert float(metrics["kl"]) == pytest.approx(float(kl), rel=1e-4)
    assert float(metrics["ce"]) == pytest.approx(float(ce), rel=1e-4)
    assert float(metrics["teacher_ce"]) == pytest.approx(float(teacher_ce), rel=1e-4)


def test_teacher_loads_dense_and_int8(train_dataset, tmp_path):
    """A stored teacher's logits: equal to transformers' for a dense one, close for int8 (dequantized)."""
    io = LocalCheckpointIO(tmp_path / "ckpt")
    hf = hf_model()
    tok = train_dataset / "tokenizer.json"
    x = torch.randint(0, 448, (2, 16), generator=torch.Generator().manual_seed(1))
    module = load_teacher(io, save_hf(io, "dense", hf, tok), torch.device("cpu"))
    assert not module.training and not any(p.requires_grad for p in module.parameters())
    with torch.no_grad():
        expected = hf(x).logits
        dense = module(x)
        q8 = load_teacher(io, save_hf(io, "q8", hf, tok, quantize="int8"), torch.device("cpu"))(x)
    torch.testing.assert_close(dense, expected, rtol=1e-4, atol=1e-5)
    assert not torch.equal(q8, dense)
    assert float((q8 - expected).abs().max()) < 0.05 * float(expected.abs().max())


def test_student_takes_the_teacher_vocabulary_and_refuses_another(train_dataset, tmp_path):
    io = LocalCheckpointIO(tmp_path / "ckpt")
    ref = save_hf(io, "t", hf_model(), train_dataset / "tokenizer.json")
    cfg = TrainConfig(mode="distill", dataset_path="d", teacher_checkpoint=ref, seq_len=32)
    assert student_config(cfg, io).vocab_size == 448
    cfg.model_overrides = {"vocab_size": 512}
    with pytest.raises(errors.FailedPrecondition, match="vocab_size 512 differs from .*vocab_size 448"):
        student_config(cfg, io)
    cfg.model_overrides, cfg.seq_len = {}, 128
    with pytest.raises(errors.FailedPrecondition, match="seq_len=128 exceeds teacher"):
        student_config(cfg, io)
    with pytest.raises(errors.NotFound, match="teacher checkpoint 'ghost' not found"):
        student_config(TrainConfig(mode="distill", dataset_path="d", teacher_checkpoint="ghost"), io)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"distill_temperature": 0.0}, "distill_temperature must be > 0, got 0.0"),
        ({"distill_temperature": float("nan")}, "distill_temperature must be > 0"),
        ({"distill_alpha": -0.1}, r"distill_alpha must lie in \[0, 1\], got -0.1"),
        ({"distill_alpha": 1.5}, r"distill_alpha must lie in \[0, 1\]"),
        ({"teacher_checkpoint": ""}, "distill needs teacher_checkpoint"),
        ({"dataset_path": ""}, "distill needs a dataset"),
        ({"init_checkpoint": "base"}, "init_checkpoint does not apply"),
    ],
)
def test_bad_distill_configs(fields, message):
    base = {"mode": "distill", "dataset_path": "d", "teacher_checkpoint": "t"}
    with pytest.raises(errors.InvalidArgument, match=message):
        TrainConfig(**{**base, **fields}).validate()
    with pytest.raises(errors.InvalidArgument, match="teacher_checkpoint applies to mode distill"):
        TrainConfig(mode="pretrain", dataset_path="d", teacher_checkpoint="t").validate()


# --------------------------------------------------------------------------------- real workers
def _cfg(ds: Path, **kw) -> TrainConfig:
    base = dict(
        dataset_path=str(ds),
        model_preset="test-1m",
        model_overrides=dict(STUDENT),
        output_name="student",
        steps=40,
        micro_batch_size=8,
        seq_len=64,
        lr=3e-3,
        warmup_steps=2,
        seed=3,
        workers=1,
    )
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def teacher(train_dataset, tmp_path_factory):
    """A test-1m teacher pretrained a little on the stories corpus (deterministic seed)."""
    root = tmp_path_factory.mktemp("distill-ckpt")
    io_spec = {"kind": "local", "root": str(root)}
    cfg = _cfg(train_dataset, mode="pretrain", model_overrides={"vocab_size": 512}, output_name="teacher",
               steps=60, run_id="teacher", seed=0)  # fmt: skip
    result = run_local(cfg, io_spec)
    assert result["status"] == "completed", result["reason"]
    return io_spec, result["checkpoint"]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_distilled_student_beats_scratch_and_its_loss_falls(teacher, train_dataset):
    io_spec, ref = teacher
    # small batches: one-hot labels of this corpus's random choices are noisy targets, the teacher's
    # distribution is not (at T=1; T=2 needs more than 40 steps to pay off here)
    common = dict(eval_every=40, eval_batches=4, micro_batch_size=2, lr=5e-3)
    distilled = run_local(
        _cfg(
            train_dataset,
            mode="distill",
            teacher_checkpoint=ref,
            distill_temperature=1.0,
            run_id="kd",
            **common,
        ),
        io_spec,
    )
    scratch = run_local(
        _cfg(train_dataset, mode="pretrain", model_overrides={**STUDENT, "vocab_size": 512}, run_id="scratch",
             **common),
        io_spec,
    )  # fmt: skip
    assert distilled["status"] == scratch["status"] == "completed"
    h = distilled["history"]
    assert set(METRICS) <= set(h[-1]), h[-1]
    assert np.mean([x["loss"] for x in h[-5:]]) < 0.5 * np.mean([x["loss"] for x in h[:3]])
    assert h[-1]["teacher_ce"] < h[-1]["ce"], "the teacher knows the corpus better than the student"
    # held-out perplexity: val_loss is the student's own cross-entropy in both runs
    ppl_kd, ppl_scratch = math.exp(distilled["val_loss"]), math.exp(scratch["val_loss"])
    assert ppl_kd < ppl_scratch, (ppl_kd, ppl_scratch)
    io = LocalCheckpointIO(Path(io_spec["root"]))
    version = io.store.get(distilled["checkpoint"])
    assert version.manifest.lineage["parent"] == ref
    assert version.manifest.config["distillation"]["teacher"] == ref


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_distill_resume_is_exact_and_two_workers_match_one(teacher, train_dataset, monkeypatch):
    io_spec, ref = teacher

    def cfg(run_id: str, **kw) -> TrainConfig:
        return _cfg(train_dataset, mode="distill", teacher_checkpoint=ref, distill_alpha=0.3, run_id=run_id,
                    steps=8, checkpoint_every=3, **kw)  # fmt: skip

    assert_workers_agree_and_resume_is_exact(cfg, METRICS, io_spec, monkeypatch, micro_batch=4)


# ------------------------------------------------------------------------------------------ gRPC
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_distill_through_the_trainer_service_and_bad_inputs(trainer_service, train_dataset, tmp_path):
    from click.testing import CliRunner

    from tokenmill.common.cli.train import train

    svc = trainer_service
    io = svc.store_io()
    tok = train_dataset / "tokenizer.json"
    good = save_hf(io, "kd-teacher", hf_model(vocab=512), tok)
    small = save_hf(io, "small-vocab", hf_model(vocab=256), tok)
    ok = dict(mode="distill", dataset="stories", teacher_checkpoint=good, model_preset="test-1m", seq_len=32,
              micro_batch_size=4, workers=1, lr=2e-3, warmup_steps=1)  # fmt: skip
    cases = [
        (errors.NotFound, "teacher checkpoint 'ghost' not found", dict(ok, teacher_checkpoint="ghost")),
        (errors.FailedPrecondition, "vocab_size 448 differs from teacher .*vocab_size 512",
         dict(ok, model_overrides={"vocab_size": 448})),
        (errors.FailedPrecondition, "tokenized with \\d+ tokens but teacher .* has vocab_size 256",
         dict(ok, teacher_checkpoint=small)),
        (errors.InvalidArgument, "distill_temperature must be > 0, got 0.0", dict(ok, distill_temperature=0.0)),
        (errors.InvalidArgument, "distill_temperature must be > 0, got -2.0", dict(ok, distill_temperature=-2.0)),
        (errors.InvalidArgument, r"distill_alpha must lie in \[0, 1\], got 1.5", dict(ok, distill_alpha=1.5)),
        (errors.InvalidArgument, r"distill_alpha must lie in \[0, 1\], got -0.5", dict(ok, distill_alpha=-0.5)),
        (errors.InvalidArgument, "distill needs teacher_checkpoint", dict(ok, teacher_checkpoint="")),
        (errors.InvalidArgument, "distill needs 'dataset'", dict(ok, dataset="")),
        (errors.InvalidArgument, "teacher_checkpoint applies to mode distill", dict(ok, mode="pretrain")),
    ]  # fmt: skip
    svc.assert_refused(cases)

    obj = svc.cli_obj(tmp_path)
    args = ["--output", "kd-student", "--mode", "distill", "--teacher", "kd-teacher", "--dataset", "stories",
            "--preset", "test-1m", "--steps", "4", "--batch", "4", "--seq-len", "32", "--lr", "2e-3",
            "--warmup", "1"]  # fmt: skip
    runner = CliRunner()
    rejected = runner.invoke(train, [*args, "--temperature", "0"], obj=obj)
    assert rejected.exit_code == 1 and "INVALID_ARGUMENT: distill_temperature must be > 0" in rejected.output
    result = runner.invoke(train, [*args, "--alpha", "0.5"], obj=obj)
    assert result.exit_code == 0, result.output
    assert "step 4/4 loss" in result.output and " kl " in result.output, result.output
    (job,) = svc.client.iter_jobs()
    done = svc.client.get_job(job.id)
    assert done.state == common_pb2.JOB_STATE_SUCCEEDED, done.error
    assert done.spec["teacher_checkpoint"] == "kd-teacher"
    student = io.client.get(done.result["checkpoint"], include_manifest=True)
    assert student.manifest.lineage.parent == good  # pinned to the version at submit
    progress = [e for e in svc.client.watch_job(job.id, follow=False) if e.kind == "progress"]
    assert set(METRICS) <= set(progress[-1].data.keys())
