"""Signing keys for access tokens: Ed25519, stored in the database so replicas share them.

Every auth replica reloads the keys every `reload_seconds` (KeyRing): it publishes (JWKS)
every key not retired, and signs with the newest key that is ready. A key is ready
`sign_delay(reload_seconds)` after it was created: by then every replica has reloaded
and publishes it, so whichever replica a verifier asks for the keys knows it, and no
verifier ever meets a token signed with a key it cannot fetch. Rotation is therefore
one step (`rotate`: a new key, published at once, signed with once ready), and so is
retirement (`retire`: no replica publishes or signs with the key after its next reload).
Times are the database's clock on PostgreSQL (one clock for every replica and the CLI),
so clock skew between hosts does not shorten the delay.

With an encryption key configured, private keys are stored as encrypted PKCS#8 (PBES2:
PBKDF2-HMAC-SHA256 and AES-256-CBC, the `cryptography` package's best available), which
`openssl pkcs8` can also open. The encryption key must be random and long (at least 32
characters), which is what makes PKCS#8's modest PBKDF2 iteration count irrelevant.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jwt.algorithms import OKPAlgorithm
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from fairlane_server.core.logging import get_logger
from fairlane_server.core.models import signing_keys
from fairlane_server.core.settings import Settings
from fairlane_server.core.tasks import cancel_and_wait

log = get_logger(__name__)

MIN_ENCRYPTION_KEY = 32
_ENCRYPTED = "-----BEGIN ENCRYPTED PRIVATE KEY-----"
# Added to the delay before a new key signs, for what one reload interval does not cover:
# a reload that took long, a verifier's rate-limited refetch (at most one a second,
# services/core/tokens.py) and the fetch itself.
SIGN_MARGIN_SECONDS = 5.0


def sign_delay(reload_seconds: float) -> float:
    """How long after its creation a key is first used to sign.

    Every replica reloads its keys `reload_seconds` apart, so within one interval of the
    insert each has begun a reload that sees the new key. The second interval covers a
    reload that failed once (a database blip) or started just before the insert
    committed; the margin covers the reload's own time and a verifier's refetch. Signing
    earlier would let a replica hand out tokens that a verifier, asking another replica
    that does not publish the key yet, refuses as "signed with an unknown key"."""
    return 2 * reload_seconds + SIGN_MARGIN_SECONDS


class SigningKeyError(Exception):
    """The signing keys cannot be used with this configuration; auth must not start."""


class SigningKey:
    """The key a replica signs with. One object for the replica's life (Auth keeps it):
    a reload that picks another key swaps its three fields together, in one step with no
    await between them, so a token is always signed by the key its `kid` names."""

    __slots__ = ("kid", "private_key", "public_jwk")

    def __init__(self, kid: str, private_key: Any, public_jwk: dict[str, Any]) -> None:
        self.kid = kid
        self.private_key = private_key
        self.public_jwk = public_jwk

    def become(self, other: SigningKey) -> None:
        self.kid, self.private_key, self.public_jwk = other.kid, other.private_key, other.public_jwk


@dataclass(frozen=True, slots=True)
class KeyRow:
    """A stored key without its private part: what the choice of keys looks at."""

    kid: str
    created_at: datetime
    retired_at: datetime | None
    public_jwk: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Choice:
    """What a replica does with the stored keys at time `now`."""

    signing: KeyRow
    # Every key not retired, newest first: the JWKS.
    published: tuple[KeyRow, ...]
    # Published keys not ready to sign yet, and when each will be.
    pending: tuple[tuple[KeyRow, datetime], ...]
    # No key was ready: the oldest is used anyway (the first key of a new database, or
    # the ready key was retired before its successor was ready).
    early: bool


def choose(rows: Sequence[KeyRow], now: datetime, delay: float) -> Choice | None:
    """Publish every key not retired; sign with the newest one created at least `delay`
    seconds before `now` (the oldest when none was). None: no key is left (all retired,
    or none yet)."""
    live = sorted(
        (r for r in rows if r.retired_at is None), key=lambda r: (r.created_at, r.kid), reverse=True
    )
    if not live:
        return None
    wait = timedelta(seconds=delay)
    ready = [r for r in live if r.created_at + wait <= now]
    pending = tuple((r, r.created_at + wait) for r in live if r.created_at + wait > now)
    return Choice(
        # None ready (a new database's first key; a key rotated in before that one was
        # ready; the ready key retired early): the oldest, the one most likely published
        # everywhere already, and the one every replica picks alike.
        signing=ready[0] if ready else live[-1],
        published=tuple(live),
        pending=pending,
        early=not ready,
    )


@dataclass(frozen=True, slots=True)
class KeyEncryption:
    """The key new and re-encrypted private keys are stored under, and former keys that
    may still open some of them. No current key: keys are stored in clear."""

    current: bytes | None = None
    previous: tuple[bytes, ...] = field(default_factory=tuple)

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyEncryption:
        value = settings.signing_key_encryption_key
        path = settings.signing_key_encryption_key_file
        if value is not None and path:
            raise SigningKeyError(
                "set FAIRLANE_SIGNING_KEY_ENCRYPTION_KEY or ..._KEY_FILE, not both"
            )
        current = value.get_secret_value() if value is not None else None
        if path:
            try:
                lines = Path(path).read_text().splitlines()
            except OSError as exc:
                raise SigningKeyError(f"cannot read the signing-key encryption key: {exc}") from exc
            current = lines[0].strip() if lines else ""
        previous = [p.get_secret_value() for p in settings.signing_key_previous_encryption_keys]
        for key in [current, *previous] if current is not None else previous:
            if len(key) < MIN_ENCRYPTION_KEY:
                raise SigningKeyError(
                    f"a signing-key encryption key must be at least {MIN_ENCRYPTION_KEY} "
                    "random characters (e.g. `openssl rand -base64 32`)"
                )
        return cls(
            current.encode() if current is not None else None,
            tuple(p.encode() for p in previous),
        )

    def encode(self, private: Ed25519PrivateKey) -> str:
        protection: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(self.current)
            if self.current is not None
            else serialization.NoEncryption()
        )
        return private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, protection
        ).decode()

    def decode(self, kid: str, pem: str) -> tuple[Any, bool]:
        """The private key, and whether it should be stored again under the current key."""
        if not pem.startswith(_ENCRYPTED):
            key = serialization.load_pem_private_key(pem.encode(), password=None)
            return key, self.current is not None
        candidates = [self.current] if self.current is not None else []
        for index, secret in enumerate([*candidates, *self.previous]):
            try:
                key = serialization.load_pem_private_key(pem.encode(), password=secret)
            except ValueError:
                continue
            return key, index >= len(candidates) and self.current is not None
        raise SigningKeyError(
            f"signing key {kid} is encrypted and none of the configured encryption keys "
            "opens it (FAIRLANE_SIGNING_KEY_ENCRYPTION_KEY / ..._PREVIOUS_ENCRYPTION_KEYS)"
        )


def _new_key(encryption: KeyEncryption) -> tuple[str, str, str]:
    private = Ed25519PrivateKey.generate()
    kid = uuid.uuid4().hex
    jwk = json.loads(OKPAlgorithm.to_jwk(private.public_key()))
    jwk.update(kid=kid, alg="EdDSA", use="sig")
    return kid, encryption.encode(private), json.dumps(jwk)


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


async def _now(conn: AsyncConnection) -> datetime:
    """The database's clock on PostgreSQL (the same for every replica and the CLI); this
    host's elsewhere (SQLite lives on one host)."""
    if conn.dialect.name == "postgresql":
        value = (await conn.execute(sa.select(sa.func.now()))).scalar_one()
        return _aware(value)
    return datetime.now(UTC)


