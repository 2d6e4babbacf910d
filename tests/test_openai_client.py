"""The OpenAI HTTP front driven by the official `openai` Python client, serving a model and tokenizer
built and saved by `transformers` and imported as a user would: completions and chat, streaming and
not, logprobs and echo (lm-evaluation-harness's loglikelihood request), greedy ids equal to HF's, and
each error class the client raises, with errors known before the first token as HTTP statuses even
when streaming. Also `/health` and `/metrics`."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.grpc import TEST_TOKEN, make_test_config
from tests.fixtures.hf_chat import HfChat
from tests.fixtures.inference import wait_for

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow  # a checkpoint service, a replica and a router per test (~3 s)

PROMPT = "The quick brown fox jumps over"
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi there"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "Naïve café?"},
]
POOL_TOKENS = 47 * 4  # the replica's KV pool (48 blocks of 4, one reserved): less than the context


def gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the byte each character of a byte-level BPE token is."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    cs = list(bs)
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


BYTE_DECODER = gpt2_byte_decoder()


def hf_token_bytes(tokenizer, token_id: int) -> bytes:
    """A token's real bytes from HF's tokenizer: an added token's content, else its byte-level piece."""
    added = tokenizer.added_tokens_decoder
    if token_id in added:
        return added[token_id].content.encode("utf-8")
    return bytes(BYTE_DECODER[c] for c in tokenizer.convert_ids_to_tokens(token_id))


def openai_token(tokenizer, token_id: int) -> str:
    """OpenAI's logprobs text for a token: its bytes as UTF-8, else "bytes:\\xNN..."."""
    raw = hf_token_bytes(tokenizer, token_id)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def check_offsets(text: str, tokens: list[str], offsets: list[int]) -> None:
    """`text_offset` indexes `text`: every whole-character token stands at its offset (special tokens
    the text skips excepted), and offsets never go back or past the end."""
    assert offsets == sorted(offsets) and all(0 <= o <= len(text) for o in offsets), offsets
    bad = [
        (t, o, text[o : o + len(t)])
        for t, o in zip(tokens, offsets, strict=True)
        if not t.startswith("bytes:") and t not in ("<s>", "</s>") and text[o : o + len(t)] != t
    ]
    assert not bad, bad


@pytest.fixture
def served(start_checkpoint_service, hf_chat, redis_url, start_router, tmp_path: Path) -> Iterator:
    """(openai client, HTTP front) with one replica of the imported HF model 'chat' behind a router."""
    from tokenmill.common.inference import EngineConfig
    from tokenmill.common.redis_conn import connect_url
    from tokenmill.common.runtime import ServiceApp
    from tokenmill.services.inference.convert import SERVICE_NAME, add_inference_servicer
    from tokenmill.services.inference.dispatch.puller import ReplicaPuller
    from tokenmill.services.inference.loader import load_model
    from tokenmill.services.inference.replica import Replica, ReplicaServicer

    store = start_checkpoint_service()
    store.client.import_hf(hf_chat.path, "chat")
    _, dispatcher, front = start_router()
    replica = Replica(
        load_model(store.client, "chat"),
        EngineConfig(num_blocks=48, block_size=4, max_num_seqs=8),
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
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{front.port}/v1", api_key=TEST_TOKEN, max_retries=0, timeout=60
    )
    yield client, front
    client.close()
    puller.stop()
    app.stop(0)
    replica.shutdown()


