"""`BaseClient`: the channel, retries, auth and error conversion every typed client shares.

* Retries: UNAVAILABLE is retried by gRPC itself (service-config retry policy: 5 attempts,
  0.1 s -> 1 s backoff, x2), so a server that is restarting or not up yet is ridden over.
  Requests that change state carry idempotency keys, so a retried Submit cannot double-run.
* Auth: `authorization: Bearer <token>` metadata on every call (a client interceptor, so it works
  on plain loopback channels too, where gRPC refuses to send call credentials).
* Errors: `grpc.RpcError` becomes the matching `tokenmill.common.errors` class, so callers catch
  `errors.NotFound` whether the code ran in-process or over the wire.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar, cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tokenmill.common import errors
from tokenmill.common.config import Config, host_port
from tokenmill.v1 import common_pb2

T = TypeVar("T")

DEFAULT_TIMEOUT = 30.0
# Pass as `timeout=` for a call that may legitimately run unbounded (a huge upload, a full
# verify); `timeout=None` means "this client's default deadline".
NO_DEADLINE = math.inf
DEFAULT_MAX_MESSAGE_BYTES = 8 * 1024 * 1024

RETRY_POLICY = {
    "maxAttempts": 5,
    "initialBackoff": "0.1s",
    "maxBackoff": "1s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}


def service_config_json(retry: bool = True) -> str:
    """The `grpc.service_config` channel option: one retry policy for every method."""
    method_config: dict[str, Any] = {"name": [{}]}
    if retry:
        method_config["retryPolicy"] = RETRY_POLICY
    return json.dumps({"methodConfig": [method_config]})


@dataclass(frozen=True)
class ClientTls:
    """What a client trusts and (for mTLS) presents. `ca_file=None` trusts the system roots;
    `server_name` overrides the name checked against the server certificate."""

    ca_file: str | Path | None = None
    cert_file: str | Path | None = None
    key_file: str | Path | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("client TLS: cert_file and key_file must be given together")

        def read(path: str | Path | None) -> bytes | None:
            if path is None:
                return None
            try:
                return Path(path).read_bytes()
            except OSError as exc:
                raise ValueError(f"client TLS: cannot read {path}: {exc.strerror}") from None

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca_file),
            private_key=read(self.key_file),
            certificate_chain=read(self.cert_file),
        )


def client_tls(config: Config) -> ClientTls | None:
    """The TLS a platform client uses: trust `server_ca_file`; under mutual TLS present the
    platform's own certificate."""
    if not config.tls.enabled:
        return None
    mtls = config.tls.client_ca_file is not None
    return ClientTls(
        ca_file=config.tls.server_ca_file,
        cert_file=config.tls.cert_file if mtls else None,
        key_file=config.tls.key_file if mtls else None,
    )


