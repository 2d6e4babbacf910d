"""The OpenAI HTTP front's security: TLS / mutual TLS from config.tls, and bearer-token checks.

Real uvicorn servers on loopback (port 0) in front of a real RouterDispatcher on the test Redis;
no replicas are needed: `/v1/models` answers (an empty list) once a request is let in.
"""

from __future__ import annotations

import http.client
import json
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fixtures.grpc import OTHER_TOKEN, TEST_TOKEN, TlsFiles, make_test_config
from tokenmill.common.config import Config
from tokenmill.common.redis_conn import connect_url
from tokenmill.services.inference.dispatch.failover import RouterDispatcher
from tokenmill.services.inference.http_api import HttpFront

TRANSPORT_ERRORS = (ssl.SSLError, ConnectionError, http.client.HTTPException, OSError)


@pytest.fixture
def start_front(redis_url: str, redis_client) -> Iterator[Callable[[Config], HttpFront]]:
    """`start_front(config)` -> a started HttpFront on an ephemeral port, stopped at teardown."""
    fronts: list[HttpFront] = []

    def start(config: Config) -> HttpFront:
        dispatcher = RouterDispatcher(connect_url(redis_url), dead_after_s=1.0, no_replica_timeout_s=1.0)
        front = HttpFront(dispatcher, config, "127.0.0.1", 0)
        front.start()
        fronts.append(front)
        return front

    yield start
    for front in fronts:
        front.stop()


def get_models(
    front: HttpFront,
    *,
    headers: dict[str, str | bytes] | None = None,
    context: ssl.SSLContext | None = None,
) -> tuple[int, dict]:
    """GET /v1/models over HTTP (or HTTPS given `context`); header values may be raw bytes."""
    if context is None:
        conn: http.client.HTTPConnection = http.client.HTTPConnection("127.0.0.1", front.port, timeout=10)
    else:
        conn = http.client.HTTPSConnection("127.0.0.1", front.port, timeout=10, context=context)
    try:
        conn.putrequest("GET", "/v1/models")
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def bearer(token: str) -> dict[str, str | bytes]:
    return {"Authorization": f"Bearer {token}"}


def client_context(tls: TlsFiles, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(tls.ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


# -- bearer tokens ---------------------------------------------------------------------------------


def test_valid_tokens_are_accepted_and_wrong_ones_refused(start_front, tmp_path: Path) -> None:
    front = start_front(make_test_config(tmp_path))
    for token in (TEST_TOKEN, OTHER_TOKEN):
        assert get_models(front, headers=bearer(token)) == (200, {"object": "list", "data": []})
    for headers in ({}, bearer("wrong-token-0000000000000"), {"Authorization": TEST_TOKEN}, bearer("")):
        status, body = get_models(front, headers=headers)
        assert status == 401 and body["error"]["code"] == "UNAUTHENTICATED", headers


@pytest.mark.parametrize(
    "value",
    [
        "Bearer tökén-0123456789abcdef".encode(),  # UTF-8 bytes (starlette decodes them as latin-1)
        "Bearer tökén-0123456789abcdef".encode("latin-1"),
        b"Bearer \xff\xfe\x80",
        ("Bearer " + TEST_TOKEN[:-1] + "é").encode(),  # the right token but for one non-ASCII character
    ],
)
def test_non_ascii_authorization_header_is_401_not_500(start_front, tmp_path: Path, value: bytes) -> None:
    front = start_front(make_test_config(tmp_path))
    status, body = get_models(front, headers={"Authorization": value})
    assert status == 401, body
    assert body["error"]["code"] == "UNAUTHENTICATED"


def test_empty_token_list_lets_nobody_in(start_front, tmp_path: Path) -> None:
    """Only `auth.disabled` opens the front; an empty token list (however it came about) refuses all."""
    config = make_test_config(tmp_path)
    config = config.model_copy(update={"auth": config.auth.model_copy(update={"tokens": []})})
    assert not config.auth.disabled and config.auth.tokens == []
    front = start_front(config)
    for headers in ({}, bearer(""), bearer(TEST_TOKEN)):
        status, body = get_models(front, headers=headers)
        assert status == 401 and body["error"]["code"] == "UNAUTHENTICATED", headers


def test_disabled_auth_lets_everyone_in(start_front, tmp_path: Path) -> None:
    front = start_front(make_test_config(tmp_path, auth={"disabled": True}))
    assert get_models(front)[0] == 200
    assert get_models(front, headers={"Authorization": b"Bearer \xff"})[0] == 200


# -- TLS -------------------------------------------------------------------------------------------


def test_tls_config_serves_https_only(start_front, tmp_path: Path, tls_files: TlsFiles) -> None:
    config = make_test_config(
        tmp_path, tls={"cert_file": tls_files.server_cert, "key_file": tls_files.server_key}
    )
    front = start_front(config)
    assert front.tls
    status, body = get_models(front, headers=bearer(TEST_TOKEN), context=client_context(tls_files))
    assert (status, body["data"]) == (200, [])
    assert get_models(front, context=client_context(tls_files))[0] == 401  # TLS does not replace auth
    with pytest.raises(TRANSPORT_ERRORS):  # plaintext HTTP gets no answer from a TLS listener
        get_models(front, headers=bearer(TEST_TOKEN))
    with pytest.raises(ssl.SSLCertVerificationError):  # a client that does not trust our CA
        get_models(front, headers=bearer(TEST_TOKEN), context=ssl.create_default_context())


def test_mutual_tls_requires_a_client_certificate_from_the_ca(
    start_front, tmp_path: Path, tls_files: TlsFiles
) -> None:
    config = make_test_config(
        tmp_path,
        tls={
            "cert_file": tls_files.server_cert,
            "key_file": tls_files.server_key,
            "client_ca_file": tls_files.ca,
        },
    )
    front = start_front(config)
    trusted = client_context(tls_files, tls_files.client_cert, tls_files.client_key)
    assert get_models(front, headers=bearer(TEST_TOKEN), context=trusted)[0] == 200
    with pytest.raises(TRANSPORT_ERRORS):  # no client certificate
        get_models(front, headers=bearer(TEST_TOKEN), context=client_context(tls_files))
    rogue = client_context(tls_files, tls_files.rogue_cert, tls_files.rogue_key)
    with pytest.raises(TRANSPORT_ERRORS):  # a certificate from a CA the server does not trust
        get_models(front, headers=bearer(TEST_TOKEN), context=rogue)
    assert get_models(front, headers=bearer(TEST_TOKEN), context=trusted)[0] == 200  # still serving


def test_unloadable_tls_files_fail_at_construction(
    redis_url: str, tmp_path: Path, tls_files: TlsFiles
) -> None:
    """A key that does not match the certificate is reported with the files, not as a dead thread."""
    config = make_test_config(
        tmp_path, tls={"cert_file": tls_files.server_cert, "key_file": tls_files.client_key}
    )
    dispatcher = RouterDispatcher(connect_url(redis_url))
    with pytest.raises(RuntimeError, match="cannot load its TLS files.*tls.key_file="):
        HttpFront(dispatcher, config, "127.0.0.1", 0)
