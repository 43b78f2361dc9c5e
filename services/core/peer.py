"""The client address behind a call, for per-address limits and audit records.

gRPC reports the TCP peer. Behind a proxy that is the proxy, so the `x-forwarded-for`
metadata is believed only when the TCP peer is one of the configured trusted proxies, and
then its rightmost address that is not itself a trusted proxy is the client (the entries
to its left were written by the client and prove nothing). IPv6 clients are grouped by
/64, the block one host or customer is usually given.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from fairlane_server.core.grpc_host import ServicerContext

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_networks(cidrs: Iterable[str]) -> list[Network]:
    return [ipaddress.ip_network(c.strip(), strict=False) for c in cidrs if c.strip()]


def _grpc_peer_ip(peer: str) -> Address | None:
    # "ipv4:10.0.0.1:5000", "ipv6:[::1]:5000", "unix:/path" (no address)
    kind, _, rest = peer.partition(":")
    host = rest.rsplit(":", 1)[0].strip("[]") if kind in ("ipv4", "ipv6") else ""
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None


def _label(ip: Address) -> str:
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def _trusted(ip: Address, proxies: Sequence[Network]) -> bool:
    return any(ip.version == net.version and ip in net for net in proxies)


def client_address(context: ServicerContext, proxies: Sequence[Network] = ()) -> str:
    """A stable label for the caller's address ("unknown" for non-IP transports)."""
    ip = _grpc_peer_ip(context.peer() or "")
    if ip is None:
        return "unknown"
    if proxies and _trusted(ip, proxies):
        forwarded = [
            (v.decode() if isinstance(v, bytes) else v)
            for k, v in context.invocation_metadata() or ()
            if k == "x-forwarded-for"
        ]
        hops = [h.strip() for line in forwarded for h in line.split(",") if h.strip()]
        for hop in reversed(hops):
            try:
                hop_ip = ipaddress.ip_address(hop)
            except ValueError:
                break  # a garbled entry: stop at the last address we could trust
            ip = hop_ip
            if not _trusted(hop_ip, proxies):
                break
    return _label(ip)
