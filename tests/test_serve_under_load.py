"""Many models on one local platform, driven as an outsider with real processes (`tokenmill up`,
`tokenmill serve`, the router, replica processes) while clients keep sending requests: exact routing
by name, version and tag (gRPC and the official `openai` client), a rolling replacement of A:v1 by
A:v2 under streaming and unary load, `--remove` under load, and kill -9 of the supervisor and of the
router mid-request."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.inference import TinyCheckpoint, random_model, reference_greedy, tiny_config
from tests.test_serve_models import _cli, _save, local_platform
from tokenmill.common import errors
from tokenmill.common.clients.inference import InferenceClient

PROMPT = "Once upon a time"
MAX_NEW = 6


@pytest.fixture
def platform(tmp_path: Path):
    with local_platform(tmp_path, no_replica_wait_s=5) as up:
        yield up


def _serve(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    result = _cli(env, "serve", *args, "--device", "cpu", "--kv-cache-mb", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def _unary(client: InferenceClient, model: str) -> tuple[list[int], set[str]]:
    resp = client.generate(
        PROMPT, model=model, max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True, timeout=120
    )
    return list(resp.token_ids), {resp.replica}


def _streamed(client: InferenceClient, model: str) -> tuple[list[int], set[str]]:
    ids: list[int] = []
    replicas: set[str] = set()
    for chunk in client.stream(PROMPT, model=model, max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True):
        ids.extend(chunk.token_ids)
        if chunk.replica:
            replicas.add(chunk.replica)
    return ids, replicas


class Load:
    """Clients sending `model` requests (one streaming, one unary thread) until stopped; each
    outcome is (tokens, replicas that answered) or the error code."""

    def __init__(self, client: InferenceClient, model: str):
        self.outcomes: list[tuple[list[int], set[str]] | str] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(fn, client, model), daemon=True)
            for fn in (_streamed, _unary)
        ]

    def _run(self, fn: Callable[..., Any], client: InferenceClient, model: str) -> None:
        while not self._stop.is_set():
            try:
                self.outcomes.append(fn(client, model))
            except errors.TokenmillError as exc:
                self.outcomes.append(f"{exc.code}: {exc.message}")

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(120)

    def wait_for(self, count: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while len(self.outcomes) < count and time.monotonic() < deadline:
            time.sleep(0.1)


def _generation(replica: str) -> str:
    return replica.rsplit("-", 1)[0]  # inference-replica-tiny-g2-0 -> ...-g2


@pytest.mark.slow  # the whole platform and several replica processes
def test_many_models_roll_and_remove_under_load(platform, tiny_ckpt):
    env, ports, token = platform
    vocab = tiny_ckpt.config.vocab_size
    v2 = TinyCheckpoint(random_model(tiny_config(vocab), seed=2), tiny_ckpt.hf_tokenizer)
    other = TinyCheckpoint(random_model(tiny_config(vocab), seed=1), tiny_ckpt.hf_tokenizer)
    _save(ports, token, "tiny", tiny_ckpt)
    _save(ports, token, "tiny", v2)
    _save(ports, token, "other", other)
    ids = tiny_ckpt.encode(PROMPT)
    want = {
        "v1": reference_greedy(tiny_ckpt.model, ids, MAX_NEW),
        "v2": reference_greedy(v2.model, ids, MAX_NEW),
        "other": reference_greedy(other.model, ids, MAX_NEW),
    }
    assert len({tuple(w) for w in want.values()}) == 3

    _serve(env, "tiny:1")
    _serve(env, "other")  # B while A is served: both serve
    with InferenceClient(f"127.0.0.1:{ports['inference']}", token=token) as client:
        # (1) exact routing by name, version and tag; anything else NOT_FOUND.
        for model in ("tiny", "tiny:1"):
            assert _unary(client, model)[0] == want["v1"], model
            assert _streamed(client, model)[0] == want["v1"], model
        for model in ("other", "other:1", "other:latest"):
            assert _unary(client, model)[0] == want["other"], model
        for model in ("tiny:2", "tiny:latest", "other:2", "nope", "nope:1"):
            with pytest.raises(errors.NotFound):
                _unary(client, model)
            with pytest.raises(errors.NotFound):
                _streamed(client, model)
        _openai_routing(ports, token, {k: tiny_ckpt.hf_tokenizer.decode(v) for k, v in want.items()})

        # (2) rolling replacement of tiny:1 by tiny:2 under streaming and unary load.
        with Load(client, "tiny") as load:
            load.wait_for(4)
            rolled = _serve(env, "tiny:2")
            time.sleep(3)  # requests keep flowing while the old generation drains
        assert "replaced 1 replica" in rolled.stdout, rolled.stdout
        answered = _check_versions(load.outcomes, want)
        assert answered == {"v1", "v2"}, load.outcomes
        for model in ("tiny", "tiny:2"):
            assert _unary(client, model)[0] == want["v2"]
            assert _streamed(client, model)[0] == want["v2"]
        with pytest.raises(errors.NotFound):
            _unary(client, "tiny:1")

        # (3) remove other under load: in-flight requests finish, new ones NOT_FOUND, tiny unaffected.
        with Load(client, "other") as load, Load(client, "tiny") as tiny_load:
            load.wait_for(4)
            removed = _cli(env, "serve", "other", "--remove")
            assert removed.returncode == 0, removed.stderr
            gone = time.monotonic()
            while time.monotonic() - gone < 30 and not any(isinstance(o, str) for o in load.outcomes):
                time.sleep(0.2)
            waited = time.monotonic() - gone
        errs = [o for o in load.outcomes if isinstance(o, str)]
        assert errs and all(e.startswith("NOT_FOUND") for e in errs), errs
        assert waited < 15, f"new requests for a removed model waited {waited:.1f}s for NOT_FOUND"
        assert all(o[0] == want["other"] for o in load.outcomes if not isinstance(o, str))
        assert tiny_load.outcomes and all(
            not isinstance(o, str) and o[0] == want["v2"] for o in tiny_load.outcomes
        ), tiny_load.outcomes
    listing = _cli(env, "serve", "--list").stdout
    assert "tiny:2" in listing and "other" not in listing, listing


def _check_versions(outcomes: list[Any], want: dict[str, list[int]]) -> set[str]:
    """Every outcome is a whole answer of exactly one version from one generation; the versions seen."""
    seen = set()
    for o in outcomes:
        assert not isinstance(o, str), outcomes
        tokens, replicas = o
        version = next((v for v in ("v1", "v2") if tokens == want[v]), None)
        assert version is not None, o
        gens = {_generation(r) for r in replicas}
        assert len(gens) == 1 and gens.pop().endswith("-g1" if version == "v1" else "-g2"), o
        seen.add(version)
    return seen


def _openai_routing(ports: dict[str, int], token: str, want: dict[str, str]) -> None:
    """The same exact routing over HTTP with the official client: a selector nothing serves is 404."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{ports['inference'] + 2000}/v1", api_key=token, max_retries=0, timeout=60
    )
    with client:
        for model, key in (("tiny:1", "v1"), ("other:latest", "other")):
            out = client.completions.create(
                model=model, prompt=PROMPT, max_tokens=MAX_NEW, temperature=0, extra_body={"ignore_eos": True}
            )
            assert out.choices[0].text == want[key], model
        for model in ("tiny:2", "nope", "other:7"):
            with pytest.raises(openai.NotFoundError):
                client.completions.create(model=model, prompt=PROMPT, max_tokens=2)
            with pytest.raises(openai.NotFoundError):
                list(client.completions.create(model=model, prompt=PROMPT, max_tokens=2, stream=True))


