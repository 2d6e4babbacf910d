"""Server TLS credentials from `config.tls`; mutual TLS when `client_ca_file` is set."""

from __future__ import annotations

from pathlib import Path

import grpc

from tokenmill.common.config import TlsConfig


def _read(path: Path | None, field: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"tls.{field}: cannot read {path}: {exc.strerror}") from None


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials | None:
    """None when TLS is off; otherwise SSL credentials that require a client certificate
    signed by `client_ca_file` when that is set (mTLS)."""
    if not tls.enabled:
        return None
    cert = _read(tls.cert_file, "cert_file")
    key = _read(tls.key_file, "key_file")
    client_ca = _read(tls.client_ca_file, "client_ca_file")
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )
