#!/usr/bin/env python3
"""Ask a Fairlane server for its grpc.health.v1 status; exit 0 only when SERVING.

Installed in the image as /usr/local/bin/fairlane-healthcheck and used by the compose
health checks:

    fairlane-healthcheck 127.0.0.1:50052 fairlane.queue.v1.QueueService
    fairlane-healthcheck --wait 30 127.0.0.1:50051

Exit codes: 0 SERVING, 1 any other status (NOT_SERVING, UNKNOWN, no answer), 2 bad usage.

With FAIRLANE_TLS_CERT_FILE set (the server's own settings, in the same container) it
speaks TLS: it trusts FAIRLANE_TLS_CA_FILE, presents FAIRLANE_TLS_CLIENT_CERT_FILE (or the
server's certificate) for mTLS, and expects FAIRLANE_TLS_SERVER_NAME (default localhost)
in the server's certificate.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _read(variable: str, fallback: str = "") -> bytes | None:
    path = os.environ.get(variable) or (os.environ.get(fallback) if fallback else None)
    return Path(path).read_bytes() if path else None


def channel(target: str) -> grpc.Channel:
    if not os.environ.get("FAIRLANE_TLS_CERT_FILE"):
        return grpc.insecure_channel(target)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read("FAIRLANE_TLS_CA_FILE"),
        private_key=_read("FAIRLANE_TLS_CLIENT_KEY_FILE", "FAIRLANE_TLS_KEY_FILE"),
        certificate_chain=_read("FAIRLANE_TLS_CLIENT_CERT_FILE", "FAIRLANE_TLS_CERT_FILE"),
    )
    name = os.environ.get("FAIRLANE_TLS_SERVER_NAME") or "localhost"
    return grpc.secure_channel(
        target, credentials, options=[("grpc.ssl_target_name_override", name)]
    )


def check(target: str, service: str, timeout: float) -> str:
    """One Health.Check call; returns the status name or the gRPC error code name."""
    with channel(target) as channel_:
        stub = health_pb2_grpc.HealthStub(channel_)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code()
            return code.name if code is not None else "UNKNOWN"
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", help="host:port of the gRPC server")
    parser.add_argument("service", nargs="?", default="", help="service name ('' = overall)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds per call")
    parser.add_argument(
        "--wait", type=float, default=0.0, help="keep asking for up to this many seconds"
    )
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.wait
    while True:
        status = check(args.target, args.service, args.timeout)
        if status == "SERVING" or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    print(f"{args.target} {args.service or '(overall)'}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