async def _insert_new(engine: AsyncEngine, encryption: KeyEncryption) -> tuple[str, datetime]:
    kid, pem, jwk = _new_key(encryption)
    async with engine.begin() as conn:
        created = await _now(conn)
        await conn.execute(
            signing_keys.insert().values(
                kid=kid,
                algorithm="EdDSA",
                private_pem=pem,
                public_jwk=jwk,
                created_at=created,
            )
        )
    return kid, created


async def _reencrypt(engine: AsyncEngine, encryption: KeyEncryption) -> None:
    """Stores every private key (retired ones too) under the current encryption key."""
    async with engine.connect() as conn:
        rows = (await conn.execute(sa.select(signing_keys.c.kid, signing_keys.c.private_pem))).all()
    for row in rows:
        private, stale = encryption.decode(row.kid, row.private_pem)
        if not stale:
            continue
        async with engine.begin() as conn:
            # Conditional on the old text: a replica doing the same at once is harmless.
            await conn.execute(
                signing_keys.update()
                .where(signing_keys.c.kid == row.kid, signing_keys.c.private_pem == row.private_pem)
                .values(private_pem=encryption.encode(private))
            )
        log.info("signing_key_reencrypted", kid=row.kid)


async def read(engine: AsyncEngine) -> tuple[list[KeyRow], datetime]:
    """Every stored key (retired ones too), and the time of the read."""
    async with engine.connect() as conn:
        now = await _now(conn)
        result = await conn.execute(
            sa.select(
                signing_keys.c.kid,
                signing_keys.c.created_at,
                signing_keys.c.retired_at,
                signing_keys.c.public_jwk,
            )
        )
        rows = [
            KeyRow(
                r.kid,
                _aware(r.created_at),
                _aware(r.retired_at) if r.retired_at is not None else None,
                json.loads(r.public_jwk),
            )
            for r in result
        ]
    return rows, now


