"""Signing-key rotation without I/O: which keys a replica publishes and signs with
(keys.choose), and how a verifier refetches the keys for a kid it does not hold
(TokenVerifier: shared, rate-limited, never from a fetch older than the token)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jwt.algorithms import OKPAlgorithm

from fairlane_server.auth import keys
from fairlane_server.core.tokens import InvalidToken, KeysUnavailable, TokenVerifier

T0 = datetime(2026, 1, 1, tzinfo=UTC)
DELAY = keys.sign_delay(5.0)
ISSUER = AUDIENCE = "fairlane-test"


def row(kid: str, created_s: float, retired_s: float | None = None) -> keys.KeyRow:
    return keys.KeyRow(
        kid,
        T0 + timedelta(seconds=created_s),
        T0 + timedelta(seconds=retired_s) if retired_s is not None else None,
        {"kid": kid},
    )


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_the_delay_covers_two_reloads_and_a_margin() -> None:
    assert keys.sign_delay(5.0) == 15.0
    assert keys.sign_delay(0.5) == 1.0 + keys.SIGN_MARGIN_SECONDS


def test_the_first_key_signs_at_once() -> None:
    choice = keys.choose([row("a", 0)], at(0), DELAY)
    assert choice is not None
    assert (choice.signing.kid, choice.early) == ("a", True)
    assert [r.kid for r in choice.published] == ["a"]


def test_a_new_key_is_published_at_once_and_signs_only_after_the_delay() -> None:
    rows = [row("old", 0), row("new", 100)]
    for now in (100, 100 + DELAY - 0.001):
        choice = keys.choose(rows, at(now), DELAY)
        assert choice is not None
        assert choice.signing.kid == "old", now
        assert [r.kid for r in choice.published] == ["new", "old"]
        assert [(r.kid, when) for r, when in choice.pending] == [("new", at(100 + DELAY))]
        assert not choice.early
    choice = keys.choose(rows, at(100 + DELAY), DELAY)
    assert choice is not None
    assert (choice.signing.kid, choice.pending) == ("new", ())
    assert [r.kid for r in choice.published] == ["new", "old"]


def test_a_retired_key_is_neither_published_nor_signed_with() -> None:
    rows = [row("old", 0, retired_s=200), row("new", 100)]
    choice = keys.choose(rows, at(300), DELAY)
    assert choice is not None
    assert choice.signing.kid == "new"
    assert [r.kid for r in choice.published] == ["new"]


def test_retiring_the_signing_key_early_falls_back_to_the_oldest_left() -> None:
    rows = [row("old", 0, retired_s=101), row("new", 100), row("newer", 101)]
    choice = keys.choose(rows, at(102), DELAY)
    assert choice is not None
    assert (choice.signing.kid, choice.early) == ("new", True)


def test_a_rotation_before_the_first_key_is_ready_does_not_sign_with_the_new_key() -> None:
    rows = [row("first", 0), row("rotated", 1)]
    choice = keys.choose(rows, at(2), DELAY)
    assert choice is not None
    assert choice.signing.kid == "first"
    choice = keys.choose(rows, at(1 + DELAY), DELAY)
    assert choice is not None
    assert choice.signing.kid == "rotated"


def test_no_key_left() -> None:
    assert keys.choose([], at(0), DELAY) is None
    assert keys.choose([row("a", 0, retired_s=1)], at(2), DELAY) is None


def test_keys_created_at_the_same_time_are_chosen_alike_everywhere() -> None:
    """Two replicas starting on an empty database may each add a first key."""
    rows = [row("b", 0), row("a", 0)]
    for now in (0, 100):
        first = keys.choose(rows, at(now), DELAY)
        second = keys.choose(list(reversed(rows)), at(now), DELAY)
        assert first is not None
        assert second is not None
        assert first.signing.kid == second.signing.kid, now


def test_the_signer_changes_all_its_fields_at_once() -> None:
    signer = keys.SigningKey("a", "private-a", {"kid": "a"})
    held = signer
    signer.become(keys.SigningKey("b", "private-b", {"kid": "b"}))
    assert (held.kid, held.private_key, held.public_jwk) == ("b", "private-b", {"kid": "b"})


# -- the verifier -----------------------------------------------------------------------


class Key:
    def __init__(self) -> None:
        self.private = Ed25519PrivateKey.generate()
        self.kid = uuid.uuid4().hex
        self.jwk = json.loads(OKPAlgorithm.to_jwk(self.private.public_key()))
        self.jwk.update(kid=self.kid, alg="EdDSA", use="sig")

    def token(self, kid: str | None = None) -> str:
        now = datetime.now(UTC)
        claims: dict[str, Any] = {
            "sub": "someone",
            "iss": ISSUER,
            "aud": AUDIENCE,
            "iat": now,
            "exp": now + timedelta(minutes=5),
        }
        return jwt.encode(claims, self.private, algorithm="EdDSA", headers={"kid": kid or self.kid})


class Auth:
    """What GetJwks answers: the published keys, each fetch taking `latency` seconds."""

    def __init__(self, *published: Key, latency: float = 0.05) -> None:
        self.published = list(published)
        self.latency = latency
        self.began: list[float] = []
        self.failing = False

    async def jwks(self) -> str:
        self.began.append(time.monotonic())
        snapshot = [k.jwk for k in self.published]  # what the replica had when asked
        await asyncio.sleep(self.latency)
        if self.failing:
            raise ConnectionError("auth unreachable")
        return json.dumps({"keys": snapshot})


def verifier(auth: Auth, *, min_refetch: float = 0.3, refresh: float = 300.0) -> TokenVerifier:
    return TokenVerifier(
        auth.jwks,
        issuer=ISSUER,
        audience=AUDIENCE,
        refresh_seconds=refresh,
        min_refetch_seconds=min_refetch,
    )


async def test_a_new_kid_is_fetched_once_for_every_token_that_misses_together() -> None:
    old, new = Key(), Key()
    auth = Auth(old)
    v = verifier(auth)
    await v.refresh()
    await asyncio.sleep(0.3)  # past the rate limit
    auth.published.append(new)
    results = await asyncio.gather(*(v.verify(new.token()) for _ in range(50)))
    assert {p.user_id for p in results} == {"someone"}
    assert len(auth.began) == 2  # start-up and one refetch for all fifty


async def test_a_miss_within_the_rate_limit_waits_for_the_next_fetch_rather_than_refusing() -> None:
    old, new = Key(), Key()
    auth = Auth(old)
    v = verifier(auth, min_refetch=0.5)
    await v.refresh()
    auth.published.append(new)
    started = time.monotonic()
    assert (await v.verify(new.token())).user_id == "someone"
    waited = time.monotonic() - started
    assert 0.4 <= waited < 1.0, waited
    assert len(auth.began) == 2


async def test_made_up_kids_cost_at_most_one_fetch_per_interval() -> None:
    key = Key()
    auth = Auth(key, latency=0.01)
    v = verifier(auth, min_refetch=0.2)
    await v.refresh()
    started = time.monotonic()

    async def bogus() -> None:
        with pytest.raises(InvalidToken, match="unknown key"):
            await v.verify(key.token(kid=uuid.uuid4().hex))

    await asyncio.gather(*(bogus() for _ in range(20)))
    for _ in range(5):
        await asyncio.gather(*(bogus() for _ in range(5)))
    elapsed = time.monotonic() - started
    began = auth.began[1:]
    assert all(b - a >= 0.19 for a, b in zip(auth.began, began, strict=False)), auth.began
    assert len(began) <= elapsed / 0.2 + 1
    # The known key is still verified at once meanwhile.
    assert (await v.verify(key.token())).user_id == "someone"


async def test_a_fetch_that_began_before_the_token_is_not_the_last_word() -> None:
    """A token whose key appeared after a fetch under way began waits for another fetch:
    the one under way may hold the older key set."""
    old, new = Key(), Key()
    auth = Auth(old, latency=0.2)
    v = verifier(auth, min_refetch=0.1)
    await v.refresh()
    await asyncio.sleep(0.15)
    probe = asyncio.create_task(v.verify(old.token(kid=uuid.uuid4().hex)))  # begins a fetch
    await asyncio.sleep(0.05)
    auth.published.append(new)  # the new key appears while that fetch is under way
    assert (await v.verify(new.token())).user_id == "someone"
    with pytest.raises(InvalidToken):
        await probe
    assert len(auth.began) == 3


async def test_an_unknown_kid_while_auth_is_unreachable_is_unavailable_not_refused() -> None:
    old, new = Key(), Key()
    auth = Auth(old, latency=0.01)
    v = verifier(auth, min_refetch=0.05)
    await v.refresh()
    auth.failing = True
    with pytest.raises(KeysUnavailable):
        await v.verify(new.token())
    # Known keys keep verifying.
    assert (await v.verify(old.token())).user_id == "someone"


async def test_a_retired_key_stops_verifying_at_the_next_refresh_and_a_failure_keeps_keys() -> None:
    old, new = Key(), Key()
    auth = Auth(old, new, latency=0.01)
    v = verifier(auth, min_refetch=0.05, refresh=0.3)
    await v.refresh()
    token = old.token()
    assert (await v.verify(token)).user_id == "someone"
    auth.failing = True
    await asyncio.sleep(0.35)
    assert (await v.verify(token)).user_id == "someone"  # auth away: the keys held stay
    auth.failing = False
    auth.published.remove(old)
    await asyncio.sleep(0.1)
    with pytest.raises(InvalidToken, match="unknown key"):
        await v.verify(token)
    assert (await v.verify(new.token())).user_id == "someone"


async def test_a_caller_that_leaves_does_not_end_the_shared_fetch() -> None:
    old, new = Key(), Key()
    auth = Auth(old, latency=0.2)
    v = verifier(auth, min_refetch=0.0)
    await v.refresh()
    auth.published.append(new)
    leaver = asyncio.create_task(v.verify(new.token()))
    stayer = asyncio.create_task(v.verify(new.token()))
    await asyncio.sleep(0.05)
    leaver.cancel()
    assert (await stayer).user_id == "someone"
    assert len(auth.began) == 2
