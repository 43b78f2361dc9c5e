"""Open streams watch their login's family: a refetch of the revocation list that holds it
calls them, and while anything watches the list is refetched without calls asking."""

from __future__ import annotations

import asyncio

from fairlane_server.core.revocation import RevokedFamilies, RevokedPage
from tests.polling import until


class Auth:
    def __init__(self) -> None:
        self.revoked: list[str] = []
        self.fetches = 0

    async def fetch(self, token: str, size: int) -> RevokedPage:
        # The whole list in one page each time: what a page holds is not at issue here.
        self.fetches += 1
        return RevokedPage([(f, 10.0**10) for f in self.revoked], "r1.0", more_pages=False)


async def test_a_watcher_is_called_once_a_refetch_lists_its_family() -> None:
    auth = Auth()
    families = RevokedFamilies(auth.fetch, max_age=0.1)
    await families.refresh()
    called: list[str] = []
    unwatch_a = families.watch("fam-a", lambda: called.append("a"))
    unwatch_b = families.watch("fam-b", lambda: called.append("b"))
    auth.revoked.append("fam-a")  # no call asks: the watch refetches by itself
    await until(lambda: called == ["a"])
    unwatch_a()  # already called: stopping is harmless
    fetches = auth.fetches
    await until(lambda: auth.fetches > fetches)  # b still watches: refetches go on
    assert called == ["a"]
    unwatch_b()


async def test_a_family_already_revoked_is_reported_at_once() -> None:
    auth = Auth()
    auth.revoked.append("fam-a")
    families = RevokedFamilies(auth.fetch, max_age=60.0)
    await families.refresh()
    called = asyncio.Event()
    families.watch("fam-a", called.set)
    await asyncio.wait_for(called.wait(), 5)


async def test_the_last_watcher_gone_stops_the_refetching_task() -> None:
    before = len(asyncio.all_tasks())
    families = RevokedFamilies(Auth().fetch, max_age=60.0)
    unwatch = families.watch("fam-a", lambda: None)
    assert len(asyncio.all_tasks()) == before + 1
    unwatch()
    await until(lambda: len(asyncio.all_tasks()) == before)
