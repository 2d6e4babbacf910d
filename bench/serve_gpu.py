"""GPU serving benchmark (one script, < 8 minutes on one H100/H200; no Redis, no gRPC).

A 1B-class model (Llama-3.2-1B shapes, random bf16 weights: speed does not depend on the values):

1. Batch-1 decode: tokens/s and the fraction of the memory-bandwidth floor reached, where the
   floor per step is (weight bytes + KV bytes read) / measured device copy bandwidth
   (Databricks' MBU with a measured, not a datasheet, bandwidth). Target >= 50 %.
2. 64 concurrent requests (128-token prompts, 256 new tokens) through the engine vs Hugging Face
   `generate` on the same batch, same weights, same run. Target >= 10x output tokens/s.

    python -m bench.serve_gpu            # on the GPU box
    python -m bench.serve_gpu --smoke    # tiny config, runs anywhere (CPU), checks the script
"""

from __future__ import annotations

import argparse
import time

import torch

from bench._report import target, write_report
from tokenmill.common.inference import EngineConfig, SamplingParams, build_engine
from tokenmill.common.model.transformer import ModelConfig, preset


def copy_bandwidth(device: torch.device, nbytes: int, iters: int) -> float:
    """Bytes/s moved by a device-to-device copy (read + write counted)."""
    n = nbytes // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    sync(device)
    elapsed = time.perf_counter() - t0
    del src, dst
    return 2 * n * 2 * iters / elapsed


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_hf(cfg: ModelConfig, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(**cfg.to_hf_config())
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(hf_cfg).to(dtype).eval()
    return model


def run_engine(engine, prompts: list[list[int]], new_tokens: int, device) -> dict:
    """Submit all prompts at once; returns throughput and per-token timings."""
    reqs = [
        engine.add_request(
            prompt_token_ids=p, params=SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        )
        for p in prompts
    ]
    sync(device)
    t0 = time.perf_counter()
    first_done = None
    decode_steps = 0
    while engine.has_unfinished():
        outs = engine.step()
        if outs and first_done is None and all(r.output_token_ids for r in reqs):
            sync(device)
            first_done = time.perf_counter()
        elif first_done is not None:
            decode_steps += 1
    sync(device)
    end = time.perf_counter()
    produced = sum(len(r.output_token_ids) for r in reqs)
    first_done = first_done or end
    return {
        "output_tokens": produced,
        "seconds": end - t0,
        "tokens_per_s": produced / (end - t0),
        "prefill_s": first_done - t0,
        "decode_s_per_step": (end - first_done) / max(decode_steps, 1),
        "decode_steps": decode_steps,
        "tokens": [r.output_token_ids for r in reqs],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke", action="store_true", help="tiny model, few tokens (CPU check of the script)"
    )
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--no-cuda-graphs", action="store_true")
    args = parser.parse_args(argv)
    t_start = time.perf_counter()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        cfg = ModelConfig(
            vocab_size=512,
            hidden_size=128,
            intermediate_size=256,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            max_seq_len=512,
        )
        args.batch, args.prompt_len, args.new_tokens = 4, 16, 8
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        if device.type != "cuda":
            raise SystemExit("bench/serve_gpu.py needs a CUDA GPU; use --smoke to check the script on CPU")
        cfg = preset("llama-1b")
        dtype = torch.bfloat16
    torch.backends.cuda.matmul.allow_tf32 = True

    hf = build_hf(cfg, device, dtype)
    tensors = dict(hf.state_dict())
    max_len = args.prompt_len + args.new_tokens + 16
    kv_bytes_needed = (args.batch + 1) * max_len * 2 * cfg.num_layers * cfg.num_kv_heads * cfg.dim_head * 2
    ecfg = EngineConfig(
        block_size=16,
        kv_cache_memory_bytes=int(kv_bytes_needed * 1.5),
        max_num_seqs=args.batch,
        max_num_batched_tokens=max(2048, args.batch * args.prompt_len // 2),
        max_model_len=min(cfg.max_seq_len, 2048),
        enable_prefix_caching=False,
        device=str(device),
        dtype=dtype,
        use_cuda_graphs=not args.no_cuda_graphs,
        cuda_graph_max_batch=max(64, args.batch),
    )
    engine = build_engine(tensors, cfg.to_hf_config(), ecfg)
    g = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(1, cfg.vocab_size, (args.prompt_len,), generator=g).tolist() for _ in range(args.batch)
    ]

    # Warm-up: kernels, allocator, CUDA graphs for the buckets both runs use.
    run_engine(engine, prompts[:1], min(args.new_tokens, 64), device)
    run_engine(engine, prompts, 8, device)

    # 1. Batch-1 decode against the bandwidth floor.
    one = run_engine(engine, prompts[:1], args.new_tokens, device)
    weight_bytes = engine.model.weight_bytes()
    kv_per_token = engine.spec.kv_bytes_per_token(dtype)
    mean_ctx = args.prompt_len + args.new_tokens / 2
    step_bytes = weight_bytes + kv_per_token * mean_ctx
    bw = copy_bandwidth(device, 1 << (24 if args.smoke else 30), 5 if args.smoke else 20)
    floor_s = step_bytes / bw
    frac = floor_s / one["decode_s_per_step"]

    # 2. Concurrent requests vs HF generate on the same batch.
    many = run_engine(engine, prompts, args.new_tokens, device)
    ids = torch.tensor(prompts, device=device)
    with torch.inference_mode():
        hf.generate(
            ids[:, :8], max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None
        )  # warm-up
        sync(device)
        t0 = time.perf_counter()
        out = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
        sync(device)
        hf_s = time.perf_counter() - t0
    hf_tokens = int((out.shape[1] - args.prompt_len) * out.shape[0])
    hf_tps = hf_tokens / hf_s
    # Same weights, greedy: the first tokens should agree (bf16 can flip near-ties later).
    agree = sum(
        a == b
        for row, toks in zip(out[:, args.prompt_len :].tolist(), many["tokens"], strict=True)
        for a, b in zip(row[:8], toks[:8], strict=False)
    ) / (8 * args.batch)

    name = "serve_gpu_smoke" if args.smoke else "serve_gpu"
    write_report(
        name,
        figures={
            "model": "tiny (smoke)" if args.smoke else "llama-1b shapes, random bf16 weights",
            "parameters": cfg.num_params(),
            "batch1_decode_tokens_per_s": 1.0 / one["decode_s_per_step"],
            "batch1_decode_ms_per_token": 1000 * one["decode_s_per_step"],
            "batch1_bandwidth_floor_ms": 1000 * floor_s,
            "batch1_fraction_of_bandwidth_floor": frac,
            "weight_bytes": weight_bytes,
            "measured_copy_bandwidth_gb_s": bw / 1e9,
            "concurrent_requests": args.batch,
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "engine_tokens_per_s": many["tokens_per_s"],
            "engine_prefill_s": many["prefill_s"],
            "engine_decode_ms_per_step": 1000 * many["decode_s_per_step"],
            "first8_token_agreement_with_hf": agree,
            "cuda_graphs": bool(engine.runner.use_graphs),
            "cuda_graphs_captured": len(engine.runner.graphs),
        },
        baseline={"hf_generate_same_batch_tokens_per_s": hf_tps, "hf_generate_seconds": hf_s},
        ratios={"engine_vs_hf_generate": many["tokens_per_s"] / hf_tps},
        targets={
            "batch1_fraction_of_bandwidth_floor": target(frac, 0.5),
            "concurrent_vs_hf_generate": target(many["tokens_per_s"] / hf_tps, 10.0),
            "wall_clock_minutes": target((time.perf_counter() - t_start) / 60, 8.0, higher_is_better=False),
        },
        extra={"command": "python -m bench.serve_gpu " + " ".join(argv or []), "device": str(device)},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
