"""Plaintext only on loopback, unless allowed; the TLS settings go together."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import structlog

from fairlane_server.core.settings import Settings
from fairlane_server.core.transport import Transport, TransportError, is_loopback
from tests.certs import Authority


@pytest.mark.parametrize(
    ("target", "loopback"),
    [
        ("127.0.0.1:50051", True),
        ("127.8.9.10:1", True),
        ("localhost:50051", True),
        ("[::1]:50051", True),
        ("ipv4:127.0.0.1:1,127.0.0.2:2", True),
        ("unix:/run/fairlane.sock", True),
        ("dns:///localhost:50052", True),
        ("0.0.0.0:50051", False),
        ("[::]:50051", False),
        ("10.0.0.7:50051", False),
        ("ipv4:127.0.0.1:1,10.0.0.2:2", False),
        ("auth:50051", False),
        ("dns:///queue.fairlane.svc:50052", False),
        ("", False),
    ],
)
def test_loopback_addresses(target: str, loopback: bool) -> None:
    assert is_loopback(target) is loopback


async def test_plaintext_beyond_loopback_needs_the_insecure_setting() -> None:
    with pytest.raises(TransportError, match=r"refusing plaintext gRPC target 10\.0\.0\.7:50051"):
        Transport().channel("10.0.0.7:50051", [])
    with structlog.testing.capture_logs() as logs:
        # A channel connects lazily: nothing is sent anywhere here.
        channel = Transport(allow_insecure=True).channel("10.0.0.7:50051", [])
    await channel.close()
    assert logs == [
        {
            "event": "insecure_plaintext",
            "address": "10.0.0.7:50051",
            "role": "target",
            "log_level": "warning",
        }
    ]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"tls_cert_file": "c.pem"}, "FAIRLANE_TLS_CERT_FILE and FAIRLANE_TLS_KEY_FILE"),
        ({"tls_client_ca_file": "ca.pem"}, "needs FAIRLANE_TLS_CERT_FILE"),
        (
            {"tls_ca_file": "/nonexistent/ca.pem", "tls_client_cert_file": "c.pem"},
            "FAIRLANE_TLS_CLIENT_CERT_FILE and FAIRLANE_TLS_CLIENT_KEY_FILE",
        ),
        ({"tls_ca_file": "/nonexistent/ca.pem"}, "cannot read CA '/nonexistent/ca.pem'"),
        # A client certificate alone dials with TLS: it is read, not dropped.
        ({"tls_client_cert_file": "c.pem"}, "FAIRLANE_TLS_CLIENT_CERT_FILE and"),
        (
            {"tls_client_cert_file": "/nonexistent/c.pem", "tls_client_key_file": "/nonexistent/k"},
            "cannot read TLS key '/nonexistent/k'",
        ),
    ],
)
def test_inconsistent_tls_settings(settings: dict[str, str], message: str) -> None:
    with pytest.raises(TransportError, match=re.escape(message)):
        Transport.from_settings(Settings(**settings))  # type: ignore[arg-type]


def test_a_client_certificate_alone_dials_with_tls(tmp_path: Path) -> None:
    leaf = Authority(tmp_path).issue("worker-1", server=False)
    transport = Transport.from_settings(
        Settings(tls_client_cert_file=str(leaf.cert), tls_client_key_file=str(leaf.key))
    )
    assert transport.server is None
    assert transport.client is not None
