"""`tokenmill serve` on a real local platform (`tokenmill up`): several models at once, a rolling
replacement that drops no request, removal, and a model that cannot load failing at once."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.inference import TinyCheckpoint, random_model, reference_greedy, tiny_config
from tokenmill.common import errors
from tokenmill.common.clients.checkpoint import CheckpointClient
from tokenmill.common.clients.inference import InferenceClient
from tokenmill.common.config import SERVICE_NAMES

TOKENMILL = str(Path(sys.executable).parent / "tokenmill")
PROMPT = "Once upon a time"


def _cli(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TOKENMILL, *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def platform(tmp_path: Path):
    with local_platform(tmp_path, no_replica_wait_s=3) as up:
        yield up


@contextlib.contextmanager
def local_platform(tmp_path: Path, no_replica_wait_s: float) -> Iterator[tuple[dict[str, str], dict, str]]:
    """`tokenmill up` on free ports in `tmp_path`: (the CLI's env, service ports, auth token)."""
    from tests.test_launcher import _free_ports

    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENMILL_") and k != "REDIS_URL"}
    env["TOKENMILL_DATA_DIR"] = str(tmp_path / "data")
    env["TOKENMILL_INFERENCE_LIMITS__NO_REPLICA_WAIT_SECONDS"] = str(no_replica_wait_s)
    ports = dict(zip(SERVICE_NAMES, _free_ports(len(SERVICE_NAMES)), strict=True))
    for name, port in ports.items():
        env[f"TOKENMILL_SERVICES__{name.upper()}__PORT"] = str(port)
    result = _cli(env, "up", "--timeout", "90")
    try:
        assert result.returncode == 0, result.stdout + result.stderr
        yield env, ports, (tmp_path / "data" / "auth_token").read_text().strip()
    finally:
        _cli(env, "down")


def _save(ports, token: str, name: str, ckpt: TinyCheckpoint, tensors=None) -> None:
    with CheckpointClient(f"127.0.0.1:{ports['checkpoint']}", token=token) as store:
        ckpt.save_to(store, name, tensors)


def _greedy(client: InferenceClient, model: str) -> list[int]:
    resp = client.generate(PROMPT, model=model, max_tokens=6, temperature=0.0, ignore_eos=True, timeout=120)
    return list(resp.token_ids)


@pytest.mark.slow  # the whole platform and several replica processes
def test_serve_many_models_roll_remove_and_fail_fast(platform, tiny_ckpt):
    env, ports, token = platform
    other = TinyCheckpoint(
        random_model(tiny_config(tiny_ckpt.config.vocab_size), seed=1), tiny_ckpt.hf_tokenizer
    )
    _save(ports, token, "tiny", tiny_ckpt)
    _save(ports, token, "other", other)
    broken = dict(tiny_ckpt.tensors)
    name = next(k for k in broken if k.endswith("q_proj.weight"))
    broken[name] = broken[name][:, :-3]
    _save(ports, token, "broken", tiny_ckpt, broken)

    start = time.monotonic()
    failed = _cli(env, "serve", "broken", "--device", "cpu", "--timeout", "240")
    assert failed.returncode != 0 and "could not load broken" in failed.stderr, failed.stderr
    assert time.monotonic() - start < 180  # the reason, at once: not the 240 s timeout

    for model in ("tiny", "other"):
        result = _cli(env, "serve", model, "--device", "cpu", "--kv-cache-mb", "2")
        assert result.returncode == 0, result.stdout + result.stderr
    listing = _cli(env, "serve", "--list").stdout
    assert "tiny" in listing and "other" in listing and "broken" not in listing

    ids = tiny_ckpt.encode(PROMPT)
    with InferenceClient(f"127.0.0.1:{ports['inference']}", token=token) as client:
        assert _greedy(client, "tiny") == reference_greedy(tiny_ckpt.model, ids, 6)
        assert _greedy(client, "other:1") == reference_greedy(other.model, ids, 6)
        with pytest.raises(errors.NotFound):
            _greedy(client, "tiny:2")

        # Rolling replacement of tiny under load: every request answered, none dropped.
        stop, outcomes = threading.Event(), []

        def load() -> None:
            while not stop.is_set():
                try:
                    outcomes.append(_greedy(client, "tiny") == reference_greedy(tiny_ckpt.model, ids, 6))
                except errors.TokenmillError as exc:
                    outcomes.append(exc.code)

        worker = threading.Thread(target=load)
        worker.start()
        try:
            rolled = _cli(env, "serve", "tiny", "--device", "cpu", "--kv-cache-mb", "2")
            time.sleep(3)  # requests keep flowing while the old replica drains
        finally:
            stop.set()
            worker.join(120)
        assert rolled.returncode == 0 and "replaced 1 replica" in rolled.stdout, rolled.stderr
        assert outcomes and all(o is True for o in outcomes), outcomes
        assert "-g2-0" in _cli(env, "serve", "--list").stdout

        removed = _cli(env, "serve", "other", "--remove")
        assert removed.returncode == 0, removed.stderr
        assert "other" not in _cli(env, "serve", "--list").stdout
        assert _greedy(client, "tiny") == reference_greedy(tiny_ckpt.model, ids, 6)
