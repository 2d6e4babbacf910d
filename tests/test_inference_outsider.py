"""Serving driven from outside (issue 11): a replica killed with SIGKILL mid-stream (nothing lost,
no text, penalty state or seeded draw dropped by the continuation), LoRA adapters addressed as models
through the openai client and equal to PEFT-merged weights (rsLoRA, rank/alpha patterns; features the
engine cannot apply refused), stop strings across tokens with streamed usage, and a client that goes
away mid-stream freeing its KV blocks."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch

from tests.fixtures.grpc import TEST_TOKEN
from tests.fixtures.inference import greedy, reference_greedy, replica_process, wait_for
from tokenmill.common import errors
from tokenmill.common.inference import Continued, EngineConfig, SamplingParams, Tokenizer, build_engine
from tokenmill.common.model.lora import adapter_config
from tokenmill.services.inference.dispatch.protocol import REPLICAS

openai = pytest.importorskip("openai")
PROMPT = "The quick brown fox jumps over"


@pytest.mark.slow
def test_killed_replica_with_stop_strings_loses_no_text(
    start_router, start_replica, redis_url, redis_client, inference_store, tmp_path, tiny_ckpt
):
    """With stop strings every chunk holds back text that may start one; the continuation on the
    survivor used to start its text after the tokens already sent, dropping that text."""
    client, _, _ = start_router()
    prompt = tiny_ckpt.encode("Once upon a time")
    want = reference_greedy(tiny_ckpt.model, prompt, 120)
    text_want = tiny_ckpt.hf_tokenizer.decode(want)
    proc, log = replica_process(tmp_path, redis_url, inference_store.app.port, "victim")
    try:
        wait_for(lambda: redis_client.hexists(REPLICAS, "victim") or proc.poll() is not None, 90, "victim")
        assert proc.poll() is None, log.read_text()[-3000:]
        stream = client.stream(prompt, max_tokens=120, stop=["\x01never-there\x01"], **greedy())
        chunks = []
        while sum(len(c.token_ids) for c in chunks) < 10:
            chunks.append(next(stream))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        start_replica(redis_url, replica_id="survivor")
        chunks += list(stream)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [t for c in chunks for t in c.token_ids] == want
    assert "".join(c.text for c in chunks) == text_want


def _engine(ckpt, **kw):
    cfg = EngineConfig(**{"num_blocks": 256, "block_size": 4, **kw})
    return build_engine(ckpt.tensors, ckpt.config_dict, cfg, Tokenizer(ckpt.hf_tokenizer))


def _run(eng, prompt: list[int], params: SamplingParams, continued: Continued | None = None):
    """Every output of one request, step by step."""
    req = eng.make_request(prompt_token_ids=prompt, params=params, continued=continued)
    eng.add(req)
    outs = []
    while eng.has_unfinished():
        outs.extend(eng.step())
    return outs


@pytest.mark.parametrize(
    "extra",
    [
        {"stop": ("\x00absent",)},  # every chunk holds back text that may start a stop string
        {"frequency_penalty": 1.5, "presence_penalty": 0.5},  # over generated tokens, both attempts
        {},  # incomplete UTF-8 characters wait for the next token
        {"temperature": 1.0, "seed": 11, "top_k": 50},  # the seeded draws go on where they were
    ],
    ids=["held-text", "penalties", "utf8", "seeded"],
)
def test_a_continuation_at_any_point_ends_as_the_uninterrupted_request(tiny_ckpt, extra):
    """What the router resumes on another replica (prompt + tokens sent, the characters sent) must
    finish exactly as the request would have: same tokens, and the text sent plus the rest equal
    to the whole text, for a cut after every output."""
    eng = _engine(tiny_ckpt)
    prompt = tiny_ckpt.encode("Naïve café 日本語")
    total = 24
    params = SamplingParams(**{"max_tokens": total, "temperature": 0.0, "ignore_eos": True, **extra})
    whole = _run(eng, prompt, params)
    want_ids = [t for o in whole for t in o.token_ids]
    want_text = "".join(o.text for o in whole)
    assert len(want_ids) == total and "\ufffd" in want_text  # split characters are in play
    for cut in range(1, len(whole) - 1):
        sent_ids = [t for o in whole[:cut] for t in o.token_ids]
        sent_text = "".join(o.text for o in whole[:cut])
        if not sent_ids:
            continue
        rest_params = dataclasses.replace(params, max_tokens=total - len(sent_ids))
        rest = _run(eng, prompt + sent_ids, rest_params, Continued(len(sent_ids), len(sent_text)))
        assert sent_ids + [t for o in rest for t in o.token_ids] == want_ids, cut
        assert sent_text + "".join(o.text for o in rest) == want_text, cut
        assert rest[-1].usage.completion_tokens == total and rest[-1].usage.prompt_tokens == len(prompt)
    eng.blocks.check_invariants()


def test_a_stop_string_spanning_the_failover_still_stops(tiny_ckpt):
    """A stop string that began in the text sent before the replica died and ends after it."""
    eng = _engine(tiny_ckpt)
    prompt = tiny_ckpt.encode("The quick brown fox")
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    whole = _run(eng, prompt, params)
    ids = [t for o in whole for t in o.token_ids]
    text = "".join(o.text for o in whole)
    # the sent part ends inside the stop string: the text of the first k tokens, minus 2 characters
    # a replica held back; the first cut whose stop string appears nowhere earlier
    cuts = [
        k
        for k in range(4, 30)
        if text.startswith(sent := tiny_ckpt.hf_tokenizer.decode(ids[:k]))
        and "\ufffd" not in text[len(sent) - 2 : len(sent) + 3]
        and text.find(text[len(sent) - 2 : len(sent) + 3]) == len(sent) - 2
    ]
    assert cuts, text
    k = cuts[0]
    sent = tiny_ckpt.hf_tokenizer.decode(ids[:k])
    stop = text[len(sent) - 2 : len(sent) + 3]
    rest = _run(
        eng,
        prompt + ids[:k],
        SamplingParams(max_tokens=40 - k, temperature=0.0, ignore_eos=True, stop=(stop,)),
        Continued(k, len(sent) - 2),
    )
    assert "".join(o.text for o in rest) == "" and rest[-1].finish_reason == "stop"


# -- LoRA adapters addressed as models through the OpenAI API -----------------------------------

ADAPTERS = {
    # name: (targets, rank, alpha, extra adapter_config fields)
    "chat-qv": (("q_proj", "v_proj"), 4, 8.0, {}),
    "chat-mlp": (("gate_proj", "down_proj", "o_proj"), 2, 3.0, {}),
    "chat-rs": (("k_proj", "up_proj"), 4, 2.0, {"use_rslora": True}),  # scale alpha / sqrt(r)
    # per-module rank and alpha, as PEFT's rank_pattern / alpha_pattern give them
    "chat-pat": (
        ("q_proj", "o_proj"),
        4,
        8.0,
        {"rank_pattern": {"o_proj": 2}, "alpha_pattern": {"q_proj": 2.0}},
    ),
}


def _peft_scale(target: str, rank: int, alpha: float, extra: dict) -> tuple[int, float]:
    """(r, scale) of `target`'s pair as PEFT computes them from adapter_config.json."""
    r = extra.get("rank_pattern", {}).get(target, rank)
    a = extra.get("alpha_pattern", {}).get(target, alpha)
    return r, a / (r**0.5 if extra.get("use_rslora") else r)