def _state_pid(data_dir: Path, name: str) -> int:
    import json

    return int(json.loads((data_dir / "run" / "state.json").read_text())[name]["pid"])


@pytest.mark.slow  # the whole platform and a replica process
def test_kill_9_of_the_supervisor_and_of_the_router_mid_request(platform, tiny_ckpt, tmp_path: Path):
    env, ports, token = platform
    data_dir = tmp_path / "data"
    _save(ports, token, "tiny", tiny_ckpt)
    _serve(env, "tiny")
    want = reference_greedy(tiny_ckpt.model, tiny_ckpt.encode(PROMPT), MAX_NEW)
    with InferenceClient(f"127.0.0.1:{ports['inference']}", token=token) as client:
        # The supervisor dies: its children (own sessions) keep serving, in-flight requests finish.
        with Load(client, "tiny") as load:
            load.wait_for(2)
            os.kill(int((data_dir / "run" / "supervisor.pid").read_text()), signal.SIGKILL)
            load.wait_for(len(load.outcomes) + 4)
        assert load.outcomes and all(not isinstance(o, str) and o[0] == want for o in load.outcomes)
        listing = _cli(env, "serve", "--list")
        assert "inference-replica-tiny-g1-0" in listing.stdout and "SERVING" in listing.stdout, listing.stdout
        assert "supervisor is not running" in listing.stderr, listing.stderr
        # `tokenmill up` takes the platform back without stopping what serves (no "port in use").
        router_pid = _state_pid(data_dir, "inference")
        again = _cli(env, "up", "--timeout", "60")
        assert again.returncode == 0, again.stdout + again.stderr
        assert _state_pid(data_dir, "inference") == router_pid
        assert _unary(client, "tiny")[0] == want

        # The router dies mid-request: in flight, UNAVAILABLE (never a wrong or cut answer); the
        # supervisor restarts it and requests succeed again.
        with Load(client, "tiny") as load:
            load.wait_for(2)
            os.kill(router_pid, signal.SIGKILL)
            killed = len(load.outcomes)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if len([o for o in load.outcomes[killed:] if not isinstance(o, str)]) >= 4:
                    break
                time.sleep(0.2)
        after = load.outcomes[killed:]
        assert all(o[0] == want for o in load.outcomes if not isinstance(o, str))
        assert all(o.startswith("UNAVAILABLE") for o in after if isinstance(o, str)), after
        assert len([o for o in after if not isinstance(o, str)]) >= 4, after
        assert _state_pid(data_dir, "inference") != router_pid
    listing = _cli(env, "serve", "--list")
    assert (
        "inference-replica-tiny-g1-0" in listing.stdout and "SERVING" in listing.stdout and not listing.stderr
    ), listing


