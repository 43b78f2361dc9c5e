"""Retry policy, error mapping and token refresh of fairlane.client, with fake calls."""

from __future__ import annotations

import base64
import json
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2

from fairlane.auth.v1 import auth_pb2
from fairlane.client import (
    Client,
    FairlaneError,
    InvalidArgument,
    NotFound,
    NotLoggedIn,
    ResourceExhausted,
    RetryPolicy,
    Status,
    Tokens,
    Unauthenticated,
    Unavailable,
)
from fairlane.client.channels import Channels
from fairlane.client.errors import error_from_rpc, retry_delay_ms
from fairlane.client.retry import call_with_retry


def rpc_error(code: Any, message: str = "nope", retry_after_ms: int | None = None) -> Any:
    """A real grpc.aio.AioRpcError as a server would send it, RetryInfo included."""
    trailing: tuple[tuple[str, Any], ...] = ()
    if retry_after_ms is not None:
        detail = status_pb2.Status().details.add()
        detail.Pack(
            error_details_pb2.RetryInfo(
                retry_delay=duration_pb2.Duration(
                    seconds=retry_after_ms // 1000, nanos=(retry_after_ms % 1000) * 1_000_000
                )
            )
        )
        status = status_pb2.Status(code=code.value[0], message=message, details=[detail])
        trailing = (("grpc-status-details-bin", status.SerializeToString()),)
    return grpc.aio.AioRpcError(
        code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing), details=message
    )


class Script:
    """A fake call: raises the scripted errors in turn, then returns `value`."""

    def __init__(self, *errors: Any, value: Any = "ok") -> None:
        self.errors = list(errors)
        self.value = value
        self.calls = 0

    async def __call__(self) -> Any:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.value


class Sleeps:
    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


def test_retry_info_is_read_from_the_status_details() -> None:
    assert retry_delay_ms(rpc_error(EXHAUSTED, "lane full", 1500)) == 1500
    assert retry_delay_ms(rpc_error(EXHAUSTED, "lane full")) is None
    err = error_from_rpc(rpc_error(EXHAUSTED, "lane full", 250))
    assert isinstance(err, ResourceExhausted)
    assert (err.code, err.message, err.retry_after_ms) == ("RESOURCE_EXHAUSTED", "lane full", 250)
    assert isinstance(error_from_rpc(rpc_error(grpc.StatusCode.NOT_FOUND)), NotFound)
    assert isinstance(error_from_rpc(rpc_error(grpc.StatusCode.INVALID_ARGUMENT)), InvalidArgument)
    other = error_from_rpc(rpc_error(grpc.StatusCode.DATA_LOSS, ""))
    assert type(other) is FairlaneError
    assert other.code == "DATA_LOSS"
    assert other.message == "data loss"


def test_policy_waits_at_least_the_server_delay_with_bounded_full_jitter() -> None:
    policy = RetryPolicy(max_attempts=4, base_backoff=0.1, max_backoff=0.3)
    rng = random.Random(7)
    for attempt in (1, 2, 3):
        cap = min(0.3, 0.1 * 2 ** (attempt - 1))
        waits = [
            policy.delay(attempt, "RESOURCE_EXHAUSTED", 500, idempotent=False, rng=rng)
            for _ in range(200)
        ]
        assert all(w is not None and 0.5 <= w <= 0.5 + cap for w in waits)
        assert max(w for w in waits if w is not None) > 0.5 + cap * 0.8  # spread, not fixed
    assert policy.delay(4, "RESOURCE_EXHAUSTED", 500, idempotent=True) is None  # bounded
    assert policy.delay(1, "INVALID_ARGUMENT", 500, idempotent=True) is None
    assert policy.delay(1, "UNAVAILABLE", 60_000, idempotent=True) is None  # too long
    # A bare UNAVAILABLE may come after the server acted: only idempotent calls retry.
    assert policy.delay(1, "UNAVAILABLE", None, idempotent=False) is None
    bare = policy.delay(1, "UNAVAILABLE", None, idempotent=True, rng=rng)
    assert bare is not None
    assert 0 <= bare <= 0.1