def _lora_tensors(model, targets, rank: int, alpha: float, extra: dict, seed: int):
    """PEFT-named LoRA pairs for `targets` in every layer of the HF `model`, large enough to
    change its greedy output, and {A's name: the pair's scale}."""
    gen = torch.Generator().manual_seed(seed)
    out, scales = {}, {}
    for i, layer in enumerate(model.model.layers):
        for target in targets:
            parent = layer.self_attn if target in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp
            w = getattr(parent, target).weight
            kind = "self_attn" if parent is layer.self_attn else "mlp"
            name = f"base_model.model.model.layers.{i}.{kind}.{target}"
            r, scales[f"{name}.lora_A.weight"] = _peft_scale(target, rank, alpha, extra)
            out[f"{name}.lora_A.weight"] = torch.randn(r, w.shape[1], generator=gen) * 0.3
            out[f"{name}.lora_B.weight"] = torch.randn(w.shape[0], r, generator=gen) * 0.3
    return out, scales


def _merged(hf_chat, tensors: dict[str, torch.Tensor], scales: dict[str, float]):
    """PEFT's merge_and_unload by hand: a copy of the HF model with W + scale * B @ A."""
    model = copy.deepcopy(hf_chat.model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, a in tensors.items():
            if ".lora_A." not in key:
                continue
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            base = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
            params[base] += scales[key] * (b @ a)
    return model


@torch.inference_mode()
def _hf_greedy(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None)
    return out[0, len(ids) :].tolist()


@pytest.fixture
def lora_front(start_checkpoint_service, hf_chat, redis_url, start_router):
    """openai client, {adapter name: (tensors, scales)}, the router's gRPC client, the store and the
    replica: one replica of the imported HF
    model 'chat' holding every adapter of ADAPTERS, behind a router."""
    from tokenmill.common.redis_conn import connect_url
    from tokenmill.services.inference.dispatch.puller import ReplicaPuller
    from tokenmill.services.inference.loader import load_model
    from tokenmill.services.inference.replica import Replica

    store = start_checkpoint_service()
    store.client.import_hf(hf_chat.path, "chat")
    made = {}
    for seed, (name, (targets, rank, alpha, extra)) in enumerate(ADAPTERS.items()):
        tensors, scales = _lora_tensors(hf_chat.model, targets, rank, alpha, extra, seed)
        config = {**adapter_config(rank, alpha, list(targets)), **extra}
        store.client.save(name, tensors, files={"adapter_config.json": json.dumps(config).encode()})
        made[name] = (tensors, scales)
    grpc_client, dispatcher, front = start_router()
    replica = Replica(
        load_model(store.client, "chat"),
        EngineConfig(num_blocks=96, block_size=4, max_num_seqs=8),
        "lora-r0",
        store_client=store.client,
    )
    replica.warmup()
    for name in ADAPTERS:
        replica.ensure_adapter(name)
    puller = ReplicaPuller(replica, connect_url(redis_url), "127.0.0.1:1", heartbeat_s=0.2)
    puller.start()
    wait_for(lambda: dispatcher.replicas(), 30, "the replica's heartbeat")
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{front.port}/v1", api_key=TEST_TOKEN, max_retries=0, timeout=60
    )
    yield SimpleNamespace(client=client, made=made, grpc=grpc_client, store=store.client, replica=replica)
    client.close()
    puller.stop()
    replica.shutdown()


