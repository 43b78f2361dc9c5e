"""Access-token verification shared by every service that takes calls: JWKS cache + PyJWT."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import jwt

from fairlane_server.core.revocation import RevokedFamilies

ALGORITHMS = ["EdDSA", "RS256"]
ROLE_USER = "user"
ROLE_SERVICE = "service"
ROLE_ADMIN = "admin"
# The refresh-token family (one login) a user's access token belongs to.
FAMILY_CLAIM = "fam"


# Why an open stream's login no longer holds (the stream was authenticated when it opened).
REVOKED_ON_STREAM = "login revoked; log in again and open a new stream"


@dataclass(frozen=True, slots=True)
class Principal:
    user_id: str
    username: str
    role: str
    # The token's login family (`fam`), for streams that outlive the check made when they
    # opened. None: not known (not from a token).
    family: str | None = None


class TokenCheck(Protocol):
    """What an open stream asks about the token it was opened with."""

    async def refusal(self, principal: Principal) -> str | None: ...

    def watch(
        self, principal: Principal, on_refused: Callable[[str], None]
    ) -> Callable[[], None]: ...


class InvalidToken(Exception):
    pass


class KeysUnavailable(InvalidToken):
    """No verification key could be had (the auth service is unreachable): the caller
    should retry, its token may be fine."""


class TokenVerifier:
    """Verifies JWTs locally with keys from `fetch_jwks`.

    The keys are refetched when they are older than `refresh_seconds` (that is how a
    retired key stops verifying here), and when a token names a `kid` they do not hold:
    after a rotation, the first token signed with the new key brings it. Such a token
    joins the fetch under way, or begins one; should the fetch it joined have begun
    before the token arrived and lack the key, it waits for one that begins after. At
    most one fetch begins per `min_refetch_seconds` (1 s), and tokens that miss together
    share it. So a token signed with a key auth publishes is verified within
    `min_refetch_seconds` plus two fetches, and a flood of tokens with made-up kids costs
    auth at most one call per `min_refetch_seconds`. When the fetch fails the token is
    refused as KeysUnavailable (UNAVAILABLE: try again), not as unknown: it may be fine.
    With `revoked`, tokens of a revoked login (their `fam` claim) are refused too
    (services/core/revocation.py).
    """

    def __init__(
        self,
        fetch_jwks: Callable[[], Awaitable[str]],
        *,
        issuer: str,
        audience: str,
        refresh_seconds: float = 300.0,
        min_refetch_seconds: float = 1.0,
        revoked: RevokedFamilies | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch_jwks
        self._revoked = revoked
        self._issuer = issuer
        self._audience = audience
        self._refresh = refresh_seconds
        self._min_refetch = min_refetch_seconds
        self._clock = clock
        # kid -> (key, the one algorithm that key verifies).
        self._keys: dict[str, tuple[Any, str]] = {}
        self._fetched_at = -float("inf")
        # The fetch under way (shared by every caller that may use it) and when it began;
        # when the last one began, for the rate limit.
        self._fetching: asyncio.Task[None] | None = None
        self._fetch_began = -float("inf")
        self._last_began = -float("inf")
        self.fetches = 0

    async def refresh(self) -> None:
        """Fetches the keys now, or joins a fetch under way that began no earlier than
        this call (start-up, and auth's own verifier after each reload of its keys)."""
        await self._fetched_since(self._clock(), wait=False)

    async def _fetched_since(self, since: float | None, *, wait: bool = True) -> float:
        """Returns once a fetch that began at or after `since` (any fetch when None) has
        succeeded, with the time it began; raises what it failed with. With `wait`, a new
        fetch begins no sooner than `min_refetch_seconds` after the last one began."""
        while True:
            task = self._fetching
            if task is not None and not task.done():
                began = self._fetch_began
                if since is None or began >= since:
                    # Shielded: a caller that leaves does not end the fetch for the others.
                    await asyncio.shield(task)
                    return began
                # It began before the caller needed it: it may lack the key. Let it end.
                await asyncio.wait([task])
                continue
            if wait:
                pause = self._last_began + self._min_refetch - self._clock()
                if pause > 0:
                    await asyncio.sleep(pause)
                    continue
            self._fetch_began = self._last_began = self._clock()
            self._fetching = asyncio.create_task(self._load(), name="jwks-fetch")
            self._fetching.add_done_callback(_retrieve)

    async def _load(self) -> None:
        self.fetches += 1
        keys_json = await self._fetch()
        keys: dict[str, tuple[Any, str]] = {}
        for jwk in json.loads(keys_json).get("keys", []):
            parsed = jwt.PyJWK(jwk)
            if parsed.algorithm_name in ALGORITHMS:
                keys[jwk["kid"]] = (parsed.key, parsed.algorithm_name)
        self._keys = keys
        self._fetched_at = self._clock()

    async def _key(self, kid: str) -> tuple[Any, str]:
        now = self._clock()
        if kid not in self._keys:
            try:
                # A fetch under way most likely brings the key (auth publishes a key well
                # before any replica signs with it: services/auth/keys.py). If it began
                # before this token arrived and did not, one more that begins after.
                began = await self._fetched_since(None)
                if kid not in self._keys and began < now:
                    await self._fetched_since(now)
            except Exception as exc:
                raise KeysUnavailable("token keys are unavailable, try again") from exc
        elif now - self._fetched_at > self._refresh and now - self._last_began >= self._min_refetch:
            # Stale: refetched, so that retired keys stop verifying. A failure keeps the
            # keys held (auth unreachable must not refuse every token); a call after
            # `min_refetch_seconds` tries again.
            with contextlib.suppress(Exception):
                await self._fetched_since(None, wait=False)
        try:
            return self._keys[kid]
        except KeyError:
            raise InvalidToken("token signed with an unknown key") from None

    async def verify(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise InvalidToken("malformed access token") from exc
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise InvalidToken("access token has no kid")
        key, algorithm = await self._key(kid)
        if header.get("alg") != algorithm:
            # Checked here because PyJWT raises TypeError (not PyJWTError) when a header
            # names an algorithm of another key family.
            raise InvalidToken("access token algorithm does not match its key")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self._audience,
                issuer=self._issuer,
                options={"require": ["exp", "sub", "iat"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise InvalidToken("access token expired") from exc
        except jwt.PyJWTError as exc:
            raise InvalidToken(f"invalid access token: {exc}") from exc
        except (ValueError, TypeError) as exc:
            # Junk the crypto backend refuses to parse: its words are not for the caller.
            raise InvalidToken("invalid access token") from exc
        family = claims.get(FAMILY_CLAIM)
        if (
            self._revoked is not None
            and isinstance(family, str)
            and await self._revoked.contains(family)
        ):
            raise InvalidToken("access token revoked: log in again")
        return Principal(
            user_id=str(claims["sub"]),
            username=str(claims.get("name", "")),
            role=str(claims.get("role", ROLE_USER)),
            family=family if isinstance(family, str) else None,
        )

    async def refusal(self, principal: Principal) -> str | None:
        """Why the login `principal` was verified from no longer holds (it has been revoked
        since), or None. For open streams, per message: a look in the revocation list
        (refetched as `verify` does).

        An open stream answers to its login, not to its access token's expiry: the token's
        short life bounds how long a copied token can open calls, and an open stream is
        held to the login instead, through the revocation list. Ended at the token's
        expiry, every long-lived Session would break each 15 minutes, with nothing a
        client could do but open another."""
        if (
            self._revoked is not None
            and principal.family is not None
            and await self._revoked.contains(principal.family)
        ):
            return REVOKED_ON_STREAM
        return None

    def watch(self, principal: Principal, on_refused: Callable[[str], None]) -> Callable[[], None]:
        """Calls `on_refused(reason)` once, when a refetch of the revocation list (at most
        the revocation bound apart while anything watches) holds the principal's login;
        returns the function that stops watching. For streams that wait."""
        called = False

        def refused() -> None:
            nonlocal called
            if not called:
                called = True
                on_refused(REVOKED_ON_STREAM)

        unwatch_family = None
        if self._revoked is not None and principal.family is not None:
            unwatch_family = self._revoked.watch(principal.family, refused)

        def unwatch() -> None:
            nonlocal called
            called = True
            if unwatch_family is not None:
                unwatch_family()

        return unwatch


def _retrieve(task: asyncio.Task[None]) -> None:
    """Marks a fetch's failure retrieved: its callers may all have left, and asyncio would
    log an exception nobody retrieved."""
    if not task.cancelled():
        task.exception()


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The token of the call's `authorization: Bearer <token>` metadata."""
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode(errors="replace") if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            break
    raise InvalidToken("missing 'authorization: Bearer <token>' metadata")
