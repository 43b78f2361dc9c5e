"""The revocation list read in pages and then incrementally: the service side
(RevokedFamilies: every page once, then only what is new, expired families forgotten,
staleness shown) against a fake auth, and the auth side's cursor (AuthStore.revoked_page
and the page tokens) on an in-memory SQLite database."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import StaticPool
from structlog.testing import capture_logs

from fairlane_server.auth.domain import InvalidInput, _revoked_after
from fairlane_server.auth.store import AuthStore
from fairlane_server.core.metrics import REVOCATION_LIST_AGE
from fairlane_server.core.models import metadata, revoked_families, users
from fairlane_server.core.revocation import RevokedFamilies, RevokedPage

FAR = 10**10  # an expiry far in the future (Unix time)


@dataclass
class FakeAuth:
    """GetRevokedFamilies as auth answers it: revocations numbered in commit order, pages
    of at most `page` (auth caps page sizes), tokens naming the last number covered."""

    page: int = 3
    committed: list[tuple[str, float]] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    sent: int = 0
    down: bool = False

    def revoke(self, family: str, expires: float = FAR) -> None:
        self.committed.append((family, expires))

    async def fetch(self, token: str, size: int) -> RevokedPage:
        self.tokens.append(token)
        if self.down:
            raise ConnectionError("auth down")
        after = int(token) if token else 0
        newer = self.committed[after : after + min(size, self.page) + 1]
        more = len(newer) > min(size, self.page)
        page = newer[: min(size, self.page)]
        self.sent += len(page)
        last = after + len(page) if more else len(self.committed)
        return RevokedPage(page, str(last), more)


async def test_the_first_fetch_pages_through_the_list_and_later_ones_ask_for_news() -> None:
    auth = FakeAuth(page=3)
    for i in range(8):
        auth.revoke(f"fam-{i}")
    revoked = RevokedFamilies(auth.fetch, max_age=5.0)
    await revoked.refresh()
    assert len(revoked) == 8
    assert auth.tokens == ["", "3", "6"]  # three pages: 3 + 3 + 2
    auth.tokens.clear()
    auth.sent = 0

    await revoked.refresh()  # nothing new: one call, nothing sent
    assert (auth.tokens, auth.sent) == (["8"], 0)

    auth.revoke("fam-new")
    await revoked.refresh()
    assert auth.sent == 1
    assert await revoked.contains("fam-new")
    assert await revoked.contains("fam-0")


async def test_expired_families_are_forgotten() -> None:
    now = 1000.0
    auth = FakeAuth()
    auth.revoke("short", expires=1010.0)
    auth.revoke("long", expires=2000.0)
    revoked = RevokedFamilies(auth.fetch, max_age=5.0, wall_clock=lambda: now)
    await revoked.refresh()
    assert len(revoked) == 2
    now = 1011.0
    await revoked.refresh()
    assert len(revoked) == 1
    assert await revoked.contains("long")
    assert not await revoked.contains("short")


async def test_a_fetch_failing_half_way_keeps_its_pages_and_continues_from_there() -> None:
    auth = FakeAuth(page=2)
    for i in range(5):
        auth.revoke(f"fam-{i}")
    pages = 0
    real = auth.fetch

    async def second_page_fails(token: str, size: int) -> RevokedPage:
        nonlocal pages
        pages += 1
        if pages == 2:
            raise ConnectionError("auth went away")
        return await real(token, size)

    revoked = RevokedFamilies(second_page_fails, max_age=5.0)
    with pytest.raises(ConnectionError):
        await revoked.refresh()
    assert len(revoked) == 2  # the first page counts
    auth.tokens.clear()
    await revoked.refresh()
    assert len(revoked) == 5
    assert auth.tokens == ["2", "4"]  # not from the start


async def test_a_stale_list_shows_in_the_gauge_and_logs_an_error_past_the_bound() -> None:
    now = 100.0
    auth = FakeAuth()
    auth.revoke("fam-a")
    # Calls 5 s apart, max_age 2 s: each call waits for its refetch (one at a time).
    revoked = RevokedFamilies(auth.fetch, max_age=2.0, stale_after=30.0, clock=lambda: now)
    assert await revoked.contains("fam-a")
    assert revoked.failing_age() == 0.0
    auth.down = True
    with capture_logs() as logs:
        for _ in range(10):  # a call every 5 s for 50 s, each meeting a failed fetch
            now += 5
            assert await revoked.contains("fam-a")  # the last list stays in force
    assert revoked.failing_age() == 50.0
    (sample,) = next(iter(REVOCATION_LIST_AGE.collect())).samples
    assert sample.value >= 50.0  # the stalest list of the process
    events = [(e["event"], e["log_level"]) for e in logs]
    assert events.count(("revocation_list_fetch_failed", "warning")) == 10
    # Once past 30 s, then not again within the minute.
    assert events.count(("revocation_list_stale", "error")) == 1
    auth.down = False
    with capture_logs() as logs:
        now += 5
        await revoked.contains("fam-a")
    assert revoked.failing_age() == 0.0
    assert [e["event"] for e in logs] == ["revocation_list_current_again"]


async def test_an_auth_of_the_release_before_paging_is_taken_at_its_word() -> None:
    listed = ["fam-a", "fam-b"]

    async def old_auth(token: str, size: int) -> RevokedPage:
        # Ignores the request's fields; the whole list, no token, no expiries.
        return RevokedPage([(f, float("inf")) for f in listed], "", False)

    revoked = RevokedFamilies(old_auth, max_age=5.0)
    await revoked.refresh()
    assert len(revoked) == 2
    listed.remove("fam-a")
    await revoked.refresh()
    assert not await revoked.contains("fam-a")  # its list replaces the last one
    assert await revoked.contains("fam-b")


# -- auth's side: the cursor over revoked_families ------------------------------------------


@pytest.fixture
async def store() -> AsyncIterator[tuple[AuthStore, uuid.UUID, AsyncEngine]]:
    # One in-memory database shared by every connection of the engine.
    engine = create_async_engine("sqlite+aiosqlite://", poolclass=StaticPool)
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all, tables=[users, revoked_families])
        user = uuid.uuid4()
        await conn.execute(
            users.insert().values(
                id=user, username="u", password_hash="x", created_at=datetime.now(UTC)
            )
        )
    try:
        yield AuthStore(engine), user, engine
    finally:
        await engine.dispose()


async def _read_all(s: AuthStore, after: int | None, since: datetime, limit: int) -> list[str]:
    """Every page from `after`, as the families' ids in order."""
    found: list[str] = []
    while True:
        page = await s.revoked_page(after, since, limit)
        found += [str(r.family_id) for r in page.families]
        after = page.last
        if not page.more:
            return found


