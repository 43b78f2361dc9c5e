"""Registration, login, token rotation and revocation rules, independent of gRPC."""

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

from fairlane_server.auth import audit
from fairlane_server.auth.hashing import PasswordHashing
from fairlane_server.auth.keys import SigningKey
from fairlane_server.auth.passwords import MAX_PASSWORD, WeakPassword, check_new_password
from fairlane_server.auth.sealing import seal, unseal
from fairlane_server.auth.store import AuthStore, NewRefresh, RefreshRecord, UsernameTaken, fold
from fairlane_server.auth.throttle import Hold, Rule, Throttle, Trip
from fairlane_server.core.logging import get_logger
from fairlane_server.core.revocation import RevokedPage
from fairlane_server.core.tokens import FAMILY_CLAIM, ROLE_SERVICE, ROLE_USER

USERNAME = re.compile(r"[A-Za-z0-9._-]{3,64}")
# Access tokens issued just before a revocation may carry an `iat` a little after it on a
# replica whose clock runs ahead; keep revoked families listed this much longer.
CLOCK_SKEW = timedelta(seconds=60)
# The largest page of revoked families: about 0.5 MB on the wire (a UUID and an expiry each).
MAX_REVOKED_PAGE = 10_000
# Page tokens of revoked_families are "r1." and a revocation number (store.revoked_page):
# opaque to callers; the version lets a later release change them and recognise old ones.
_REVOKED_TOKEN_PREFIX = "r1."

log = get_logger(__name__)


class InvalidInput(Exception):
    pass


class BadCredentials(Exception):
    pass


@dataclass(frozen=True, slots=True)
class TokenPair:
    access_token: str
    refresh_token: str
    expires_in: int


@dataclass(frozen=True, slots=True)
class Policy:
    issuer: str
    audience: str
    access_ttl: int
    refresh_ttl: int
    refresh_reuse_interval: float
    password_min_length: int
    service_secret: str
    login_user: Rule
    login_peer: Rule
    register_peer: Rule
    service_peer: Rule


