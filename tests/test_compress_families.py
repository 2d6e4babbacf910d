"""Compression of every supported model family as a user gets there: a `transformers` model (Llama
with attention and MLP biases, Qwen2 with q/k/v biases, Mistral with a sliding window) imported
into the store, compressed by a compress job, and served: the child keeps its parent's model config
(family, biases, window, rope scaling) and the engine's greedy output equals transformers' over the
dequantized/reconstructed weights plus the parent's own biases, past the sliding window too."""

from __future__ import annotations

import pytest
import torch

from tests.fixtures.grpc import TEST_TOKEN, make_test_config
from tests.test_compress_job import write_dataset
from tests.test_model_families import hf_model
from tokenmill.common.clients import CompressClient
from tokenmill.common.inference.config import EngineConfig
from tokenmill.common.inference.llm_engine import build_engine
from tokenmill.common.inference.request import SamplingParams
from tokenmill.common.model.quant import dequantize_state_dict
from tokenmill.common.model.transformer import ModelConfig, Transformer
from tokenmill.common.runtime import ServiceApp
from tokenmill.common.runtime.proto_struct import struct_to_dict
from tokenmill.services.compress.measure import decode_tokens_per_second
from tokenmill.services.compress.server import build
from tokenmill.services.inference.loader import load_model
from tokenmill.v1 import common_pb2

transformers = pytest.importorskip("transformers")

FAMILIES = {
    "llama-biases-linear-rope": (
        "Llama",
        dict(attention_bias=True, mlp_bias=True, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    ),
    "qwen2-tied": ("Qwen2", dict(tie_word_embeddings=True)),
    "mistral-window-8": ("Mistral", dict(sliding_window=8)),
}
CALIB = dict(calibration_dataset="calib", calibration_samples=8)
JOBS = {
    "int4_awq": dict(group_size=32, **CALIB),
    "int4_gptq": dict(group_size=32, act_order=True, **CALIB),
    "prune_2_4": dict(score="wanda", keep_dense=["*.o_proj"], **CALIB),
    "svd": dict(rank_fraction=0.25),
}


@pytest.fixture
def env(tmp_path, ckpt, redis_url, redis_client):
    config = make_test_config(tmp_path, redis_url=redis_url, services={"checkpoint": {"port": ckpt.app.port}})
    app = ServiceApp("compress", config, port=0, metrics=False)
    build(config, app)
    app.start()
    app.set_serving()
    write_dataset(tmp_path, "calib", vocab=128)
    with CompressClient(f"127.0.0.1:{app.port}", token=TEST_TOKEN, timeout=30) as client:
        yield client, ckpt
    app.stop(0)


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(JOBS))
@pytest.mark.parametrize("case", sorted(FAMILIES))
def test_each_family_compresses_keeps_its_config_and_biases_and_serves_its_reference(
    env, tmp_path, case, method
):
    client, ckpt = env
    family, overrides = FAMILIES[case]
    hf = hf_model(family, **overrides)
    hf.save_pretrained(tmp_path / "hf")
    ckpt.client.import_hf(tmp_path / "hf", "src")
    parent = struct_to_dict(ckpt.client.get("src", include_manifest=True).manifest.config)
    done = client.wait(client.submit("src", "out", method, **JOBS[method]).id, timeout=300)
    assert done.state == common_pb2.JOB_STATE_SUCCEEDED, done.error
    child = struct_to_dict(ckpt.client.get("out", include_manifest=True).manifest.config)
    assert {k: child[k] for k in parent} == parent  # family, biases, window, rope scaling, eos ids
    loaded = load_model(ckpt.client, "out")
    original = hf.state_dict()
    weights = {
        k: v for k, v in dequantize_state_dict(dict(loaded.tensors)).items() if not k.endswith(".bias")
    }
    reference = type(hf)(hf.config).eval()
    reference.load_state_dict({**original, **weights})  # the parent's biases, the child's weights
    engine = build_engine(loaded.tensors, loaded.config, EngineConfig(num_blocks=64, block_size=4))
    prompt = [5, 9, 17, 33, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]  # past the window of 8
    out = engine.generate([prompt], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))[0]
    with torch.no_grad():
        want = reference.generate(
            torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    assert out.output_token_ids == want[0, len(prompt) :].tolist()


@pytest.mark.parametrize("context", [2, 16, 32, 47])
def test_decode_speed_is_measured_within_a_short_context(context):
    """The report's decode tokens/s runs prompts and outputs that fit the model's context: a model
    whose context is below 16 + 32 tokens is measured, not refused with the engine's error."""
    config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                         num_kv_heads=1, max_seq_len=context)  # fmt: skip
    tensors = Transformer(config).state_dict()
    assert decode_tokens_per_second(tensors, config.to_dict()) > 0


def test_a_model_with_a_32_token_context_compresses(env, tmp_path):
    client, ckpt = env
    hf_model("Qwen2", tie_word_embeddings=True, max_position_embeddings=32).save_pretrained(tmp_path / "hf")
    ckpt.client.import_hf(tmp_path / "hf", "short")
    done = client.wait(client.submit("short", "short-int8", "int8", eval_dataset="calib").id, timeout=120)
    assert done.state == common_pb2.JOB_STATE_SUCCEEDED, done.error
    report = done.result["report"]
    assert report["tokens_per_second_before"] > 0 and report["tokens_per_second_after"] > 0
    assert report["perplexity_before"] > 0 and report["perplexity_after"] > 0