async def test_pages_follow_commit_order_and_a_late_commit_with_an_early_time_is_not_skipped(
    store: tuple[AuthStore, uuid.UUID, AsyncEngine],
) -> None:
    s, user, _ = store
    now = datetime.now(UTC)
    since = now - timedelta(minutes=16)
    families = [uuid.uuid4() for _ in range(7)]
    for i, family in enumerate(families[:5]):
        await s.revoke_family(family, user, now + timedelta(seconds=i), "revoke")
    assert await _read_all(s, None, since, 2) == [str(f) for f in families[:5]]
    first = await s.revoked_page(None, since, 2)
    assert (len(first.families), first.more) == (2, True)
    caught_up = await s.revoked_page(first.last, since, 10)
    assert (len(caught_up.families), caught_up.more) == (3, False)

    # Revocations that took their time on another replica (or whose replica's clock is
    # behind) commit with a time before those already read: a cursor on time would
    # skip them; the number comes from the commit.
    await s.revoke_family(families[5], user, now - timedelta(seconds=30), "revoke")
    await s.revoke_family(families[6], user, now - timedelta(seconds=60), "reuse")
    assert await _read_all(s, caught_up.last, since, 1) == [str(f) for f in families[5:]]
    # Revoking again changes nothing, and a caught-up reader hears of nothing new.
    assert not await s.revoke_family(families[0], user, now, "revoke")
    latest = await s.revoked_page(caught_up.last + 2, since, 10)
    assert (latest.families, latest.more) == ([], False)


async def test_the_first_page_starts_at_the_oldest_unexpired_revocation(
    store: tuple[AuthStore, uuid.UUID, AsyncEngine],
) -> None:
    s, user, _ = store
    now = datetime.now(UTC)
    old, recent = uuid.uuid4(), uuid.uuid4()
    await s.revoke_family(old, user, now - timedelta(hours=2), "revoke")
    await s.revoke_family(recent, user, now, "revoke")
    page = await s.revoked_page(None, now - timedelta(minutes=16), 10)
    assert [r.family_id for r in page.families] == [recent]
    assert (page.last, page.more) == (2, False)
    # A cursor beyond every number (a database restored from an older backup) starts
    # over: it repeats families rather than skip the ones numbered again.
    again = await s.revoked_page(99, now - timedelta(minutes=16), 10)
    assert [r.family_id for r in again.families] == [recent]
    # Nothing unexpired: the cursor still moves to the newest number.
    empty = await s.revoked_page(None, now + timedelta(hours=1), 10)
    assert (empty.families, empty.last) == ([], 2)


def test_page_tokens_are_checked() -> None:
    assert _revoked_after("") is None
    assert _revoked_after("r1.42") == 42
    assert _revoked_after(f"r1.{2**63 - 1}") == 2**63 - 1
    # Past a bigint, and past what int() takes (4,300 digits): refused, not INTERNAL.
    for bad in ("42", "r1.", "r1.-1", "r1.4x", "r2.42", "r1.٤٢", f"r1.{2**63}", "r1." + "9" * 5000):
        with pytest.raises(InvalidInput):
            _revoked_after(bad)
