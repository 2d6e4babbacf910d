"""DPO trainer mode: the loss against a plain reference loop, learning, exact resume, 2 workers vs 1,
LoRA, and the service's gRPC path with every bad input. Base models are built by `transformers`."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.fixtures.hf_models import engine_model, hf_model, save_hf
from tests.fixtures.train import assert_workers_agree_and_resume_is_exact
from tokenmill.common import errors
from tokenmill.common.trainer.backends.local import run_local
from tokenmill.common.trainer.config import TrainConfig
from tokenmill.common.trainer.local_io import LocalCheckpointIO
from tokenmill.common.trainer.objectives import DirectPreference
from tokenmill.common.trainer.preference import (
    PreferenceSampler,
    build_preference_arrays,
    read_preference_jsonl,
)
from tokenmill.v1 import common_pb2

transformers = pytest.importorskip("transformers")

_VERBS = ["sees", "likes", "follows", "remembers", "paints", "finds", "carries", "watches"]
_OBJECTS = ["the moon", "a red ball", "the garden", "a long road", "the blue sea", "an open door"]
METRICS = ("reward_margin", "reward_accuracy", "chosen_logps", "rejected_logps")


def write_pairs(path: Path, n: int = 32, seed: int = 0) -> Path:
    """Learnable preference: the answer naming 'The cat' is always preferred over 'A dog'."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            v, o = rng.choice(_VERBS), rng.choice(_OBJECTS)
            row = {"prompt": f"Who {v} {o}? ", "chosen": f"The cat {v} {o}.", "rejected": f"A dog {v} {o}."}
            f.write(json.dumps(row) + "\n")
    return path


# --------------------------------------------------------------------------------------------- fast
def test_bad_preference_files_name_the_line(tmp_path):
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    cases = [
        ([good, {"prompt": "p", "chosen": "a"}], r":2 lacks string field\(s\) \['rejected'\]"),
        ([{"prompt": "p", "rejected": "b"}], r":1 lacks string field\(s\) \['chosen'\]"),
        ([good, good, {"prompt": "p", "chosen": "same", "rejected": "same"}], r":3: chosen == rejected"),
        ([{"prompt": "p", "chosen": "", "rejected": "b"}], ":1 has an empty chosen or rejected"),
        ([], "holds no prompt/chosen/rejected pairs"),
    ]
    for i, (rows, message) in enumerate(cases):
        p = tmp_path / f"bad{i}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        with pytest.raises(errors.InvalidArgument, match=message):
            read_preference_jsonl(p)
    with pytest.raises(errors.NotFound):
        read_preference_jsonl(tmp_path / "absent.jsonl")


@pytest.mark.parametrize("beta", [0.0, -0.5, float("nan")])
def test_beta_must_be_positive(beta):
    cfg = TrainConfig(mode="dpo", dpo_path="x.jsonl", init_checkpoint="base", dpo_beta=beta)
    with pytest.raises(errors.InvalidArgument, match="dpo_beta must be > 0"):
        cfg.validate()


def test_dpo_fields_belong_to_mode_dpo():
    with pytest.raises(errors.InvalidArgument, match="dpo needs init_checkpoint"):
        TrainConfig(mode="dpo", dpo_path="x.jsonl").validate()
    for field in ({"use_lora": True}, {"reference_checkpoint": "ref"}, {"dpo_path": "x.jsonl"}):
        with pytest.raises(errors.InvalidArgument, match="apply to mode dpo, not 'sft'"):
            TrainConfig(mode="sft", sft_path="s.jsonl", **field).validate()