async def test_call_is_retried_after_the_server_delay_then_succeeds() -> None:
    call = Script(rpc_error(EXHAUSTED, "slow down", 200), rpc_error(UNAVAILABLE, "busy", 100))
    sleeps = Sleeps()
    policy = RetryPolicy(max_attempts=3, base_backoff=0.05)
    got = await call_with_retry(call, policy=policy, idempotent=False, sleep=sleeps)
    assert got == "ok"
    assert call.calls == 3
    assert len(sleeps.waits) == 2
    assert 0.2 <= sleeps.waits[0] <= 0.25
    assert 0.1 <= sleeps.waits[1] <= 0.2


async def test_retries_are_bounded_and_the_last_error_is_typed() -> None:
    call = Script(*[rpc_error(EXHAUSTED, "lane full", 10) for _ in range(10)])
    sleeps = Sleeps()
    with pytest.raises(ResourceExhausted) as err:
        await call_with_retry(
            call, policy=RetryPolicy(max_attempts=3), idempotent=True, sleep=sleeps
        )
    assert call.calls == 3
    assert len(sleeps.waits) == 2
    assert err.value.retry_after_ms == 10
    assert isinstance(err.value.__cause__, grpc.aio.AioRpcError)


async def test_not_idempotent_calls_are_not_retried_on_a_bare_unavailable() -> None:
    call = Script(rpc_error(UNAVAILABLE, "connection reset"))
    with pytest.raises(Unavailable):
        await call_with_retry(call, policy=RetryPolicy(), idempotent=False, sleep=Sleeps())
    assert call.calls == 1


async def test_a_cancelled_from_the_peer_is_retried_only_when_idempotent() -> None:
    # gRPC answers CANCELLED for a call it refused under a burst, before it ran.
    refused = grpc.StatusCode.CANCELLED
    call = Script(rpc_error(refused, "stream reset"), rpc_error(refused, "stream reset"))
    sleeps = Sleeps()
    got = await call_with_retry(call, policy=RetryPolicy(), idempotent=True, sleep=sleeps)
    assert got == "ok"
    assert call.calls == 3
    assert len(sleeps.waits) == 2

    once = Script(rpc_error(refused, "stream reset"))
    with pytest.raises(FairlaneError) as err:
        await call_with_retry(once, policy=RetryPolicy(), idempotent=False, sleep=Sleeps())
    assert err.value.code == "CANCELLED"
    assert once.calls == 1


async def test_unauthenticated_reauthenticates_once() -> None:
    refreshed: list[int] = []

    async def reauth() -> bool:
        refreshed.append(1)
        return True

    call = Script(rpc_error(grpc.StatusCode.UNAUTHENTICATED, "access token expired"))
    got = await call_with_retry(
        call, policy=RetryPolicy(max_attempts=1), idempotent=False, on_unauthenticated=reauth
    )
    assert (got, call.calls, len(refreshed)) == ("ok", 2, 1)

    twice = Script(*[rpc_error(grpc.StatusCode.UNAUTHENTICATED, "revoked") for _ in range(2)])
    with pytest.raises(Unauthenticated, match="revoked"):
        await call_with_retry(
            twice, policy=RetryPolicy(), idempotent=True, on_unauthenticated=reauth
        )
    assert twice.calls == 2

    async def no_refresh_token() -> bool:
        return False

    once = Script(rpc_error(grpc.StatusCode.UNAUTHENTICATED, "expired"))
    with pytest.raises(Unauthenticated):
        await call_with_retry(
            once, policy=RetryPolicy(), idempotent=True, on_unauthenticated=no_refresh_token
        )
    assert once.calls == 1


def _jwt(exp: float, **claims: str) -> str:
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'EdDSA'})}.{part({'exp': int(exp), 'sub': 'u', **claims})}.sig"


def test_tokens_expiry_comes_from_the_jwt_when_earlier() -> None:
    now = time.time()
    tokens = Tokens.issued(_jwt(now + 5), "refresh", 900, "alice")
    assert tokens.expires_at <= now + 5
    assert tokens.lifetime == 900
    assert tokens.expires_within(10)
    assert not Tokens.issued("opaque", "refresh", 900).expires_within(10)


