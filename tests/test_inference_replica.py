"""The replica service over real gRPC, with the model loaded from a real checkpoint service."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from tests.fixtures.grpc import TEST_TOKEN
from tests.fixtures.inference import reference_greedy
from tokenmill.common import errors
from tokenmill.services.inference.replica import ReplicaServicer
from tokenmill.v1 import inference_pb2


def test_generate_and_stream_match_the_reference(start_replica, tiny_ckpt):
    h = start_replica()
    prompt = "The quick brown fox jumps over the lazy dog, once upon a time"
    ref = reference_greedy(tiny_ckpt.model, tiny_ckpt.encode(prompt), 20)
    resp = h.client.generate(prompt, max_tokens=20, temperature=0.0, ignore_eos=True, logprobs=True)
    assert list(resp.token_ids) == ref
    assert resp.finish_reason == "length" and resp.replica == "r0"
    assert resp.usage.prompt_tokens == len(tiny_ckpt.encode(prompt)) and resp.usage.completion_tokens == 20
    assert len(resp.logprobs) == 20 and all(lp <= 0 for lp in resp.logprobs)
    chunks = list(h.client.stream(prompt, max_tokens=20, temperature=0.0, ignore_eos=True))
    assert [t for c in chunks for t in c.token_ids] == ref
    assert "".join(c.text for c in chunks) == resp.text
    assert chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.cached_prompt_tokens > 0  # the second request reused the prompt's blocks


def test_tokenize_model_info_and_stats(start_replica, tiny_ckpt):
    h = start_replica()
    tok = h.client.tokenize("Naïve café")
    assert list(tok.token_ids) == tiny_ckpt.encode("Naïve café") and len(tok.tokens) == len(tok.token_ids)
    info = h.client.model_info()
    assert info.model == "tiny:1" and info.vocab_size == tiny_ckpt.config.vocab_size
    assert info.context_length == 256 and info.dtype == "float32" and info.quantization == ""
    assert info.parameters == tiny_ckpt.config.num_params()
    h.client.generate("hello", max_tokens=3)
    stats = h.client.stats()
    assert stats.replica == "r0" and stats.kv_blocks_total == 127 and stats.kv_blocks_free <= 127
    assert stats.prefix_cache_queries > 0 and list(stats.gpus) == []  # CPU host: no GPUs, no error


@pytest.mark.parametrize(
    ("kwargs", "code", "needle"),
    [
        (dict(prompt=""), "INVALID_ARGUMENT", "empty"),
        (dict(prompt=list(range(1, 257))), "INVALID_ARGUMENT", "context"),
        (dict(prompt="hi", max_tokens=10_000), "INVALID_ARGUMENT", "max_tokens"),
        (dict(prompt="hi", temperature=-1.0), "INVALID_ARGUMENT", "temperature"),
        (dict(prompt="hi", top_p=0.0), "INVALID_ARGUMENT", "top_p"),
        (dict(prompt="hi", top_p=1.01), "INVALID_ARGUMENT", "top_p"),
        (dict(prompt="hi", model="other-model"), "NOT_FOUND", "other-model"),
        (dict(prompt="hi", adapter="no-such-adapter"), "NOT_FOUND", "no-such-adapter"),
        (dict(prompt="hi", logit_bias={10**6: 1.0}), "INVALID_ARGUMENT", "outside the vocabulary"),
        (dict(prompt="hi", logit_bias={-1: 1.0}), "INVALID_ARGUMENT", "logit_bias keys"),
        (dict(prompt="hi", logit_bias={5: 101.0}), "INVALID_ARGUMENT", "logit_bias"),
        (dict(prompt="hi", frequency_penalty=2.5), "INVALID_ARGUMENT", "frequency_penalty"),
        (dict(prompt="hi", presence_penalty=-3.0), "INVALID_ARGUMENT", "presence_penalty"),
        (dict(prompt="hi", top_logprobs=21), "INVALID_ARGUMENT", "top_logprobs"),
    ],
)
def test_bad_requests_get_precise_statuses(start_replica, kwargs, code, needle):
    h = start_replica()
    prompt = kwargs.pop("prompt")
    with pytest.raises(errors.TokenmillError, match=needle) as info:
        h.client.generate(prompt, **kwargs)
    assert info.value.code == code
    with pytest.raises(errors.TokenmillError) as info:
        list(h.client.stream(prompt, **kwargs))
    assert info.value.code == code


def test_client_sends_every_sampling_control(start_replica):
    """logit_bias, the penalties, top_logprobs and echo reach the engine through the client."""
    h = start_replica()
    forced = h.client.generate("hi", max_tokens=4, temperature=0.0, ignore_eos=True, logit_bias={7: 100.0})
    assert list(forced.token_ids) == [7] * 4
    penalised = h.client.generate(
        "hi", max_tokens=4, temperature=0.0, ignore_eos=True, logit_bias={7: 50.0}, presence_penalty=-2.0
    )
    assert list(penalised.token_ids) == [7] * 4
    scored = h.client.generate("hi", max_tokens=2, temperature=0.0, top_logprobs=3, echo=True)
    assert scored.usage.completion_tokens == 2
    assert [len(t.entries) for t in scored.top_logprobs] == [3, 3]
    assert list(scored.prompt.token_ids) == h.client.tokenize("hi").token_ids


def test_max_tokens_zero_through_the_wire_means_server_default(start_replica):
    h = start_replica()
    resp = h.client.generate("hi", max_tokens=0, temperature=0.0, ignore_eos=True)
    assert (
        resp.usage.completion_tokens == 256 - resp.usage.prompt_tokens or resp.usage.completion_tokens == 256
    )


def test_non_utf8_stop_string_is_invalid_argument(start_replica):
    h = start_replica()
    good = inference_pb2.GenerateRequest(prompt="hi", sampling=inference_pb2.SamplingParams(stop=["XYZW"]))
    raw = good.SerializeToString().replace(b"XYZW", b"\xff\xfe\xc3(")
    channel = grpc.insecure_channel(h.address)
    call = channel.unary_unary(
        "/tokenmill.v1.InferenceService/Generate",
        request_serializer=lambda b: b,
        response_deserializer=inference_pb2.GenerateResponse.FromString,
    )
    with pytest.raises(grpc.RpcError) as info:
        call(raw, metadata=[("authorization", f"Bearer {TEST_TOKEN}")], timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "UTF-8" in info.value.details()
    channel.close()


def test_client_cancel_mid_stream_frees_blocks(start_replica):
    h = start_replica(enable_prefix_caching=False)
    engine = h.replica.engine
    stream = h.client.stream("Once upon a time", max_tokens=200, temperature=0.0, ignore_eos=True)
    got = [next(stream) for _ in range(3)]
    assert all(c.token_ids for c in got)
    stream.close()  # cancels the RPC
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        s = h.replica.aengine.stats()
        if s.requests_running == 0 and s.kv_blocks_free == s.kv_blocks_total:
            break
        time.sleep(0.05)
    assert not engine.requests and engine.blocks.num_free() == engine.blocks.usable_blocks


def test_concurrent_clients_all_complete(start_replica, tiny_ckpt):
    h = start_replica(max_num_seqs=16)
    prompts = ["The quick brown fox", "Once upon a time", "def add(a, b):", "Naïve café"] * 6
    results: dict[int, list[int]] = {}

    def run(i: int) -> None:
        results[i] = list(
            h.client.generate(prompts[i], max_tokens=10, temperature=0.0, ignore_eos=True).token_ids
        )

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, p in enumerate(prompts):
        assert results[i] == reference_greedy(tiny_ckpt.model, tiny_ckpt.encode(p), 10)


def test_servicer_without_a_loaded_model_is_unavailable():
    servicer = ReplicaServicer(lambda: None)
    with pytest.raises(errors.Unavailable, match="loading"):
        servicer.ModelInfo(inference_pb2.ModelInfoRequest(), None)


def test_lora_adapter_from_the_store(start_replica, inference_store, tiny_ckpt):
    import torch

    from tokenmill.common.model.lora import adapter_config

    torch.manual_seed(1)
    cfg = tiny_ckpt.config
    lora = {}
    for layer in range(cfg.num_layers):
        base = f"model.layers.{layer}.self_attn.q_proj"
        lora[f"{base}.lora_A.weight"] = torch.randn(4, cfg.hidden_size) * 0.3
        lora[f"{base}.lora_B.weight"] = torch.randn(cfg.hidden_size, 4) * 0.3
    import json

    inference_store.client.save(
        "tiny-style",
        lora,
        files={"adapter_config.json": json.dumps(adapter_config(4, 8.0, ["q_proj"])).encode()},
    )
    h = start_replica()
    base = h.client.generate("Once upon a time", max_tokens=12, temperature=0.0, ignore_eos=True)
    styled = h.client.generate(
        "Once upon a time", max_tokens=12, temperature=0.0, ignore_eos=True, adapter="tiny-style"
    )
    assert list(base.token_ids) != list(styled.token_ids)
    assert "tiny-style" in h.client.model_info().adapters
    # The base checkpoint is not an adapter: a precise error.
    with pytest.raises(errors.InvalidArgument, match="not a LoRA adapter"):
        h.client.generate("hi", max_tokens=2, adapter="tiny")


def test_metrics_use_vllm_names(inference_store):
    from prometheus_client import generate_latest

    from tokenmill.common.inference import EngineConfig
    from tokenmill.common.runtime.metrics import new_registry
    from tokenmill.services.inference.loader import load_model
    from tokenmill.services.inference.metrics import EngineCollector
    from tokenmill.services.inference.replica import Replica

    registry = new_registry()
    replica = Replica(
        load_model(inference_store.client, "tiny"),
        EngineConfig(num_blocks=64, block_size=4),
        "m0",
        registry=registry,
    )
    try:
        registry.register(EngineCollector(replica.aengine.stats, replica.labels))
        replica.warmup()
        for _ in range(2):
            stream = replica.submit(
                inference_pb2.GenerateRequest(
                    prompt="The quick brown fox jumps over the lazy dog",
                    sampling=inference_pb2.SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True),
                )
            )
            list(stream)
        time.sleep(0.6)  # the engine thread refreshes its stats snapshot when idle
        text = generate_latest(registry).decode()
    finally:
        replica.shutdown()
    for name in (
        "tokenmill:num_requests_running",
        "tokenmill:num_requests_waiting",
        "tokenmill:kv_cache_usage_perc",
        "tokenmill:prefix_cache_queries_total",
        "tokenmill:prefix_cache_hits_total",
        "tokenmill:prompt_tokens_total",
        "tokenmill:generation_tokens_total",
        "tokenmill:num_preemptions_total",
        "tokenmill:time_to_first_token_seconds_bucket",
        "tokenmill:inter_token_latency_seconds_bucket",
        "tokenmill:e2e_request_latency_seconds_count",
    ):
        assert name in text, name
    line = next(ln for ln in text.splitlines() if ln.startswith("tokenmill:generation_tokens_total"))
    assert float(line.split()[-1]) == 11.0  # warm-up token + 2 x 5
    hits = next(ln for ln in text.splitlines() if ln.startswith("tokenmill:prefix_cache_hits_total"))
    assert float(hits.split()[-1]) > 0


def test_entry_point_roles(monkeypatch):
    from tokenmill.services.inference.server import MODEL_ENV, parse_args

    monkeypatch.delenv(MODEL_ENV, raising=False)
    assert parse_args(["--config", "c.yaml"]).role == "router"
    args = parse_args(["replica", "--model", "m:2", "--port", "7001"])
    assert (args.role, args.model, args.port, args.device) == ("replica", "m:2", 7001, "auto")
    monkeypatch.setenv(MODEL_ENV, "demo-model:prod")
    monkeypatch.setenv("HOSTNAME", "inference-7c9f")
    args = parse_args(["--config", "c.yaml"])  # the Helm chart's inference pods
    assert (args.role, args.model, args.port, args.replica_id, args.config) == (
        "replica",
        "demo-model:prod",
        None,
        "inference-7c9f",
        "c.yaml",
    )


def test_overload_is_queued_or_resource_exhausted_never_lost(start_replica):
    h = start_replica(max_num_seqs=2, max_waiting=6, num_blocks=17)
    outcomes: list[str] = []
    lock = threading.Lock()

    def run(i: int) -> None:
        try:
            r = h.client.generate([1 + i, 2, 3], max_tokens=6, temperature=0.0, ignore_eos=True)
            result = "ok" if len(r.token_ids) == 6 and r.finish_reason == "length" else "truncated"
        except errors.TokenmillError as exc:
            result = exc.code
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(outcomes) == 40
    assert set(outcomes) <= {"ok", "RESOURCE_EXHAUSTED"}, outcomes
    assert outcomes.count("ok") >= 8
    eng = h.replica.engine
    assert not eng.requests and eng.blocks.num_free() == eng.blocks.usable_blocks
