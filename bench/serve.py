"""CPU serving benchmark: 32 concurrent streams through the engine vs one request at a time.

Baselines, same model weights and lengths, measured in the same run: (a) the same engine serving
one request at a time, (b) Hugging Face `LlamaForCausalLM.generate` one request at a time (KV
cache on, greedy). Figure: output tokens/s; target >= 5x the better baseline.

    python -m bench.serve [--requests 32] [--prompt-len 64] [--new-tokens 64] [--baseline-requests 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench._report import target, write_report
from tokenmill.common.inference import EngineConfig, SamplingParams, build_engine
from tokenmill.common.model.transformer import ModelConfig, Transformer

MODEL = ModelConfig(
    vocab_size=4096,
    hidden_size=384,
    intermediate_size=1024,
    num_layers=6,
    num_heads=6,
    num_kv_heads=2,
    max_seq_len=512,
    tie_embeddings=True,
)


def make_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (length,), generator=g).tolist() for _ in range(n)]


def engine_run(engine, prompts, new_tokens: int, concurrent: bool) -> dict:
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    ttft, itl, produced = [], [], 0
    groups = [prompts] if concurrent else [[p] for p in prompts]
    for group in groups:
        reqs = [engine.add_request(prompt_token_ids=p, params=SamplingParams(**vars(params))) for p in group]
        last: dict[str, float] = {}
        start = time.perf_counter()
        while engine.has_unfinished():
            outs = engine.step()
            now = time.perf_counter()
            for o in outs:
                if o.request_id not in last:
                    ttft.append(now - start)
                else:
                    itl.append(now - last[o.request_id])
                last[o.request_id] = now
        produced += sum(len(r.output_token_ids) for r in reqs)
    elapsed = time.perf_counter() - t0
    return {
        "output_tokens": produced,
        "seconds": elapsed,
        "tokens_per_s": produced / elapsed,
        "ttft_p50_ms": 1000 * statistics.median(ttft),
        "itl_p50_ms": 1000 * statistics.median(itl),
        "itl_p99_ms": 1000 * statistics.quantiles(itl, n=100)[98] if len(itl) > 1 else 0.0,
    }


def hf_run(model, prompts, new_tokens: int) -> dict:
    t0 = time.perf_counter()
    produced = 0
    with torch.inference_mode():
        for p in prompts:
            out = model.generate(
                torch.tensor([p]),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
            produced += out.shape[1] - len(p)
    elapsed = time.perf_counter() - t0
    return {"output_tokens": produced, "seconds": elapsed, "tokens_per_s": produced / elapsed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--baseline-requests", type=int, default=8, help="requests timed for each baseline")
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds; the best of each is reported"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads for every run (1: stable on a shared box)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = Transformer(MODEL).eval()
    tensors = {k: v.detach() for k, v in model.state_dict().items()}
    hf = LlamaForCausalLM(LlamaConfig(**MODEL.to_hf_config())).eval()
    hf.load_state_dict(tensors, strict=False)
    prompts = make_prompts(args.requests, args.prompt_len, MODEL.vocab_size)
    cfg = EngineConfig(
        block_size=16,
        num_blocks=1 + args.requests * ((args.prompt_len + args.new_tokens) // 16 + 2),
        max_num_seqs=args.requests,
        max_num_batched_tokens=1024,
        enable_prefix_caching=False,
    )
    engine = build_engine(tensors, MODEL.to_dict(), cfg)
    engine_run(engine, prompts[:2], 4, concurrent=True)  # warm-up
    hf_run(hf, prompts[:1], 4)

    # Interleaved rounds, best of each: the box is shared, so load drifts between runs; every method
    # gets the same number of chances at a quiet moment.
    runs: dict[str, list[dict]] = {"batched": [], "sequential": [], "hf": []}
    for _ in range(args.rounds):
        runs["batched"].append(engine_run(engine, prompts, args.new_tokens, concurrent=True))
        runs["sequential"].append(
            engine_run(engine, prompts[: args.baseline_requests], args.new_tokens, concurrent=False)
        )
        runs["hf"].append(hf_run(hf, prompts[: args.baseline_requests], args.new_tokens))
    batched, sequential, hf_seq = (max(runs[k], key=lambda r: r["tokens_per_s"]) for k in runs)
    # Same greedy tokens as HF on one prompt: the figures compare equal work.
    check = engine.generate([prompts[0]], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))[0]
    with torch.inference_mode():
        ref = hf.generate(
            torch.tensor([prompts[0]]), max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    assert check.output_token_ids == ref[0, args.prompt_len :].tolist(), "engine and HF disagree"

    best = max(sequential["tokens_per_s"], hf_seq["tokens_per_s"])
    ratio = batched["tokens_per_s"] / best
    write_report(
        "serve",
        figures={
            "concurrent_streams": args.requests,
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "model_params": MODEL.num_params(),
            "torch_threads": args.threads,
            "rounds_best_of": args.rounds,
            "engine_batched_tokens_per_s": batched["tokens_per_s"],
            "engine_batched_ttft_p50_ms": batched["ttft_p50_ms"],
            "engine_batched_itl_p50_ms": batched["itl_p50_ms"],
            "engine_batched_itl_p99_ms": batched["itl_p99_ms"],
        },
        baseline={
            "engine_one_at_a_time_tokens_per_s": sequential["tokens_per_s"],
            "hf_generate_one_at_a_time_tokens_per_s": hf_seq["tokens_per_s"],
            "baseline_requests": args.baseline_requests,
        },
        ratios={
            "vs_engine_sequential": batched["tokens_per_s"] / sequential["tokens_per_s"],
            "vs_hf_generate": batched["tokens_per_s"] / hf_seq["tokens_per_s"],
        },
        targets={"throughput_vs_best_baseline": target(ratio, 5.0)},
        extra={"command": "python -m bench.serve " + " ".join(argv or [])},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
