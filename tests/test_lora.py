"""common/model/lora.py: only adapters train, adapters save/load on their own, merging is exact."""

from __future__ import annotations

import pytest
import torch

from tokenmill.common.model.lora import (
    LoRALinear,
    adapter_config,
    adapter_state_dict,
    apply_lora,
    load_adapter,
    merge_lora,
)
from tokenmill.common.model.transformer import Transformer, preset


def _model(seed=0):
    torch.manual_seed(seed)
    return Transformer(preset("test-1m", num_layers=2, vocab_size=128))


def test_only_adapter_weights_train():
    model = _model()
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = apply_lora(model, rank=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    assert len(wrapped) == 6 and all(isinstance(model.get_submodule(n), LoRALinear) for n in wrapped)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # base parameter names are unchanged, so base checkpoints still load
    assert set(base_before) <= set(model.state_dict())
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), _model()(ids)), "B=0: adapted model equals its base"
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        _, loss = model(ids, ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    for k, v in base_before.items():
        assert torch.equal(after[k], v), f"frozen base weight {k} changed"
    assert any(after[k].abs().sum() > 0 for k in after if ".lora_B." in k)


def test_adapter_round_trip_and_merge_is_exact():
    model = _model()
    apply_lora(model, rank=2, alpha=4, target_modules=["q_proj", "o_proj"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_()
    saved = adapter_state_dict(model)
    assert set(saved) == {n for n, _ in model.named_parameters() if ".lora_" in n}
    other = _model()
    apply_lora(other, rank=2, alpha=4, target_modules=["q_proj", "o_proj"])
    load_adapter(other, saved)
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        want = model(ids)
        torch.testing.assert_close(other(ids), want)
        assert merge_lora(other) == 4
        assert not adapter_state_dict(other)
        torch.testing.assert_close(other(ids), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="adapter mismatch"):
        load_adapter(model, {"nope.lora_A.weight": torch.zeros(1)})


def test_bad_targets_and_config():
    with pytest.raises(ValueError, match="unknown LoRA target"):
        apply_lora(_model(), rank=2, alpha=2, target_modules=["qkv"])
    with pytest.raises(ValueError, match="rank must be >= 1"):
        apply_lora(_model(), rank=0, alpha=2)
    cfg = adapter_config(8, 16, ["v_proj", "q_proj"], 0.05)
    assert cfg["peft_type"] == "LORA" and cfg["target_modules"] == ["q_proj", "v_proj"] and cfg["r"] == 8
