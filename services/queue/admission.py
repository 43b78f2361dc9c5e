"""Admission control before anything is stored: a token bucket per user and a bound on
requests waiting for the durable write on this replica, shared fairly among users.

The bound (`FAIRLANE_MAX_PENDING_WRITES`) alone let one user who sends faster than the log
commits fill it, within their rate limit, and have everybody else refused UNAVAILABLE for
as long as they kept on. So once it is reached, a user is still let in while they hold less
than their share of it (the bound divided by the users with requests waiting): the one who
filled it waits, the others do not notice. Past twice the bound everybody is refused, so
memory stays bounded however many users share the overflow; and when the requests already
in a batch or waiting for their publish reach the bound, the replica itself is behind (a
slow log or a broker outage) and everybody is refused as before."""

from __future__ import annotations

import time

from fairlane_server.core import metrics
from fairlane_server.queue.intake import Load, Rejection


class TokenBuckets:
    """Per-user token buckets (rate per second, burst). Idle buckets are forgotten, so
    memory follows the number of active users."""

    def __init__(self, rate: float, burst: int, *, forget_after: float = 300.0) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._forget_after = forget_after
        self._buckets: dict[str, tuple[float, float]] = {}  # user -> (tokens, updated)
        self._last_sweep = time.monotonic()

    def take(self, user: str, now: float | None = None) -> float:
        """Takes one token; returns 0 if granted, else seconds until one is available."""
        now = time.monotonic() if now is None else now
        tokens, updated = self._buckets.get(user, (self._burst, now))
        tokens = min(self._burst, tokens + (now - updated) * self._rate)
        if tokens >= 1:
            self._buckets[user] = (tokens - 1, now)
            granted = 0.0
        else:
            self._buckets[user] = (tokens, now)
            granted = (1 - tokens) / self._rate
        if now - self._last_sweep > self._forget_after:
            self._sweep(now)
        return granted

    def _sweep(self, now: float) -> None:
        self._last_sweep = now
        full_after = self._burst / self._rate
        stale = [u for u, (_, at) in self._buckets.items() if now - at > full_after]
        for user in stale:
            del self._buckets[user]


class Admission:
    def __init__(
        self, *, rate: float, burst: int, max_pending: int, overload_retry_after_ms: int
    ) -> None:
        self._buckets = TokenBuckets(rate, burst)
        self._max_pending = max_pending
        self._overload_retry_ms = overload_retry_after_ms

    def check(self, user: str, load: Load) -> None:
        """Raises Rejection when the request must not be admitted now."""
        refusal = self._over_bound(load)
        if refusal is not None:
            metrics.REJECTIONS.labels(refusal.reason).inc()
            raise refusal
        wait = self._buckets.take(user)
        if wait > 0:
            metrics.REJECTIONS.labels("rate_limited").inc()
            raise Rejection(
                "rate_limited",
                "you are sending faster than your rate limit; slow down",
                max(1, int(wait * 1000)),
            )

    def _over_bound(self, load: Load) -> Rejection | None:
        bound = self._max_pending
        if load.total < bound:
            return None
        if load.behind >= bound or load.total >= 2 * bound:
            return Rejection(
                "overloaded", "the server is overloaded; retry shortly", self._overload_retry_ms
            )
        users = load.users if load.own else load.users + 1
        share = max(1, bound // users)
        if load.own < share:
            return None
        return Rejection(
            "over_share",
            f"you have {load.own} requests waiting for their write on this server, more than "
            "your share while it is busy; retry shortly",
            self._overload_retry_ms,
        )