@pytest.mark.slow
def test_adapters_and_base_in_one_batch_equal_merged_weights(lora_front, hf_chat):
    client, made = lora_front.client, lora_front.made
    prompt = "Once upon a time"
    ids = hf_chat.encode(prompt)
    want = {"chat": _hf_greedy(hf_chat.model, ids, 10)}
    for name, (tensors, scales) in made.items():
        want[name] = _hf_greedy(_merged(hf_chat, tensors, scales), ids, 10)
    assert len({tuple(v) for v in want.values()}) == len(want), "each adapter must change the output"

    def call(model: str) -> list[int]:
        stream = client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=10,
            temperature=0,
            stream=True,
            logprobs=0,
            extra_body={"ignore_eos": True},
        )
        text = "".join(c.choices[0].text for c in stream if c.choices)
        return text

    models = [m for m in want for _ in range(2)]
    with ThreadPoolExecutor(len(models)) as pool:
        got = list(pool.map(call, models))
    for model, text in zip(models, got, strict=True):
        assert text == hf_chat.tokenizer.decode(want[model]), model
    listed = {m.id for m in client.models.list().data}
    assert listed == {f"{name}:1" for name in want}


@pytest.mark.slow
@pytest.mark.parametrize(
    "config, extra_tensor, field",
    [
        ({"use_dora": True}, "lora_magnitude_vector", "use_dora"),
        ({}, "lora_magnitude_vector", "lora_magnitude_vector"),
        ({"modules_to_save": ["lm_head"]}, None, "modules_to_save"),
        ({}, "lm_head", "lm_head"),
    ],
    ids=["dora-config", "dora-tensor", "modules-to-save", "lora-on-lm-head"],
)
def test_adapters_the_engine_cannot_apply_are_refused(lora_front, hf_chat, config, extra_tensor, field):
    """A PEFT adapter using what the engine does not apply is refused naming it, never served
    without it (silently wrong outputs)."""
    grpc_client, store = lora_front.grpc, lora_front.store
    tensors, _ = _lora_tensors(hf_chat.model, ("q_proj",), 4, 8.0, {}, 0)
    if extra_tensor == "lora_magnitude_vector":
        tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(64)
    elif extra_tensor == "lm_head":
        tensors["base_model.model.lm_head.lora_A.weight"] = torch.zeros(4, 64)
        tensors["base_model.model.lm_head.lora_B.weight"] = torch.zeros(hf_chat.model.config.vocab_size, 4)
    body = {**adapter_config(4, 8.0, ["q_proj"]), **config}
    store.save("chat-bad", tensors, files={"adapter_config.json": json.dumps(body).encode()})
    with pytest.raises(errors.InvalidArgument, match=field):
        grpc_client.generate("hi", model="chat", adapter="chat-bad", max_tokens=2, timeout=60)


