"""The revoked token families every service refuses, fetched from auth like the JWKS.

Access tokens carry their login's refresh-token family (the `fam` claim). Revoke, and the
reuse of a spent refresh token, revoke a family; auth lists the families revoked within
the last access-token lifetime (GetRevokedFamilies), in pages. The first fetch reads every
page; each later one asks only for the revocations since the last (the page token is a
cursor in commit order, services/auth/store.py), so what a fetch costs depends on how many
families were revoked since, not on how many are listed: the whole list once passed
gRPC's message limit, after which no service learned of any new revocation. Each family
comes with the time its last access token expires, and is forgotten then, so the list
held here is the unexpired revoked families and no more.

A service refetches when its list is older than `max_age` seconds, before it answers the
call that noticed, so a revoked family is refused everywhere at most `max_age` (plus one
fetch) after the revocation. Half-way through `max_age` the list is refetched in the
background, so busy services never wait for it. When auth cannot be reached the last list
stays in force (revocations made meanwhile are not seen until it answers again): each
failure logs a warning, the age of the list in force shows in
fairlane_revocation_list_age_seconds, and past `stale_after` an error is logged (again
every minute while it lasts).

Open streams were authenticated once, when they opened: they `watch` their family and are
called when a fetch lists it. While anything watches, one task refetches the list every
`max_age / 2` when no call did, so an idle stream of a revoked login learns of it within
the same bound as a new call.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import math
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

from fairlane_server.core.logging import get_logger
from fairlane_server.core.metrics import REVOCATION_LIST_AGE

log = get_logger(__name__)

# How long a call waits for an overdue refetch before it goes on with the last list.
_WAIT_FOR_FETCH = 2.0
# After a failed fetch, calls do not wait for another one for this long.
_RETRY_AFTER_FAILURE = 1.0
# Families asked for per call: the most auth serves (about 0.5 MB a page).
PAGE_SIZE = 10_000
# While the list stays stale, the error is repeated this often.
_STALE_LOG_EVERY = 60.0


@dataclass(frozen=True, slots=True)
class RevokedPage:
    """One answer of GetRevokedFamilies."""

    # (family id, Unix time after which no access token of that family is valid).
    families: Sequence[tuple[str, float]]
    # Where the next fetch continues. Empty only from an auth of the release before
    # paging, whose answer is its whole list.
    next_page_token: str
    # More families follow at once (the list is not caught up yet).
    more_pages: bool


# (page token, page size) -> a page. The first call of a process passes "".
Fetch = Callable[[str, int], Awaitable[RevokedPage]]

# Every list of this process, for REVOCATION_LIST_AGE (`fairlane dev` runs three services,
# each with its own): the gauge shows the stalest.
_LISTS: weakref.WeakSet[RevokedFamilies] = weakref.WeakSet()
REVOCATION_LIST_AGE.set_function(lambda: max((r.failing_age() for r in _LISTS), default=0.0))


class RevokedFamilies:
    def __init__(
        self,
        fetch: Fetch,
        *,
        max_age: float,
        stale_after: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._fetch = fetch
        self._clock = clock
        self._wall = wall_clock
        self._max_age = max_age
        # Well past the bound a healthy service keeps (max_age and one fetch), and past a
        # few failed refetches, so that a short hiccup of auth does not page anyone.
        self._stale_after = stale_after if stale_after is not None else max(30.0, 3 * max_age)
        # family -> when it expires (Unix time); a heap of the same to forget them in order.
        self._expiry: dict[str, float] = {}
        self._expiring: list[tuple[float, str]] = []
        self._token = ""
        # Start of the last fetch that caught up: the list holds every revocation before.
        self._fetched_at = -float("inf")
        self._created_at = clock()
        self._failed_at = -float("inf")
        self._stale_logged_at = -float("inf")
        self._task: asyncio.Task[None] | None = None
        # family -> what to call once a fetch lists it (open streams of that login).
        self._watchers: dict[str, set[Callable[[], None]]] = {}
        self._keeper: asyncio.Task[None] | None = None
        _LISTS.add(self)

    @property
    def max_age(self) -> float:
        return self._max_age

    def __len__(self) -> int:
        return len(self._expiry)

    def failing_age(self) -> float:
        """Seconds since the list was last caught up, while the latest fetch failed; else 0."""
        if self._failed_at <= self._fetched_at:
            return 0.0
        since = self._fetched_at if self._fetched_at > -math.inf else self._created_at
        return self._clock() - since

    async def refresh(self) -> None:
        """Fetches what was revoked since the last fetch, every page of it (start-up: the
        whole list). Each page counts as soon as it arrives: a fetch that fails half-way
        keeps what it got, and the next one continues from there."""
        started = self._clock()
        while True:
            page = await self._fetch(self._token, PAGE_SIZE)
            if not page.next_page_token:
                # An auth of the previous release (a rolling update): its answer is the
                # whole list and gives no expiry. Taken as it is; the next fetch from a
                # current auth starts over and brings the expiries.
                self._expiry = {family: math.inf for family, _ in page.families}
                self._expiring = []
                self._token = ""
                self._notify(self._expiry.keys())
                break
            for family, expires in page.families:
                if self._expiry.get(family) != expires:
                    self._expiry[family] = expires
                    heapq.heappush(self._expiring, (expires, family))
            self._token = page.next_page_token
            self._notify(family for family, _ in page.families)
            if not page.more_pages:
                break
        self._fetched_at = started
        self._forget_expired()

    def _notify(self, families: Iterable[str]) -> None:
        if not self._watchers:
            return
        for family in set(families) & self._watchers.keys():
            for callback in self._watchers.pop(family):
                try:
                    callback()
                except Exception:
                    log.exception("revocation_watcher_failed")

    def _forget_expired(self) -> None:
        now = self._wall()
        while self._expiring and self._expiring[0][0] < now:
            expires, family = heapq.heappop(self._expiring)
            if self._expiry.get(family) == expires:  # not listed again with a later expiry
                del self._expiry[family]

    async def _refresh_logged(self) -> None:
        try:
            await self.refresh()
        except Exception as exc:
            error = type(exc).__name__
        else:
            if self._stale_logged_at > -math.inf:
                self._stale_logged_at = -float("inf")
                log.info("revocation_list_current_again", families=len(self._expiry))
            return
        now = self._failed_at = self._clock()
        age = self.failing_age()
        log.warning("revocation_list_fetch_failed", error=error, age_s=round(age, 1))
        if age > self._stale_after and now - self._stale_logged_at >= _STALE_LOG_EVERY:
            # Revocations made since are not enforced here: someone has to look.
            self._stale_logged_at = now
            log.error(
                "revocation_list_stale",
                age_s=round(age, 1),
                bound_s=self._stale_after,
                families=len(self._expiry),
                error=error,
            )

    def _start_refresh(self) -> asyncio.Task[None]:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._refresh_logged())
        return self._task

    async def contains(self, family: str) -> bool:
        now = self._clock()
        age = now - self._fetched_at
        if age > self._max_age / 2:
            task = self._start_refresh()
            if age > self._max_age and now - self._failed_at > _RETRY_AFTER_FAILURE:
                # When auth is slow, go on with the last list; the fetch continues.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_WAIT_FOR_FETCH):
                        await asyncio.shield(task)
        return family in self._expiry

    def watch(self, family: str, callback: Callable[[], None]) -> Callable[[], None]:
        """Calls `callback` once the list holds `family` (soon, if it already does);
        returns the function that stops watching."""
        if family in self._expiry:
            handle = asyncio.get_running_loop().call_soon(callback)
            return handle.cancel
        self._watchers.setdefault(family, set()).add(callback)
        if self._keeper is None or self._keeper.done():
            self._keeper = asyncio.create_task(self._keep())

        def unwatch() -> None:
            callbacks = self._watchers.get(family)
            if callbacks is not None:
                callbacks.discard(callback)
                if not callbacks:
                    del self._watchers[family]
            if not self._watchers and self._keeper is not None:
                self._keeper.cancel()
                self._keeper = None

        return unwatch

    async def _keep(self) -> None:
        """Refetches every max_age / 2 while something watches and no call did."""
        while self._watchers:
            await asyncio.sleep(self._max_age / 2)
            if self._watchers and self._clock() - self._fetched_at >= self._max_age / 2:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._max_age):
                        await asyncio.shield(self._start_refresh())
