"""Plaintext only on loopback, unless allowed; the TLS settings go together."""

from __future__ import annotations

import re

import pytest
import structlog

from fairlane_server.core.settings import Settings
from fairlane_server.core.transport import Transport, TransportError, is_loopback


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
    ],
)
def test_inconsistent_tls_settings(settings: dict[str, str], message: str) -> None:
    with pytest.raises(TransportError, match=re.escape(message)):
        Transport.from_settings(Settings(**settings))  # type: ignore[arg-type]
