"""The successor of a refresh token, sealed under a key only that token can derive.

When a refresh token is spent, the pair it bought is stored encrypted (AES-GCM) with a key
derived (HKDF) from the spent token itself. Whoever presents the same token again within
the reuse interval can be handed the same pair; a database reader, who holds only token
hashes, cannot open it.
"""

from __future__ import annotations

import json
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_INFO = b"fairlane refresh successor v1"
_NONCE = 12


def _key(token: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(token.encode())


def seal(token: str, pair: dict[str, str | int]) -> bytes:
    nonce = os.urandom(_NONCE)
    return nonce + AESGCM(_key(token)).encrypt(nonce, json.dumps(pair).encode(), None)


def unseal(token: str, sealed: bytes) -> dict[str, str | int] | None:
    try:
        plain = AESGCM(_key(token)).decrypt(sealed[:_NONCE], sealed[_NONCE:], None)
    except (InvalidTag, ValueError):
        return None
    value: dict[str, str | int] = json.loads(plain)
    return value
