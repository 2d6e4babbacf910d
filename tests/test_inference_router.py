"""The router over a real Redis with real replicas (in-process and a killable subprocess)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.fixtures.grpc import TEST_TOKEN, make_test_config
from tests.fixtures.inference import greedy, reference_greedy, replica_process, wait_for
from tokenmill.common import errors
from tokenmill.common.clients.inference import InferenceClient
from tokenmill.common.runtime import ServiceApp
from tokenmill.services.inference.convert import SERVICE_NAME
from tokenmill.services.inference.dispatch.protocol import REPLICAS

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def router(start_router, redis_client):
    return start_router()


def test_routes_to_replicas_and_balances(router, start_replica, redis_url, tiny_ckpt):
    client, _, _ = router
    a = start_replica(redis_url, replica_id="ra")
    b = start_replica(redis_url, replica_id="rb")
    prompts = ["The quick brown fox", "Once upon a time", "def add(a, b):", "Naïve café"] * 10
    results: dict[int, object] = {}

    def run(i):
        results[i] = client.generate(prompts[i], max_tokens=12, **greedy())

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i, p in enumerate(prompts):
        assert list(results[i].token_ids) == reference_greedy(tiny_ckpt.model, tiny_ckpt.encode(p), 12)
    served = {r.replica for r in results.values()}
    assert served == {"ra", "rb"}, served
    assert a.replica.engine.generation_tokens_total > 0 and b.replica.engine.generation_tokens_total > 0
    chunks = list(client.stream("Once upon a time", max_tokens=8, **greedy()))
    assert [t for c in chunks for t in c.token_ids] == reference_greedy(
        tiny_ckpt.model, tiny_ckpt.encode("Once upon a time"), 8
    )
    assert client.model_info().model == "tiny:1"
    assert list(client.tokenize("hello").token_ids) == tiny_ckpt.encode("hello")
    stats = client.stats()
    assert stats.kv_blocks_total == 2 * 127 and "2 live replicas" in stats.replica


def test_router_errors(router, start_replica, redis_url, redis_client):
    client, _, _ = router
    with pytest.raises(errors.Unavailable, match="no inference replica"):
        client.generate("hi", max_tokens=2)
    start_replica(redis_url)
    with pytest.raises(errors.NotFound, match="not served"):
        client.generate("hi", max_tokens=2, model="gpt-9")
    with pytest.raises(errors.InvalidArgument, match="temperature"):
        client.generate("hi", max_tokens=2, temperature=-1.0)
    with pytest.raises(errors.InvalidArgument, match="top_p"):
        list(client.stream("hi", max_tokens=2, top_p=2.0))
    with pytest.raises(errors.InvalidArgument, match="empty"):
        client.generate("", max_tokens=2)
    with pytest.raises(errors.InvalidArgument, match="context"):
        client.generate("hi", max_tokens=100_000)


def test_client_cancel_through_the_router_frees_blocks(router, start_replica, redis_url):
    client, _, _ = router
    h = start_replica(redis_url, enable_prefix_caching=False)
    stream = client.stream("Once upon a time", max_tokens=240, **greedy())
    first = next(stream)
    assert first.token_ids
    stream.close()
    eng = h.replica.engine
    wait_for(
        lambda: h.replica.aengine.stats().requests_running == 0 and not eng.requests,
        what="the replica to abort the cancelled request",
    )
    wait_for(lambda: eng.blocks.num_free() == eng.blocks.usable_blocks, what="blocks freed")


def test_many_simultaneous_requests_on_a_small_pool(router, start_replica, redis_url):
    client, _, _ = router
    start_replica(redis_url, num_blocks=33, max_num_seqs=8)
    n = 200
    done, failed = [], []
    lock = threading.Lock()

    def run(i):
        try:
            r = client.generate([1 + i % 50, 2, 3], max_tokens=4, **greedy())
            with lock:
                done.append(len(r.token_ids))
        except errors.TokenmillError as exc:
            with lock:
                failed.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not failed, failed[:3]
    assert done == [4] * n


@pytest.mark.slow
def test_replica_killed_mid_stream_is_retried_elsewhere(
    router, start_replica, redis_url, redis_client, inference_store, tmp_path, tiny_ckpt
):
    client, _, _ = router
    proc, log = replica_process(tmp_path, redis_url, inference_store.app.port, "victim")
    try:
        wait_for(
            lambda: redis_client.hexists(REPLICAS, "victim") or proc.poll() is not None, 90, "victim ready"
        )
        assert proc.poll() is None, log.read_text()[-3000:]
        prompt = tiny_ckpt.encode("Once upon a time")
        stream = client.stream(prompt, max_tokens=240, **greedy())
        first = next(stream)
        assert first.replica == "victim"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        start_replica(redis_url, replica_id="survivor")
        chunks = [first, *stream]
    finally:
        if proc.poll() is None:
            proc.kill()
    tokens = [t for c in chunks for t in c.token_ids]
    assert tokens == reference_greedy(tiny_ckpt.model, prompt, 240)  # no gap, no duplicate, no truncation
    assert chunks[-1].replica == "survivor" and chunks[-1].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 240 and chunks[-1].usage.prompt_tokens == len(prompt)


@pytest.mark.slow
def test_replica_killed_without_a_survivor_is_unavailable(
    router, redis_url, redis_client, inference_store, tmp_path
):
    client, _, _ = router
    proc, log = replica_process(tmp_path, redis_url, inference_store.app.port, "lonely")
    try:
        wait_for(
            lambda: redis_client.hexists(REPLICAS, "lonely") or proc.poll() is not None, 90, "replica ready"
        )
        assert proc.poll() is None, log.read_text()[-3000:]
        stream = client.stream("Once upon a time", max_tokens=240, **greedy())
        assert next(stream).token_ids
        os.kill(proc.pid, signal.SIGKILL)
        with pytest.raises(errors.Unavailable, match="incomplete|no inference replica"):
            for _ in stream:
                pass
    finally:
        if proc.poll() is None:
            proc.kill()


def _http(front, path, body=None, token=TEST_TOKEN):
    req = urllib.request.Request(
        f"http://127.0.0.1:{front.port}{path}", method="POST" if body is not None else "GET"
    )
    if body is not None:
        req.data = json.dumps(body).encode()
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    return urllib.request.urlopen(req, timeout=60)


def test_openai_http_front(router, start_replica, redis_url, tiny_ckpt):
    _, _, front = router
    start_replica(redis_url)
    models = json.loads(_http(front, "/v1/models").read())
    assert [m["id"] for m in models["data"]] == ["tiny:1"]
    prompt = "The quick brown fox"
    ref = reference_greedy(tiny_ckpt.model, tiny_ckpt.encode(prompt), 10)
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 10, "temperature": 0, "ignore_eos": True}
    out = json.loads(_http(front, "/v1/completions", body).read())
    assert out["object"] == "text_completion" and out["usage"]["completion_tokens"] == 10
    assert out["model"] == "tiny:1"
    assert out["choices"][0]["finish_reason"] == "length"
    expected_text = out["choices"][0]["text"]
    resp = _http(
        front, "/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}}
    )
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = [line[6:] for line in resp.read().decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    parsed = [json.loads(e) for e in events[:-1]]
    assert "".join(c["text"] for p in parsed for c in p["choices"]) == expected_text
    assert parsed[-1]["usage"]["completion_tokens"] == 10
    lp = json.loads(_http(front, "/v1/completions", {**body, "logprobs": 1}).read())
    assert lp["choices"][0]["logprobs"]["token_ids"] == ref
    for bad, status in (
        ({"prompt": "", "max_tokens": 3}, 400),
        ({"prompt": "hi", "max_tokens": 0}, 400),
        ({"prompt": "hi", "temperature": -1}, 400),
        ({"prompt": "hi", "top_p": 0}, 400),
        ({"prompt": "hi", "model": "nope"}, 404),
        ({"prompt": "hi", "stop": ["\ud800"]}, 400),
    ):
        with pytest.raises(urllib.error.HTTPError) as info:
            _http(front, "/v1/completions", bad)
        assert info.value.code == status, (bad, info.value.read())
        assert json.loads(info.value.read())["error"]["message"]
    with pytest.raises(urllib.error.HTTPError) as info:
        _http(front, "/v1/models", token="wrong-token-000000000000")
    assert info.value.code == 401


def test_cli_generate_and_bench_serve(router, start_replica, redis_url, tmp_path, tiny_ckpt):
    from click.testing import CliRunner

    from tokenmill.common.cli.main import cli

    client, _, _ = router
    start_replica(redis_url)
    port = int(client.target.rsplit(":", 1)[1])
    cfg = tmp_path / "cli.yaml"
    cfg.write_text(
        f"data_dir: {tmp_path}\nauth:\n  tokens: ['{TEST_TOKEN}']\nservices:\n  inference:\n    port: {port}\n"
    )
    runner = CliRunner()
    res = runner.invoke(
        cli,
        [
            "--config",
            str(cfg),
            "generate",
            "The quick brown fox",
            "--stream",
            "--max-tokens",
            "8",
            "--temperature",
            "0",
        ],
    )
    assert res.exit_code == 0, res.output
    assert res.output.startswith("The quick brown fox") and "length; 8 tokens" in res.output
    res = runner.invoke(
        cli,
        [
            "--config",
            str(cfg),
            "bench",
            "serve",
            "--requests",
            "12",
            "--concurrency",
            "4",
            "--max-tokens",
            "6",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    report = json.loads(res.output[res.output.index("{") :])
    assert report["completed"] == 12 and report["failed"] == 0 and report["output_tokens"] == 72
    assert report["ttft_ms_p50"] > 0 and report["itl_ms_p99"] >= report["itl_ms_p50"] > 0
    res = runner.invoke(cli, ["--config", str(cfg), "generate", "hi", "--temperature", "-1"])
    assert res.exit_code != 0 and "INVALID_ARGUMENT" in res.output


def test_router_registers_through_the_runtime_with_health_per_service(redis_url, tmp_path):
    from tokenmill.services.inference.server import build_router, parse_args

    config = make_test_config(tmp_path, redis_url=redis_url)
    app = ServiceApp("inference", config, port=0, metrics=False)
    ready = build_router(config, app, parse_args(["router", "--http-port", "0"]))
    try:
        app.start()
        with InferenceClient(f"127.0.0.1:{app.port}", token=TEST_TOKEN) as client:
            assert client.health(SERVICE_NAME) == "NOT_SERVING"
            assert ready()
            app.set_serving()
            assert client.health(SERVICE_NAME) == "SERVING"
    finally:
        app.stop(0)


@pytest.mark.slow
def test_router_process_starts_and_answers(redis_url, tmp_path):
    from tests.fixtures.grpc import free_port

    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    cfg = tmp_path / "router.yaml"
    cfg.write_text(
        f"data_dir: {tmp_path}\nredis_url: {redis_url}\nauth:\n  tokens: ['{TEST_TOKEN}']\nlog_format: text\n"
        f"services:\n  inference:\n    port: {grpc_port}\n    metrics_port: {metrics_port}\n"
        "inference_limits:\n  no_replica_wait_seconds: 1\n"  # queued for scale from zero, then UNAVAILABLE
    )
    env = {**os.environ}
    env.pop("TOKENMILL_CONFIG", None)
    log = tmp_path / "router.log"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tokenmill.services.inference",
            "--config",
            str(cfg),
            "router",
            "--http-port",
            str(http_port),
        ],
        cwd=REPO,
        env=env,
        stdout=open(log, "wb"),  # noqa: SIM115 - the child process owns it
        stderr=subprocess.STDOUT,
    )
    try:
        client = InferenceClient(f"127.0.0.1:{grpc_port}", token=TEST_TOKEN)

        def serving() -> bool:
            try:
                return client.health(timeout=1.0) == "SERVING"
            except errors.TokenmillError:
                return False

        wait_for(lambda: proc.poll() is not None or serving(), 60, "router SERVING")
        assert proc.poll() is None, log.read_text()[-3000:]
        with pytest.raises(errors.Unavailable, match="no inference replica .* within 1 s"):
            client.generate("hi", max_tokens=2)
        req = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/models")
        req.add_header("Authorization", f"Bearer {TEST_TOKEN}")
        assert json.loads(urllib.request.urlopen(req, timeout=10).read()) == {"object": "list", "data": []}
        metrics = (
            urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        )
        # The client's own retries of UNAVAILABLE count as requests too.
        assert re.search(r'^tokenmill:router_requests_total\{model=""\} [1-9]', metrics, re.M), metrics
        # The expired request was cancelled: no model's stream holds it (series per model, none here).
        assert "# TYPE tokenmill:router_backlog gauge" in metrics
        assert not re.search(r"^tokenmill:router_queue_length\{.*\} [1-9]", metrics, re.M), metrics
        client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_draining_replica_finishes_routed_requests(router, start_replica, redis_url, tiny_ckpt):
    client, _, _ = router
    h = start_replica(redis_url, replica_id="draining")
    stream = client.stream("Once upon a time", max_tokens=120, **greedy())
    first = next(stream)
    result: dict = {}
    t = threading.Thread(target=lambda: result.setdefault("drained", h.puller.drain(30)))
    t.start()
    chunks = [first, *stream]
    t.join(30)
    assert result["drained"] is True
    assert sum(len(c.token_ids) for c in chunks) == 120 and chunks[-1].finish_reason == "length"
    # A draining replica takes no new work: a second replica serves the next request.
    start_replica(redis_url, replica_id="fresh")
    assert client.generate("hi", max_tokens=3, **greedy()).replica == "fresh"
