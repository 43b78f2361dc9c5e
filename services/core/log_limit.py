"""Once-per-key-per-period gate for log lines a hostile peer could otherwise multiply.

Hand-written: the stdlib and structlog have no rate-limited logging, and the need is one
dict and a clock.
"""

from __future__ import annotations

import time
from collections import OrderedDict


class LogLimiter:
    """`allow(key)` is true at most once per `period` seconds per key; it also tells how
    many calls were held back since the last allowed one, so the line can say so."""

    def __init__(self, period: float = 60.0, max_keys: int = 4096) -> None:
        self._period = period
        self._max_keys = max_keys
        self._seen: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def allow(self, key: str) -> tuple[bool, int]:
        now = time.monotonic()
        last = self._seen.get(key)
        if last is not None and now - last[0] < self._period:
            self._seen[key] = (last[0], last[1] + 1)
            return False, 0
        self._seen[key] = (now, 0)
        self._seen.move_to_end(key)
        # Bounded: a flood of distinct keys (peers) forgets the oldest, it cannot grow memory.
        while len(self._seen) > self._max_keys:
            self._seen.popitem(last=False)
        return True, last[1] if last is not None else 0


def peer_host(peer: str | None) -> str:
    """`ipv4:10.0.0.7:51234` -> `ipv4:10.0.0.7`: one key per host, whatever its ports."""
    if not peer:
        return "unknown"
    if peer.startswith(("ipv4:", "ipv6:")):
        return peer.rsplit(":", 1)[0]
    return peer
