"""Trainer engine with real worker processes and real gloo process groups (no service, no Redis)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tokenmill.common import failpoints
from tokenmill.common.model.transformer import IGNORE_INDEX
from tokenmill.common.trainer.backends.local import WorkerFailed, run_local
from tokenmill.common.trainer.checkpoint_io import read_full
from tokenmill.common.trainer.config import LoraSettings, TrainConfig
from tokenmill.common.trainer.data import encode_sft_example
from tokenmill.common.trainer.local_io import LocalCheckpointIO
from tokenmill.common.trainer.schedule import lr_at

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]  # real multi-process training


def _cfg(ds, **kw) -> TrainConfig:
    base = dict(
        dataset_path=str(ds),
        steps=8,
        micro_batch_size=4,
        seq_len=32,
        lr=3e-3,
        warmup_steps=2,
        checkpoint_every=3,
        output_name="m",
        workers=2,
    )
    return TrainConfig(**{**base, **kw})


def _losses(result):
    return [h["loss"] for h in result["history"]]


def _arm(monkeypatch, spec) -> None:
    """Arm failpoints in the worker processes run_local spawns from here (they inherit the env)."""
    monkeypatch.setenv(failpoints.ENV, failpoints.env_value(spec))


def _kill_after_step(step: int, rank: int) -> dict:
    return {"trainer.after_step": {"action": "kill", "when": {"step": step, "rank": rank, "attempt": 1}}}


def test_kill_and_resume_reproduces_loss_curve_and_reshards(train_dataset, tmp_path, monkeypatch):
    io_spec = {"kind": "local", "root": str(tmp_path / "ckpt")}
    full = run_local(_cfg(train_dataset, run_id="full"), io_spec)
    assert full["status"] == "completed" and full["step"] == 8
    curve = _losses(full)
    assert curve[-1] < curve[0] - 0.5, curve

    # A worker is SIGKILLed after step 4 (after the step-3 checkpoint) of attempt 1: the attempt fails...
    _arm(monkeypatch, _kill_after_step(4, rank=1))
    with pytest.raises(WorkerFailed, match=r"train-worker-1 \(signal 9\)"):
        run_local(_cfg(train_dataset, run_id="crash"), io_spec)
    io = LocalCheckpointIO(tmp_path / "ckpt")
    assert io.resolve("m:run-crash") is not None
    # ... and the retry (same world size) resumes from step 3 and reproduces the curve bit for bit.
    events = []
    resumed = run_local(
        _cfg(train_dataset, run_id="crash", attempt=2), io_spec, on_event=lambda k, d: events.append((k, d))
    )
    assert any(k == "log" and "resumed from m:" in d["message"] for k, d in events)
    assert _losses(resumed) == curve

    # Resharding: a 2-worker checkpoint resumed on 1 worker (same global batch) follows the same curve.
    _arm(monkeypatch, _kill_after_step(4, rank=0))
    with pytest.raises(WorkerFailed):
        run_local(_cfg(train_dataset, run_id="reshard"), io_spec)
    one = run_local(_cfg(train_dataset, run_id="reshard", workers=1, micro_batch_size=8, attempt=2), io_spec)
    assert one["workers"] == 1
    np.testing.assert_allclose(_losses(one), curve, rtol=2e-4)

    # Each rank wrote only its own rows: pieces of the 2-worker checkpoint are half-height shards.
    ref = io.resolve("m:run-full")
    layout = io.layout(ref)
    pieces = layout["model.embed_tokens.weight"]
    assert len(pieces) == 2 and {p.offsets[0] for p in pieces} == {0, pieces[0].global_shape[0] // 2}
    state = read_full(io, ref, ["model.embed_tokens.weight", "model.norm.weight"])
    assert state["model.embed_tokens.weight"].shape == tuple(pieces[0].global_shape)
    manifest = io.store.get(ref).manifest
    assert {"config.json", "tokenizer.json", "train_state.json"} <= {f.name for f in manifest.files}
    assert not any(k.startswith("optim.") for k in layout), "the final checkpoint is weights only"


def test_nan_loss_stops_with_reason_and_keeps_last_good_checkpoint(train_dataset, tmp_path, monkeypatch):
    io_spec = {"kind": "local", "root": str(tmp_path / "ckpt")}
    _arm(monkeypatch, {"trainer.loss": {"action": "trigger", "when": {"step": 5, "attempt": 1}}})
    result = run_local(_cfg(train_dataset, run_id="nan", workers=2, checkpoint_every=2), io_spec)
    assert result["status"] == "failed"
    assert "non-finite" in result["reason"] and "step 5" in result["reason"] and "m:2" in result["reason"]
    assert result["checkpoint"] == "m:2" and result["step"] == 4
    io = LocalCheckpointIO(tmp_path / "ckpt")
    state = json.loads(io.read_files("m:2", ["train_state.json"])["train_state.json"])
    assert state["step"] == 4
    weights = read_full(io, "m:2", ["model.layers.0.self_attn.q_proj.weight"])
    assert torch.isfinite(weights["model.layers.0.self_attn.q_proj.weight"]).all()


def test_sft_masks_prompt_tokens():
    inputs, targets = encode_sft_example([5, 6, 7], [8, 9], eos_id=0, seq_len=8)
    assert inputs.tolist() == [5, 6, 7, 8, 9, 0, 0, 0]
    # position i predicts token i+1: prompt tokens 6, 7 are masked; 8, 9 and eos are learned
    assert targets.tolist() == [IGNORE_INDEX, IGNORE_INDEX, 8, 9, 0, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    inputs, targets = encode_sft_example([1] * 10, [2, 3], eos_id=0, seq_len=4)
    assert (targets == IGNORE_INDEX).all(), "a prompt filling the window contributes no loss"


def test_sft_then_lora_trains_only_adapters(train_dataset, sft_jsonl, tmp_path):
    io_spec = {"kind": "local", "root": str(tmp_path / "ckpt")}
    base = run_local(_cfg(train_dataset, run_id="base", workers=1, steps=3, checkpoint_every=0), io_spec)
    sft = run_local(
        TrainConfig(
            mode="sft",
            sft_path=str(sft_jsonl),
            dataset_path=str(train_dataset),
            init_checkpoint=base["checkpoint"],
            output_name="sft",
            workers=1,
            steps=12,
            micro_batch_size=8,
            seq_len=32,
            lr=3e-3,
            warmup_steps=1,
            run_id="sft",
        ),
        io_spec,
    )
    assert sft["status"] == "completed"
    losses = _losses(sft)
    assert min(losses[-3:]) < losses[0], losses
    lora = run_local(
        TrainConfig(
            mode="lora",
            sft_path=str(sft_jsonl),
            dataset_path=str(train_dataset),
            init_checkpoint=base["checkpoint"],
            output_name="adapter",
            workers=2,
            steps=4,
            micro_batch_size=4,
            seq_len=32,
            lr=1e-2,
            warmup_steps=0,
            run_id="lora",
            lora=LoraSettings(rank=4, alpha=8, target_modules=["q_proj", "v_proj"]),
        ),
        io_spec,
    )
    assert lora["trainable_parameters"] < lora["parameters"] / 10
    io = LocalCheckpointIO(tmp_path / "ckpt")
    names = set(io.layout(lora["checkpoint"]))
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names), names
    assert len(names) == 2 * 2 * 4  # (A, B) x (q, v) x 4 layers
    adapters = read_full(io, lora["checkpoint"])
    assert any(adapters[n].abs().sum() > 0 for n in names if ".lora_B." in n), (
        "B left zero: adapters never trained"
    )
    cfg = json.loads(io.read_files(lora["checkpoint"], ["adapter_config.json"])["adapter_config.json"])
    assert cfg["r"] == 4 and cfg["target_modules"] == ["q_proj", "v_proj"]


def test_grad_accumulation_matches_the_larger_batch(train_dataset, tmp_path):
    io_spec = {"kind": "local", "root": str(tmp_path / "ckpt")}
    common = dict(workers=1, steps=4, checkpoint_every=0, warmup_steps=1)
    big = run_local(_cfg(train_dataset, run_id="big", micro_batch_size=8, **common), io_spec)
    accum = run_local(
        _cfg(
            train_dataset,
            run_id="acc",
            micro_batch_size=4,
            grad_accum_steps=2,
            activation_checkpointing=True,
            **common,
        ),
        io_spec,
    )
    np.testing.assert_allclose(_losses(accum), _losses(big), rtol=2e-4)


def test_lr_schedule_warmup_then_cosine():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=4, total_steps=14)
    assert [lr_at(s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, **kw) == pytest.approx(1.0)
    assert lr_at(9, **kw) == pytest.approx(0.55)
    assert lr_at(14, **kw) == pytest.approx(0.1)