def test_completions_greedy_equal_hf_with_logprobs(served, hf_chat: HfChat):
    client, _ = served
    ids = hf_chat.encode(PROMPT)
    want = hf_chat.greedy(ids, 8)
    out = client.completions.create(
        model="chat", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2, extra_body={"ignore_eos": True}
    )
    choice = out.choices[0]
    assert choice.text == hf_chat.tokenizer.decode(want) and choice.finish_reason == "length"
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 8
    lp = choice.logprobs
    assert lp.tokens == [openai_token(hf_chat.tokenizer, t) for t in want]
    ref = hf_chat.logprobs(ids + want[:-1])[len(ids) - 1 :]
    assert lp.token_logprobs == pytest.approx([ref[k, t].item() for k, t in enumerate(want)], abs=1e-4)
    assert all(
        len(top) >= 2 and max(top.values()) == chosen
        for top, chosen in zip(lp.top_logprobs, lp.token_logprobs, strict=True)
    )
    check_offsets(choice.text, lp.tokens, lp.text_offset)

    stream = client.completions.create(
        model="chat",
        prompt=PROMPT,
        max_tokens=8,
        temperature=0,
        stream=True,
        logprobs=1,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    streamed = [
        t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens
    ]
    assert streamed == lp.tokens and chunks[-1].usage.completion_tokens == 8


def test_echo_scores_the_prompt_as_lm_eval_asks(served, hf_chat: HfChat):
    """lm-eval's local-completions loglikelihood request: token ids, echo, logprobs, max_tokens 0 or 1."""
    client, _ = served
    ids = hf_chat.encode("Once upon a time there was a small language model")
    ref = hf_chat.logprobs(ids)
    want = [ref[i - 1, ids[i]].item() for i in range(1, len(ids))]
    for max_tokens in (0, 1):
        out = client.completions.create(
            model="chat", prompt=[ids], echo=True, logprobs=1, max_tokens=max_tokens, temperature=0
        )
        lp = out.choices[0].logprobs
        assert len(lp.tokens) == len(ids) + max_tokens
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.token_logprobs[1 : len(ids)] == pytest.approx(want, abs=1e-4)
        # lm-eval's is_greedy: the chosen logprob is the best of the alternatives exactly when HF's argmax is it
        greedy = [
            max(top.values()) == tok
            for top, tok in zip(lp.top_logprobs[1:], lp.token_logprobs[1:], strict=True)
        ]
        assert (
            greedy == [int(ref[i - 1].argmax()) == ids[i] for i in range(1, len(ids))] + [True] * max_tokens
        )
        assert out.choices[0].text.startswith(hf_chat.tokenizer.decode(ids, skip_special_tokens=True))
    text_echo = client.completions.create(model="chat", prompt=PROMPT, echo=True, max_tokens=2, temperature=0)
    assert text_echo.choices[0].text.startswith(PROMPT)


def test_chat_uses_the_models_template_and_equals_hf(served, hf_chat: HfChat):
    client, _ = served
    ids = hf_chat.tokenizer.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True)
    ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    want = hf_chat.greedy(ids, 6)
    out = client.chat.completions.create(
        model="chat",
        messages=CHAT,
        max_completion_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    assert out.object == "chat.completion" and out.usage.prompt_tokens == len(ids)
    msg = out.choices[0].message
    assert msg.role == "assistant" and msg.content == hf_chat.tokenizer.decode(want)
    content = out.choices[0].logprobs.content
    assert [c.token for c in content] == [hf_chat.tokenizer.decode([t]) for t in want]
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob == c.logprob for c in content)
    stream = client.chat.completions.create(
        model="chat", messages=CHAT, max_tokens=6, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == msg.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_sampling_controls_through_the_router(served, hf_chat: HfChat):
    client, _ = served
    forced = client.completions.create(
        model="chat",
        prompt=PROMPT,
        max_tokens=4,
        temperature=0,
        logit_bias={"42": 100},
        extra_body={"ignore_eos": True},
    )
    assert forced.choices[0].text == hf_chat.tokenizer.decode([42] * 4)
    seeded = [
        client.completions.create(model="chat", prompt=PROMPT, max_tokens=10, temperature=1.0, seed=s)
        .choices[0]
        .text
        for s in (3, 3, 4)
    ]
    assert seeded[0] == seeded[1] != seeded[2]
    penalised = client.completions.create(
        model="chat",
        prompt=PROMPT,
        max_tokens=24,
        temperature=0,
        frequency_penalty=2.0,
        extra_body={"ignore_eos": True},
    )
    plain = hf_chat.tokenizer.decode(hf_chat.greedy(hf_chat.encode(PROMPT), 24))
    assert penalised.choices[0].text != plain
    stopped = client.completions.create(
        model="chat", prompt=PROMPT, max_tokens=24, temperature=0, stop=[plain[3:6]]
    )
    assert stopped.choices[0].text == plain[:3] and stopped.choices[0].finish_reason == "stop"


def test_token_healing_through_the_router(served, hf_chat: HfChat):
    """A prompt ending mid-word ('fo'): the first token must extend the removed one, chosen by the
    model's own logits at the shortened prompt; the text still continues the prompt as sent."""
    import torch

    from tokenmill.common.inference.healing import TokenHealer

    client, _ = served
    prompt = "The quick brown fo"
    healing = TokenHealer(hf_chat.tokenizer.backend_tokenizer).heal(hf_chat.encode(prompt))
    assert healing is not None
    with torch.inference_mode():
        logits = hf_chat.model(torch.tensor([healing.prompt_token_ids])).logits[0, -1]
    allowed = torch.tensor(healing.allowed_token_ids)
    first = int(allowed[logits[allowed].argmax()])
    ids = healing.prompt_token_ids + [first]
    ids += hf_chat.greedy(ids, 5)
    out = client.completions.create(
        model="chat",
        prompt=prompt,
        max_tokens=6,
        temperature=0,
        extra_body={"token_healing": True, "ignore_eos": True},
    )
    assert prompt + out.choices[0].text == hf_chat.tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "streaming"])