def test_tokens_name_the_user_as_registered() -> None:
    """Usernames are case-insensitive: a login typed as ALICE is Alice's, and the client
    shows the spelling the token names, not the one typed."""
    now = time.time()
    assert Tokens.issued(_jwt(now + 900, name="Alice"), "r", 900, "ALICE").username == "Alice"
    assert Tokens.issued(_jwt(now + 900), "r", 900, "ALICE").username == "ALICE"
    assert Tokens.issued("opaque", "r", 900, "ALICE").username == "ALICE"


def test_status_parse() -> None:
    assert Status.parse("succeeded") is Status.SUCCEEDED
    assert Status.parse("REQUEST_STATUS_DEAD") is Status.DEAD
    assert Status.parse(5) is Status.CANCELLED
    with pytest.raises(ValueError, match="unknown status 'bogus'"):
        Status.parse("bogus")
    assert Status.FAILED.final
    assert not Status.RUNNING.final


class FakeAuthStub:
    """Stands in for AuthServiceStub: Refresh hands out numbered tokens."""

    def __init__(self) -> None:
        self.refreshes: list[str] = []

    async def Refresh(self, request: auth_pb2.RefreshRequest, **_: Any) -> auth_pb2.RefreshResponse:
        self.refreshes.append(request.refresh_token)
        n = len(self.refreshes)
        return auth_pb2.RefreshResponse(
            access_token=f"access-{n}", refresh_token=f"refresh-{n}", expires_in=100
        )


def _client_with_fake_auth(
    monkeypatch: pytest.MonkeyPatch, tokens: Tokens | None, seen: list[Tokens | None]
) -> tuple[Client, Any]:
    stub = FakeAuthStub()
    monkeypatch.setattr(Channels, "auth", lambda self: stub)
    return Client("auth:1", "queue:1", tokens=tokens, on_tokens=seen.append), stub


def _recording(outcomes: list[Any]) -> tuple[Callable[..., Awaitable[str]], list[Any]]:
    """A fake unary method returning (or raising) `outcomes` in turn; records its calls."""
    calls: list[Any] = []

    async def method(request: Any, *, metadata: Any, timeout: Any) -> str:
        calls.append((metadata, timeout))
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return str(outcome)

    return method, calls


async def test_client_refreshes_before_expiry_and_after_unauthenticated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[Tokens | None] = []
    soon = Tokens("access-0", "refresh-0", time.time() + 5, 100, "alice")
    client, stub = _client_with_fake_auth(monkeypatch, soon, seen)
    method, calls = _recording(["one"])
    # 5 s left of a 100 s token is under the margin (20 s): refresh first.
    assert await client._unary("queue", method, object(), timeout=3.0) == "one"
    assert stub.refreshes == ["refresh-0"]
    assert calls == [((("authorization", "Bearer access-1"),), 3.0)]
    assert seen[-1] == client.tokens
    assert client.tokens is not None
    assert client.tokens.username == "alice"

    # UNAUTHENTICATED: refresh once, try once more with the new token.
    method, calls = _recording(
        [rpc_error(grpc.StatusCode.UNAUTHENTICATED, "access token expired"), "two"]
    )
    assert await client._unary("queue", method, object()) == "two"
    assert stub.refreshes == ["refresh-0", "refresh-1"]
    assert [c[0][0][1] for c in calls] == ["Bearer access-1", "Bearer access-2"]
    assert calls[0][1] == 10.0  # the client's default deadline
    await client.close()


async def test_client_errors_name_the_service_and_need_a_login() -> None:
    client = Client("auth:1", "queue:1", retry=RetryPolicy(max_attempts=1))
    method, _ = _recording([rpc_error(UNAVAILABLE, "connection refused")])
    with pytest.raises(Unavailable, match="queue service at queue:1 is unavailable"):
        await client._unary("queue", method, object(), auth="none")
    method, calls = _recording(["never"])
    with pytest.raises(NotLoggedIn):
        await client._unary("queue", method, object())
    assert calls == []
    with pytest.raises(FairlaneError, match="no worker target"):
        await client.worker_status()
    await client.close()
