"""HF equality through the served path for each family: a Qwen2 (q/k/v biases, tied, sliding
layers), a Mistral whose window is shorter than the prompts and a Llama with attention/MLP biases and
yarn rope, each built and saved by transformers, imported with `import_hf`, served by a replica behind
the router: greedy ids over gRPC (unary and streamed) and HTTP (the official `openai` client, token-id
prompts) equal HF `generate`, and the HTTP logprobs equal HF's within 1e-4, with prompts longer than
the window and than one prefill chunk."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.fixtures.grpc import TEST_TOKEN, make_test_config
from tests.fixtures.inference import wait_for
from tests.test_model_families import hf_model

transformers = pytest.importorskip("transformers")
openai = pytest.importorskip("openai")

CONTEXT = 256
SERVED = {
    "qwen2-tied-sliding": (
        "Qwen2",
        dict(tie_word_embeddings=True, use_sliding_window=True, sliding_window=12, max_window_layers=1),
    ),
    "mistral-window": ("Mistral", dict(sliding_window=10)),
    "llama-biases-yarn": (
        "Llama",
        dict(
            attention_bias=True,
            mlp_bias=True,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 2.0,
                "original_max_position_embeddings": CONTEXT // 2,
            },
        ),
    ),
}


@pytest.fixture(params=sorted(SERVED))
def served(request, start_checkpoint_service, redis_url, start_router, tmp_path: Path) -> Iterator:
    from tokenmill.common.inference import EngineConfig
    from tokenmill.common.redis_conn import connect_url
    from tokenmill.common.runtime import ServiceApp
    from tokenmill.services.inference.convert import SERVICE_NAME, add_inference_servicer
    from tokenmill.services.inference.dispatch.puller import ReplicaPuller
    from tokenmill.services.inference.loader import load_model
    from tokenmill.services.inference.replica import Replica, ReplicaServicer

    family, overrides = SERVED[request.param]
    hf = hf_model(family, max_position_embeddings=CONTEXT, **overrides)
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "hf", max_shard_size="40KB")  # bf16 shards
    hf = getattr(transformers, f"{family}ForCausalLM").from_pretrained(
        tmp_path / "hf", dtype=torch.float32, attn_implementation="eager"
    )
    store = start_checkpoint_service()
    store.client.import_hf(tmp_path / "hf", "fam")
    grpc_client, dispatcher, front = start_router()
    replica = Replica(
        load_model(store.client, "fam"),
        EngineConfig(num_blocks=160, block_size=4, max_num_seqs=8, max_num_batched_tokens=32),
        "r0",
        store_client=store.client,
    )
    replica.warmup()
    app = ServiceApp("inference", make_test_config(tmp_path), port=0, metrics=False)
    app.add(add_inference_servicer, ReplicaServicer(replica), SERVICE_NAME)
    app.start()
    app.set_serving()
    puller = ReplicaPuller(replica, connect_url(redis_url), f"127.0.0.1:{app.port}", heartbeat_s=0.2)
    puller.start()
    wait_for(lambda: dispatcher.replicas(), 30, "the replica's heartbeat")
    http = openai.OpenAI(
        base_url=f"http://127.0.0.1:{front.port}/v1", api_key=TEST_TOKEN, max_retries=0, timeout=60
    )
    yield hf.eval(), grpc_client, http
    http.close()
    puller.stop()
    app.stop(0)
    replica.shutdown()


def test_served_family_equals_hf_over_grpc_and_http(served):
    hf, grpc_client, http = served
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (5, 37, 150)]
    for prompt in prompts:
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None)
            want = out[0, len(prompt) :].tolist()
            ref = torch.log_softmax(hf(out[:, :-1]).logits[0, len(prompt) - 1 :].float(), dim=-1)
        got = grpc_client.generate(prompt, model="fam", max_tokens=12, temperature=0.0, ignore_eos=True)
        assert list(got.token_ids) == want
        chunks = grpc_client.stream(prompt, model="fam", max_tokens=12, temperature=0.0, ignore_eos=True)
        assert [t for c in chunks for t in c.token_ids] == want
        done = http.completions.create(
            model="fam",
            prompt=prompt,
            max_tokens=12,
            temperature=0,
            logprobs=1,
            extra_body={"ignore_eos": True},
        )
        lp = done.choices[0].logprobs
        assert (lp.model_extra or {}).get("token_ids") == want
        assert lp.token_logprobs == pytest.approx([ref[k, t].item() for k, t in enumerate(want)], abs=1e-4)
