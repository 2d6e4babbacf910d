"""gRPC health probe: exit 0 only when grpc.health.v1 says SERVING.

Why this exists next to Kubernetes' native gRPC probes: kubelet's probe speaks plaintext only, so with TLS
(or mutual TLS) on, pods use this as an exec probe instead; the images also use it for Docker's HEALTHCHECK.
Only grpcio and grpcio-health-checking are needed (both are tokenmill dependencies).

usage: grpc_probe.py --port 50051 [--host 127.0.0.1] [--service NAME] [--tls-dir DIR --server-name NAME]
exit status: 0 SERVING, 1 NOT_SERVING/unknown service, 2 unreachable or error (message on stderr).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _channel(args: argparse.Namespace) -> grpc.Channel:
    target = f"{args.host}:{args.port}"
    if not args.tls_dir:
        return grpc.insecure_channel(target)
    tls = Path(args.tls_dir)
    ca = tls / "ca.crt"
    cert, key = tls / "tls.crt", tls / "tls.key"
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes() if ca.is_file() else cert.read_bytes(),
        # Presenting the pod's own certificate satisfies servers that require client certificates (mTLS).
        private_key=key.read_bytes() if args.client_cert and key.is_file() else None,
        certificate_chain=cert.read_bytes() if args.client_cert and cert.is_file() else None,
    )
    options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else []
    return grpc.secure_channel(target, credentials, options=options)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--service", default="", help="HealthCheckRequest.service ('' = whole server)")
    parser.add_argument("--timeout", type=float, default=3.0)
    parser.add_argument(
        "--tls-dir", default="", help="directory with ca.crt, tls.crt, tls.key; empty = plaintext"
    )
    parser.add_argument("--server-name", default="", help="name to verify in the server certificate")
    parser.add_argument("--no-client-cert", dest="client_cert", action="store_false")
    args = parser.parse_args(argv)
    try:
        with _channel(args) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
    except grpc.RpcError as exc:
        code = exc.code()
        print(
            f"health check {args.host}:{args.port}: {code.name if code else 'error'}: {exc.details()}",
            file=sys.stderr,
        )
        return 1 if code == grpc.StatusCode.NOT_FOUND else 2
    except OSError as exc:
        print(f"health check {args.host}:{args.port}: cannot read TLS files: {exc}", file=sys.stderr)
        return 2
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"health check {args.host}:{args.port}: {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
