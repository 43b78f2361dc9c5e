"""AuthService defences against real PostgreSQL: throttles, the password blocklist, the
refresh reuse interval, revoked families and the bounded password-check queue."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from structlog.testing import capture_logs

from fairlane.auth.v1 import auth_pb2, auth_pb2_grpc
from fairlane.client.errors import retry_delay_ms
from fairlane_server.auth.service import AuthService
from fairlane_server.auth.throttle_store import Claim, ThrottleStore
from fairlane_server.core.db import migrate
from fairlane_server.core.settings import Settings
from tests.conftest import DATABASE_URL, unique
from tests.e2e.suite import wait_until

pytestmark = pytest.mark.integration
PASSWORD = "correct horse battery"


@dataclass
class Running:
    service: AuthService
    stub: auth_pb2_grpc.AuthServiceStub


Start = Callable[..., Awaitable[Running]]


@pytest.fixture
async def start_auth(pg_schema: str) -> AsyncIterator[Start]:
    """Starts auth replicas on one schema, with settings overridden per test."""
    started: list[tuple[AuthService, grpc.aio.Channel]] = []

    async def start(database_url: str = DATABASE_URL, **overrides: Any) -> Running:
        values: dict[str, Any] = {
            "database_url": database_url,
            "database_schema": pg_schema if database_url == DATABASE_URL else "",
            "auth_listen": "127.0.0.1:0",
            "service_secret": "the-secret",
            # Addresses come from x-forwarded-for, as behind a load balancer.
            "trusted_proxies": ["127.0.0.0/8"],
        }
        values.update(overrides)
        service = AuthService(Settings(**values))
        await service.start()
        channel = grpc.aio.insecure_channel(service.address)
        started.append((service, channel))
        return Running(service, auth_pb2_grpc.AuthServiceStub(channel))

    try:
        yield start
    finally:
        for service, channel in started:
            await channel.close()
            await service.stop(1)


def _from(address: str) -> tuple[tuple[str, str]]:
    return (("x-forwarded-for", address),)


@dataclass(frozen=True)
class Outcome:
    code: str
    message: str
    retry_info: bool


async def _outcome(call: Awaitable[object]) -> Outcome:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return Outcome(exc.code().name, exc.details() or "", retry_delay_ms(exc) is not None)
    return Outcome("OK", "", False)


def _login(
    stub: auth_pb2_grpc.AuthServiceStub, name: str, password: str, address: str = "198.51.100.1"
) -> Awaitable[auth_pb2.LoginResponse]:
    return stub.Login(  # type: ignore[no-any-return]
        auth_pb2.LoginRequest(username=name, password=password), metadata=_from(address)
    )


async def _register(stub: auth_pb2_grpc.AuthServiceStub, prefix: str) -> str:
    name = unique(prefix)
    await stub.Register(
        auth_pb2.RegisterRequest(username=name, password=PASSWORD), metadata=_from("192.0.2.9")
    )
    return name


UNAUTHENTICATED = Outcome("UNAUTHENTICATED", "wrong username or password", False)


async def test_failed_logins_block_a_username_alike_for_known_and_unknown_users(
    start_auth: Start,
) -> None:
    auth = await start_auth(login_user_free_failures=3, throttle_base_delay_seconds=120)
    known = await _register(auth.stub, "known")
    unknown = unique("unknown")

    with capture_logs() as logs:
        outcomes = {
            name: [await _outcome(_login(auth.stub, name, "wrong password!")) for _ in range(5)]
            for name in (known, unknown)
        }
    # Three free failures, a fourth that starts a block, then refusals with RetryInfo:
    # the same for a user that exists and one that does not.
    assert outcomes[known][:4] == [UNAUTHENTICATED] * 4
    assert outcomes[known][4].code == "RESOURCE_EXHAUSTED"
    assert outcomes[known][4].retry_info
    assert outcomes[known] == outcomes[unknown]
    # While blocked, even the right password is refused without being checked.
    assert (await _outcome(_login(auth.stub, known, PASSWORD))).code == "RESOURCE_EXHAUSTED"

    failed = [e for e in logs if e["event"] == "auth.login.failed"]
    assert [(e["username"], e["user_known"]) for e in failed] == [(known, True)] * 4 + [
        (unknown, False)
    ] * 4
    trips = [e for e in logs if e["event"] == "auth.throttle.tripped"]
    assert [(e["rule"], e["username"], e["blocked_for_s"]) for e in trips] == [
        ("login-user", known, 120.0),
        ("login-user", unknown, 120.0),
    ]
    assert all(e["audit"] is True and e["peer"] == "198.51.100.1" for e in failed + trips)


async def test_a_successful_login_restarts_the_username_count(start_auth: Start) -> None:
    auth = await start_auth(login_user_free_failures=3, throttle_base_delay_seconds=120)
    name = await _register(auth.stub, "forgetful")
    for _ in range(3):
        for _ in range(2):
            assert await _outcome(_login(auth.stub, name, "not it at all")) == UNAUTHENTICATED
        with capture_logs() as logs:
            await _login(auth.stub, name, PASSWORD)
        assert [e["event"] for e in logs] == ["auth.login.succeeded"]


async def test_addresses_that_logged_in_before_are_trusted(start_auth: Start) -> None:
    auth = await start_auth()
    name = await _register(auth.stub, "returning")
    assert not await auth.service.throttle.trusted("198.51.100.77")
    await _outcome(_login(auth.stub, name, "wrong password!", "198.51.100.77"))
    assert not await auth.service.throttle.trusted("198.51.100.77")
    await _login(auth.stub, name, PASSWORD, "198.51.100.77")
    assert await auth.service.throttle.trusted("198.51.100.77")
    assert not await auth.service.throttle.trusted("198.51.100.78")


async def test_failures_from_one_address_block_that_address_only(start_auth: Start) -> None:
    auth = await start_auth(login_peer_free_failures=3, throttle_base_delay_seconds=120)
    name = await _register(auth.stub, "bystander")
    for i in range(4):
        outcome = await _outcome(_login(auth.stub, unique(f"guess{i}"), "guess", "203.0.113.5"))
        assert outcome == UNAUTHENTICATED
    blocked = await _outcome(_login(auth.stub, name, PASSWORD, "203.0.113.5"))
    assert (blocked.code, blocked.retry_info) == ("RESOURCE_EXHAUSTED", True)
    await _login(auth.stub, name, PASSWORD, "203.0.113.6")


async def test_limits_hold_across_replicas(start_auth: Start) -> None:
    first = await start_auth(login_user_free_failures=2, throttle_base_delay_seconds=120)
    second = await start_auth(login_user_free_failures=2, throttle_base_delay_seconds=120)
    name = await _register(first.stub, "shared")
    for stub in (first.stub, second.stub, first.stub):
        assert await _outcome(_login(stub, name, "wrong again")) == UNAUTHENTICATED
    assert (await _outcome(_login(second.stub, name, PASSWORD))).code == "RESOURCE_EXHAUSTED"


async def test_register_and_service_tokens_are_throttled_per_address(start_auth: Start) -> None:
    auth = await start_auth(
        register_peer_free=2, service_token_peer_free_failures=2, throttle_base_delay_seconds=120
    )

    def register(address: str) -> Awaitable[object]:
        request = auth_pb2.RegisterRequest(username=unique("reg"), password=PASSWORD)
        return auth.stub.Register(request, metadata=_from(address))  # type: ignore[no-any-return]

    assert [(await _outcome(register("198.51.100.7"))).code for _ in range(4)] == [
        "OK",
        "OK",
        "OK",  # the third starts the block
        "RESOURCE_EXHAUSTED",
    ]
    assert (await _outcome(register("198.51.100.8"))).code == "OK"

    def service_token(secret: str) -> Awaitable[object]:
        request = auth_pb2.IssueServiceTokenRequest(service="worker", secret=secret)
        return auth.stub.IssueServiceToken(  # type: ignore[no-any-return]
            request, metadata=_from("198.51.100.9")
        )

    codes = [(await _outcome(service_token("guess"))).code for _ in range(3)]
    assert codes == ["UNAUTHENTICATED"] * 3
    refused = await _outcome(service_token("the-secret"))
    assert (refused.code, refused.retry_info) == ("RESOURCE_EXHAUSTED", True)


@pytest.mark.parametrize("password", ["password", "12345678", "qwertyuiop", "iloveyou2"])
async def test_common_and_breached_passwords_are_refused(start_auth: Start, password: str) -> None:
    auth = await start_auth()
    refused = await _outcome(
        auth.stub.Register(auth_pb2.RegisterRequest(username=unique("weak"), password=password))
    )
    assert refused.code == "INVALID_ARGUMENT"
    assert "password is too common or easy to guess" in refused.message


async def test_a_password_made_of_the_username_is_refused(start_auth: Start) -> None:
    auth = await start_auth()
    name = unique("margaret")
    refused = await _outcome(
        auth.stub.Register(auth_pb2.RegisterRequest(username=name, password=f"{name}1"))
    )
    assert refused.code == "INVALID_ARGUMENT"


async def test_concurrent_refreshes_share_one_pair_and_a_late_reuse_revokes(
    start_auth: Start,
) -> None:
    interval = 1.0
    auth = await start_auth(refresh_reuse_interval_seconds=interval)
    name = await _register(auth.stub, "twoprocs")
    login = await _login(auth.stub, name, PASSWORD)
    request = auth_pb2.RefreshRequest(refresh_token=login.refresh_token)

    with capture_logs() as logs:
        pairs = await asyncio.gather(*(auth.stub.Refresh(request) for _ in range(8)))
    assert {(p.access_token, p.refresh_token) for p in pairs} == {
        (pairs[0].access_token, pairs[0].refresh_token)
    }
    assert pairs[0].refresh_token != login.refresh_token
    assert [e["event"] for e in logs].count("auth.refresh.reuse_tolerated") == 7

    # The interval is a duration: let it pass, then the same token is a replay.
    await asyncio.sleep(interval + 0.2)
    with capture_logs() as logs:
        replay = await _outcome(auth.stub.Refresh(request))
    assert replay.code == "UNAUTHENTICATED"
    assert "revoked" in replay.message
    assert [e["event"] for e in logs] == ["auth.family.revoked_on_reuse"]
    newest = auth_pb2.RefreshRequest(refresh_token=pairs[0].refresh_token)
    assert (await _outcome(auth.stub.Refresh(newest))).code == "UNAUTHENTICATED"


async def test_a_revoked_login_is_refused_within_the_bound(start_auth: Start) -> None:
    bound = 1.0
    auth = await start_auth(revocation_refresh_seconds=bound)
    name = await _register(auth.stub, "leaving")
    login = await _login(auth.stub, name, PASSWORD)
    other = await _login(auth.stub, name, PASSWORD)
    family = jwt.decode(login.access_token, options={"verify_signature": False})["fam"]

    def whoami(token: str) -> Awaitable[object]:
        return auth.stub.WhoAmI(  # type: ignore[no-any-return]
            auth_pb2.WhoAmIRequest(), metadata=(("authorization", f"Bearer {token}"),)
        )

    assert (await _outcome(whoami(login.access_token))).code == "OK"
    with capture_logs() as logs:
        await auth.stub.Revoke(auth_pb2.RevokeRequest(refresh_token=login.refresh_token))
    assert [(e["event"], e["family_id"]) for e in logs] == [("auth.token.revoked", family)]
    listed = await auth.stub.GetRevokedFamilies(auth_pb2.GetRevokedFamiliesRequest())
    assert family in listed.family_ids

    async def refused() -> bool:
        outcome = await _outcome(whoami(login.access_token))
        return outcome == Outcome("UNAUTHENTICATED", "access token revoked: log in again", False)

    await wait_until(refused, timeout=bound + 5)
    assert (await _outcome(whoami(other.access_token))).code == "OK"


async def test_password_checks_are_bounded_and_do_not_hold_up_other_calls(
    start_auth: Start,
) -> None:
    # One slow hash at a time, one waiting: a third concurrent login is refused.
    auth = await start_auth(
        hash_concurrency=1, hash_queue_limit=1, argon2_time_cost=12, argon2_memory_kib=65536
    )
    name = await _register(auth.stub, "patient")
    earlier = await _login(auth.stub, name, PASSWORD)
    logins = [
        asyncio.ensure_future(_outcome(_login(auth.stub, name, PASSWORD, f"192.0.2.{i}")))
        for i in range(3)
    ]
    await wait_until(lambda: _true(auth.service.hashing.pending == 2))
    # Calls that need no hash are answered while the hashes run.
    await auth.stub.GetJwks(auth_pb2.GetJwksRequest())
    await auth.stub.Refresh(auth_pb2.RefreshRequest(refresh_token=earlier.refresh_token))
    assert auth.service.hashing.pending == 2
    outcomes = await asyncio.gather(*logins)
    assert sorted(o.code for o in outcomes) == ["OK", "OK", "RESOURCE_EXHAUSTED"]
    busy = next(o for o in outcomes if o.code != "OK")
    assert busy.retry_info
    assert "too many password checks" in busy.message


async def _true(value: bool) -> bool:
    return value


async def test_throttles_work_on_the_embedded_database(start_auth: Start, tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/auth.db"
    await migrate(url)
    auth = await start_auth(url, login_user_free_failures=1, throttle_base_delay_seconds=120)
    name = await _register(auth.stub, "embedded")
    for _ in range(2):
        assert await _outcome(_login(auth.stub, name, "wrong one")) == UNAUTHENTICATED
    assert (await _outcome(_login(auth.stub, name, PASSWORD))).code == "RESOURCE_EXHAUSTED"
    # Rotation, the reuse interval and revocation on SQLite too.
    login = await _login(auth.stub, await _register(auth.stub, "embedded"), PASSWORD)
    request = auth_pb2.RefreshRequest(refresh_token=login.refresh_token)
    first, second = await asyncio.gather(auth.stub.Refresh(request), auth.stub.Refresh(request))
    assert first.refresh_token == second.refresh_token
    await auth.stub.Revoke(auth_pb2.RevokeRequest(refresh_token=first.refresh_token))
    family = jwt.decode(first.access_token, options={"verify_signature": False})["fam"]
    listed = await auth.stub.GetRevokedFamilies(auth_pb2.GetRevokedFamiliesRequest())
    assert list(listed.family_ids) == [family]


async def test_prune_keeps_blocks_and_recent_trust(start_auth: Start) -> None:
    auth = await start_auth()
    store = ThrottleStore(auth.service.engine)
    now = datetime.now(UTC)
    hours, days = timedelta(hours=2), timedelta(days=31)
    earlier, window = now - hours, timedelta(hours=1)
    await store.claim([Claim("login-user:stale", 5, [now])], earlier, earlier - window)
    # No free events: the first one blocks, for longer than the window.
    blocked = Claim("login-user:blocked", 0, [now + timedelta(minutes=5)])
    await store.claim([blocked], earlier, earlier - window)
    await store.claim([Claim("login-user:recent", 5, [now])], now, now - window)
    await store.settle(
        clear=None, touch=["login-ok:recent-trust", "login-ok-pair:recent"], now=now - hours
    )
    await store.settle(
        clear=None, touch=["login-ok:old-trust", "login-ok-pair:old"], now=now - days
    )
    await auth.service.throttle.prune()
    left = await store.read(
        [
            "login-user:stale",
            "login-user:blocked",
            "login-user:recent",
            "login-ok:recent-trust",
            "login-ok:old-trust",
            "login-ok-pair:recent",
            "login-ok-pair:old",
        ]
    )
    assert sorted(left) == [
        "login-ok-pair:recent",
        "login-ok:recent-trust",
        "login-user:blocked",
        "login-user:recent",
    ]


async def test_service_tokens_are_audited(start_auth: Start) -> None:
    auth = await start_auth()
    with capture_logs() as logs:
        await auth.stub.IssueServiceToken(
            auth_pb2.IssueServiceTokenRequest(
                service="operator", secret="the-secret", role=auth_pb2.SERVICE_TOKEN_ROLE_ADMIN
            ),
            metadata=_from("198.51.100.30"),
        )
        await _outcome(
            auth.stub.IssueServiceToken(
                auth_pb2.IssueServiceTokenRequest(service="worker", secret="nope"),
                metadata=_from("198.51.100.31"),
            )
        )
    seen = [(e["event"], e["token_service"], e.get("token_role"), e["peer"]) for e in logs]
    assert all(e["principal"] is None for e in logs)
    assert seen == [
        ("auth.service_token.issued", "operator", "admin", "198.51.100.30"),
        ("auth.service_token.refused", "worker", None, "198.51.100.31"),
    ]


async def _parallel_wrong_logins(
    stubs: list[auth_pb2_grpc.AuthServiceStub], names: list[str], addresses: list[str]
) -> list[str]:
    calls = [
        _outcome(_login(stubs[i % len(stubs)], name, f"wrong guess {i}", address))
        for i, (name, address) in enumerate(zip(names, addresses, strict=True))
    ]
    return [o.code for o in await asyncio.gather(*calls)]


async def test_parallel_guesses_at_one_username_get_only_the_free_failures(
    start_auth: Start,
) -> None:
    # Two replicas, 40 guesses at once, each from its own address: the count is taken
    # before a password is checked, so only the free failures and the one that starts the
    # block are checked; the others are refused unchecked, whichever replica they reach.
    settings = {"login_user_free_failures": 5, "throttle_base_delay_seconds": 120}
    first, second = await start_auth(**settings), await start_auth(**settings)
    name = await _register(first.stub, "besieged")
    with capture_logs() as logs:
        codes = await _parallel_wrong_logins(
            [first.stub, second.stub], [name] * 40, [f"198.51.100.{100 + i}" for i in range(40)]
        )
    assert codes.count("UNAUTHENTICATED") == 6, codes
    assert codes.count("RESOURCE_EXHAUSTED") == 34, codes
    assert [e["event"] for e in logs].count("auth.login.failed") == 6
    trips = [(e["rule"], e["events"]) for e in logs if e["event"] == "auth.throttle.tripped"]
    assert trips == [("login-user", 6)]
    # Blocked: the right password is refused unchecked too.
    assert (await _outcome(_login(first.stub, name, PASSWORD))).code == "RESOURCE_EXHAUSTED"


async def test_parallel_guesses_from_one_address_get_only_the_free_failures(
    start_auth: Start,
) -> None:
    auth = await start_auth(login_peer_free_failures=10, throttle_base_delay_seconds=120)
    names = [unique(f"spray{i}") for i in range(40)]
    codes = await _parallel_wrong_logins([auth.stub], names, ["203.0.113.40"] * 40)
    assert codes.count("UNAUTHENTICATED") == 11, codes
    assert codes.count("RESOURCE_EXHAUSTED") == 29, codes


async def test_parallel_wrong_service_secrets_get_only_the_free_failures(
    start_auth: Start,
) -> None:
    auth = await start_auth(service_token_peer_free_failures=2, throttle_base_delay_seconds=120)

    def service_token(secret: str) -> Awaitable[object]:
        request = auth_pb2.IssueServiceTokenRequest(service="worker", secret=secret)
        return auth.stub.IssueServiceToken(  # type: ignore[no-any-return]
            request, metadata=_from("198.51.100.60")
        )

    # The right secret gives its event back, so these cost nothing.
    for _ in range(3):
        assert (await _outcome(service_token("the-secret"))).code == "OK"
    outcomes = await asyncio.gather(*(_outcome(service_token(f"guess {i}")) for i in range(20)))
    codes = [o.code for o in outcomes]
    assert (codes.count("UNAUTHENTICATED"), codes.count("RESOURCE_EXHAUSTED")) == (3, 17)


async def test_successful_logins_do_not_count_against_their_address(start_auth: Start) -> None:
    auth = await start_auth(login_peer_free_failures=2, throttle_base_delay_seconds=120)
    name = await _register(auth.stub, "officemate")
    # Counted while their passwords are checked, given back when they succeed.
    await asyncio.gather(*(_login(auth.stub, name, PASSWORD, "203.0.113.70") for _ in range(2)))
    for _ in range(4):
        await _login(auth.stub, name, PASSWORD, "203.0.113.70")
    others = [unique(f"other{i}") for i in range(4)]
    codes = [(await _outcome(_login(auth.stub, n, "nope", "203.0.113.70"))).code for n in others]
    assert codes == ["UNAUTHENTICATED"] * 3 + ["RESOURCE_EXHAUSTED"]


async def test_known_pairs_pass_a_blocked_shared_address_and_a_burst_of_them_is_not_refused(
    start_auth: Start,
) -> None:
    """One address for a whole office (a NAT): a guesser or a colleague's typos there block
    the address for usernames that never logged in from it, not for those that did; and
    many of those logging in at once are not refused as if they were failures."""
    office = "203.0.113.80"
    auth = await start_auth(
        login_peer_free_failures=3, login_user_free_failures=2, throttle_base_delay_seconds=120
    )
    staff = [await _register(auth.stub, f"staff{i}") for i in range(25)]
    for name in staff:  # each logs in once from the office
        await _login(auth.stub, name, PASSWORD, office)
    newcomer = await _register(auth.stub, "newcomer")
    guesses = [unique(f"guess{i}") for i in range(4)]
    codes = [(await _outcome(_login(auth.stub, n, "guess", office))).code for n in guesses]
    assert codes == ["UNAUTHENTICATED"] * 4  # the 4th started the address's block
    assert (await _outcome(_login(auth.stub, newcomer, PASSWORD, office))).code == (
        "RESOURCE_EXHAUSTED"
    )
    # 25 known pairs at once (more than the address has free failures): all in.
    outcomes = await asyncio.gather(
        *(_outcome(_login(auth.stub, n, PASSWORD, office)) for n in staff)
    )
    assert [o.code for o in outcomes] == ["OK"] * 25
    # A colleague's typos: not refused by the address block, not adding to it; their own
    # username's rule still counts them (2 free, the 3rd starts its block).
    typo = staff[0]
    codes = [
        (await _outcome(_login(auth.stub, typo, "fat fingers", office))).code for _ in range(3)
    ]
    assert codes == ["UNAUTHENTICATED"] * 3
    assert (await _outcome(_login(auth.stub, typo, PASSWORD, office))).code == "RESOURCE_EXHAUSTED"
    assert (await _outcome(_login(auth.stub, staff[1], PASSWORD, office))).code == "OK"
    # Known at the office is not known elsewhere.
    elsewhere = "198.51.100.200"
    for n in guesses:
        await _outcome(_login(auth.stub, n, "guess", elsewhere))
    assert (await _outcome(_login(auth.stub, staff[1], PASSWORD, elsewhere))).code == (
        "RESOURCE_EXHAUSTED"
    )


async def test_after_the_block_the_right_password_logs_in_and_restarts_the_count(
    start_auth: Start,
) -> None:
    delay = 1.0
    auth = await start_auth(login_user_free_failures=2, throttle_base_delay_seconds=delay)
    name = await _register(auth.stub, "patient2")
    addresses = [f"198.51.100.{150 + i}" for i in range(10)]
    codes = await _parallel_wrong_logins([auth.stub], [name] * 10, addresses)
    assert (codes.count("UNAUTHENTICATED"), codes.count("RESOURCE_EXHAUSTED")) == (3, 7)
    assert (await _outcome(_login(auth.stub, name, PASSWORD))).code == "RESOURCE_EXHAUSTED"
    await asyncio.sleep(delay + 0.2)
    await _login(auth.stub, name, PASSWORD)
    # A fresh count: two free failures, a third that starts a block, then refusals.
    codes = [(await _outcome(_login(auth.stub, name, "still wrong"))).code for _ in range(4)]
    assert codes == ["UNAUTHENTICATED"] * 3 + ["RESOURCE_EXHAUSTED"]


async def test_parallel_guesses_are_limited_on_the_embedded_database(
    start_auth: Start, tmp_path: Path
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/auth.db"
    await migrate(url)
    auth = await start_auth(url, login_user_free_failures=3, throttle_base_delay_seconds=120)
    name = await _register(auth.stub, "embedded")
    addresses = [f"198.51.100.{200 + i}" for i in range(20)]
    codes = await _parallel_wrong_logins([auth.stub], [name] * 20, addresses)
    assert (codes.count("UNAUTHENTICATED"), codes.count("RESOURCE_EXHAUSTED")) == (4, 16)


async def test_a_login_refused_for_a_full_check_queue_does_not_count(start_auth: Start) -> None:
    auth = await start_auth(
        hash_concurrency=1,
        hash_queue_limit=1,
        argon2_time_cost=12,
        argon2_memory_kib=65536,
        login_user_free_failures=3,
        throttle_base_delay_seconds=120,
    )
    name = await _register(auth.stub, "crowded")
    logins = [
        asyncio.ensure_future(_outcome(_login(auth.stub, name, "wrong!", f"192.0.2.{50 + i}")))
        for i in range(3)
    ]
    codes = sorted(o.code for o in await asyncio.gather(*logins))
    assert codes == ["RESOURCE_EXHAUSTED", "UNAUTHENTICATED", "UNAUTHENTICATED"]
    # Two failures counted, not three: one more is free, the next starts the block.
    later = [(await _outcome(_login(auth.stub, name, "wrong!"))).code for _ in range(3)]
    assert later == ["UNAUTHENTICATED", "UNAUTHENTICATED", "RESOURCE_EXHAUSTED"]
