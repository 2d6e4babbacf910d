"""Platform configuration: one YAML file plus `TOKENMILL_*` environment variables.

Precedence (highest first): constructor arguments, environment, YAML file, defaults.
Nested fields use `__` in the environment: `TOKENMILL_AUTH__TOKENS='["t1"]'`,
`TOKENMILL_SERVICES__CHECKPOINT__PORT=7003`. The plain `REDIS_URL` is honoured too.
Validation happens at load time and `ConfigError` names the offending field.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    YamlConfigSettingsSource,
)

SERVICE_NAMES = ("ingest", "trainer", "checkpoint", "compress", "inference")
DEFAULT_PORTS = {
    "ingest": 50051,
    "trainer": 50052,
    "checkpoint": 50053,
    "compress": 50054,
    "inference": 50055,
}


def host_port(host: str, port: int) -> str:
    """`host:port` as gRPC and HTTP clients dial it: an IPv6 host in brackets (`[::1]:50055`)."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


class ConfigError(ValueError):
    """Raised for a config that cannot start a service; the message names each bad field."""


class AuthConfig(BaseModel):
    """Bearer-token auth, on by default. Turning it off must be explicit (`disabled: true`).

    Tokens come from `tokens` and/or `token_file` (one per line). With neither set, the
    platform's own token file `<data_dir>/auth_token` is used, which `tokenmill up` creates,
    so a local install is authenticated without any configuration.
    """

    disabled: bool = False
    tokens: list[str] = Field(default_factory=list)
    token_file: Path | None = None

    @field_validator("tokens")
    @classmethod
    def _long_enough(cls, value: list[str]) -> list[str]:
        if any(len(t) < 16 for t in value):
            raise ValueError("every token must be at least 16 characters")
        return value

    def resolve(self, data_dir: Path) -> AuthConfig:
        """Fold the token file into `tokens`; fail if auth is on and no token exists anywhere."""
        if self.disabled:
            return self
        token_file = self.token_file or (data_dir / "auth_token" if not self.tokens else None)
        tokens = list(self.tokens)
        if token_file is not None:
            if not token_file.is_file():
                raise ValueError(
                    f"auth.token_file {token_file} does not exist: run `tokenmill up` (which creates it), "
                    "set auth.tokens, or set auth.disabled: true for local use"
                )
            tokens += [line.strip() for line in token_file.read_text().splitlines() if line.strip()]
        if not tokens:
            raise ValueError("auth.tokens is empty: give at least one token, or set auth.disabled: true")
        return self.model_copy(update={"tokens": self._long_enough(tokens), "token_file": token_file})


