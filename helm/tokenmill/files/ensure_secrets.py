"""Create each named Secret with one random value, unless it already exists (the chart's pre-install hook).

Why a hook and not a template: a value generated in a template changes on every `helm template`, so
GitOps tools would rotate the auth token and the Redis password on each sync. This runs in the cluster
once per install/upgrade, creates only what is missing and never rewrites a Secret. The Secrets carry
`helm.sh/resource-policy: keep`; Helm does not own them, so `helm uninstall` leaves them in place.

Standard library only (any Python image runs it), talking to the API server with the pod's
ServiceAccount token.  usage: ensure_secrets.py NAME=KEY [NAME=KEY ...]
"""

from __future__ import annotations

import json
import os
import secrets
import ssl
import sys
import urllib.error
import urllib.request
from pathlib import Path

SA_DIR = Path(os.environ.get("SA_DIR", "/var/run/secrets/kubernetes.io/serviceaccount"))


def api_base() -> str:
    """The API server URL: KUBERNETES_API_URL when set, else the in-cluster service address."""
    if url := os.environ.get("KUBERNETES_API_URL"):
        return url.rstrip("/")
    return f"https://{os.environ['KUBERNETES_SERVICE_HOST']}:{os.environ['KUBERNETES_SERVICE_PORT']}"


def call(method: str, path: str, body: dict | None = None) -> int:
    """One API request; returns the HTTP status (4xx/5xx included) so the caller decides."""
    headers = {"Authorization": f"Bearer {(SA_DIR / 'token').read_text().strip()}"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(api_base() + path, data=data, method=method, headers=headers)
    ca = SA_DIR / "ca.crt"
    context = ssl.create_default_context(cafile=str(ca)) if ca.exists() else None
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def ensure(namespace: str, name: str, key: str, labels: dict[str, str]) -> str:
    """Create Secret `name` with a random `key` unless it exists; returns what happened."""
    path = f"/api/v1/namespaces/{namespace}/secrets"
    status = call("GET", f"{path}/{name}")
    if status == 200:
        return "kept"
    if status != 404:
        raise SystemExit(f"ensure_secrets: reading Secret {namespace}/{name} failed with HTTP {status}")
    body = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "labels": labels,
            "annotations": {"helm.sh/resource-policy": "keep"},
        },
        "type": "Opaque",
        "stringData": {key: secrets.token_urlsafe(30)},
    }
    status = call("POST", path, body)
    if status == 409:  # created by a concurrent install in between: keep theirs
        return "kept"
    if status != 201:
        raise SystemExit(f"ensure_secrets: creating Secret {namespace}/{name} failed with HTTP {status}")
    return "created"


def main(argv: list[str]) -> int:
    namespace = os.environ.get("POD_NAMESPACE") or (SA_DIR / "namespace").read_text().strip()
    labels = json.loads(os.environ.get("SECRET_LABELS", "{}"))
    for item in argv:
        name, _, key = item.partition("=")
        print(f"Secret {namespace}/{name}: {ensure(namespace, name, key, labels)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