def test_engine_dpo_loss_equals_a_plain_loop(train_dataset, tmp_path):
    """DirectPreference (batched, masked, cached reference) against a per-pair loop over a
    transformers model: sum of log p(response tokens + eos | prefix), then the DPO formula."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(train_dataset / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    pairs_path = write_pairs(tmp_path / "p.jsonl", n=6)
    inputs, targets = build_preference_arrays(str(pairs_path), 40, tok, eos)
    reference, policy, beta = hf_model(seed=1), hf_model(seed=2), 0.3

    sampler = PreferenceSampler(inputs, targets, batch_size=4)
    objective = DirectPreference(beta, torch.device("cpu"), sampler, batch_size=4, rank=0)
    objective.prepare(engine_model(reference), world=1)
    batch = sampler.next_batch()
    with torch.no_grad():
        loss, metrics = objective(engine_model(policy), batch)

    def logp(model, prompt: str, response: str) -> float:
        p = tok.encode(prompt, add_special_tokens=False).ids
        ids = p + tok.encode(response, add_special_tokens=False).ids + [eos]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
        lp = F.log_softmax(logits, -1)
        return sum(float(lp[i - 1, ids[i]]) for i in range(len(p), len(ids)))

    triples = read_preference_jsonl(pairs_path)
    losses, margins, chosen = [], [], []
    for i in batch.index.tolist():
        prompt, c, r = triples[i]
        pc, pr = logp(policy, prompt, c), logp(policy, prompt, r)
        rc, rr = logp(reference, prompt, c), logp(reference, prompt, r)
        margin = beta * ((pc - rc) - (pr - rr))
        losses.append(-math.log(1 / (1 + math.exp(-margin))))
        margins.append(margin)
        chosen.append(pc)
    assert float(loss) == pytest.approx(np.mean(losses), rel=1e-4, abs=1e-5)
    assert float(metrics["reward_margin"]) == pytest.approx(np.mean(margins), rel=1e-4, abs=1e-5)
    assert float(metrics["chosen_logps"]) == pytest.approx(np.mean(chosen), rel=1e-4)
    assert float(metrics["reward_accuracy"]) == np.mean([m > 0 for m in margins])


# --------------------------------------------------------------------------------- real workers
def _dpo_cfg(pairs: Path, init: str, ds: Path, **kw) -> TrainConfig:
    base = dict(
        mode="dpo",
        dpo_path=str(pairs),
        dataset_path=str(ds),
        init_checkpoint=init,
        output_name="aligned",
        steps=12,
        micro_batch_size=4,
        seq_len=32,
        lr=2e-3,
        warmup_steps=1,
        dpo_beta=0.1,
        workers=1,
    )
    return TrainConfig(**{**base, **kw})


@pytest.fixture
def dpo_setup(train_dataset, tmp_path):
    io_spec = {"kind": "local", "root": str(tmp_path / "ckpt")}
    io = LocalCheckpointIO(tmp_path / "ckpt")
    base = save_hf(io, "base", hf_model(), train_dataset / "tokenizer.json")
    return io_spec, io, base, write_pairs(tmp_path / "pairs.jsonl")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_dpo_learns_the_preference_from_log2(dpo_setup, train_dataset):
    io_spec, io, base, pairs = dpo_setup
    events: list = []
    result = run_local(
        _dpo_cfg(pairs, base, train_dataset, run_id="learn"),
        io_spec,
        on_event=lambda k, d: events.append((k, d)),
    )
    assert result["status"] == "completed", result["reason"]
    h = result["history"]
    # step 1's loss is measured before any update: policy == reference, so exactly log 2, margin 0
    assert h[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert h[0]["reward_margin"] == pytest.approx(0.0, abs=1e-5)
    last = h[-3:]
    assert max(x["loss"] for x in last) < h[0]["loss"] - 0.1, [x["loss"] for x in h]
    assert min(x["reward_margin"] for x in last) > 0.5
    assert min(x["reward_accuracy"] for x in last) == 1.0
    progress = [d for k, d in events if k == "progress"]
    assert set(METRICS) <= set(progress[-1]), progress[-1]
    assert "dpo_reference.json" in {f.name for f in io.store.get(result["checkpoint"]).manifest.files}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_dpo_with_lora_trains_only_adapters(dpo_setup, train_dataset):
    io_spec, io, base, pairs = dpo_setup
    result = run_local(_dpo_cfg(pairs, base, train_dataset, run_id="lora", use_lora=True, lr=1e-2), io_spec)
    assert result["status"] == "completed", result["reason"]
    h = result["history"]
    assert h[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # B = 0: the wrapped policy is the base
    assert h[-1]["loss"] < h[0]["loss"] and h[-1]["reward_margin"] > 0
    layout = io.layout(result["checkpoint"])
    assert layout and all(".lora_" in k for k in layout), sorted(layout)[:4]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_dpo_resume_is_exact_and_two_workers_match_one(dpo_setup, train_dataset, monkeypatch):
    io_spec, io, base, pairs = dpo_setup

    def cfg(run_id: str, **kw) -> TrainConfig:
        return _dpo_cfg(pairs, base, train_dataset, run_id=run_id, steps=8, checkpoint_every=3, **kw)

    assert_workers_agree_and_resume_is_exact(cfg, METRICS, io_spec, monkeypatch, micro_batch=2)


# ------------------------------------------------------------------------------------------ gRPC
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_dpo_through_the_trainer_service_and_bad_inputs(trainer_service, train_dataset, tmp_path):
    svc = trainer_service
    io = svc.store_io()
    tokenizer = train_dataset / "tokenizer.json"
    base = save_hf(io, "dpo-base", hf_model(), tokenizer)
    other = save_hf(io, "other-vocab", hf_model(vocab=512), tokenizer)
    pairs = write_pairs(tmp_path / "pairs.jsonl", n=16)
    ok = dict(mode="dpo", dataset="stories", init_checkpoint=base, dpo_data=str(pairs), seq_len=32,
              micro_batch_size=4, workers=1, lr=2e-3, warmup_steps=1)  # fmt: skip

    def bad(name: str, rows: list[dict]) -> str:
        p = tmp_path / name
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(p)

    cases = [
        (errors.InvalidArgument, r"bad1.jsonl:1 lacks string field\(s\) \['rejected'\]",
         dict(ok, dpo_data=bad("bad1.jsonl", [{"prompt": "p", "chosen": "a"}]))),
        (errors.InvalidArgument, "bad2.jsonl:1: chosen == rejected",
         dict(ok, dpo_data=bad("bad2.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "a"}]))),
        (errors.InvalidArgument, "holds no prompt/chosen/rejected pairs", dict(ok, dpo_data=bad("empty.jsonl", []))),
        (errors.NotFound, "preference data", dict(ok, dpo_data=str(tmp_path / "absent.jsonl"))),
        (errors.InvalidArgument, "dpo_beta must be > 0, got 0.0", dict(ok, dpo_beta=0.0)),
        (errors.InvalidArgument, "dpo_beta must be > 0, got -1.0", dict(ok, dpo_beta=-1.0)),
        (errors.NotFound, "reference checkpoint 'ghost' not found", dict(ok, reference_checkpoint="ghost")),
        (errors.FailedPrecondition, "vocab_size 512 but the policy has vocab_size 448",
         dict(ok, reference_checkpoint=other)),
        (errors.InvalidArgument, "dpo needs dpo_data", dict(ok, dpo_data="")),
    ]  # fmt: skip
    svc.assert_refused(cases)

    # the CLI: `tokenmill train --mode dpo --dpo-data FILE --beta B --init CKPT`, through SubmitTrain
    from click.testing import CliRunner

    from tokenmill.common.cli.train import train

    obj = svc.cli_obj(tmp_path)
    args = ["--output", "aligned", "--mode", "dpo", "--dpo-data", str(pairs), "--init", base, "--dataset",
            "stories", "--steps", "4", "--batch", "4", "--seq-len", "32", "--lr", "2e-3", "--warmup", "1"]  # fmt: skip
    runner = CliRunner()
    rejected = runner.invoke(train, [*args, "--beta", "0"], obj=obj)
    assert rejected.exit_code == 1 and "INVALID_ARGUMENT: dpo_beta must be > 0" in rejected.output
    result = runner.invoke(train, [*args, "--beta", "0.2"], obj=obj)
    assert result.exit_code == 0, result.output
    assert "step 4/4 loss" in result.output and " margin " in result.output, result.output
    (job,) = svc.client.iter_jobs()
    done = svc.client.get_job(job.id)
    assert done.state == common_pb2.JOB_STATE_SUCCEEDED, done.error
    history = done.result["history"]
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    progress = [e for e in svc.client.watch_job(job.id, follow=False) if e.kind == "progress"]
    assert set(METRICS) <= set(progress[-1].data.keys())
