"""Growing delays for Login, Register and IssueServiceToken, per username and per address.

Each rule counts events (failed logins, registrations, wrong service secrets) per subject.
The first `free` events in a window cost nothing; each further one blocks the subject for
a delay that doubles from `base_delay` up to `max_delay`. While blocked, calls are refused
before any password is hashed. A count starts again after `window` seconds without an
event. The counters live in the database (services/auth/throttle_store.py), so they hold
across auth replicas.

An event is counted before its outcome is known, by the same statement that checks the
block (`take`): a login counts as failed while its password is being checked, and is given
back if it succeeds. So concurrent calls cannot all pass the check before any of them is
counted: however many arrive at once, at most the free ones and the one that starts the
block are let through.

The same table remembers, for `TRUST_DAYS`, which addresses logged in successfully: their
logins go first when password checks queue up (services/auth/hashing.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from fairlane_server.auth.throttle_store import Blocked, Claim, ThrottleStore


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
class Hold:
    """An event counted before its outcome is known (Throttle.take)."""

    rule: str
    key: str
    events: int
    # The end of the block this event started, if it started one.
    block: datetime | None
    delay: float

    @property
    def trip(self) -> Trip | None:
        return Trip(self.rule, self.events, self.delay) if self.block is not None else None


@dataclass(frozen=True, slots=True)
class LoginState:
    trusted: bool
    user: Hold
    peer: Hold
    trust_key: str | None

    @property
    def holds(self) -> tuple[Hold, Hold]:
        return self.user, self.peer


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

    def _claim(self, rule: Rule, subject: str, now: datetime) -> Claim:
        # The ends of the blocks the next events could start, up to the cap: the store
        # picks one by the count it reaches (about 11 with the default settings).
        ends: list[datetime] = []
        over = 1
        while True:
            delay = self.delay(rule, rule.free + over)
            ends.append(now + timedelta(seconds=delay))
            if delay >= self._max or over > 62:
                return Claim(_key(rule, subject), rule.free, ends)
            over += 1

    async def _take(
        self, subjects: Sequence[tuple[Rule, str]], read: Sequence[str] = ()
    ) -> tuple[list[Hold], dict[str, tuple[datetime | None, datetime]]]:
        now = datetime.now(UTC)
        claims = [self._claim(rule, subject, now) for rule, subject in subjects]
        try:
            counts, rows = await self._store.claim(claims, now, now - self._window, read)
        except Blocked as exc:
            raise Throttled((_aware(exc.until) - now).total_seconds()) from None
        holds = [
            Hold(rule.name, claim.key, n, claim.block_after(n), self.delay(rule, n))
            for (rule, _), claim, n in zip(subjects, claims, counts, strict=True)
        ]
        return holds, rows

    async def take(self, *subjects: tuple[Rule, str]) -> list[Hold]:
        """Raises Throttled while any of the subjects is blocked, counting nothing;
        otherwise counts one event on each, atomically with that check, starting the
        block an event earns. An event that turns out not to count is given back."""
        holds, _ = await self._take(subjects)
        return holds

    async def give_back(self, holds: Sequence[Hold]) -> None:
        """Uncounts events taken by take(), and ends the blocks they started."""
        await self._store.give_back([(h.key, h.block) for h in holds])

    async def before_login(self, user: tuple[Rule, str], peer: tuple[Rule, str]) -> LoginState:
        """Raises Throttled while the username or the address is blocked; otherwise counts
        the login as a failure of both until it succeeds (after_login), and tells whether
        the address is trusted. One transaction, on the path of every login."""
        trust_key = _key(TRUSTED_PEER, peer[1])
        (user_hold, peer_hold), rows = await self._take((user, peer), [trust_key])
        now = datetime.now(UTC)
        seen = _aware(rows[trust_key][1]) if trust_key in rows else None
        return LoginState(
            trusted=seen is not None and seen >= now - timedelta(days=TRUST_DAYS),
            user=user_hold,
            peer=peer_hold,
            # Refreshed at most daily: a returning user's login writes nothing here.
            trust_key=trust_key if seen is None or seen < now - TRUST_REFRESH else None,
        )

    async def after_login(self, state: LoginState) -> None:
        """A successful login: its username count restarts, its address gets its event
        back and is trusted."""
        await self._store.settle(
            clear=state.user.key,
            returned=[(state.peer.key, state.peer.block)],
            touch=state.trust_key,
            now=datetime.now(UTC),
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
