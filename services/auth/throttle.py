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

from fairlane_server.auth.throttle_store import ThrottleStore


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
TRUST_REFRESH = timedelta(days=1)
# Never blocks: it only records that an address logged in successfully.
TRUSTED_PEER = Rule("login-ok", free=2**62)


@dataclass(frozen=True, slots=True)
class LoginState:
    trusted: bool
    clear_key: str | None
    trust_key: str | None


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


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
            raise Throttled((_aware(until) - now).total_seconds())

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

    async def before_login(self, user: tuple[Rule, str], peer: tuple[Rule, str]) -> LoginState:
        """Raises Throttled while the username or the address is blocked; otherwise tells
        whether the address is trusted. One query, on the path of every login."""
        now = datetime.now(UTC)
        user_key, peer_key = _key(*user), _key(*peer)
        trust_key = _key(TRUSTED_PEER, peer[1])
        rows = await self._store.read([user_key, peer_key, trust_key])
        ends = [rows[k][0] for k in (user_key, peer_key) if k in rows]
        until = max((_aware(end) for end in ends if end is not None), default=now)
        if until > now:
            raise Throttled((until - now).total_seconds())
        seen = _aware(rows[trust_key][1]) if trust_key in rows else None
        return LoginState(
            trusted=seen is not None and seen >= now - timedelta(days=TRUST_DAYS),
            clear_key=user_key if user_key in rows else None,
            # Refreshed at most daily: a returning user's login writes nothing here.
            trust_key=trust_key if seen is None or seen < now - TRUST_REFRESH else None,
        )

    async def after_login(self, state: LoginState) -> None:
        """A successful login: its username count restarts, its address is trusted."""
        if state.clear_key or state.trust_key:
            await self._store.settle(
                clear=state.clear_key, touch=state.trust_key, now=datetime.now(UTC)
            )

    async def trusted(self, peer: str) -> bool:
        """Whether `peer` logged in successfully within the last TRUST_DAYS."""
        key = _key(TRUSTED_PEER, peer)
        seen = (await self._store.read([key])).get(key)
        return seen is not None and _aware(seen[1]) >= datetime.now(UTC) - timedelta(
            days=TRUST_DAYS
        )

    async def prune(self) -> int:
        now = datetime.now(UTC)
        return await self._store.prune(
            now - self._window,
            now,
            kept=f"{TRUSTED_PEER.name}:",
            kept_since=now - timedelta(days=TRUST_DAYS),
        )
