"""TokenManager: when tokens are refreshed, and that concurrent callers share one refresh."""

from __future__ import annotations

import asyncio

import pytest

from fairlane.client import NotLoggedIn, Tokens, Unauthenticated
from fairlane.client.tokens import TokenManager

NOW = 1_000_000.0


class Exchange:
    """Stands in for AuthService.Refresh: numbered tokens, optionally held or refused."""

    def __init__(self, *, refuse: bool = False) -> None:
        self.spent: list[str] = []
        self.refuse = refuse
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self, refresh_token: str) -> Tokens:
        self.spent.append(refresh_token)
        await self.gate.wait()
        if self.refuse:
            raise Unauthenticated("refresh token revoked")
        n = len(self.spent)
        return Tokens(f"access-{n}", f"refresh-{n}", NOW + 900, 900)


def tokens(expires_in: float, lifetime: float = 900) -> Tokens:
    return Tokens("access-0", "refresh-0", NOW + expires_in, lifetime, "alice")


async def test_access_token_is_refreshed_inside_the_margin_only() -> None:
    exchange = Exchange()
    told: list[Tokens | None] = []
    # Default margin: a fifth of the lifetime, at most 60 s (here 900 / 5 > 60).
    manager = TokenManager(exchange, tokens(61), on_tokens=told.append, clock=lambda: NOW)
    assert await manager.access_token() == "access-0"
    assert exchange.spent == []

    manager.set(tokens(59))
    assert await manager.access_token() == "access-1"
    assert exchange.spent == ["refresh-0"]
    assert manager.tokens is not None
    assert manager.tokens.username == "alice"  # kept: Refresh does not name the user
    assert told[-1] == manager.tokens

    # A 100 s token: the margin is 20 s.
    short = TokenManager(exchange, tokens(21, lifetime=100), clock=lambda: NOW)
    assert await short.access_token() == "access-0"
    short.set(tokens(19, lifetime=100))
    assert await short.access_token() == "access-2"
    explicit = TokenManager(exchange, tokens(29), refresh_margin=30, clock=lambda: NOW)
    assert await explicit.access_token() == "access-3"
    assert len(exchange.spent) == 3


async def test_a_burst_of_refusals_costs_one_refresh() -> None:
    exchange = Exchange()
    exchange.gate.clear()
    manager = TokenManager(exchange, tokens(600), clock=lambda: NOW)
    callers = [asyncio.create_task(manager.refresh_if_current("access-0")) for _ in range(5)]
    await asyncio.sleep(0)
    exchange.gate.set()
    assert await asyncio.gather(*callers) == [True] * 5
    assert exchange.spent == ["refresh-0"]
    # A caller that still holds the replaced token does not refresh again.
    assert await manager.refresh_if_current("access-0")
    assert exchange.spent == ["refresh-0"]


async def test_without_tokens_or_refresh_token_it_says_so() -> None:
    exchange = Exchange()
    manager = TokenManager(exchange, clock=lambda: NOW)
    with pytest.raises(NotLoggedIn):
        await manager.access_token()
    with pytest.raises(NotLoggedIn):
        await manager.refresh()
    assert not await manager.refresh_if_current("anything")
    manager.set(Tokens("access-x", "", NOW - 10, 900))
    # An expired token without a refresh token is used as is: the server decides.
    assert await manager.access_token() == "access-x"
    assert not await manager.refresh_if_current("access-x")
    assert exchange.spent == []


async def test_a_refused_refresh_asks_to_log_in_again() -> None:
    told: list[Tokens | None] = []
    manager = TokenManager(
        Exchange(refuse=True), tokens(600), on_tokens=told.append, clock=lambda: NOW
    )
    with pytest.raises(Unauthenticated, match=r"log in again \(refresh token revoked\)"):
        await manager.refresh()
    assert told == []
    assert manager.tokens == tokens(600)


async def test_set_none_is_told_to_the_listener() -> None:
    told: list[Tokens | None] = []
    manager = TokenManager(Exchange(), tokens(600), on_tokens=told.append)
    manager.set(None)
    assert told == [None]
    assert manager.tokens is None