# -- streaming through the openai client -----------------------------------------------------------


@pytest.mark.slow
def test_streamed_stop_string_across_tokens_with_usage(lora_front, hf_chat):
    """A stop string spanning several tokens: the stream ends before it, on the token completing it,
    and the usage chunk (stream_options) counts exactly the tokens generated."""
    prompt = "Once upon a time there was"
    ids = hf_chat.encode(prompt)
    want = hf_chat.greedy(ids, 30)
    pieces = [hf_chat.tokenizer.decode(want[:k]) for k in range(len(want) + 1)]
    text = pieces[-1]
    # a stop string that starts inside one token's text and ends inside a later one's
    spans = [
        (len(pieces[k]) - 1, text[len(pieces[k]) - 1 : len(pieces[k]) - 1 + n])
        for k in range(3, 25)
        for n in range(3, 10)
        if pieces[k] and text.startswith(pieces[k])
    ]
    start, stop = next(
        (i, w)
        for i, w in spans
        if "\ufffd" not in w
        and text.find(w) == i
        and len(w) == len(w.strip())
        and not any(p_.startswith(text[: i + len(w)]) and len(p_) == i + len(w) for p_ in pieces)
    )
    done = next(k for k in range(len(want) + 1) if len(pieces[k]) >= start + len(stop))
    kw = dict(model="chat", max_tokens=30, temperature=0, stream=True, stop=[stop])
    kw.update(stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(lora_front.client.completions.create(prompt=prompt, **kw))
    body = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in body) == text[:start]
    assert body[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].usage is not None and not chunks[-1].choices
    assert chunks[-1].usage.completion_tokens == done and chunks[-1].usage.prompt_tokens == len(ids)


