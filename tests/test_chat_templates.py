"""Chat templates rendered as HF renders them, and refused as a 400, never a 500 or a model that
will not load (issue 11 items 3 and 5): HF's `{% generation %}` tag (training templates mark the
assistant's turns with it), a template that does not compile refusing only chats, a template's
Python error on the messages it is given, and vLLM's template switches refused by name rather than
silently ignored. HF's `apply_chat_template` over the same saved directory is the reference."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.grpc import TEST_TOKEN
from tests.fixtures.hf_chat import save_hf_chat
from tokenmill.common.config import InferenceLimitsConfig
from tokenmill.common.errors import InvalidArgument
from tokenmill.common.inference import Tokenizer
from tokenmill.common.model.hf_layout import read_hf_dir
from tokenmill.services.inference.openai_request import chat_request

# ChatML whose assistant turns sit in `{% generation %}` (TRL's assistant_only_loss templates), and
# whose system turn adds an int to a string: a Python TypeError on the messages it is given.
GENERATION_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% elif m['role'] == 'system' %}{{ m['content'] + loop.index }}"
    "{% else %}{{ m['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHAT = [
    {"role": "user", "content": "hi 🚀"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "Naïve café?"},
]
BAD_FOR_TEMPLATE = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]


def hf_ids(tokenizer, messages) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_generation_tag_renders_as_hf_and_python_errors_are_invalid_argument(tmp_path: Path):
    hf = save_hf_chat(tmp_path / "gen", chat_template=GENERATION_TEMPLATE)
    tok = Tokenizer.from_files(read_hf_dir(hf.path)[2])
    want = hf.tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert tok.render_chat(CHAT) == want
    assert tok.encode(want, add_special_tokens=False) == hf_ids(hf.tokenizer, CHAT)
    with pytest.raises(TypeError):
        hf.tokenizer.apply_chat_template(BAD_FOR_TEMPLATE, tokenize=False, add_generation_prompt=True)
    with pytest.raises(InvalidArgument, match="chat template refused these messages: TypeError"):
        tok.render_chat(BAD_FOR_TEMPLATE)


def test_template_that_does_not_compile_refuses_only_chats(tmp_path: Path):
    """HF's tokenizer loads and encodes without compiling the template: so must the model load."""
    hf = save_hf_chat(tmp_path / "broken", chat_template="{% for m in messages %}{{ m['content'] }}")
    tok = Tokenizer.from_files(read_hf_dir(hf.path)[2])
    assert tok.encode("The quick brown fox") == hf.encode("The quick brown fox")
    with pytest.raises(InvalidArgument, match="chat template does not compile"):
        tok.render_chat(CHAT)


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"chat_template_kwargs": {"enable_thinking": False}}, "chat_template_kwargs"),
        ({"chat_template": "{{ messages }}"}, "chat_template"),
        ({"documents": [{"title": "a", "text": "b"}]}, "documents"),
        ({"add_generation_prompt": False}, "add_generation_prompt"),
        ({"continue_final_message": True}, "continue_final_message"),
    ],
)
def test_chat_template_switches_are_refused_not_ignored(extra, field):
    body = {"model": "m", "messages": CHAT, **extra}
    with pytest.raises(InvalidArgument, match=field):
        chat_request(body, InferenceLimitsConfig())
    # their defaults are what the server does anyway
    plain = {"chat_template_kwargs": {}, "add_generation_prompt": True, "continue_final_message": False}
    req, _, _ = chat_request({"model": "m", "messages": CHAT, **plain}, InferenceLimitsConfig())
    assert len(req.messages) == len(CHAT)


@pytest.mark.slow
def test_openai_client_chat_over_a_generation_template(
    start_checkpoint_service, redis_url, start_router, tmp_path: Path
):
    """Served through the HTTP front: the model loads, chat equals HF, the template's error is a 400."""
    openai = pytest.importorskip("openai")
    from tests.test_openai_conformance import serve

    hf = save_hf_chat(tmp_path / "gen", chat_template=GENERATION_TEMPLATE)
    ids = hf_ids(hf.tokenizer, CHAT)
    want = hf.tokenizer.decode(hf.greedy(ids, 4))
    for client, _ in serve(start_checkpoint_service, hf.path, redis_url, start_router, tmp_path):
        assert client.api_key == TEST_TOKEN
        out = client.chat.completions.create(
            model="chat", messages=CHAT, max_tokens=4, temperature=0, extra_body={"ignore_eos": True}
        )
        assert out.usage.prompt_tokens == len(ids) and out.choices[0].message.content == want
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError, match="TypeError"):
                r = client.chat.completions.create(
                    model="chat", messages=BAD_FOR_TEMPLATE, max_tokens=2, stream=stream
                )
                list(r) if stream else None
        with pytest.raises(openai.BadRequestError, match="chat_template_kwargs"):
            client.chat.completions.create(
                model="chat", messages=CHAT, extra_body={"chat_template_kwargs": {"enable_thinking": False}}
            )
