"""The official `openai` client against the router's HTTP front with two models served at once
('tiny' and 'other', different weights): listed, each answered with its own model's tokens (also
streaming both at once), and an unknown model is `NotFoundError`."""

from __future__ import annotations

import threading

import pytest

from tests.fixtures.grpc import TEST_TOKEN
from tests.fixtures.inference import reference_greedy, wait_for

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow  # two replicas and a router
PROMPTS = ["Once upon a time", "The quick brown fox"]


@pytest.fixture
def client(start_router, start_replica, start_puller, other_ckpt, redis_url):
    _, dispatcher, front = start_router(no_replica_timeout_s=30.0)
    start_replica(redis_url, replica_id="a")
    start_puller("other", "b")
    wait_for(lambda: len(dispatcher.replicas()) == 2, 30, "both replicas' heartbeats")
    c = openai.OpenAI(
        base_url=f"http://127.0.0.1:{front.port}/v1", api_key=TEST_TOKEN, max_retries=0, timeout=60
    )
    yield c
    c.close()


def test_both_models_listed_and_each_answers_with_its_own_tokens(client, tiny_ckpt, other_ckpt):
    assert {"tiny", "other"} <= {m.id.partition(":")[0] for m in client.models.list().data}
    for name, ckpt in (("tiny", tiny_ckpt), ("other", other_ckpt)):
        for prompt in PROMPTS:
            ids = ckpt.encode(prompt)
            out = client.completions.create(
                model=name, prompt=[ids], max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
            )
            want = reference_greedy(ckpt.model, ids, 6)
            assert out.choices[0].text == ckpt.hf_tokenizer.decode(want), (name, prompt)
            assert out.model.partition(":")[0] == name
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=2)


def test_streaming_both_models_at_once(client, tiny_ckpt, other_ckpt):
    results: dict[str, str] = {}

    def run(name: str, ckpt) -> None:
        ids = ckpt.encode(PROMPTS[0])
        chunks = client.completions.create(
            model=name,
            prompt=[ids],
            max_tokens=8,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        results[name] = "".join(c.choices[0].text for c in chunks if c.choices)

    threads = [threading.Thread(target=run, args=a) for a in (("tiny", tiny_ckpt), ("other", other_ckpt))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    for name, ckpt in (("tiny", tiny_ckpt), ("other", other_ckpt)):
        want = reference_greedy(ckpt.model, ckpt.encode(PROMPTS[0]), 8)
        assert results.get(name) == ckpt.hf_tokenizer.decode(want), name