@pytest.mark.slow
def test_client_disconnect_mid_stream_frees_the_kv_blocks(lora_front):
    client, engine = lora_front.client, lora_front.replica.engine
    for model in ("chat", "chat-qv"):
        stream = client.completions.create(
            model=model,
            prompt=PROMPT,
            max_tokens=200,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        it = iter(stream)
        got = [next(it) for _ in range(3)]
        assert any(c.choices and c.choices[0].text for c in got)
        assert engine.requests, "the request is running"
        stream.close()  # the client goes away mid-stream
        wait_for(lambda: not engine.requests, 20, f"the replica to abort the {model} request")
        wait_for(lambda: engine.blocks.num_free() == engine.blocks.usable_blocks, 20, "blocks freed")


@pytest.mark.slow
def test_openai_stream_survives_kill_9_of_its_replica(
    start_router, start_replica, redis_url, redis_client, inference_store, tmp_path, tiny_ckpt
):
    """Two replicas serve the model; the one streaming is killed with SIGKILL: the openai client's
    stream goes on from the other, with every character (text a replica held back for a stop
    string included), the usage of the whole request, and no hang."""
    _, _, front = start_router()
    prompt = "Once upon a time"
    want = reference_greedy(tiny_ckpt.model, tiny_ckpt.encode(prompt), 120)
    proc, log = replica_process(tmp_path, redis_url, inference_store.app.port, "victim")
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{front.port}/v1", api_key=TEST_TOKEN, max_retries=0, timeout=120
    )
    try:
        wait_for(lambda: redis_client.hexists(REPLICAS, "victim") or proc.poll() is not None, 90, "victim")
        assert proc.poll() is None, log.read_text()[-3000:]
        stream = client.completions.create(
            model="tiny",
            prompt=prompt,
            max_tokens=120,
            temperature=0,
            stream=True,
            stop=["\x01none\x01"],
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        it = iter(stream)
        chunks = [next(it) for _ in range(6)]
        start_replica(redis_url, replica_id="survivor")  # two replicas serve 'tiny' now
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        chunks += list(it)
    finally:
        client.close()
        if proc.poll() is None:
            proc.kill()
    body = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in body) == tiny_ckpt.hf_tokenizer.decode(want)
    assert body[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 120


def test_a_healed_request_continues_without_healing_twice(tiny_ckpt):
    """Token healing cut the prompt's last token and its text from the output: a continuation before
    any token starts over from the original prompt (healing it once), one after some tokens goes on
    from the healed prompt with the healed text accounted for."""
    from tokenmill.services.inference.dispatch.failover import _Routing
    from tokenmill.services.inference.dispatch.protocol import Accepted
    from tokenmill.v1 import inference_pb2

    eng = _engine(tiny_ckpt)
    prompt = tiny_ckpt.encode("The quick brown fo")
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, token_healing=True)
    req = eng.make_request(prompt_token_ids=prompt, params=params)
    healed, healed_chars = req.prompt_token_ids, req.healed_chars
    assert len(healed) < len(prompt) and healed_chars > 0
    whole = _run(eng, prompt, params)
    ids, text = [t for o in whole for t in o.token_ids], "".join(o.text for o in whole)

    routing = _Routing.start(
        inference_pb2.GenerateRequest(
            prompt_token_ids=prompt,
            sampling=inference_pb2.SamplingParams(max_tokens=12, temperature=0.0, token_healing=True),
        ),
        60.0,
    )
    routing.accept(Accepted("r0", healed, 12, healed_chars))
    routing.next_attempt()
    again = routing.request()
    assert list(again.prompt_token_ids) == prompt and again.sampling.token_healing
    assert routing.continued() is None
    sent = whole[:3]
    for out in sent:
        routing.relabel(inference_pb2.GenerateChunk(token_ids=out.token_ids, text=out.text))
    routing.next_attempt()
    later = routing.request()
    k = sum(len(o.token_ids) for o in sent)
    assert list(later.prompt_token_ids) == healed + ids[:k] and not later.sampling.token_healing
    continued = routing.continued()
    rest_params = dataclasses.replace(params, max_tokens=12 - k, token_healing=False)
    rest = _run(eng, list(later.prompt_token_ids), rest_params, continued)
    assert "".join(o.text for o in sent) + "".join(o.text for o in rest) == text
    assert ids[:k] + [t for o in rest for t in o.token_ids] == ids
