"""TokenManager: the login's tokens, refreshed before they expire and once after a refusal.

The auth half of the client (after httpx's auth flows): it decides when a token must be
refreshed and makes concurrent callers share one refresh, while the refresh call itself
is handed in (`exchange`), so the manager does no I/O of its own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable

from fairlane.client.errors import NotLoggedIn, Unauthenticated
from fairlane.client.types import Tokens

__all__ = ["Exchange", "TokenListener", "TokenManager"]

TokenListener = Callable[[Tokens | None], None]
"""Told the new Tokens after every login and refresh, and None after logout."""

Exchange = Callable[[str], Awaitable[Tokens]]
"""Trades a refresh token for new tokens (AuthService.Refresh); raises Unauthenticated
when the refresh token is spent, expired or revoked."""


class TokenManager:
    """Holds the current Tokens and refreshes them.

    - `access_token()` refreshes first when the token expires within `refresh_margin`
      seconds (default: a fifth of its lifetime, at most 60 s).
    - `refresh_if_current(stale)` is for a call refused with UNAUTHENTICATED: it refreshes
      unless another caller already replaced `stale`, so a burst of refusals costs one
      refresh (refresh tokens rotate: a second use of the same one revokes the login).
    """

    def __init__(
        self,
        exchange: Exchange,
        tokens: Tokens | None = None,
        *,
        on_tokens: TokenListener | None = None,
        refresh_margin: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._exchange = exchange
        self._tokens = tokens
        self._on_tokens = on_tokens
        self._refresh_margin = refresh_margin
        self._clock = clock
        self._lock = asyncio.Lock()

    @property
    def tokens(self) -> Tokens | None:
        """The current tokens, or None before login."""
        return self._tokens

    def set(self, tokens: Tokens | None) -> None:
        """Replaces the tokens and tells the listener."""
        self._tokens = tokens
        if self._on_tokens is not None:
            self._on_tokens(tokens)

    def margin(self, tokens: Tokens) -> float:
        if self._refresh_margin is not None:
            return self._refresh_margin
        return min(60.0, tokens.lifetime / 5)

    async def access_token(self) -> str:
        """A valid access token, refreshed first if it is about to expire."""
        tokens = self._tokens
        if tokens is None:
            raise NotLoggedIn("not logged in")
        if tokens.refresh_token and tokens.expires_within(self.margin(tokens), self._clock()):
            await self.refresh_if_current(tokens.access_token)
            tokens = self._tokens
            if tokens is None:
                raise NotLoggedIn("not logged in")
        return tokens.access_token

    async def refresh_if_current(self, stale: str) -> bool:
        """Refreshes unless `stale` was already replaced; False when there is no refresh
        token to use (the caller should give up)."""
        async with self._lock:
            current = self._tokens
            if current is None or not current.refresh_token:
                return False
            if current.access_token != stale:
                return True  # another caller refreshed meanwhile
            try:
                fresh = await self._exchange(current.refresh_token)
            except Unauthenticated as exc:
                raise Unauthenticated(
                    f"the login has expired or was revoked, log in again ({exc.message})"
                ) from exc
            self.set(dataclasses.replace(fresh, username=fresh.username or current.username))
            return True

    async def refresh(self) -> Tokens:
        """Refreshes now, whatever the expiry."""
        tokens = self._tokens
        if tokens is None or not tokens.refresh_token:
            raise NotLoggedIn("not logged in")
        await self.refresh_if_current(tokens.access_token)
        if self._tokens is None:
            raise NotLoggedIn("not logged in")
        return self._tokens
