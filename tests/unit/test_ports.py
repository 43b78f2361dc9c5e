"""The ports handed to the services that tests start: free, distinct, never ephemeral."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests import ports
from tests.ports import free_port, free_ports, is_free


def test_ports_are_distinct_free_and_below_the_ephemeral_range() -> None:
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    chosen = free_ports(50) + [free_port() for _ in range(50)]
    assert len(set(chosen)) == 100
    assert all(port < low for port in chosen)
    for port in chosen[:10]:
        with socket.socket() as server:
            server.bind(("127.0.0.1", port))


class _Draws:
    """Stands in for the port generator: the given ports first, in order."""

    def __init__(self, *ports: int) -> None:
        self.ports = list(ports)

    def randrange(self, low: int, high: int) -> int:
        return self.ports.pop(0)


def test_a_port_in_use_or_handed_out_before_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    given = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        in_use = taken.getsockname()[1]
        # A port below the range that nothing holds and nobody was given.
        fresh = next(p for p in range(20000, 30000) if p not in ports._given and is_free(p))
        monkeypatch.setattr(ports, "_rng", _Draws(in_use, given, fresh))
        assert free_ports(1) == [fresh]
    assert fresh in ports._given
