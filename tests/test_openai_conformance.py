"""OpenAI conformance details, driven through the official `openai` client against a model and
tokenizer saved by `transformers`: completions `top_logprobs` keyed uniquely per token (OpenAI's
"bytes:\\xNN" for a piece of a character), chat logprobs `bytes` as the token's real bytes,
`text_offset` indexing the echoed text (BOS skipped), an omitted `max_tokens` near the context,
special tokens named only in special_tokens_map.json reaching the chat template, a stop string found
late (its character completed by later tokens) cutting the tokens after it, and `models.retrieve`."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.grpc import TEST_TOKEN, make_test_config
from tests.fixtures.hf_chat import CONTEXT, HfChat
from tests.fixtures.inference import wait_for
from tests.test_openai_client import CHAT, PROMPT, check_offsets, hf_token_bytes, openai_token

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow  # a checkpoint service, a replica and a router per test (~3 s)


def serve(start_checkpoint_service, path: Path, redis_url, start_router, tmp_path: Path) -> Iterator:
    """(openai client, HTTP front) serving the HF directory `path` as 'chat', with a KV pool (80
    blocks of 4) larger than the context, so requests may fill the context."""
    from tokenmill.common.inference import EngineConfig
    from tokenmill.common.redis_conn import connect_url
    from tokenmill.common.runtime import ServiceApp
    from tokenmill.services.inference.convert import SERVICE_NAME, add_inference_servicer
    from tokenmill.services.inference.dispatch.puller import ReplicaPuller
    from tokenmill.services.inference.loader import load_model
    from tokenmill.services.inference.replica import Replica, ReplicaServicer

    store = start_checkpoint_service()
    store.client.import_hf(path, "chat")
    _, dispatcher, front = start_router()
    replica = Replica(
        load_model(store.client, "chat"),
        EngineConfig(num_blocks=80, block_size=4, max_num_seqs=8),
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
    try:
        yield client, front
    finally:
        client.close()
        puller.stop()
        app.stop(0)
        replica.shutdown()


@pytest.fixture
def client(start_checkpoint_service, hf_chat: HfChat, redis_url, start_router, tmp_path: Path):
    for client, _ in serve(start_checkpoint_service, hf_chat.path, redis_url, start_router, tmp_path):
        yield client


def chat_ids(hf_chat: HfChat, messages=CHAT) -> list[int]:
    ids = hf_chat.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_completion_top_logprobs_are_unique_per_token_and_hold_the_chosen(client, hf_chat: HfChat):
    """The random model writes pieces of characters: each keeps its own key (no U+FFFD collisions),
    so every position holds `logprobs` alternatives (+1 for a chosen token outside them), HF's."""
    tok = hf_chat.tokenizer
    ids = hf_chat.encode(PROMPT)
    want = hf_chat.greedy(ids, 10)
    ref = hf_chat.logprobs(ids + want[:-1])[len(ids) - 1 :]
    out = client.completions.create(
        model="chat", prompt=PROMPT, max_tokens=10, temperature=0, logprobs=5, extra_body={"ignore_eos": True}
    )
    lp = out.choices[0].logprobs
    assert lp.tokens == [openai_token(tok, t) for t in want]
    assert any(t.startswith("bytes:") for t in lp.tokens)  # the case that used to collide
    for k, (token, chosen, top) in enumerate(zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True)):
        values, best = ref[k].topk(5)
        expect = {openai_token(tok, t): v for t, v in zip(best.tolist(), values.tolist(), strict=True)}
        assert len(expect) == 5
        assert len(top) == (5 if want[k] in best.tolist() else 6)
        assert top[token] == chosen and max(top.values()) == pytest.approx(values[0].item(), abs=1e-4)
        assert {t: top[t] for t in expect} == pytest.approx(expect, abs=1e-4)


