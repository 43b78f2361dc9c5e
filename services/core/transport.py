"""Transport security of every gRPC listener and inter-service channel: TLS, mTLS, and
the rule that plaintext is only for loopback addresses unless the operator allows it."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from fairlane_server.core.logging import get_logger
from fairlane_server.core.settings import Settings

log = get_logger(__name__)


class TransportError(Exception):
    """A listener or target that may not be used as configured (the process stops)."""


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TransportError(f"cannot read {what} {path!r}: {exc.strerror}") from None


def _host(address: str) -> str:
    """The host of `host:port`, `[v6]:port`, or a bare host."""
    if address.startswith("["):
        return address[1:].partition("]")[0]
    if address.count(":") == 1:
        return address.rsplit(":", 1)[0]
    return address


def _addresses(target: str) -> list[str]:
    """Hosts a gRPC target names: `host:port`, `dns:///host:port`, `ipv4:a:1,b:2`,
    `unix:path`..."""
    if target.startswith(("unix:", "unix-abstract:")):
        return ["unix"]
    if target.startswith("dns:"):
        target = target.split("/", 3)[-1] if "///" in target else target[4:]
    elif target.startswith(("ipv4:", "ipv6:")):
        target = target[5:]
    return [_host(part.strip()) for part in target.split(",") if part.strip()]


def is_loopback(target: str) -> bool:
    """True when every address of `target` is this host (127.0.0.0/8, ::1, localhost or a
    Unix socket)."""
    hosts = _addresses(target)
    if not hosts:
        return False
    for host in hosts:
        if host in ("unix", "localhost"):
            continue
        try:
            if not ipaddress.ip_address(host).is_loopback:
                return False
        except ValueError:
            return False  # a name other than localhost may resolve anywhere
    return True


@dataclass(frozen=True)
class Transport:
    """How this process listens and dials.

    `server` is None for plaintext listeners; `client` is None for plaintext channels.
    """

    server: grpc.ServerCredentials | None = None
    client: grpc.ChannelCredentials | None = None
    server_name: str = ""
    allow_insecure: bool = False
    mutual: bool = False

    @classmethod
    def from_settings(cls, s: Settings) -> Transport:
        server = client = None
        if bool(s.tls_cert_file) != bool(s.tls_key_file):
            raise TransportError("FAIRLANE_TLS_CERT_FILE and FAIRLANE_TLS_KEY_FILE go together")
        if s.tls_client_ca_file and not s.tls_cert_file:
            raise TransportError("FAIRLANE_TLS_CLIENT_CA_FILE (mTLS) needs FAIRLANE_TLS_CERT_FILE")
        if s.tls_cert_file:
            pair = (_read(s.tls_key_file, "TLS key"), _read(s.tls_cert_file, "TLS certificate"))
            client_ca = _read(s.tls_client_ca_file, "client CA") if s.tls_client_ca_file else None
            server = grpc.ssl_server_credentials(
                [pair], root_certificates=client_ca, require_client_auth=client_ca is not None
            )
        # A client certificate alone means dialing with TLS (the system's roots): it was
        # dropped, and the process dialed in plaintext without a word.
        if s.tls_cert_file or s.tls_ca_file or s.tls_client_cert_file or s.tls_client_key_file:
            cert_file = s.tls_client_cert_file or s.tls_cert_file
            key_file = s.tls_client_key_file or s.tls_key_file
            if bool(s.tls_client_cert_file) != bool(s.tls_client_key_file):
                raise TransportError(
                    "FAIRLANE_TLS_CLIENT_CERT_FILE and FAIRLANE_TLS_CLIENT_KEY_FILE go together"
                )
            client = grpc.ssl_channel_credentials(
                root_certificates=_read(s.tls_ca_file, "CA") if s.tls_ca_file else None,
                private_key=_read(key_file, "TLS key") if key_file else None,
                certificate_chain=_read(cert_file, "TLS certificate") if cert_file else None,
            )
        return cls(
            server=server,
            client=client,
            server_name=s.tls_server_name,
            allow_insecure=s.allow_insecure,
            mutual=bool(s.tls_client_ca_file),
        )

    def _plaintext(self, address: str, what: str) -> None:
        if is_loopback(address):
            return
        if not self.allow_insecure:
            raise TransportError(
                f"refusing plaintext gRPC {what} {address}: it is not a loopback address. "
                "Set FAIRLANE_TLS_CERT_FILE/FAIRLANE_TLS_KEY_FILE (and FAIRLANE_TLS_CA_FILE "
                "to dial), or FAIRLANE_ALLOW_INSECURE=true on a network you trust"
            )
        log.warning("insecure_plaintext", address=address, role=what)

    def add_port(self, server: Any, listen: str) -> int:
        """Binds `listen` with TLS, or in plaintext where allowed; returns the port."""
        if self.server is not None:
            port: int = server.add_secure_port(listen, self.server)
        else:
            self._plaintext(listen, "listener")
            port = server.add_insecure_port(listen)
        return port

    def channel(
        self,
        target: str,
        options: Sequence[tuple[str, Any]],
        interceptors: Sequence[Any] = (),
    ) -> grpc.aio.Channel:
        """A channel to another Fairlane service."""
        if self.client is None:
            self._plaintext(target, "target")
            return grpc.aio.insecure_channel(
                target, options=list(options), interceptors=list(interceptors) or None
            )
        extra = [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []
        return grpc.aio.secure_channel(
            target,
            self.client,
            options=[*options, *extra],
            interceptors=list(interceptors) or None,
        )
