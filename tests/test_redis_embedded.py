"""EmbeddedRedis and connect(): real redis-server processes in temporary directories."""

from __future__ import annotations

import logging
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis

from tokenmill.common.config import Config
from tokenmill.common.platform.redis_embedded import (
    DISABLED_COMMANDS,
    EmbeddedRedis,
    _free_port,
    redact,
    redis_server_executable,
)
from tokenmill.common.procs import pid_alive
from tokenmill.common.redis_conn import connect, connect_url, redis_url_for

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def embedded(tmp_path: Path):
    server = EmbeddedRedis(tmp_path)
    yield server
    server.stop()


def test_start_writes_discovery_files_and_enables_aof(embedded: EmbeddedRedis, tmp_path: Path) -> None:
    url = embedded.start()
    assert url.startswith("redis://:") and "@127.0.0.1:" in url
    assert (tmp_path / "redis" / "redis.url").read_text().strip() == url
    pid = int((tmp_path / "redis" / "redis.pid").read_text())
    assert pid_alive(pid)
    client = redis.Redis.from_url(url, decode_responses=True)
    client.set("k", "v")
    # CONFIG is disabled on the server, so the settings are read from INFO and the files
    persistence = client.info("persistence")
    assert persistence["aof_enabled"] == 1
    assert (tmp_path / "redis" / "appendonly.aof").stat().st_size > 0  # AOF in <data_dir>/redis
    assert "appendfsync everysec" in (tmp_path / "redis" / "redis.conf").read_text().splitlines()
    server_info = client.info("server")
    assert server_info["redis_version"] >= "6.2"
    assert server_info["config_file"] == str(tmp_path.resolve() / "redis" / "redis.conf")


@pytest.mark.slow  # restarts redis-server several times
def test_server_requires_the_generated_password(embedded: EmbeddedRedis, tmp_path: Path) -> None:
    url = embedded.start()
    password = (tmp_path / "redis" / "redis.pass").read_text().strip()
    assert len(password) == 64 and urlsplit(url).password == password
    anonymous = redis.Redis(host="127.0.0.1", port=embedded.port)
    with pytest.raises(redis.AuthenticationError):
        anonymous.set("job", "injected")
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=embedded.port, password="0" * 64).ping()
    assert redis.Redis.from_url(url).ping()


def test_secrets_are_private_to_the_user(embedded: EmbeddedRedis, tmp_path: Path) -> None:
    embedded.start()
    directory = tmp_path / "redis"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for name in ("redis.pass", "redis.url", "redis.conf"):
        assert stat.S_IMODE((directory / name).stat().st_mode) == 0o600, name
    assert not list(directory.glob("*.tmp"))


def test_dangerous_commands_are_disabled(embedded: EmbeddedRedis) -> None:
    """CONFIG SET dir + SAVE would write files anywhere we can; DEBUG/MODULE/REPLICAOF are no better."""
    client = redis.Redis.from_url(embedded.start())
    for command in (
        ("CONFIG", "SET", "dir", "/tmp"),
        ("CONFIG", "GET", "dir"),
        ("DEBUG", "SLEEP", "0"),
        ("MODULE", "LIST"),
        ("REPLICAOF", "127.0.0.1", "1"),
        ("SLAVEOF", "127.0.0.1", "1"),
    ):
        assert command[0] in DISABLED_COMMANDS
        with pytest.raises(redis.ResponseError, match="unknown command"):
            client.execute_command(*command)
    assert client.ping()  # what tokenmill itself uses still works
    client.flushdb()


def test_password_survives_restart_and_is_never_logged(
    embedded: EmbeddedRedis, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="tokenmill.common.platform.redis_embedded")
    url = embedded.start()
    password = urlsplit(url).password
    embedded.stop()
    assert embedded.start() == url  # same password (from redis.pass) and port
    embedded.stop()
    assert urlsplit(EmbeddedRedis(tmp_path).start()).password == password  # another process: same file
    assert password not in caplog.text and "embedded redis-server pid" in caplog.text
    assert redact(url) == f"redis://:***@127.0.0.1:{embedded.port}/0"


def test_password_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "redis"
    directory.mkdir()
    (directory / "redis.pass").write_text("a" * 64 + "\n")
    (directory / "redis.pass").chmod(0o644)
    with pytest.raises(RuntimeError, match="delete the file"):
        EmbeddedRedis(tmp_path).start()
    assert not (directory / "redis.url").exists()


def test_server_without_password_is_replaced(tmp_path: Path) -> None:
    """A server recorded by an older, password-less tokenmill is restarted with the password, data kept."""
    directory = tmp_path / "redis"
    directory.mkdir()
    port = _free_port("127.0.0.1")
    conf = directory / "legacy.conf"
    conf.write_text(
        f'bind 127.0.0.1\nport {port}\ndir "{directory}"\nappendonly yes\nappendfilename "appendonly.aof"\n'
        f'save ""\ndaemonize no\n'
    )
    legacy = subprocess.Popen([redis_server_executable(), str(conf)], stdout=subprocess.DEVNULL)
    try:
        old_url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + 15
        while not EmbeddedRedis._ping(old_url):
            assert time.monotonic() < deadline and legacy.poll() is None, "legacy redis-server did not start"
            time.sleep(0.05)
        redis.Redis.from_url(old_url).set("kept", "1")
        (directory / "redis.url").write_text(old_url + "\n")
        (directory / "redis.pid").write_text(f"{legacy.pid}\n")
        server = EmbeddedRedis(tmp_path)
        try:
            url = server.start()
            assert legacy.wait(timeout=15) == 0  # shut down cleanly
            assert urlsplit(url).password and urlsplit(url).port == port
            with pytest.raises(redis.AuthenticationError):
                redis.Redis.from_url(old_url).get("kept")
            assert redis.Redis.from_url(url).get("kept") == b"1"  # AOF carried over
        finally:
            server.stop()
    finally:
        if legacy.poll() is None:
            legacy.kill()
            legacy.wait()


def test_start_is_idempotent_and_shared_between_instances(embedded: EmbeddedRedis, tmp_path: Path) -> None:
    url = embedded.start()
    pid = (tmp_path / "redis" / "redis.pid").read_text()
    assert embedded.start() == url
    other = EmbeddedRedis(tmp_path)  # e.g. a service process finding the launcher's server
    assert other.running()
    assert other.start() == url
    assert (tmp_path / "redis" / "redis.pid").read_text() == pid


def test_server_outlives_the_process_that_started_it(tmp_path: Path) -> None:
    code = f"from tokenmill.common.platform.redis_embedded import EmbeddedRedis; print(EmbeddedRedis({str(tmp_path)!r}).start())"
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
    clash = EmbeddedRedis(tmp_path / "other", port=embedded.port, port_wait_s=0.5)
    pid = int((tmp_path / "redis" / "redis.pid").read_text())
    with pytest.raises(RuntimeError, match=f"could not start embedded redis-server.*held by pid {pid} "):
        clash.start()


def test_connect_uses_embedded_server_for_data_dir(tmp_path: Path) -> None:
    config = Config(data_dir=tmp_path, redis_url=None, auth={"disabled": True})
    try:
        client = connect(config)
        assert client.ping()
        url = redis_url_for(config)
        assert url == (tmp_path / "redis" / "redis.url").read_text().strip()
        assert urlsplit(url).password == (tmp_path / "redis" / "redis.pass").read_text().strip()
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
