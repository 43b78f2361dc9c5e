"""Auth rules without I/O: throttle delays, client addresses, successor sealing, the
password blocklist and the revoked-families cache."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from fairlane_server.auth.hashing import HashGate, HashingBusy
from fairlane_server.auth.passwords import WeakPassword, check_new_password
from fairlane_server.auth.sealing import seal, unseal
from fairlane_server.auth.throttle import Rule, Throttle
from fairlane_server.auth.throttle_store import ThrottleStore
from fairlane_server.core.peer import client_address, parse_networks
from fairlane_server.core.revocation import RevokedFamilies, RevokedPage


def test_delays_double_after_the_free_events_up_to_the_cap() -> None:
    # The engine is never connected: delays are pure arithmetic.
    store = ThrottleStore(create_async_engine("sqlite+aiosqlite://"))
    throttle = Throttle(store, window=3600, base_delay=1.0, max_delay=60.0)
    rule = Rule("login-user", free=3)
    assert [throttle.delay(rule, n) for n in range(1, 11)] == [
        0.0,
        0.0,
        0.0,
        1.0,
        2.0,
        4.0,
        8.0,
        16.0,
        32.0,
        60.0,
    ]
    assert throttle.delay(rule, 10**6) == 60.0


class FakeContext:
    def __init__(self, peer: str, metadata: Sequence[tuple[str, str]] = ()) -> None:
        self._peer = peer
        self._metadata = tuple(metadata)

    def peer(self) -> str:
        return self._peer

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata


PROXIES = parse_networks(["10.0.0.0/8", "fd00::/8"])


@pytest.mark.parametrize(
    ("peer", "forwarded", "expected"),
    [
        ("ipv4:198.51.100.4:5000", [], "198.51.100.4"),
        # x-forwarded-for from a caller that is not a trusted proxy proves nothing.
        ("ipv4:198.51.100.4:5000", ["203.0.113.9"], "198.51.100.4"),
        ("ipv4:10.1.2.3:5000", ["203.0.113.9"], "203.0.113.9"),
        # The client may prepend anything; the rightmost untrusted hop counts.
        ("ipv4:10.1.2.3:5000", ["1.1.1.1, 203.0.113.9, 10.0.0.7"], "203.0.113.9"),
        ("ipv4:10.1.2.3:5000", ["garbage, 203.0.113.9"], "203.0.113.9"),
        ("ipv4:10.1.2.3:5000", [], "10.1.2.3"),
        # IPv6 clients are grouped by /64.
        ("ipv6:[2001:db8:1:2:3:4:5:6]:5000", [], "2001:db8:1:2::/64"),
        ("ipv6:[::ffff:198.51.100.4]:5000", [], "198.51.100.4"),
        ("ipv6:[fd00::1]:5000", ["2001:db8::9"], "2001:db8::/64"),
        ("unix:/tmp/socket", [], "unknown"),
    ],
)
def test_client_address(peer: str, forwarded: list[str], expected: str) -> None:
    context = FakeContext(peer, [("x-forwarded-for", f) for f in forwarded])
    assert client_address(context, PROXIES) == expected


def test_a_sealed_successor_opens_only_with_the_spent_token() -> None:
    pair: dict[str, str | int] = {"access_token": "a", "refresh_token": "r", "expires_in": 900}
    sealed = seal("spent-token", pair)
    assert unseal("spent-token", sealed) == pair
    assert unseal("another-token", sealed) is None
    assert b"refresh_token" not in sealed


@pytest.mark.parametrize(
    "password",
    ["password", "12345678", "Password1", "qwertyuiop", "p4ssw0rd!", "fairlane2024", "bob12345"],
)
def test_blocklisted_passwords(password: str) -> None:
    with pytest.raises(WeakPassword, match="too common or easy to guess"):
        check_new_password(password, username="bob", min_length=8)


@pytest.mark.parametrize(
    "password", ["correct horse battery", "fairlane-bench-password", "x7#kQ!m2Lp", "éé ü☃ 9k ñ"]
)
def test_passwords_that_pass(password: str) -> None:
    check_new_password(password, username="bob", min_length=8)


def test_length_rules_come_first() -> None:
    with pytest.raises(WeakPassword, match="at least 8"):
        check_new_password("short", username="bob", min_length=8)
    with pytest.raises(WeakPassword, match="at most 1024"):
        check_new_password("long enough " * 200, username="bob", min_length=8)


async def test_revoked_families_are_refetched_when_stale_and_kept_when_auth_fails() -> None:
    lists: list[list[str] | Exception] = [["a"], ["a", "b"], RuntimeError("auth down")]
    calls = 0

    async def fetch(token: str, size: int) -> RevokedPage:
        nonlocal calls
        item = lists[min(calls, len(lists) - 1)]
        calls += 1
        if isinstance(item, Exception):
            raise item
        new = item[len(item) - 1 :] if token else item  # since the last fetch
        return RevokedPage([(f, 10.0**10) for f in new], f"r1.{len(item)}", more_pages=False)

    now = 100.0
    revoked = RevokedFamilies(fetch, max_age=5.0, clock=lambda: now)
    assert await revoked.contains("a")  # first use fetches
    assert not await revoked.contains("b")  # fresh: no fetch
    now += 6
    assert await revoked.contains("b")  # stale: the call waits for the refetch
    now += 6
    assert await revoked.contains("b")  # the fetch failed: the last list stays in force
    assert calls == 3


async def test_the_gate_serves_the_priority_lane_first_and_bounds_waiters() -> None:
    gate = HashGate(concurrency=1, max_waiting=2)
    order: list[str] = []

    async def hold(name: str, priority: bool) -> None:
        await gate.acquire(priority)
        order.append(name)

    await hold("first", False)  # holds the only slot
    waiters = [
        asyncio.ensure_future(hold(name, priority))
        for name, priority in [("guess-1", False), ("guess-2", False), ("returning", True)]
    ]
    await asyncio.sleep(0)
    assert gate.pending == 4
    with pytest.raises(HashingBusy):  # the normal lane's allowance (2) is used up
        await gate.acquire(False)
    late = asyncio.ensure_future(hold("late", True))  # priority callers may queue twice as many
    await asyncio.sleep(0)
    late.cancel()  # a caller that gives up leaves its lane
    for _ in range(3):
        gate.release()
        await asyncio.sleep(0)
    await asyncio.gather(*waiters)
    assert order == ["first", "returning", "guess-1", "guess-2"]
    assert gate.pending == 1


def test_a_line_break_in_a_password_is_judged_not_crashed_on() -> None:
    # The fuzz found it: zxcvbn raised ValueError on a newline after digits.
    check_new_password("6443a4f2-eaf2-4a54-8d3f-e81252b20658\n", username="fail", min_length=8)
    with pytest.raises(WeakPassword):
        check_new_password("password\n", username="someone", min_length=8)
