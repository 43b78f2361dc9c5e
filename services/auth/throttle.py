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
logins go first when password checks queue up (services/auth/hashing.py). And which
username logged in successfully from which address: such a known pair is not counted by
the address rule, so the users behind one shared address (an office's NAT, a proxy) are
neither locked out by a colleague's typos or a guesser among them, nor refused when many
of them log in at once. Their username rule still counts every failure, so a guesser at
that address gains nothing on those accounts (OWASP's advice for lockouts by address).
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
# Never block: they only record that an address, and a username at an address, logged in
# successfully.
TRUSTED_PEER = Rule("login-ok", free=2**62)
KNOWN_PAIR = Rule("login-ok-pair", free=2**62)
KEPT = (f"{TRUSTED_PEER.name}:", f"{KNOWN_PAIR.name}:")


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
    # None for a known pair (this username logged in from this address before): the
    # address rule does not count it.
    peer: Hold | None
    # Trust records a success refreshes (each at most daily).
    refresh: tuple[str, ...]

    @property
    def holds(self) -> tuple[Hold, ...]:
        return (self.user,) if self.peer is None else (self.user, self.peer)


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
        """Raises Throttled while the username, or the address, is blocked; otherwise
        counts the login as a failure of both until it succeeds (after_login), and tells
        whether the address is trusted. A known pair (this username logged in from this
        address within TRUST_DAYS) is neither refused nor counted by the address rule.
        Two statements on the path of every login: what is known, then the counts."""
        trust_key = _key(TRUSTED_PEER, peer[1])
        pair_key = _key(KNOWN_PAIR, f"{user[1]}\n{peer[1]}")
        now = datetime.now(UTC)
        seen = {
            key: _aware(last)
            for key, (_, last) in (await self._store.read([trust_key, pair_key])).items()
        }
        trusted = {key for key, last in seen.items() if last >= now - timedelta(days=TRUST_DAYS)}
        if pair_key in trusted:
            (user_hold,), _ = await self._take((user,))
            peer_hold = None
        else:
            (user_hold, peer_hold), _ = await self._take((user, peer))
        return LoginState(
            trusted=trust_key in trusted,
            user=user_hold,
            peer=peer_hold,
            # Refreshed at most daily: a returning user's login writes nothing here.
            refresh=tuple(
                key
                for key in (trust_key, pair_key)
                if key not in seen or seen[key] < now - TRUST_REFRESH
            ),
        )

    async def after_login(self, state: LoginState) -> None:
        """A successful login: its username count restarts, its address gets its event
        back, and the address and the pair are trusted."""
        await self._store.settle(
            clear=state.user.key,
            returned=[] if state.peer is None else [(state.peer.key, state.peer.block)],
            touch=state.refresh,
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
            now - self._window, now, kept=KEPT, kept_since=now - timedelta(days=TRUST_DAYS)
        )
