"""common/config.py: sources, precedence and field-naming errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from tokenmill.common.config import DEFAULT_PORTS, Config, ConfigError, load_config

TOKEN = "local-token-0123456789abcdef"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No ambient TOKENMILL_* settings; data_dir is a temp dir holding the local token file."""
    for key in list(os.environ):
        if key.startswith("TOKENMILL_") or key == "REDIS_URL":
            monkeypatch.delenv(key)
    monkeypatch.setenv("TOKENMILL_DATA_DIR", str(tmp_path))
    (tmp_path / "auth_token").write_text(TOKEN + "\n")


def _yaml(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_are_usable_locally(tmp_path):
    config = load_config()
    assert config.data_dir == tmp_path
    assert not config.auth.disabled and config.auth.tokens == [TOKEN]  # from <data_dir>/auth_token
    assert not config.tls.enabled
    assert {name: s.port for name, s in config.services.items()} == DEFAULT_PORTS
    assert config.services["compress"].effective_metrics_port == DEFAULT_PORTS["compress"] + 1000
    assert config.effective_storage_url == f"file://{config.data_dir / 'store'}"


def test_yaml_then_env_then_arguments(tmp_path, monkeypatch):
    path = _yaml(
        tmp_path,
        {"log_level": "DEBUG", "max_message_bytes": 1048576, "services": {"checkpoint": {"port": 7003}}},
    )
    monkeypatch.setenv("TOKENMILL_MAX_MESSAGE_BYTES", "2097152")
    monkeypatch.setenv("TOKENMILL_SERVICES__CHECKPOINT__WORKERS", "4")
    config = load_config(path, log_format="text")
    assert config.log_level == "DEBUG"  # yaml
    assert config.max_message_bytes == 2097152  # env beats yaml
    assert config.log_format == "text"  # arguments beat everything
    # env merges into the YAML's service entry
    assert (config.services["checkpoint"].port, config.services["checkpoint"].workers) == (7003, 4)
    assert config.services["ingest"].port == DEFAULT_PORTS["ingest"]  # others keep their defaults


def test_config_env_var_names_the_yaml_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENMILL_CONFIG", str(_yaml(tmp_path, {"log_level": "WARNING"})))
    assert load_config().log_level == "WARNING"
    monkeypatch.setenv("TOKENMILL_CONFIG", str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config()


def test_plain_redis_url_is_honoured(monkeypatch):
    monkeypatch.setenv("REDIS_URL", "redis://cache:6379/0")
    assert load_config().redis_url == "redis://cache:6379/0"
    monkeypatch.setenv("TOKENMILL_REDIS_URL", "redis://primary:6379/1")
    assert load_config().redis_url == "redis://primary:6379/1"


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"auth": {"tokens": [], "token_file": "/nonexistent/tokens"}}, "auth.token_file"),
        ({"auth": {"tokens": ["short"]}}, "at least 16 characters"),
        ({"services": {"compress": {"port": 70000}}}, "services.compress.port"),
        ({"services": {"compresser": {"port": 1}}}, "unknown service(s) ['compresser']"),
        ({"redis_url": "http://x"}, "redis_url"),
        ({"jobs": {"lease_seconds": 5, "heartbeat_seconds": 5}}, "heartbeat_seconds must be smaller"),
        ({"max_message_bytes": 10}, "max_message_bytes"),
        ({"tls": {"cert_file": "/nonexistent.pem", "key_file": "/nonexistent.key"}}, "tls.cert_file"),
        ({"tls": {"cert_file": "/etc/hostname"}}, "must be set together"),
        ({"log_format": "xml"}, "log_format"),
        ({"typo_field": 1}, "typo_field"),
    ],
)
def test_invalid_values_raise_config_error_naming_the_field(tmp_path, data, field):
    with pytest.raises(ConfigError) as info:
        load_config(_yaml(tmp_path, data))
    assert field in str(info.value)


def test_env_errors_name_the_field(monkeypatch):
    monkeypatch.setenv("TOKENMILL_SHUTDOWN_GRACE_SECONDS", "-1")
    with pytest.raises(ConfigError, match="shutdown_grace_seconds"):
        load_config()


def test_auth_is_on_by_default_and_needs_a_token(tmp_path):
    (tmp_path / "auth_token").unlink()
    with pytest.raises(ConfigError, match="tokenmill up"):
        load_config()
    assert load_config(auth={"disabled": True}).auth.disabled
    explicit = load_config(auth={"tokens": ["explicit-token-0123456789"]})
    assert explicit.auth.tokens == ["explicit-token-0123456789"]
    token_file = tmp_path / "tokens.txt"
    token_file.write_text("file-token-0123456789abcd\n\nsecond-token-0123456789ab\n")
    from_file = load_config(auth={"token_file": str(token_file)})
    assert from_file.auth.tokens == ["file-token-0123456789abcd", "second-token-0123456789ab"]
    token_file.write_text("short\n")
    with pytest.raises(ConfigError, match="at least 16 characters"):
        load_config(auth={"token_file": str(token_file)})


def test_service_address_and_constructor_validation():
    config = Config(services={"inference": {"host": "0.0.0.0", "port": 9000, "metrics_port": 9100}})
    assert config.service("inference").address == "0.0.0.0:9000"
    assert config.service("inference").effective_metrics_port == 9100