class _MetadataInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds fixed metadata (the bearer token) to every call."""

    def __init__(self, metadata: Sequence[tuple[str, str]]):
        self._metadata = tuple(metadata)

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(
            details.method,
            details.timeout,
            (*(details.metadata or ()), *self._metadata),
            details.credentials,
            details.wait_for_ready,
            details.compression,
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


@dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str]] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


def convert_rpc_error(exc: grpc.RpcError) -> errors.TokenmillError:
    """The `tokenmill.common.errors` exception for a failed call (code name kept on `.code`)."""
    code = exc.code() if hasattr(exc, "code") else None
    name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
    details = (exc.details() if hasattr(exc, "details") else None) or name
    err = errors.from_code(name, details)
    if err.code != name:  # a code without its own class (UNIMPLEMENTED, UNKNOWN, ...)
        err.code = name
    return err


class BaseClient:
    """A channel to one service plus helpers that call it and convert errors.

    Subclasses set `stub_class` (the generated `XServiceStub`) and `service_name` (the config key),
    and call `self._unary(self.stub.Method, request)` / `self._stream(self.stub.Method, request)`.
    The generated stubs carry no annotations (their methods are untyped attributes), so `stub` is
    `Any`; it is None only on a plain `BaseClient` (health checks)."""

    stub_class: ClassVar[type | None] = None
    service_name: ClassVar[str] = ""

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls: ClientTls | Mapping[str, Any] | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        timeout: float | None = DEFAULT_TIMEOUT,
        wait_for_ready: bool = False,
        retry: bool = True,
        options: Sequence[tuple[str, Any]] = (),
    ):
        self.target = target
        self.timeout = timeout
        self.wait_for_ready = wait_for_ready
        channel_options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.service_config", service_config_json(retry)),
            ("grpc.enable_retries", 1 if retry else 0),
            # Reconnect quickly to a restarting server (the default first backoff is 1 s).
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2_000),
            # Detect a dead server under a long stream; the server permits pings every 10 s.
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
        ]
        if isinstance(tls, Mapping):
            tls = ClientTls(**tls)
        if tls is not None and tls.server_name:
            channel_options.append(("grpc.ssl_target_name_override", tls.server_name))
        channel_options.extend(options)
        if tls is None:
            channel = grpc.insecure_channel(target, options=channel_options)
        else:
            channel = grpc.secure_channel(target, tls.credentials(), options=channel_options)
        self._raw_channel = channel
        if token:
            channel = grpc.intercept_channel(
                channel, _MetadataInterceptor([("authorization", f"Bearer {token}")])
            )
        self.channel = channel
        self.stub: Any = self.stub_class(channel) if self.stub_class is not None else None

    @classmethod
    def from_config(cls, config: Config, service_name: str | None = None, **kwargs: Any):
        """A client for `config.services[service_name]` with the config's token, TLS and limits.

        A wildcard bind host (0.0.0.0, ::) is dialled on loopback. Under mutual TLS the client
        presents `tls.cert_file`/`key_file` (the platform's own certificate)."""
        name = service_name or cls.service_name
        if not name:
            raise ValueError(f"{cls.__name__}.from_config needs a service_name")
        service = config.services[name]
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(service.host, service.host)
        target = host_port(host, service.port)
        if not config.auth.disabled and config.auth.tokens:
            kwargs.setdefault("token", config.auth.tokens[0])
        if config.tls.enabled:
            kwargs.setdefault("tls", client_tls(config))
        kwargs.setdefault("max_message_bytes", config.max_message_bytes)
        return cls(kwargs.pop("target", target), **kwargs)

    # -- calling ----------------------------------------------------------------------------

    def _call_kwargs(self, timeout: float | None, wait_for_ready: bool | None, default_timeout: bool) -> dict:
        if timeout is None and default_timeout:
            timeout = self.timeout
        if timeout is not None and math.isinf(timeout):
            timeout = None  # NO_DEADLINE
        return {
            "timeout": timeout,
            "wait_for_ready": self.wait_for_ready if wait_for_ready is None else wait_for_ready,
        }

    def _unary(
        self,
        method: Callable[..., T],
        request: Any,
        *,
        timeout: float | None = None,
        wait_for_ready: bool | None = None,
        metadata: Sequence[tuple[str, str]] | None = None,
    ) -> T:
        """Call a unary (or client-streaming: pass an iterator) method; errors -> tokenmill.common.errors.

        `timeout=None` uses the client's default deadline; `NO_DEADLINE` sets none."""
        try:
            return method(request, metadata=metadata, **self._call_kwargs(timeout, wait_for_ready, True))
        except grpc.RpcError as exc:
            raise convert_rpc_error(exc) from None

    def _stream(
        self,
        method: Callable[..., Any],
        request: Any,
        *,
        timeout: float | None = None,
        wait_for_ready: bool | None = None,
        metadata: Sequence[tuple[str, str]] | None = None,
    ) -> Iterator[Any]:
        """Iterate a server-streaming method. No default deadline (streams may be long-lived);
        stopping the iteration early cancels the call."""
        call = method(request, metadata=metadata, **self._call_kwargs(timeout, wait_for_ready, False))
        try:
            yield from call
        except grpc.RpcError as exc:
            raise convert_rpc_error(exc) from None
        finally:
            call.cancel()

    # -- health -----------------------------------------------------------------------------

    def health(self, service: str = "", *, timeout: float | None = 5.0) -> str:
        """'SERVING' | 'NOT_SERVING' | ... for `service` ("" = the whole server)."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        response = self._unary(stub.Check, health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def wait_until_serving(self, timeout: float = 30.0, service: str = "") -> None:
        """Block until the server reports SERVING; `DeadlineExceeded` after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise errors.DeadlineExceeded(
                    f"{self.target} not SERVING after {timeout:g}s (last status: {last})"
                )
            try:
                last = self.health(service, timeout=min(remaining, 5.0))
                if last == "SERVING":
                    return
            except errors.TokenmillError as exc:
                last = f"{exc.code}: {exc.message}"
            time.sleep(min(0.1, max(remaining, 0)))

    # -- lifecycle --------------------------------------------------------------------------

    def close(self) -> None:
        self._raw_channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


TERMINAL_STATES = frozenset(
    {common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED, common_pb2.JOB_STATE_CANCELLED}
)


def job_state_value(state: int | str | None) -> common_pb2.JobState:
    """`None`/int/`"RUNNING"`/`"JOB_STATE_RUNNING"` -> the JobState enum value (0 = any)."""
    if state is None:
        return common_pb2.JOB_STATE_UNSPECIFIED
    if isinstance(state, int):
        # Enum values are plain ints at runtime; the generated stubs call the type JobState.
        return cast(common_pb2.JobState, state)
    name = state.upper()
    if not name.startswith("JOB_STATE_"):
        name = f"JOB_STATE_{name}"
    try:
        return common_pb2.JobState.Value(name)
    except ValueError:
        known = [n.removeprefix("JOB_STATE_") for n in common_pb2.JobState.keys()[1:]]
        raise errors.InvalidArgument(f"unknown job state {state!r}; use one of {known}") from None


class JobsClientMixin:
    """GetJob/ListJobs/CancelJob/WatchJob for any job service, plus `wait()`.

    Mix into a `BaseClient` whose stub has those four methods (every job service has)."""

    UNAVAILABLE_PATIENCE_S = 60.0  # how long wait() rides out a service that is down

    def get_job(self: Any, job_id: str, *, timeout: float | None = None) -> common_pb2.Job:
        return self._unary(self.stub.GetJob, common_pb2.GetJobRequest(job_id=job_id), timeout=timeout)

    def list_jobs(
        self: Any,
        state: int | str | None = None,
        *,
        page_size: int = 50,
        page_token: str = "",
        timeout: float | None = None,
    ) -> common_pb2.ListJobsResponse:
        request = common_pb2.ListJobsRequest(
            state=job_state_value(state), page_size=page_size, page_token=page_token
        )
        return self._unary(self.stub.ListJobs, request, timeout=timeout)

    def iter_jobs(
        self: Any, state: int | str | None = None, *, page_size: int = 100
    ) -> Iterator[common_pb2.Job]:
        """Every job (newest first, as the server orders them), following page tokens."""
        token = ""
        while True:
            page = self.list_jobs(state, page_size=page_size, page_token=token)
            yield from page.jobs
            token = page.next_page_token
            if not token:
                return

    def cancel_job(
        self: Any, job_id: str, reason: str = "", *, timeout: float | None = None
    ) -> common_pb2.Job:
        request = common_pb2.CancelJobRequest(job_id=job_id, reason=reason)
        return self._unary(self.stub.CancelJob, request, timeout=timeout)

    def watch_job(
        self: Any, job_id: str, after: str = "", follow: bool = True, *, timeout: float | None = None
    ) -> Iterator[common_pb2.JobEvent]:
        """The job's events from after offset `after`; with `follow`, until the job is terminal."""
        request = common_pb2.WatchJobRequest(job_id=job_id, after_offset=after, follow=follow)
        return self._stream(self.stub.WatchJob, request, timeout=timeout)

    def wait(self: Any, job_id: str, timeout: float | None = None) -> common_pb2.Job:
        """Block until the job is SUCCEEDED/FAILED/CANCELLED and return it.

        Follows the event stream (no polling) and resumes from the last offset if the server
        restarts. `DeadlineExceeded` after `timeout` seconds (None = no limit)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        offset = ""
        down_since: float | None = None
        while True:
            try:
                job = self.get_job(job_id)
                down_since = None
            except errors.Unavailable:
                # the service is restarting: keep trying for a while (or until our deadline)
                now = time.monotonic()
                down_since = down_since or now
                if now - down_since > self.UNAVAILABLE_PATIENCE_S or (
                    deadline is not None and now >= deadline
                ):
                    raise
                time.sleep(0.5)
                continue
            if job.state in TERMINAL_STATES:
                return job
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                state = common_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_")
                raise errors.DeadlineExceeded(f"job {job_id} is still {state} after {timeout:g}s")
            seen = 0
            try:
                for event in self.watch_job(job_id, after=offset, follow=True, timeout=remaining):
                    offset, seen = event.offset, seen + 1
                    if event.kind == "state" and event.state in TERMINAL_STATES:
                        break
            except (errors.DeadlineExceeded, errors.Unavailable, errors.Cancelled):
                pass  # re-checked above: the deadline passed, or the server went away briefly
            if not seen:
                time.sleep(0.2)  # the stream ended at once (server draining): do not spin
