"""GPU benchmark: our training step vs Hugging Face LlamaForCausalLM + torch.compile, one GPU.

Ours is the real engine (`tokenmill.common.trainer.worker.train`): FSDP2 world size 1 over NCCL,
bf16 params/activations with fp32 master weights and fp32 gradient reduction, per-block
torch.compile, fused AdamW, clipping, warmup+cosine, packed-shard sampler. The baseline is the
standard HF recipe on the same config, batch and sequence: fp32 weights + bf16 autocast, SDPA
attention, torch.compile of the whole model, fused AdamW, clipping. Both run in this process.
MFU = (6N + 12·L·H·Q·T) · tokens/s / peak (PaLM), peak from the device table in
common/trainer/metrics.py (H100/H200 SXM dense bf16 989 TFLOP/s).

Needs torch + transformers only (no Redis, Ray or gRPC). Finishes in well under 8 minutes on an H100.

    python -m bench.train_gpu              # gpt2-124m and llama-1b on cuda:0
    python -m bench.train_gpu --smoke      # tiny CPU run that checks the script end to end
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._report import target, write_report  # noqa: E402
from tokenmill.common.data.dataset import MANIFEST, ShardWriter, token_dtype_for, write_json_atomic  # noqa: E402
from tokenmill.common.model.transformer import preset  # noqa: E402
from tokenmill.common.trainer.config import TrainConfig  # noqa: E402
from tokenmill.common.trainer.local_io import LocalCheckpointIO  # noqa: E402
from tokenmill.common.trainer.metrics import peak_flops  # noqa: E402
from tokenmill.common.trainer.parallel import free_port  # noqa: E402
from tokenmill.common.trainer.worker import NullChannel, train  # noqa: E402

# name -> (micro batch, seq len, warm-up steps, measured steps, MFU goal, speed-up goal vs HF)
PLANS = {
    "gpt2-124m": (16, 1024, 10, 30, 0.45, 1.25),
    "llama-1b": (4, 2048, 8, 16, 0.55, 1.15),
}
SMOKE = {"test-1m": (2, 64, 2, 4, 0.0, 0.0)}


def make_dataset(root: Path, vocab: int, tokens: int) -> Path:
    out = root / "datasets" / f"synthetic-{vocab}"
    if (out / MANIFEST).exists():
        return out
    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", tokens), ("val", 4096)):
        with ShardWriter(out, split, vocab_size=vocab, eos_id=0) as w:
            data = rng.integers(1, vocab, size=n)
            for i in range(0, n, 4095):
                w.add(data[i : i + 4095])
            splits[split] = w.close()
    write_json_atomic(
        out / MANIFEST,
        {
            "name": out.name,
            "token_dtype": token_dtype_for(vocab),
            "vocab_size": vocab,
            "eos_id": 0,
            "splits": splits,
        },
    )
    return out


def run_ours(name: str, batch: int, seq: int, warm: int, steps: int, root: Path, device: str) -> float:
    """Median step time over the measured windows (each window = `log_every` steps, one sync)."""
    model = preset(name)
    ds = make_dataset(root, model.vocab_size, batch * (seq + 1) * (warm + steps + 2))
    window = 2 if device == "cuda" else 1
    cfg = TrainConfig(
        dataset_path=str(ds),
        model_preset=name,
        device=device,
        precision="bf16" if device == "cuda" else "fp32",
        compile=device == "cuda",
        steps=warm + steps,
        micro_batch_size=batch,
        seq_len=seq,
        warmup_steps=2,
        lr=3e-4,
        min_lr=3e-5,
        log_every=window,
        output_name="bench",
        save_final=False,
    )
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(free_port())  # a fresh rendezvous per run in this process
    channel = NullChannel()
    result = train(cfg, LocalCheckpointIO(root / "ckpt"), channel)
    assert result["status"] == "completed", result
    times = [d["step_time_s"] for kind, d in channel.events if kind == "progress" and d["step"] > warm]
    return statistics.median(times)


def run_hf(name: str, batch: int, seq: int, warm: int, steps: int, device: str) -> float:
    import transformers

    cfg = preset(name)
    hf_cfg = transformers.LlamaConfig(**cfg.to_hf_config())
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM._from_config(hf_cfg, attn_implementation="sdpa")
    model.train()
    opt = torch.optim.AdamW(
        model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=device == "cuda"
    )
    compiled = torch.compile(model) if device == "cuda" else model
    gen = torch.Generator(device="cpu").manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen) for _ in range(4)]
    amp = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device == "cuda"
        else torch.autocast("cpu", enabled=False)
    )
    times = []
    for step in range(warm + steps):
        ids = batches[step % len(batches)].to(device, non_blocking=True)
        t0 = time.perf_counter()
        with amp:
            loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())  # one sync per step, as a plain loop logs its loss
        if step >= warm:
            times.append(time.perf_counter() - t0)
    del compiled, model, opt
    return statistics.median(times)


def release() -> None:
    torch._dynamo.reset()  # the next model compiles from scratch; no stale graphs hold memory
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU: checks the script runs")
    ap.add_argument("--models", default=",".join(PLANS), help="comma-separated presets")
    args = ap.parse_args()
    if args.smoke:
        plans, device = SMOKE, "cpu"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench.train_gpu needs a CUDA device (use --smoke on CPU)")
        plans = {m: PLANS[m] for m in args.models.split(",")}
        device = "cuda"
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    peak = peak_flops(torch.cuda.get_device_name(0)) if device == "cuda" else None
    figures, baseline, ratios, targets, detail = {}, {}, {}, {}, {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-train-gpu-") as tmp:
        for name, (batch, seq, warm, steps, mfu_goal, speed_goal) in plans.items():
            t0 = time.perf_counter()
            ours = run_ours(name, batch, seq, warm, steps, Path(tmp), device)
            ours_mem = torch.cuda.max_memory_allocated() if device == "cuda" else 0
            release()
            hf = run_hf(name, batch, seq, warm, steps, device)
            hf_mem = torch.cuda.max_memory_allocated() if device == "cuda" else 0
            release()
            tokens = batch * seq
            fpt = preset(name).flops_per_token(seq)
            ours_tps, hf_tps = tokens / ours, tokens / hf
            figures[f"{name}_tokens_per_s"] = ours_tps
            baseline[f"{name}_hf_tokens_per_s"] = hf_tps
            ratios[f"{name}_ours_over_hf"] = ours_tps / hf_tps
            if peak:
                figures[f"{name}_mfu"] = fpt * ours_tps / peak
                baseline[f"{name}_hf_mfu"] = fpt * hf_tps / peak
                targets[f"{name}_mfu"] = target(figures[f"{name}_mfu"], mfu_goal)
                targets[f"{name}_ours_over_hf"] = target(ratios[f"{name}_ours_over_hf"], speed_goal)
            detail[name] = {
                "micro_batch": batch,
                "seq_len": seq,
                "warmup_steps": warm,
                "measured_steps": steps,
                "flops_per_token": fpt,
                "ours_step_s": ours,
                "hf_step_s": hf,
                "ours_peak_mem_bytes": ours_mem,
                "hf_peak_mem_bytes": hf_mem,
                "wall_s": time.perf_counter() - t0,
            }
            print(
                f"{name}: ours {ours_tps:,.0f} tok/s, HF {hf_tps:,.0f} tok/s ({time.perf_counter() - t0:.0f}s)",
                flush=True,
            )
    import transformers

    write_report(
        "train_gpu_smoke" if args.smoke else "train_gpu",
        figures=figures,
        baseline=baseline,
        ratios=ratios,
        targets=targets,
        extra={
            "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
            "peak_flops": peak,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "models": detail,
            "wall_s": time.perf_counter() - started,
        },
    )


if __name__ == "__main__":
    main()
