"""Access-token verification shared by every service that takes calls: JWKS cache + PyJWT."""

from __future__ import annotations

import asyncio
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
    """Verifies JWTs locally with keys from `fetch_jwks`; refetches on an unknown `kid`.

    Refetches are rate-limited so a flood of tokens with made-up kids cannot turn into a
    flood of calls to the auth service. With `revoked`, tokens of a revoked login (their
    `fam` claim) are refused too (services/core/revocation.py).
    """

    def __init__(
        self,
        fetch_jwks: Callable[[], Awaitable[str]],
        *,
        issuer: str,
        audience: str,
        refresh_seconds: float = 300.0,
        min_refetch_seconds: float = 5.0,
        revoked: RevokedFamilies | None = None,
    ) -> None:
        self._fetch = fetch_jwks
        self._revoked = revoked
        self._issuer = issuer
        self._audience = audience
        self._refresh = refresh_seconds
        self._min_refetch = min_refetch_seconds
        # kid -> (key, the one algorithm that key verifies).
        self._keys: dict[str, tuple[Any, str]] = {}
        self._fetched_at = 0.0
        self._lock = asyncio.Lock()

    async def refresh(self) -> None:
        async with self._lock:
            keys_json = await self._fetch()
            keys: dict[str, tuple[Any, str]] = {}
            for jwk in json.loads(keys_json).get("keys", []):
                parsed = jwt.PyJWK(jwk)
                if parsed.algorithm_name in ALGORITHMS:
                    keys[jwk["kid"]] = (parsed.key, parsed.algorithm_name)
            self._keys = keys
            self._fetched_at = time.monotonic()

    async def _key(self, kid: str) -> tuple[Any, str]:
        age = time.monotonic() - self._fetched_at
        if (kid not in self._keys and age > self._min_refetch) or age > self._refresh:
            try:
                await self.refresh()
            except Exception as exc:
                if not self._keys:
                    raise KeysUnavailable("token keys are unavailable, try again") from exc
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