def _hash_refresh(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _tripped(trip: Trip | None, **fields: Any) -> None:
    if trip is not None:
        audit.event(
            audit.THROTTLE_TRIPPED,
            rule=trip.rule,
            events=trip.events,
            blocked_for_s=trip.delay,
            **fields,
        )


class Auth:
    def __init__(
        self,
        *,
        store: AuthStore,
        throttle: Throttle,
        hashing: PasswordHashing,
        key: SigningKey,
        public_jwks: list[dict[str, Any]],
        policy: Policy,
    ) -> None:
        self._store = store
        self._throttle = throttle
        self._hashing = hashing
        self._key = key
        self._jwks = public_jwks
        self._p = policy
        # A real hash to verify against for unknown users, so that an unknown user costs
        # the same as a wrong password and the two cannot be told apart.
        self._dummy_hash = hashing.hash_now(secrets.token_hex(16))

    def jwks(self) -> dict[str, Any]:
        return {"keys": self._jwks}

    def _access_token(
        self, subject: str, name: str, role: str, family: uuid.UUID | None = None
    ) -> str:
        now = datetime.now(UTC)
        claims = {
            "sub": subject,
            "name": name,
            "role": role,
            "iss": self._p.issuer,
            "aud": self._p.audience,
            "iat": now,
            "nbf": now,
            "exp": now + timedelta(seconds=self._p.access_ttl),
            "jti": uuid.uuid4().hex,
        }
        if family is not None:
            claims[FAMILY_CLAIM] = str(family)
        return jwt.encode(
            claims, self._key.private_key, algorithm="EdDSA", headers={"kid": self._key.kid}
        )

    def _new_pair(
        self, user_id: uuid.UUID, username: str, family: uuid.UUID, now: datetime
    ) -> tuple[TokenPair, NewRefresh]:
        refresh = secrets.token_urlsafe(32)
        pair = TokenPair(
            self._access_token(str(user_id), username, ROLE_USER, family),
            refresh,
            self._p.access_ttl,
        )
        record = NewRefresh(
            user_id, family, _hash_refresh(refresh), now + timedelta(seconds=self._p.refresh_ttl)
        )
        return pair, record

    # -- users ---------------------------------------------------------------------------

    async def register(self, username: str, password: str, peer: str) -> uuid.UUID:
        if not USERNAME.fullmatch(username):
            raise InvalidInput(
                "username must be 3-64 characters of letters, digits, '.', '_' or '-'"
            )
        try:
            check_new_password(password, username=username, min_length=self._p.password_min_length)
        except WeakPassword as exc:
            raise InvalidInput(str(exc)) from None
        (hold,) = await self._throttle.take((self._p.register_peer, peer))
        _tripped(hold.trip, peer=peer)
        # Checked before hashing, so that a taken name costs no hash.
        if await self._store.username_taken(username):
            raise UsernameTaken(username)
        password_hash = await self._hashing.hash(password)
        user_id = await self._store.create_user(username, password_hash, datetime.now(UTC))
        audit.event(audit.REGISTERED, user_id=str(user_id), username=username, peer=peer)
        return user_id

    async def login(self, username: str, password: str, peer: str) -> TokenPair:
        # Usernames are case-insensitive, so the throttle counts a name in every case as
        # one: otherwise each case variant of a name would get its own free failures.
        subjects = ((self._p.login_user, fold(username)), (self._p.login_peer, peer))
        # Counts this login as failed before the password is checked, so that logins
        # arriving together cannot all pass the throttle; a success gives it back.
        state = await self._throttle.before_login(*subjects)
        user = None
        verified = False
        try:
            # A name that cannot exist is not looked up; it fails like a wrong password.
            if USERNAME.fullmatch(username) and password and len(password) <= MAX_PASSWORD:
                user = await self._store.user_by_name(username)
                stored = user.password_hash if user else self._dummy_hash
                # Returning addresses go first when checks queue up. It depends on the
                # address alone, so it tells nothing about whether the username exists.
                verified = await self._hashing.verify(stored, password, priority=state.trusted)
        except BaseException:
            # No verdict reaches the caller (the check queue was full, the caller left, the
            # database failed), so the attempt does not count.
            await _give_back(self._throttle, state.holds)
            raise
        if user is None or not verified:
            # A known user by the name they registered, whatever case was typed.
            named = user.username if user is not None else audit.username_field(username)
            audit.event(audit.LOGIN_FAILED, username=named, peer=peer, user_known=user is not None)
            for hold in state.holds:
                _tripped(hold.trip, username=named, peer=peer)
            raise BadCredentials("wrong username or password")
        await self._throttle.after_login(state)
        if self._hashing.needs_rehash(user.password_hash):
            await self._store.set_password_hash(user.id, await self._hashing.hash(password))
        now = datetime.now(UTC)
        family = uuid.uuid4()
        pair, record = self._new_pair(user.id, user.username, family, now)
        await self._store.add_refresh(record, now)
        audit.event(
            audit.LOGIN_SUCCEEDED,
            user_id=str(user.id),
            username=user.username,
            peer=peer,
            family_id=str(family),
        )
        return pair

    # -- refresh tokens ------------------------------------------------------------------

    async def refresh(self, refresh_token: str, peer: str) -> TokenPair:
        now = datetime.now(UTC)
        token_hash = _hash_refresh(refresh_token)
        record = await self._store.refresh_record(token_hash)
        if record is None:
            raise BadCredentials("unknown refresh token")
        if record.revoked:
            raise BadCredentials("refresh token revoked")
        if _aware(record.expires_at) <= now:
            raise BadCredentials("refresh token expired")
        if record.used_at is None:
            pair, successor = self._new_pair(record.user_id, record.username, record.family_id, now)
            sealed = seal(refresh_token, _pair_dict(pair))
            if await self._store.rotate(record.id, successor, sealed, now):
                return pair
            # Another call spent it first (or revoked the family): decide on what it wrote.
            record = await self._store.refresh_record(token_hash)
            if record is None or record.revoked:
                raise BadCredentials("refresh token revoked")
        return await self._spent_again(refresh_token, record, now, peer)

    async def _spent_again(
        self, refresh_token: str, record: RefreshRecord, now: datetime, peer: str
    ) -> TokenPair:
        assert record.used_at is not None
        since = (now - _aware(record.used_at)).total_seconds()
        if since <= self._p.refresh_reuse_interval and record.successor_sealed is not None:
            # Two processes of one login refreshing at once: both get the same pair.
            pair = unseal(refresh_token, record.successor_sealed)
            if pair is not None:
                audit.event(
                    audit.REUSE_TOLERATED,
                    user_id=str(record.user_id),
                    family_id=str(record.family_id),
                    peer=peer,
                    spent_for_s=round(since, 3),
                )
                return TokenPair(
                    str(pair["access_token"]), str(pair["refresh_token"]), int(pair["expires_in"])
                )
        # A spent token came back later: it was stolen or replayed. Kill the whole family.
        if await self._store.revoke_family(record.family_id, record.user_id, now, "reuse"):
            audit.event(
                audit.FAMILY_REVOKED_ON_REUSE,
                user_id=str(record.user_id),
                family_id=str(record.family_id),
                peer=peer,
                spent_for_s=round(since, 3),
            )
        raise BadCredentials("refresh token already used; every token of this login is revoked")

    async def revoke(self, refresh_token: str, peer: str) -> None:
        found = await self._store.family_of(_hash_refresh(refresh_token))
        if found is None:
            raise BadCredentials("unknown refresh token")
        family, user_id = found
        if await self._store.revoke_family(family, user_id, datetime.now(UTC), "revoke"):
            audit.event(audit.TOKEN_REVOKED, user_id=str(user_id), family_id=str(family), peer=peer)

    def _revoked_lifetime(self) -> timedelta:
        """A family revoked longer ago than this has no access token left that is valid."""
        return timedelta(seconds=self._p.access_ttl) + CLOCK_SKEW

    async def prune(self) -> tuple[int, int]:
        """Deletes refresh tokens past their expiry and revoked families nothing can use
        any more (AuthStore.prune); returns how many of each."""
        now = datetime.now(UTC)
        return await self._store.prune(now, revoked_before=now - self._revoked_lifetime())

    async def revoked_families(self, page_token: str = "", page_size: int = 0) -> RevokedPage:
        """A page of the families whose access tokens may still be unexpired: the deny
        list, in commit order from where `page_token` left off ("" from the start).
        Raises InvalidInput for a token not made here or a negative page size."""
        if page_size < 0:
            raise InvalidInput("page_size must not be negative")
        size = page_size if 0 < page_size <= MAX_REVOKED_PAGE else MAX_REVOKED_PAGE
        lifetime = self._revoked_lifetime()
        page = await self._store.revoked_page(
            _revoked_after(page_token), datetime.now(UTC) - lifetime, size
        )
        return RevokedPage(
            [(str(r.family_id), (r.revoked_at + lifetime).timestamp()) for r in page.families],
            f"{_REVOKED_TOKEN_PREFIX}{page.last}",
            page.more,
        )

    # -- services ------------------------------------------------------------------------

    async def service_token(
        self, service: str, secret: str, peer: str, role: str = ROLE_SERVICE
    ) -> tuple[str, int]:
        """A token for a service, or for an operator (role admin, subject admin:<name>)."""
        if not USERNAME.fullmatch(service):
            raise InvalidInput(
                "service must be 3-64 characters of letters, digits, '.', '_' or '-'"
            )
        # Counted as wrong until the secret is compared, like a login's password.
        (hold,) = await self._throttle.take((self._p.service_peer, peer))
        if not secrets.compare_digest(secret.encode(), self._p.service_secret.encode()):
            audit.event(audit.SERVICE_TOKEN_REFUSED, token_service=service, peer=peer)
            _tripped(hold.trip, peer=peer)
            raise BadCredentials("wrong service secret")
        await _give_back(self._throttle, [hold])
        audit.event(audit.SERVICE_TOKEN_ISSUED, token_service=service, peer=peer, token_role=role)
        token = self._access_token(f"{role}:{service}", service, role)
        return token, self._p.access_ttl


def _revoked_after(page_token: str) -> int | None:
    """The revocation number a page token of revoked_families stands for (None: none)."""
    if not page_token:
        return None
    number = page_token.removeprefix(_REVOKED_TOKEN_PREFIX)
    # A seq is a bigint: 19 digits at most (checked first: int() refuses past 4,300).
    if (
        number == page_token
        or not number.isascii()
        or not number.isdigit()
        or len(number) > 19
        or int(number) >= 2**63
    ):
        raise InvalidInput("page_token is not one this service gave")
    return int(number)


async def _give_back(throttle: Throttle, holds: tuple[Hold, ...] | list[Hold]) -> None:
    """Gives back events that did not count; shielded, so that a caller who leaves does not
    leave them counted. Should the database fail, they stay counted: the safe side."""
    try:
        await asyncio.shield(throttle.give_back(holds))
    except Exception as exc:
        log.warning("throttle_give_back_failed", error=type(exc).__name__)


def _pair_dict(pair: TokenPair) -> dict[str, str | int]:
    return {
        "access_token": pair.access_token,
        "refresh_token": pair.refresh_token,
        "expires_in": pair.expires_in,
    }
