"""A checkpoint server process SIGKILLed mid-commit leaves the old state or the new one, never a
partial version; an interrupted commit's tags are applied when the store reopens."""

from __future__ import annotations

import signal
import threading
import time

import pytest
import torch

from tests.fixtures.checkpoint import tiny_state_dict
from tokenmill.common import errors

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("point", "committed"),
    [("before_manifest", False), ("manifest_temp", False), ("after_manifest", True)],
)
def test_server_killed_mid_commit(checkpoint_server_process, tmp_path, point, committed):
    store_dir = tmp_path / "store"
    old, new = tiny_state_dict(seed=1), tiny_state_dict(seed=2)
    server = checkpoint_server_process(store_dir)
    with server.client(chunk_size=64 << 10) as c:
        assert c.save("model", old, tags=["best"]).ref == "model:1"
    server.proc.terminate()
    server.proc.wait(10)

    marker = tmp_path / f"{point}.reached"
    pause = {f"checkpoint.{point}": {"action": "pause", "marker": str(marker)}}
    server = checkpoint_server_process(store_dir, failpoints=pause)
    outcome: dict[str, object] = {}

    def save() -> None:
        with server.client(chunk_size=64 << 10, retry=False, timeout=20) as c:
            try:
                outcome["version"] = c.save("model", new, tags=["best", "candidate"])
            except errors.TokenmillError as exc:
                outcome["error"] = exc

    thread = threading.Thread(target=save)
    thread.start()
    deadline = time.monotonic() + 30
    while not marker.exists():
        assert time.monotonic() < deadline, f"server never reached {point}"
        assert thread.is_alive(), outcome
        time.sleep(0.02)
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)
    thread.join(30)
    assert isinstance(outcome.get("error"), errors.TokenmillError)  # the client saw the crash

    server = checkpoint_server_process(store_dir)
    with server.client(chunk_size=64 << 10) as c:
        refs = [v.ref for v in c.list("model")]
        loaded_old = c.load("model:1")
        assert all(torch.equal(loaded_old[k], old[k]) for k in old)
        if committed:
            assert refs == ["model:1", "model:2"]
            loaded_new = c.load("model:2")
            assert all(torch.equal(loaded_new[k], new[k]) for k in new)
            assert c.get("model:best").ref == "model:2"  # the commit's tags were re-applied
            assert c.get("model:candidate").ref == "model:2"
        else:
            assert refs == ["model:1"]
            assert c.get("model:best").ref == "model:1"
            assert c.get("model").ref == "model:1"
        assert c.verify().ok
        leftovers = [p for p in store_dir.rglob("*") if ".tmp-" in p.name]
        assert leftovers == []  # temp files of the crashed write were cleaned up on open
        # the store keeps working: the same save now succeeds
        v = c.save("model", new)
        assert v.ref == ("model:3" if committed else "model:2")


def test_upload_resumes_after_server_restart(checkpoint_server_process, tmp_path):
    """Half the chunks arrive, the server is SIGKILLed; after a restart the same save (same
    idempotency key) sends only the other half."""
    store_dir = tmp_path / "store"
    sd = {"a": torch.randn(64, 1024), "b": torch.randn(64, 1024)}  # 2 x 256 KiB = 8 chunks of 64 KiB
    server = checkpoint_server_process(store_dir)
    with server.client(chunk_size=64 << 10) as c:
        prepared = c._prepare(sd, {}, {})
        up = c.begin("resume", idempotency_key="job-1-step-5", _prepared=prepared)
        first_half = sorted(up.session.missing_chunks)[:4]
        c._send_chunks(up.upload_id, first_half, prepared.data)
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)

    server = checkpoint_server_process(store_dir)
    with server.client(chunk_size=64 << 10) as c:
        v = c.save("resume", sd, idempotency_key="job-1-step-5")
        assert c.last_upload.upload_id == up.upload_id  # the same session, persisted in the store
        assert c.last_upload.chunks_sent == 4 and c.last_upload.bytes_sent == 4 * (64 << 10)
        out = c.load(v.ref)
        assert all(torch.equal(out[k], sd[k]) for k in sd)
        again = c.save("resume", sd, idempotency_key="job-1-step-5")
        assert again.ref == v.ref and c.last_upload.bytes_sent == 0