def test_errors_before_the_first_token_are_http_statuses(served, stream):
    """Each refusal is the client's own exception class, streaming or not (not a generic APIError)."""
    client, _ = served
    cases = [
        (openai.BadRequestError, dict(temperature=-1), "temperature"),
        (openai.BadRequestError, dict(logit_bias={"5": 101}), "logit_bias"),
        (
            openai.BadRequestError,
            dict(logit_bias={"99999": 1}),
            "outside the vocabulary",
        ),  # found by the replica
        (openai.BadRequestError, dict(suffix="x"), "'suffix' is not supported"),
        (
            openai.UnprocessableEntityError,
            dict(extra_body={"token_healing": "yes"}),
            "'token_healing' must be true",
        ),
        (
            openai.BadRequestError,
            dict(echo=True, extra_body={"token_healing": True}),
            "token_healing and echo",
        ),
        (openai.BadRequestError, dict(n=2), "'n' = 2 is not supported"),
        (openai.BadRequestError, dict(best_of=3), "'best_of' = 3 is not supported"),
        (openai.BadRequestError, dict(prompt="fox " * 400), "context|prompt is"),
        (openai.NotFoundError, dict(model="no-such-model"), "no-such-model"),
        (openai.RateLimitError, dict(max_tokens=POOL_TOKENS + 8), "KV blocks"),
    ]
    for error, kwargs, message in cases:
        args = {"model": "chat", "prompt": PROMPT, "max_tokens": 4, "stream": stream, **kwargs}
        with pytest.raises(error, match=message):
            result = client.completions.create(**args)
            if stream:
                list(result)
    chat_cases = [
        (openai.BadRequestError, dict(messages=[{"role": "tool", "content": "x"}]), "role"),
        (openai.BadRequestError, dict(messages=[]), "'messages' is empty"),
        (openai.BadRequestError, dict(messages=CHAT, top_logprobs=2), "needs 'logprobs'"),
        (openai.BadRequestError, dict(messages=CHAT, n=2), "'n' = 2"),
    ]
    for error, kwargs, message in chat_cases:
        with pytest.raises(error, match=message):
            result = client.chat.completions.create(model="chat", max_tokens=4, stream=stream, **kwargs)
            if stream:
                list(result)
    bad_key = openai.OpenAI(base_url=str(client.base_url), api_key="wrong-token-0000000000", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.completions.create(model="chat", prompt=PROMPT, max_tokens=2, stream=stream)


def test_health_and_metrics(served, start_router):
    _, front = served

    def get(front, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{front.port}{path}", timeout=30) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    status, body = get(front, "/health")
    health = json.loads(body)
    assert status == 200 and health["status"] == "ok" and health["live_replicas"] == 1
    status, body = get(front, "/metrics")
    assert status == 200 and b"# HELP" in body
    # a router that judges every replica dead cannot serve: 503 with the reason
    _, _, idle = start_router(dead_after_s=0.0)
    status, body = get(idle, "/health")
    assert status == 503 and json.loads(body)["error"]["code"] == "UNAVAILABLE"
