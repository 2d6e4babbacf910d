"""EmbeddedRedis and connect(): real redis-server processes in temporary directories."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from common.config import Config
from common.redis_conn import connect, connect_url, redis_url_for
from common.redis_embedded import EmbeddedRedis, _pid_alive

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def embedded(tmp_path: Path):
    server = EmbeddedRedis(tmp_path)
    yield server
    server.stop()


def test_start_writes_discovery_files_and_enables_aof(embedded: EmbeddedRedis, tmp_path: Path) -> None:
    url = embedded.start()
    assert url.startswith("redis://127.0.0.1:")
    assert (tmp_path / "redis" / "redis.url").read_text().strip() == url
    pid = int((tmp_path / "redis" / "redis.pid").read_text())
    assert _pid_alive(pid)
    client = redis.Redis.from_url(url, decode_responses=True)
    assert client.config_get("appendonly") == {"appendonly": "yes"}
    assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
    assert client.config_get("dir")["dir"] == str(tmp_path.resolve() / "redis")
    assert client.info("server")["redis_version"] >= "6.2"


def test_start_is_idempotent_and_shared_between_instances(embedded: EmbeddedRedis, tmp_path: Path) -> None:
    url = embedded.start()
    pid = (tmp_path / "redis" / "redis.pid").read_text()
    assert embedded.start() == url
    other = EmbeddedRedis(tmp_path)  # e.g. a service process finding the launcher's server
    assert other.running()
    assert other.start() == url
    assert (tmp_path / "redis" / "redis.pid").read_text() == pid


def test_server_outlives_the_process_that_started_it(tmp_path: Path) -> None:
    code = f"from common.redis_embedded import EmbeddedRedis; print(EmbeddedRedis({str(tmp_path)!r}).start())"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    url = out.stdout.strip()
    server = EmbeddedRedis(tmp_path)
    try:
        assert server.running()
        assert server.start() == url
        assert redis.Redis.from_url(url).ping()
    finally:
        server.stop()
    assert not server.running()
    assert not (tmp_path / "redis" / "redis.url").exists()


def test_restart_on_same_port_keeps_data_via_aof(embedded: EmbeddedRedis) -> None:
    url = embedded.start()
    client = redis.Redis.from_url(url, decode_responses=True)
    client.set("k", "v")
    client.xadd("s", {"a": "1"})
    client.close()
    embedded.stop()
    assert embedded.start() == url  # same port: clients holding the URL reconnect
    client = redis.Redis.from_url(url, decode_responses=True)
    assert client.get("k") == "v"
    assert client.xlen("s") == 1


def test_sigkilled_server_loses_no_acknowledged_write(embedded: EmbeddedRedis, tmp_path: Path) -> None:
    """AOF is written to the OS before the reply, so a killed process (not a power cut) loses nothing."""
    url = embedded.start()
    client = redis.Redis.from_url(url, decode_responses=True)
    for i in range(200):
        client.rpush("l", i)
    client.close()
    pid = int((tmp_path / "redis" / "redis.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    assert embedded.start() == url  # the recorded pid is dead: a fresh server on the same port
    assert redis.Redis.from_url(url).llen("l") == 200


def test_requested_port_in_use_is_an_actionable_error(tmp_path: Path, embedded: EmbeddedRedis) -> None:
    embedded.start()
    clash = EmbeddedRedis(tmp_path / "other", port=embedded.port)
    with pytest.raises(RuntimeError, match="could not start embedded redis-server"):
        clash.start()


def test_connect_uses_embedded_server_for_data_dir(tmp_path: Path) -> None:
    config = Config(data_dir=tmp_path, redis_url=None, auth={"disabled": True})
    try:
        client = connect(config)
        assert client.ping()
        assert redis_url_for(config) == (tmp_path / "redis" / "redis.url").read_text().strip()
        client.set("x", "1")
        assert client.get("x") == "1"  # decode_responses=True everywhere
    finally:
        EmbeddedRedis(tmp_path).stop()


def test_connect_prefers_configured_url(redis_server) -> None:
    config = Config(redis_url=redis_server.url, auth={"disabled": True})
    assert redis_url_for(config) == redis_server.url
    assert connect(config).ping()


def test_client_survives_server_restart(embedded: EmbeddedRedis) -> None:
    client = connect_url(embedded.start())
    client.set("before", "1")
    embedded.stop()
    embedded.start()
    # the pooled connection is dead; the retry policy reconnects transparently
    assert client.get("before") == "1"
    client.set("after", "2")
    assert client.get("after") == "2"
