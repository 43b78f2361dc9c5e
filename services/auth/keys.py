"""Signing keys for access tokens: Ed25519, stored in the database so replicas share them.

With an encryption key configured, private keys are stored as encrypted PKCS#8 (PBES2:
PBKDF2-HMAC-SHA256 and AES-256-CBC, the `cryptography` package's best available), which
`openssl pkcs8` can also open. The encryption key must be random and long (at least 32
characters), which is what makes PKCS#8's modest PBKDF2 iteration count irrelevant.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jwt.algorithms import OKPAlgorithm
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from fairlane_server.core.logging import get_logger
from fairlane_server.core.models import signing_keys
from fairlane_server.core.settings import Settings

log = get_logger(__name__)

MIN_ENCRYPTION_KEY = 32
_ENCRYPTED = "-----BEGIN ENCRYPTED PRIVATE KEY-----"


class SigningKeyError(Exception):
    """The signing keys cannot be used with this configuration; auth must not start."""


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str
    private_key: Any
    public_jwk: dict[str, Any]


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


async def _insert_new(engine: AsyncEngine, encryption: KeyEncryption) -> str:
    kid, pem, jwk = _new_key(encryption)
    async with engine.begin() as conn:
        await conn.execute(
            signing_keys.insert().values(
                kid=kid,
                algorithm="EdDSA",
                private_pem=pem,
                public_jwk=jwk,
                created_at=datetime.now(UTC),
            )
        )
    return kid


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


async def load_or_create(
    engine: AsyncEngine, encryption: KeyEncryption | None = None
) -> tuple[SigningKey, list[dict[str, Any]]]:
    """The newest active key (created on first start) and every published public key."""
    encryption = encryption or KeyEncryption()
    if encryption.current is not None:
        await _reencrypt(engine, encryption)
    async with engine.begin() as conn:
        rows = (
            await conn.execute(
                sa.select(signing_keys)
                .where(signing_keys.c.retired_at.is_(None))
                .order_by(signing_keys.c.created_at.desc())
            )
        ).all()
    if not rows:
        # Another replica may win the race; then read what it stored.
        with contextlib.suppress(IntegrityError):
            await _insert_new(engine, encryption)
        return await load_or_create(engine, encryption)
    newest = rows[0]
    private, _ = encryption.decode(newest.kid, newest.private_pem)
    return (
        SigningKey(newest.kid, private, json.loads(newest.public_jwk)),
        [json.loads(r.public_jwk) for r in rows],
    )


async def rotate(engine: AsyncEngine, encryption: KeyEncryption | None = None) -> str:
    """Adds a new signing key, used by auth replicas from their next start; the older keys
    stay published until retired, so tokens they signed keep verifying."""
    return await _insert_new(engine, encryption or KeyEncryption())


async def retire(engine: AsyncEngine, kid: str) -> None:
    """Stops publishing a key: tokens it signed stop verifying once services refetch."""
    async with engine.begin() as conn:
        await conn.execute(
            signing_keys.update()
            .where(signing_keys.c.kid == kid, signing_keys.c.retired_at.is_(None))
            .values(retired_at=datetime.now(UTC))
        )