class KeyRing:
    """This replica's keys: `signer` (what it signs with) and `published` (its JWKS),
    reloaded from the database every `reload_seconds` (see the module's docstring).

    `published` is one list for the replica's life, replaced in place by a reload, like
    `signer`'s fields: Auth keeps both. When a reload changes them, `on_change` is called
    (the replica's own verifier refetches, so WhoAmI follows a rotation or a retirement at
    once). When the database cannot be read, the last keys stay in use and a warning is
    logged; the replica is NOT_SERVING meanwhile (services/core/health.py)."""

    def __init__(
        self, engine: AsyncEngine, encryption: KeyEncryption, *, reload_seconds: float
    ) -> None:
        self._engine = engine
        self._encryption = encryption
        self.reload_seconds = reload_seconds
        self.delay = sign_delay(reload_seconds)
        self.signer = SigningKey("", None, {})
        self.published: list[dict[str, Any]] = []
        self.on_change: Callable[[], Awaitable[None]] | None = None
        # kid -> private key: PKCS#8 decryption costs a key derivation, paid once per key.
        self._private: dict[str, Any] = {}
        self._failing = False
        self._task: asyncio.Task[None] | None = None

    async def load_first(self) -> None:
        """At start: re-encrypts stored keys under the current encryption key, creates the
        first key of an empty database, and loads. Raises SigningKeyError when a key
        cannot be decrypted (auth must not start)."""
        if self._encryption.current is not None:
            await _reencrypt(self._engine, self._encryption)
        await self._load_or_create()

    async def _load_or_create(self) -> None:
        if await self.load():
            return
        # A new database, or every key retired (found at start or by a reload): a new
        # key, used at once since there is no other. Replicas doing this at once each add
        # one; all are published, and from their next reload all sign with the oldest
        # (`choose`).
        kid, _ = await _insert_new(self._engine, self._encryption)
        if self.signer.kid:
            log.warning("signing_key_created", kid=kid, reason="every key was retired")
        else:
            log.info("signing_key_created", kid=kid)
        if not await self.load():
            raise SigningKeyError("no signing key after creating one")

    async def load(self) -> bool:
        """Reads the keys and applies them; False when no key is left to sign with."""
        rows, now = await read(self._engine)
        choice = choose(rows, now, self.delay)
        if choice is None:
            return False
        signing = choice.signing
        if signing.kid != self.signer.kid:
            private = await self._private_key(signing.kid)
            if self.signer.kid:
                log.info("signing_key_changed", kid=signing.kid, previous=self.signer.kid)
            self.signer.become(SigningKey(signing.kid, private, signing.public_jwk))
        if choice.early and any(r.retired_at is not None for r in rows):
            log.warning(
                "signing_key_not_ready",
                kid=signing.kid,
                hint="no key was ready to sign (the ready one was retired before its "
                "successor was ready): until every replica has reloaded, tokens it signs may "
                "be refused",
            )
        published = [r.public_jwk for r in choice.published]
        changed = published != self.published
        if changed:
            self.published[:] = published
            log.info(
                "signing_keys_loaded",
                signing=signing.kid,
                published=[r.kid for r in choice.published],
                pending=[r.kid for r, _ in choice.pending],
            )
        if changed and self.on_change is not None:
            await self.on_change()
        return True

    async def _private_key(self, kid: str) -> Any:
        # A kid's private key never changes (re-encryption under a new encryption key
        # changes only how it is stored), so it is decrypted once: a replica not yet
        # restarted with the new encryption key keeps the keys it has.
        cached = self._private.get(kid)
        if cached is not None:
            return cached
        async with self._engine.connect() as conn:
            pem = (
                await conn.execute(
                    sa.select(signing_keys.c.private_pem).where(signing_keys.c.kid == kid)
                )
            ).scalar_one()
        private, _ = self._encryption.decode(kid, pem)
        self._private[kid] = private
        return private

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="signing-key-reload")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.reload_seconds)
            try:
                async with asyncio.timeout(max(self.reload_seconds, 5.0)):
                    await self._load_or_create()
            except Exception as exc:  # the last keys stay; the next round tries again
                if not self._failing:
                    # A key this replica cannot decrypt (added under another encryption
                    # key) says why; a database error says which.
                    reason = str(exc) if isinstance(exc, SigningKeyError) else None
                    log.warning(
                        "signing_keys_reload_failed", error=type(exc).__name__, reason=reason
                    )
                self._failing = True
            else:
                if self._failing:
                    log.info("signing_keys_reloaded")
                self._failing = False

    async def stop(self) -> None:
        await cancel_and_wait(self._task)