class TlsConfig(BaseModel):
    """Server TLS; `client_ca_file` turns on mutual TLS (clients must present a certificate)."""

    cert_file: Path | None = None
    key_file: Path | None = None
    client_ca_file: Path | None = None
    server_ca_file: Path | None = None  # what clients trust; defaults to the system roots

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None

    @model_validator(mode="after")
    def _files_exist(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("tls.cert_file and tls.key_file must be set together")
        for name in ("cert_file", "key_file", "client_ca_file", "server_ca_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"tls.{name}: {path} is not a readable file")
        return self


class ServiceConfig(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(ge=1, le=65535)
    metrics_port: int = Field(default=0, ge=0, le=65535)  # 0 = port + 1000
    workers: int = Field(default=8, ge=1, le=256)  # gRPC handler threads
    # The host others dial to reach this service (inference replicas put it in their heartbeat);
    # "" = $POD_IP, else `host`, else (bound to all interfaces) a non-loopback address of this host.
    advertise_host: str = ""

    @property
    def address(self) -> str:
        return host_port(self.host, self.port)

    @property
    def effective_metrics_port(self) -> int:
        return self.metrics_port or self.port + 1000


def _default_services() -> dict[str, ServiceConfig]:
    return {name: ServiceConfig(port=port) for name, port in DEFAULT_PORTS.items()}


class RequestLimitsConfig(BaseModel):
    """Bounds every decoded gRPC request must meet before a handler sees it (common/runtime/requests.py):
    longer strings, deeper or bigger Struct fields answer INVALID_ARGUMENT naming the field."""

    max_string_chars: int = Field(default=1 << 20, ge=1024)
    max_struct_depth: int = Field(default=20, ge=1, le=30)  # protobuf stops decoding near 32 anyway
    max_struct_values: int = Field(default=10_000, ge=1)


class JobsConfig(BaseModel):
    lease_seconds: float = Field(default=30.0, gt=0)
    heartbeat_seconds: float = Field(default=5.0, gt=0)
    max_attempts: int = Field(default=3, ge=1, le=100)

    @model_validator(mode="after")
    def _heartbeat_below_lease(self) -> JobsConfig:
        if self.heartbeat_seconds >= self.lease_seconds:
            raise ValueError("jobs.heartbeat_seconds must be smaller than jobs.lease_seconds")
        return self


class TrainerKubernetesConfig(BaseModel):
    """Where the `kubernetes` trainer backend runs a job's workers: one Indexed Job of GPU pods per
    attempt. Defaults match the chart's GPU placement, so pending pods let a cluster autoscaler add
    GPU nodes."""

    namespace: str = ""  # "" = the trainer pod's namespace ($POD_NAMESPACE)
    image: str = ""  # "" = the trainer pod's own image
    gpus_per_worker: int = Field(default=1, ge=0, le=64)
    gpu_resource: str = "nvidia.com/gpu"
    node_selector: dict[str, str] = Field(default_factory=lambda: {"nvidia.com/gpu.present": "true"})
    tolerations: list[dict[str, Any]] = Field(
        default_factory=lambda: [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    )
    service_account: str = ""  # "" = the namespace's default
    data_claim: str = ""  # PVC mounted at data_dir in every worker (datasets, tokenizers); "" = none
    token_secret: str = ""  # Secret with the API token(s) workers present to the checkpoint service
    token_secret_key: str = "tokens"
    master_port: int = Field(default=29500, ge=1, le=65535)
    unschedulable_timeout_seconds: float = Field(default=900.0, gt=0)  # Pending unschedulable -> retry
    image_pull_timeout_seconds: float = Field(default=300.0, gt=0)
    termination_grace_seconds: int = Field(default=120, ge=1, le=3600)  # cancel checkpoint time


class TrainerConfig(BaseModel):
    """Trainer service limits: the most workers one job may ask for, and how its own Ray start
    (backend "ray"; RAY_ADDRESS or a local instance) is bounded before the job fails clearly."""

    max_workers: int = Field(default=64, ge=1, le=4096)
    ray_start_timeout_seconds: float = Field(default=120.0, gt=0, le=3600)  # all attempts together
    ray_start_attempts: int = Field(default=3, ge=1, le=20)
    kubernetes: TrainerKubernetesConfig = Field(default_factory=TrainerKubernetesConfig)


class CompressConfig(BaseModel):
    """The compress service's worker: where compression runs ("auto" = the GPU when torch sees one,
    else the CPU; "cuda" refuses to start without one). Results are stored from the CPU either way."""

    device: Literal["auto", "cpu", "cuda"] = "auto"


class InferenceLimitsConfig(BaseModel):
    """Limits on an inference request: sizes checked before any work is spent on it, so one
    oversized request cannot stall or exhaust a replica (HTTP front, router and replicas enforce
    them), and the time it may take. gRPC message sizes are `Config.max_message_bytes`."""

    # The deadline of requests that come without one (gRPC without a deadline, HTTP): past it a
    # request ends DEADLINE_EXCEEDED (HTTP 504) and is cancelled on its replica.
    deadline_seconds: float = Field(default=600.0, gt=0, le=7 * 86400)
    # How long the router holds a request for a model with no live replica (queued in Redis, where
    # KEDA/HPA see the backlog and scale from zero) before answering UNAVAILABLE.
    no_replica_wait_seconds: float = Field(default=120.0, ge=0, le=86400)
    # An HTTP request body; a larger one is answered 413 before it is read in full.
    max_http_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, le=1024 * 1024 * 1024)
    max_json_depth: int = Field(default=32, ge=2, le=512)
    # Prompt text, checked before tokenization. 0 = derived per model: its context length times
    # the tokenizer's longest token in bytes (a longer prompt cannot fit the context).
    max_prompt_bytes: int = Field(default=0, ge=0)
    max_stop_sequences: int = Field(default=16, ge=0, le=1024)
    max_string_bytes: int = Field(default=1024, ge=16, le=1024 * 1024)  # each stop string, model, adapter
    max_token_id_list: int = Field(default=1024, ge=0)  # stop_token_ids, logit_bias entries


class Config(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TOKENMILL_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    data_dir: Path = Path(os.path.expanduser("~/.tokenmill"))
    redis_url: str | None = None  # None = start the embedded redis-server under data_dir
    auth: AuthConfig = Field(default_factory=AuthConfig)
    tls: TlsConfig = Field(default_factory=TlsConfig)
    services: dict[str, ServiceConfig] = Field(default_factory=_default_services)
    jobs: JobsConfig = Field(default_factory=JobsConfig)
    inference_limits: InferenceLimitsConfig = Field(default_factory=InferenceLimitsConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    compress: CompressConfig = Field(default_factory=CompressConfig)
    max_message_bytes: int = Field(default=8 * 1024 * 1024, ge=64 * 1024, le=1024 * 1024 * 1024)
    shutdown_grace_seconds: float = Field(default=20.0, ge=0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = "json"
    storage_url: str | None = None  # None = file://<data_dir>/store; or s3://bucket/prefix
    # Where services may read client-named inputs (ingest sources, SFT files, tokenizers):
    # local directories and/or s3:// prefixes. Empty = anywhere the process can read, which suits
    # a single-user workstation; set it on shared deployments (the Helm chart does).
    input_roots: list[str] = Field(default_factory=list)
    request_limits: RequestLimitsConfig = Field(default_factory=RequestLimitsConfig)

    @model_validator(mode="after")
    def _resolve_auth(self) -> Config:
        try:
            self.auth = self.auth.resolve(self.data_dir)
        except ValueError as exc:
            raise ValueError(f"auth: {exc}") from None
        return self

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @field_validator("services")
    @classmethod
    def _known_services(cls, value: dict[str, ServiceConfig]) -> dict[str, ServiceConfig]:
        unknown = set(value) - set(SERVICE_NAMES)
        if unknown:
            raise ValueError(f"unknown service(s) {sorted(unknown)}; known: {list(SERVICE_NAMES)}")
        merged = _default_services()
        merged.update(value)
        return merged

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        yaml_file = os.environ.get("TOKENMILL_CONFIG")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if yaml_file:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file))
        return tuple(sources)

    def service(self, name: str) -> ServiceConfig:
        return self.services[name]

    @property
    def effective_storage_url(self) -> str:
        return self.storage_url or f"file://{self.data_dir / 'store'}"


def load_config(path: str | os.PathLike[str] | None = None, **overrides: Any) -> Config:
    """Load and validate the config; `path` (or `TOKENMILL_CONFIG`) names the YAML file."""
    previous = os.environ.get("TOKENMILL_CONFIG")
    try:
        if path is not None:
            if not Path(path).is_file():
                raise ConfigError(f"config file {path} does not exist")
            os.environ["TOKENMILL_CONFIG"] = str(path)
        elif previous and not Path(previous).is_file():
            raise ConfigError(f"TOKENMILL_CONFIG={previous} does not exist")
        if (
            "redis_url" not in overrides
            and os.environ.get("REDIS_URL")
            and not os.environ.get("TOKENMILL_REDIS_URL")
        ):
            overrides["redis_url"] = os.environ["REDIS_URL"]
        return Config(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid configuration: the config file is not valid YAML: {exc}") from None
    except SettingsError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from None
    finally:
        if path is not None:
            if previous is None:
                os.environ.pop("TOKENMILL_CONFIG", None)
            else:
                os.environ["TOKENMILL_CONFIG"] = previous


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        message = err["msg"].removeprefix("Value error, ")
        field = ".".join(str(part) for part in err["loc"])
        lines.append(f"config field '{field}': {message}" if field else message)
    return "invalid configuration:\n  " + "\n  ".join(lines)
