"""Pick the `make demo` model by measurement: val loss and sample quality at an equal idle-CPU time budget.

Each setting (model shape, seq len, batch, lr) trains on an ingested dataset with the trainer's own
pieces (``Transformer``, ``TokenSampler``, ``lr_at``, AdamW with the engine's decay groups and
clipping; ``bench.train`` measures the engine's step at 0.99x of this loop). The machine may be busy,
so wall time is not comparable across runs: every setting's tokens/s is measured next to the
``bench.train`` reference model, and scaled to the reference's idle rate from docs/benchmarks.md. A
setting then trains for the number of steps an idle 2-core machine runs in ``--budget-s`` seconds, so
settings are compared at equal demo time whatever the load. Each trained model completes the demo's
prompts (``def ``, ``import ``, ``class ``) with the demo's sampling settings, and the table reports
how many completions parse (``ast.parse`` of prompt + completion cut at its last full line).

    .venv/bin/python scripts/demo_sweep.py --dataset .tokenmill-demo/datasets/stdlib [--budget-s 200]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer

from tokenmill.common.data.dataset import PackedDataset, TokenSampler, read_manifest
from tokenmill.common.inference.healing import TokenHealer
from tokenmill.common.model.transformer import Transformer, preset
from tokenmill.common.platform.demo import PROMPTS, parses_as_python
from tokenmill.common.trainer.schedule import lr_at

REFERENCE_IDLE_TPS = 7549.0  # bench.train's worker step on the idle 2-core box (docs/benchmarks.md)
REFERENCE = {"hidden_size": 256, "intermediate_size": 768, "num_layers": 4, "num_heads": 8, "num_kv_heads": 4}


@dataclass
class Setting:
    name: str
    model: dict[str, int]
    seq_len: int
    batch: int
    lr: float
    warmup: int = 20
    sampling: dict[str, float] = field(default_factory=lambda: {"temperature": 0.6, "top_k": 40})


SETTINGS = [
    Setting("test-1m s128 b16 lr3e-3", {}, 128, 16, 3e-3),
    Setting("h256 L4 s256 b8 lr2e-3", REFERENCE, 256, 8, 2e-3),
    Setting("h192 L6 s256 b8 lr2e-3", {"hidden_size": 192, "intermediate_size": 512, "num_layers": 6,
                                       "num_heads": 6, "num_kv_heads": 3}, 256, 8, 2e-3),
]  # fmt: skip


class Run:
    """One model + optimizer + sampler, stepped like the engine's worker at world size 1."""

    def __init__(self, dataset: Path, model: dict[str, int], vocab: int, seq_len: int, batch: int):
        torch.manual_seed(0)
        self.model = Transformer(preset("test-1m", **model, vocab_size=vocab, max_seq_len=max(512, seq_len)))
        params = list(self.model.parameters())
        self.opt = torch.optim.AdamW(
            [
                {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
            ],
            betas=(0.9, 0.95),
        )
        self.sampler = TokenSampler(PackedDataset(dataset, "train"), seq_len, batch)
        self.val = TokenSampler(PackedDataset(dataset, "val"), seq_len, batch, seed=1)
        self.tokens_per_step = seq_len * batch
        self.vocab = vocab

    def step(self, lr: float) -> float:
        for group in self.opt.param_groups:
            group["lr"] = lr
        # the rate reference keeps bench.train's 2048 vocab: ids are folded into it (timing only)
        x, y = (t % self.vocab for t in self.sampler.next_batch())
        _, loss = self.model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def tokens_per_s(self, steps: int = 6) -> float:
        """Training rate after 2 warm-up steps; meant for a throwaway Run (it takes optimizer steps)."""
        for _ in range(2):
            self.step(1e-9)
        start = time.perf_counter()
        for _ in range(steps):
            self.step(1e-9)
        return steps * self.tokens_per_step / (time.perf_counter() - start)

    @torch.no_grad()
    def val_loss(self, batches: int = 8) -> float:
        self.model.eval()
        losses = [float(self.model(*self.val.next_batch())[1]) for _ in range(batches)]
        self.model.train()
        return sum(losses) / len(losses)

    @torch.no_grad()
    def complete(self, tok: Tokenizer, prompt: str, temperature: float, top_k: int, n: int = 64) -> str:
        ids = tok.encode(prompt).ids
        healing = TokenHealer(tok).heal(ids)  # as the demo asks: --token-healing
        if healing is not None:
            ids = healing.prompt_token_ids
        out: list[int] = []
        gen = torch.Generator().manual_seed(0)
        for _ in range(n):
            logits = self.model(torch.tensor([ids + out]))[0, -1] / temperature
            if healing is not None and not out:
                allowed = torch.tensor(healing.allowed_token_ids)
                logits = torch.full_like(logits, float("-inf")).index_copy(0, allowed, logits[allowed])
            kth = torch.topk(logits, top_k).values[-1]
            probs = torch.softmax(logits.masked_fill(logits < kth, float("-inf")), -1)
            out.append(int(torch.multinomial(probs, 1, generator=gen)))
        return tok.decode(ids + out)[len(prompt) :] if healing is not None else tok.decode(out)


def evaluate(setting: Setting, dataset: Path, budget_s: float) -> dict[str, object]:
    vocab = -(-int(read_manifest(dataset)["vocab_size"]) // 64) * 64
    tok = Tokenizer.from_file(str(dataset / "tokenizer.json"))
    ref = Run(dataset, REFERENCE, 2048, 256, 4).tokens_per_s()
    tps = Run(dataset, setting.model, vocab, setting.seq_len, setting.batch).tokens_per_s()
    run = Run(dataset, setting.model, vocab, setting.seq_len, setting.batch)
    idle_tps = tps / ref * REFERENCE_IDLE_TPS
    steps = int(budget_s * idle_tps / run.tokens_per_step)
    start = time.perf_counter()
    for i in range(steps):
        run.step(
            lr_at(i, lr=setting.lr, min_lr=setting.lr / 10, warmup_steps=setting.warmup, total_steps=steps)
        )
    samples = {p: p + run.complete(tok, p, **setting.sampling) for p in PROMPTS}  # type: ignore[arg-type]
    return {
        "setting": setting.name,
        "params_M": round(sum(p.numel() for p in run.model.parameters()) / 1e6, 2),
        "steps": steps,
        "val_loss": round(run.val_loss(), 3),
        "idle_tokens_per_s": round(idle_tps),
        "wall_s_here": round(time.perf_counter() - start),
        "parses": sum(parses_as_python(s) for s in samples.values()),
        "samples": samples,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", type=Path, required=True, help="an ingested dataset directory")
    ap.add_argument("--budget-s", type=float, default=200.0, help="idle 2-core training seconds per setting")
    ap.add_argument("--only", default="", help="run only settings whose name contains this")
    args = ap.parse_args()
    for setting in SETTINGS:
        if args.only in setting.name:
            print(json.dumps(evaluate(setting, args.dataset, args.budget_s)), flush=True)


if __name__ == "__main__":
    main()