@dataclass(frozen=True, slots=True)
class Rotated:
    kid: str
    created_at: datetime
    signs_from: datetime


async def check_encryption(engine: AsyncEngine, encryption: KeyEncryption) -> None:
    """Raises SigningKeyError unless `encryption` stores keys as the replicas do: every key
    in use opens with its current key (or, with none, is stored in clear). A key added
    under other settings would become the one to sign with, and no replica could open it:
    every reload would fail and a restarted replica would not start."""
    async with engine.connect() as conn:
        rows = await conn.execute(
            sa.select(signing_keys.c.kid, signing_keys.c.private_pem).where(
                signing_keys.c.retired_at.is_(None)
            )
        )
        for kid, pem in rows:
            try:
                _, stored_otherwise = encryption.decode(kid, pem)
            except SigningKeyError as exc:
                raise SigningKeyError(f"{exc}: run this with the auth replicas' settings") from None
            if stored_otherwise:
                raise SigningKeyError(
                    f"signing key {kid} is not stored under this command's encryption key "
                    "(FAIRLANE_SIGNING_KEY_ENCRYPTION_KEY): run it with the auth replicas' "
                    "settings, after every replica has restarted with them"
                )


async def rotate(
    engine: AsyncEngine, encryption: KeyEncryption | None = None, *, reload_seconds: float
) -> Rotated:
    """Adds a new signing key. Every auth replica publishes it from its next reload (within
    `reload_seconds`) and signs with it from `signs_from` (`sign_delay` after creation);
    the older keys stay published until retired, so tokens they signed keep verifying."""
    kid, created = await _insert_new(engine, encryption or KeyEncryption())
    return Rotated(kid, created, created + timedelta(seconds=sign_delay(reload_seconds)))


async def retire(engine: AsyncEngine, kid: str) -> bool:
    """Stops publishing and signing with a key: auth replicas drop it at their next reload,
    and tokens it signed are refused by every verifier once it refetches the keys (auth's
    own at once, the queue's and the worker's within FAIRLANE_JWKS_REFRESH_SECONDS).
    False when no key by that id was in use (unknown or retired already)."""
    async with engine.begin() as conn:
        now = await _now(conn)
        result = await conn.execute(
            signing_keys.update()
            .where(signing_keys.c.kid == kid, signing_keys.c.retired_at.is_(None))
            .values(retired_at=now)
        )
    return bool(result.rowcount)
