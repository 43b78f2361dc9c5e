"""Free TCP ports for the servers that tests start as separate processes."""

from __future__ import annotations

import random
import socket
import threading
from pathlib import Path

_given: set[int] = set()
_lock = threading.Lock()
# Its own generator: tests and hypothesis seed the global one, which would replay choices.
_rng = random.Random()


def _ephemeral_low() -> int:
    try:
        low, _ = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low)
    except (OSError, ValueError):
        return 32768  # Linux's default


def free_ports(count: int) -> list[int]:
    """`count` distinct ports that were free on 127.0.0.1 when chosen, none handed out
    before in this test run, all below the kernel's ephemeral range.

    A port the kernel picks for bind(0) is an ephemeral one: between closing the probe and
    the service's own bind, any outgoing connection on the machine (the suite opens
    hundreds, to PostgreSQL and RabbitMQ) can take it, and the service fails to start
    ("Failed to bind", in a CI run). Below that range only another listener can.
    """
    high = _ephemeral_low()
    low = 10000 if high > 12000 else 1024
    chosen: list[int] = []
    with _lock:
        while len(chosen) < count:
            port = _rng.randrange(low, high)
            if port in _given or not is_free(port):
                continue
            _given.add(port)
            chosen.append(port)
    return chosen


def is_free(port: int) -> bool:
    """Whether a server could bind `port` on 127.0.0.1 now."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    return free_ports(1)[0]
