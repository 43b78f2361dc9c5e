"""The revoked token families every service refuses, refetched from auth like the JWKS.

Access tokens carry their login's refresh-token family (the `fam` claim). Revoke, and the
reuse of a spent refresh token, revoke a family; auth lists the families revoked within
the last access-token lifetime (GetRevokedFamilies). A service refetches that list when it
is older than `max_age` seconds, before it answers the call that noticed, so a revoked
family is refused everywhere at most `max_age` (plus one fetch) after the revocation.

Half-way through `max_age` the list is refetched in the background, so busy services never
wait for it. When auth cannot be reached the last list stays in force (revocations made
meanwhile are not seen until it answers again); a warning is logged.

Open streams were authenticated once, when they opened: they `watch` their family and are
called when a fetch lists it. While anything watches, one task refetches the list every
`max_age / 2` when no call did, so an idle stream of a revoked login learns of it within
the same bound as a new call.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Collection

from fairlane_server.core.logging import get_logger

log = get_logger(__name__)

# How long a call waits for an overdue refetch before it goes on with the last list.
_WAIT_FOR_FETCH = 2.0
# After a failed fetch, calls do not wait for another one for this long.
_RETRY_AFTER_FAILURE = 1.0


class RevokedFamilies:
    def __init__(
        self,
        fetch: Callable[[], Awaitable[Collection[str]]],
        *,
        max_age: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._clock = clock
        self._max_age = max_age
        self._families: frozenset[str] = frozenset()
        self._fetched_at = -float("inf")
        self._failed_at = -float("inf")
        self._task: asyncio.Task[None] | None = None
        # family -> what to call once a fetch lists it (open streams of that login).
        self._watchers: dict[str, set[Callable[[], None]]] = {}
        self._keeper: asyncio.Task[None] | None = None

    @property
    def max_age(self) -> float:
        return self._max_age

    async def refresh(self) -> None:
        """Fetches the list now (start-up)."""
        self._families = frozenset(await self._fetch())
        self._fetched_at = self._clock()
        for family in self._families & self._watchers.keys():
            for callback in self._watchers.pop(family):
                try:
                    callback()
                except Exception:
                    log.exception("revocation_watcher_failed")

    async def _refresh_logged(self) -> None:
        try:
            await self.refresh()
        except Exception as exc:
            self._failed_at = self._clock()
            log.warning(
                "revocation_list_fetch_failed",
                error=type(exc).__name__,
                age_s=round(self._clock() - self._fetched_at, 1),
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
        return family in self._families

    def watch(self, family: str, callback: Callable[[], None]) -> Callable[[], None]:
        """Calls `callback` once the list holds `family` (soon, if it already does);
        returns the function that stops watching."""
        if family in self._families:
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
