"""Growing delays for Login, Register and IssueServiceToken, per username and per address.

Each rule counts events (failed logins, registrations, wrong service secrets) per subject.
The first `free` events in a window cost nothing; each further one blocks the subject for
a delay that doubles from `base_delay` up to `max_delay`. While blocked, calls are refused
before any password is hashed. A count starts again after `window` seconds without an
event. The counters live in the database (services/auth/throttle_store.py), so they hold
across auth replicas.

The same table remembers, for `TRUST_DAYS`, which addresses logged in successfully: their
logins go first when password checks queue up (services/auth/hashing.py).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from services.auth.throttle_store import ThrottleStore


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    free: int


class Throttled(Exception):
    def __init__(self, retry_after: float) -> None:
        super().__init__(f"too many attempts; retry in {max(1, round(retry_after))} s")
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class Trip:
    """A block that an event just started."""

    rule: str
    events: int
    delay: float


TRUST_DAYS = 30
# Never blocks: it only records that an address logged in successfully.
TRUSTED_PEER = Rule("login-ok", free=2**62)


def _key(rule: Rule, subject: str) -> str:
    # Hashed: fixed length whatever a caller sends, and no usernames or addresses at rest.
    return f"{rule.name}:{hashlib.sha256(subject.encode()).hexdigest()[:40]}"


class Throttle:
    def __init__(
        self, store: ThrottleStore, *, window: float, base_delay: float, max_delay: float
    ) -> None:
        self._store = store
        self._window = timedelta(seconds=window)
        self._base = base_delay
        self._max = max_delay

    def delay(self, rule: Rule, events: int) -> float:
        """The block that the `events`-th event within a window starts."""
        over = events - rule.free
        if over <= 0:
            return 0.0
        # min() first keeps 2**over from growing without bound on a long attack.
        return float(min(self._max, self._base * 2.0 ** min(over - 1, 62)))

    async def check(self, *subjects: tuple[Rule, str]) -> None:
        """Raises Throttled while any of the subjects is blocked."""
        now = datetime.now(UTC)
        until = await self._store.blocked_until([_key(r, s) for r, s in subjects], now)
        if until is not None:
            until = until if until.tzinfo else until.replace(tzinfo=UTC)
            raise Throttled((until - now).total_seconds())

    async def hit(self, rule: Rule, subject: str) -> Trip | None:
        """Counts one event; returns the block it started, if any."""
        now = datetime.now(UTC)
        key = _key(rule, subject)
        events = await self._store.count(key, now, now - self._window)
        delay = self.delay(rule, events)
        if delay <= 0:
            return None
        await self._store.block(key, now + timedelta(seconds=delay))
        return Trip(rule.name, events, delay)

    async def clear(self, rule: Rule, subject: str) -> None:
        await self._store.clear(_key(rule, subject))

    async def trust(self, peer: str) -> None:
        """Records a successful login from `peer`."""
        now = datetime.now(UTC)
        await self._store.count(_key(TRUSTED_PEER, peer), now, now - self._window)

    async def trusted(self, peer: str) -> bool:
        """Whether `peer` logged in successfully within the last TRUST_DAYS."""
        since = datetime.now(UTC) - timedelta(days=TRUST_DAYS)
        return await self._store.seen_since(_key(TRUSTED_PEER, peer), since)

    async def prune(self) -> int:
        now = datetime.now(UTC)
        return await self._store.prune(
            now - self._window,
            now,
            kept=f"{TRUSTED_PEER.name}:",
            kept_since=now - timedelta(days=TRUST_DAYS),
        )