def test_chat_logprob_bytes_are_the_tokens_bytes(client, hf_chat: HfChat):
    tok = hf_chat.tokenizer
    want = hf_chat.greedy(chat_ids(hf_chat), 12)
    out = client.chat.completions.create(
        model="chat",
        messages=CHAT,
        max_tokens=12,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    content = out.choices[0].logprobs.content
    assert [bytes(c.bytes) for c in content] == [hf_token_bytes(tok, t) for t in want]
    assert [c.token for c in content] == [openai_token(tok, t) for t in want]
    joined = b"".join(bytes(c.bytes) for c in content)
    assert joined.decode("utf-8", "replace") == out.choices[0].message.content == tok.decode(want)
    for c in content:
        assert all(bytes(e.bytes) == _bytes_of(e.token) for e in c.top_logprobs)


def _bytes_of(token: str) -> bytes:
    if token.startswith("bytes:"):
        return bytes(int(h, 16) for h in token[len("bytes:") :].split("\\x")[1:])
    return token.encode("utf-8")


def test_sentencepiece_byte_fallback_bytes():
    """A Llama-style tokenizer (Metaspace, byte fallback) built here: `<0xB5>` is the byte 0xB5, the
    word-start marker a space, and the text of a lone 0xB5 is OpenAI's "bytes:\\xb5"."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    from tokenmill.common.inference.tokenizer import Tokenizer

    vocab = {"<unk>": 0, "<s>": 1, "<0xB5>": 2, "<0xC2>": 3, "\u2581a": 4, "b": 5}
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    hf.pre_tokenizer = pre_tokenizers.Metaspace()
    hf.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    hf.add_special_tokens(["<s>"])
    tok = Tokenizer(hf)
    assert tok.token_bytes([2, 3, 4, 5, 1]) == [b"\xb5", b"\xc2", b" a", b"b", b"<s>"]
    assert tok.token_texts([2, 4, 1]) == ["bytes:\\xb5", " a", "<s>"]


def test_echo_text_offsets_index_the_text(client, hf_chat: HfChat):
    """With echo and a text prompt the BOS (not in the text) stands at 0 and adds no length."""
    ids = hf_chat.encode(PROMPT)
    assert hf_chat.tokenizer.convert_ids_to_tokens(ids[0]) == "<s>"
    for stream in (False, True):
        out = client.completions.create(
            model="chat",
            prompt=PROMPT,
            max_tokens=6,
            temperature=0,
            echo=True,
            logprobs=1,
            stream=stream,
            extra_body={"ignore_eos": True},
        )
        chunks = list(out) if stream else [out]
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        tokens = [
            t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens
        ]
        offsets = [
            o
            for c in chunks
            if c.choices and c.choices[0].logprobs
            for o in c.choices[0].logprobs.text_offset
        ]
        assert text.startswith(PROMPT) and tokens[0] == "<s>" and len(tokens) == len(ids) + 6
        assert offsets[:2] == [0, 0]
        check_offsets(text, tokens, offsets)
        prompt_tokens = tokens[1 : len(ids)]
        assert offsets[len(ids)] == len(PROMPT) == sum(len(t) for t in prompt_tokens)


def _ask(words: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": " ".join(["hi"] * words)}]


def test_omitted_max_tokens_fits_the_context(client, hf_chat: HfChat):
    """Chat without max_tokens generates what fits, completions OpenAI's 16 or what fits when less;
    an explicit value that does not fit is a 400."""
    words = next(n for n in range(1, CONTEXT) if len(chat_ids(hf_chat, _ask(n + 1))) >= CONTEXT - 2)
    messages = _ask(words)
    want = chat_ids(hf_chat, messages)
    assert CONTEXT - 16 < len(want) < CONTEXT - 1
    out = client.chat.completions.create(
        model="chat", messages=messages, temperature=0, extra_body={"ignore_eos": True}
    )
    assert out.usage.completion_tokens == CONTEXT - len(want) and out.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="chat", messages=messages, max_tokens=CONTEXT - len(want) + 1)
    ids = hf_chat.encode(PROMPT)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="chat", prompt=PROMPT, max_tokens=CONTEXT - len(ids) + 1)
    # Completions without max_tokens: OpenAI's 16, or the room left when that is less.
    free = {"temperature": 0, "extra_body": {"ignore_eos": True}}
    assert client.completions.create(model="chat", prompt=PROMPT, **free).usage.completion_tokens == 16
    long_prompt = (ids * CONTEXT)[: CONTEXT - 5]
    out = client.completions.create(model="chat", prompt=long_prompt, **free)
    assert out.usage.completion_tokens == 5 and out.choices[0].finish_reason == "length"


def test_stop_string_completed_inside_held_text_cuts_the_later_tokens(client, hf_chat: HfChat):
    """A token that is a space and the start of a 4-byte character: its text waits for the rest of
    the character, so the stop string " " is only seen later, yet it is this token that completed
    it: the output, its logprobs and the usage end there, whole or streamed."""
    tok = hf_chat.tokenizer
    space_lead = next(
        t
        for t in range(len(tok))
        if t not in tok.added_tokens_decoder and hf_token_bytes(tok, t) in (b" \xf0\x9f", b" \xf0", b" \xe2")
    )
    args = dict(
        model="chat",
        prompt=PROMPT,
        max_tokens=6,
        temperature=0,
        stop=[" "],
        logprobs=0,
        logit_bias={str(space_lead): 100},
        extra_body={"ignore_eos": True},
    )
    out = client.completions.create(**args)
    choice = out.choices[0]
    assert (choice.text, choice.finish_reason) == ("", "stop")
    assert choice.logprobs.model_extra["token_ids"] == [space_lead]
    assert len(choice.logprobs.token_logprobs) == 1 and out.usage.completion_tokens == 1
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **args))
    streamed = [
        t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens
    ]
    assert streamed == choice.logprobs.tokens and chunks[-1].usage.completion_tokens == 1


def test_models_retrieve(client):
    listed = [m.id for m in client.models.list().data]
    assert listed == ["chat:1"]
    for name in ("chat:1", "chat", "chat:latest"):
        model = client.models.retrieve(name)
        assert (model.id, model.object) == (name, "model")
        assert client.completions.create(model=name, prompt=PROMPT, max_tokens=1).model == "chat:1"
    for missing in ("other", "chat:2"):
        with pytest.raises(openai.NotFoundError) as err:
            client.models.retrieve(missing)
        assert err.value.body["code"] == "NOT_FOUND" and missing in err.value.body["message"]


@pytest.fixture
def map_only_dir(hf_chat: HfChat, tmp_path: Path) -> Path:
    """The same model, its special tokens named only in special_tokens_map.json (older HF saves)."""
    d = tmp_path / "map_only"
    shutil.copytree(hf_chat.path, d)
    config = json.loads((d / "tokenizer_config.json").read_text())
    config.pop("bos_token")
    config.pop("eos_token")
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    (d / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return d


def test_template_sees_special_tokens_from_special_tokens_map(
    start_checkpoint_service, map_only_dir: Path, redis_url, start_router, tmp_path: Path
):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(map_only_dir)
    want = hf.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True)
    want = list(want["input_ids"] if hasattr(want, "keys") else want)
    assert want.count(hf.bos_token_id) == 2  # the template's {{ bos_token }}, as HF renders it
    for client, _ in serve(start_checkpoint_service, map_only_dir, redis_url, start_router, tmp_path):
        out = client.chat.completions.create(model="chat", messages=CHAT, max_tokens=1)
        assert out.usage.prompt_tokens == len(want)
