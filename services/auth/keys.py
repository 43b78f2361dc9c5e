"""Signing keys for access tokens: Ed25519, stored in the database so replicas share them."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jwt.algorithms import OKPAlgorithm
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from services.core.models import signing_keys


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str
    private_key: Any
    public_jwk: dict[str, Any]


def _new_key() -> tuple[str, str, str]:
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    kid = uuid.uuid4().hex
    jwk = json.loads(OKPAlgorithm.to_jwk(private.public_key()))
    jwk.update(kid=kid, alg="EdDSA", use="sig")
    return kid, pem, json.dumps(jwk)


async def load_or_create(engine: AsyncEngine) -> tuple[SigningKey, list[dict[str, Any]]]:
    """The newest active key (created on first start) and every published public key."""
    async with engine.begin() as conn:
        rows = (
            await conn.execute(
                sa.select(signing_keys)
                .where(signing_keys.c.retired_at.is_(None))
                .order_by(signing_keys.c.created_at.desc())
            )
        ).all()
    if not rows:
        kid, pem, jwk = _new_key()
        try:
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
        except IntegrityError:
            pass  # another replica won the race; read what it stored below
        return await load_or_create(engine)
    newest = rows[0]
    private = serialization.load_pem_private_key(newest.private_pem.encode(), password=None)
    return (
        SigningKey(newest.kid, private, json.loads(newest.public_jwk)),
        [json.loads(r.public_jwk) for r in rows],
    )
