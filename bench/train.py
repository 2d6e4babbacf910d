"""CPU benchmark: tokens/s of our training worker step (world size 1) vs a bare PyTorch loop.

Ours is the real engine (`services.trainer.engine.worker.train`: FSDP2 over a gloo group of one,
AdamW, clipping, schedule, the per-step loss/stop all-reduce, sampler); its per-step times come from
its own progress reports. The baseline is a plain single-process loop over the same model, batch,
optimizer settings and sampler. Both run in this process in alternating rounds; each side's figure is
its fastest step after warm-up over all rounds (on a shared machine interference only ever adds
time, so the minimum is the least noisy estimate of each side's own cost; medians are reported too).

    python -m bench.train [--steps 10] [--rounds 4]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench._report import target, write_report
from common.dataset import (
    MANIFEST,
    PackedDataset,
    ShardWriter,
    TokenSampler,
    token_dtype_for,
    write_json_atomic,
)
from common.model import Transformer
from services.trainer.engine.checkpoint_io import LocalCheckpointIO
from services.trainer.engine.config import TrainConfig
from services.trainer.engine.schedule import lr_at
from services.trainer.engine.worker import NullChannel, train

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


def run_ours(cfg: TrainConfig, ckpt_root: Path) -> list[float]:
    channel = NullChannel()
    result = train(cfg, LocalCheckpointIO(ckpt_root), channel)
    assert result["status"] == "completed", result
    return [d["step_time_s"] for k, d in channel.events if k == "progress"][2:]  # skip warm-up steps


def run_bare(cfg: TrainConfig) -> list[float]:
    torch.manual_seed(cfg.seed)
    model = Transformer(cfg.model_config())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=cfg.betas,
    )
    sampler = TokenSampler(
        PackedDataset(cfg.dataset_path, "train"), cfg.seq_len, cfg.micro_batch_size, seed=cfg.seed
    )
    times = []
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at(
                step, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps
            )
        x, y = sampler.next_batch()
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())
        times.append(time.perf_counter() - t0)
    return times[2:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=4)
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
        ours, bare = [], []
        for r in range(args.rounds):
            bare.extend(run_bare(cfg))
            ours.extend(run_ours(cfg, Path(tmp) / f"ckpt{r}"))
    tokens = args.batch * args.seq_len
    ours_tps, bare_tps = tokens / min(ours), tokens / min(bare)
    ratio = ours_tps / bare_tps
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
                "rounds": args.rounds,
                "threads": torch.get_num_threads(),
            },
            "step_s": {"ours": ours, "bare": bare},
        },
    )


if __name__ == "__main__":
    main()
