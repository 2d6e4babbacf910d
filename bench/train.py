"""CPU benchmark: tokens/s of our training worker step (world size 1) vs a bare PyTorch loop.

Ours is the real engine (`tokenmill.common.trainer.worker.train`: FSDP2 over a gloo group of one,
AdamW, clipping, schedule, the per-step loss/stop all-reduce, sampler); its per-step times come from
its own progress reports. The baseline is a plain single-process loop over the same model, batch,
optimizer settings and sampler. Both run in this process in lockstep (one of our steps, then one
baseline step, ...), so load from other processes hits both alike; the ratio is the median over step
pairs of baseline time / our time, the tokens/s figures are per-side medians (minimums reported too).

    python -m bench.train [--steps 40]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench._report import target, write_report
from tokenmill.common.data.dataset import (
    MANIFEST,
    PackedDataset,
    ShardWriter,
    TokenSampler,
    token_dtype_for,
    write_json_atomic,
)
from tokenmill.common.model.transformer import Transformer
from tokenmill.common.trainer.config import TrainConfig
from tokenmill.common.trainer.local_io import LocalCheckpointIO
from tokenmill.common.trainer.parallel import free_port
from tokenmill.common.trainer.schedule import lr_at
from tokenmill.common.trainer.worker import NullChannel, train

MODEL = {"hidden_size": 256, "intermediate_size": 768, "num_layers": 4, "num_heads": 8, "num_kv_heads": 4}
VOCAB = 2048


def make_dataset(root: Path, tokens: int = 400_000) -> Path:
    out = root / "datasets" / "bench"
    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", tokens), ("val", tokens // 20)):
        with ShardWriter(out, split, vocab_size=VOCAB, eos_id=0) as w:
            left = n
            while left > 0:
                doc = rng.integers(1, VOCAB, size=min(left, 500))
                w.add(doc)
                left -= doc.size + 1
            splits[split] = w.close()
    write_json_atomic(
        out / MANIFEST,
        {
            "name": "bench",
            "token_dtype": token_dtype_for(VOCAB),
            "vocab_size": VOCAB,
            "eos_id": 0,
            "splits": splits,
        },
    )
    return out


class BareLoop:
    """The baseline: a plain single-process loop over the same model, optimizer settings and data."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        self.model = Transformer(cfg.model_config())
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr,
            betas=cfg.betas,
        )
        self.sampler = TokenSampler(
            PackedDataset(cfg.dataset_path, "train"), cfg.seq_len, cfg.micro_batch_size, seed=cfg.seed
        )
        self.step = 0
        self.times: list[float] = []

    def train_step(self) -> None:
        cfg = self.cfg
        t0 = time.perf_counter()
        lr = lr_at(
            self.step, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps
        )
        for g in self.opt.param_groups:
            g["lr"] = lr
        x, y = self.sampler.next_batch()
        _, loss = self.model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        float(loss.detach())
        self.times.append(time.perf_counter() - t0)
        self.step += 1


class LockstepChannel(NullChannel):
    """Runs one baseline step right after each of our steps is timed (progress reports fall outside our
    step's timed window), so both sides see the same machine load, step by step."""

    def __init__(self, bare: BareLoop):
        super().__init__()
        self.bare = bare

    def report(self, kind: str, data: dict) -> None:
        super().report(kind, data)
        if kind == "progress":
            self.bare.train_step()


def run_pair(cfg: TrainConfig, ckpt_root: Path) -> tuple[list[float], list[float]]:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(free_port())
    bare = BareLoop(cfg)
    channel = LockstepChannel(bare)
    result = train(cfg, LocalCheckpointIO(ckpt_root), channel)
    assert result["status"] == "completed", result
    ours = [d["step_time_s"] for k, d in channel.events if k == "progress"]
    return ours[3:], bare.times[3:]  # skip warm-up steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        ds = make_dataset(Path(tmp))
        cfg = TrainConfig(
            dataset_path=str(ds),
            model_overrides={**MODEL, "vocab_size": VOCAB},
            device="cpu",
            steps=args.steps,
            micro_batch_size=args.batch,
            seq_len=args.seq_len,
            warmup_steps=5,
            output_name="bench",
        )
        ours, bare = run_pair(cfg, Path(tmp) / "ckpt")
    tokens = args.batch * args.seq_len
    # Paired estimate: per step pair, bare time / our time; the median over pairs cancels load drift.
    ratio = statistics.median(b / o for o, b in zip(ours, bare, strict=True))
    ours_tps, bare_tps = tokens / statistics.median(ours), tokens / statistics.median(bare)
    write_report(
        "train",
        figures={
            "ours_tokens_per_s": ours_tps,
            "ours_step_ms_min": 1e3 * min(ours),
            "ours_step_ms_median": 1e3 * statistics.median(ours),
        },
        baseline={
            "bare_tokens_per_s": bare_tps,
            "bare_step_ms_min": 1e3 * min(bare),
            "bare_step_ms_median": 1e3 * statistics.median(bare),
        },
        ratios={"ours_over_bare": ratio},
        targets={"ours_over_bare": target(ratio, 0.95)},
        extra={
            "config": {
                "model": MODEL,
                "vocab": VOCAB,
                "batch": args.batch,
                "seq_len": args.seq_len,
                "steps": args.steps,
                "threads": torch.get_num_threads(),
            },
            "step_s": {"ours": ours, "bare": bare},
        },
    )


if __name__ == "__main__":
    main()