def test_a_dead_supervisors_children_are_adopted_not_blocked_on_their_ports(tmp_path: Path) -> None:
    """After kill -9 of the supervisor its children live on (own sessions) holding their ports:
    `tokenmill up` failed with "already in use" and `serve --remove` printed success while nothing
    stopped. Its orphans are found by pid and exact command line, and skipped by the port check."""
    import json
    import socket

    from tests.fixtures.grpc import make_test_config
    from tokenmill.common.platform.launcher import ProcessSpec, RunDir, check_ports_free

    config = make_test_config(tmp_path)
    run_dir = RunDir(config.data_dir)
    run_dir.ensure()
    svc = config.service("inference")
    argv = [sys.executable, "-c", "import time; time.sleep(60)"]
    child = subprocess.Popen(argv, start_new_session=True)
    try:
        run_dir.write_processes([ProcessSpec("inference", argv), ProcessSpec("other", [*argv, "x"])])
        state = {n: {"pid": child.pid, "started_at": time.time()} for n in ("inference", "other")}
        run_dir.state.write_text(json.dumps(state))
        run_dir.supervisor_pid.write_text("999999")  # killed
        assert run_dir.orphans() == {"inference": child.pid}  # "other": a pid that is not its command
        with socket.socket() as held:  # the orphaned router's port
            held.bind((svc.host, svc.port))
            held.listen()
            check_ports_free(config, skip=run_dir.orphans())
            with pytest.raises(RuntimeError, match="already in use"):
                check_ports_free(config)
    finally:
        child.kill()
        child.wait()
    assert run_dir.orphans() == {}
