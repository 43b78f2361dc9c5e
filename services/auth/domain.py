"""Registration, login and token rotation rules, independent of gRPC."""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from services.auth.keys import SigningKey
from services.auth.store import AuthStore
from services.core.tokens import ROLE_SERVICE, ROLE_USER

USERNAME = re.compile(r"^[A-Za-z0-9._-]{3,64}$")
MAX_PASSWORD = 1024


class InvalidInput(Exception):
    pass


class BadCredentials(Exception):
    pass


@dataclass(frozen=True, slots=True)
class TokenPair:
    access_token: str
    refresh_token: str
    expires_in: int


def _hash_refresh(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Auth:
    def __init__(
        self,
        store: AuthStore,
        key: SigningKey,
        public_jwks: list[dict[str, Any]],
        *,
        issuer: str,
        audience: str,
        access_ttl: int,
        refresh_ttl: int,
        password_min_length: int,
        service_secret: str,
    ) -> None:
        self._store = store
        self._key = key
        self._jwks = public_jwks
        self._issuer = issuer
        self._audience = audience
        self._access_ttl = access_ttl
        self._refresh_ttl = refresh_ttl
        self._min_password = password_min_length
        self._service_secret = service_secret
        self._hasher = PasswordHasher()  # argon2id with the library's current recommended cost
        # A real hash to verify against for unknown users, so timing does not tell
        # whether a username exists.
        self._dummy_hash = self._hasher.hash(secrets.token_hex(16))

    def jwks(self) -> dict[str, Any]:
        return {"keys": self._jwks}

    def _access_token(self, subject: str, name: str, role: str) -> str:
        now = datetime.now(UTC)
        claims = {
            "sub": subject,
            "name": name,
            "role": role,
            "iss": self._issuer,
            "aud": self._audience,
            "iat": now,
            "nbf": now,
            "exp": now + timedelta(seconds=self._access_ttl),
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(
            claims, self._key.private_key, algorithm="EdDSA", headers={"kid": self._key.kid}
        )

    async def _issue(self, user_id: uuid.UUID, username: str, family: uuid.UUID) -> TokenPair:
        refresh = secrets.token_urlsafe(32)
        now = datetime.now(UTC)
        await self._store.add_refresh(
            user_id=user_id,
            family_id=family,
            token_hash=_hash_refresh(refresh),
            now=now,
            expires_at=now + timedelta(seconds=self._refresh_ttl),
        )
        return TokenPair(
            self._access_token(str(user_id), username, ROLE_USER), refresh, self._access_ttl
        )

    async def register(self, username: str, password: str) -> uuid.UUID:
        if not USERNAME.fullmatch(username):
            raise InvalidInput(
                "username must be 3-64 characters of letters, digits, '.', '_' or '-'"
            )
        if len(password) < self._min_password:
            raise InvalidInput(f"password must be at least {self._min_password} characters")
        if len(password) > MAX_PASSWORD:
            raise InvalidInput(f"password must be at most {MAX_PASSWORD} characters")
        if password.strip() == "" or len(set(password)) < 3:
            raise InvalidInput("password is too weak: use more distinct characters")
        password_hash = await asyncio.to_thread(self._hasher.hash, password)
        return await self._store.create_user(username, password_hash, datetime.now(UTC))

    async def login(self, username: str, password: str) -> TokenPair:
        if not username or not password or len(password) > MAX_PASSWORD:
            raise BadCredentials("wrong username or password")
        user = await self._store.user_by_name(username)
        stored = user.password_hash if user else self._dummy_hash
        try:
            await asyncio.to_thread(self._hasher.verify, stored, password)
        except (VerificationError, InvalidHashError):
            raise BadCredentials("wrong username or password") from None
        if user is None:
            raise BadCredentials("wrong username or password")
        if self._hasher.check_needs_rehash(stored):
            new_hash = await asyncio.to_thread(self._hasher.hash, password)
            await self._store.set_password_hash(user.id, new_hash)
        return await self._issue(user.id, user.username, uuid.uuid4())

    async def refresh(self, refresh_token: str) -> TokenPair:
        now = datetime.now(UTC)
        record = await self._store.spend_refresh(_hash_refresh(refresh_token), now)
        if record is None:
            raise BadCredentials("unknown refresh token")
        if record.revoked_at is not None:
            raise BadCredentials("refresh token revoked")
        if record.used_at is not None:
            # A spent token came back: it was stolen or replayed. Kill the whole family.
            await self._store.revoke_family(record.family_id, now)
            raise BadCredentials("refresh token already used; every token of this login is revoked")
        if record.expires_at.replace(tzinfo=record.expires_at.tzinfo or UTC) <= now:
            raise BadCredentials("refresh token expired")
        return await self._issue(record.user_id, record.username, record.family_id)

    async def revoke(self, refresh_token: str) -> None:
        family = await self._store.family_of(_hash_refresh(refresh_token))
        if family is None:
            raise BadCredentials("unknown refresh token")
        await self._store.revoke_family(family, datetime.now(UTC))

    def service_token(self, service: str, secret: str, role: str = ROLE_SERVICE) -> tuple[str, int]:
        """A token for a service, or for an operator (role admin, subject admin:<name>)."""
        if not service or not secrets.compare_digest(
            secret.encode(), self._service_secret.encode()
        ):
            raise BadCredentials("wrong service secret")
        return self._access_token(f"{role}:{service}", service, role), self._access_ttl
