"""Bounded retries with full jitter that honour the server's RetryInfo delay."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from fairlane.client.errors import error_from_rpc, retry_delay_ms

T = TypeVar("T")

Sleep = Callable[[float], Awaitable[object]]

RETRYABLE = frozenset({"RESOURCE_EXHAUSTED", "UNAVAILABLE"})
# CANCELLED as a call's error (not as asyncio.CancelledError, which is our own caller
# giving up) came from the other side: a stream reset on the way, or a server refusing
# the call under a burst before it ran. It may also have cut a call that had acted, so
# only idempotent calls try again.
RETRYABLE_IF_IDEMPOTENT = frozenset({"CANCELLED"})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How unary calls are retried on RESOURCE_EXHAUSTED and UNAVAILABLE (and, when
    idempotent, on a CANCELLED that came from the peer).

    - At most `max_attempts` attempts in all (1 disables retries).
    - The wait before attempt n+1 is the server's RetryInfo delay (if it sent one) plus
      a full-jitter backoff: uniform(0, min(max_backoff, base_backoff * 2**(n-1))). So a
      client never comes back earlier than the server asked, and clients told the same
      delay do not all come back at once.
    - A server delay above `max_server_delay` is not waited for: the error is raised.
    - A call that is not idempotent (an enqueue without an idempotency key, Register,
      Refresh) is retried only when the server attached RetryInfo, which it does only
      when it refused the call before doing anything. A bare UNAVAILABLE may mean the
      connection broke after the server acted, so it is raised instead.
    """

    max_attempts: int = 5
    base_backoff: float = 0.1
    max_backoff: float = 5.0
    max_server_delay: float = 30.0

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """Full-jitter backoff after failed attempt number `attempt` (1-based)."""
        cap = min(self.max_backoff, self.base_backoff * (2 ** (attempt - 1)))
        return (rng or random).uniform(0.0, cap)

    def delay(
        self,
        attempt: int,
        code: str,
        server_delay_ms: int | None,
        *,
        idempotent: bool,
        rng: random.Random | None = None,
    ) -> float | None:
        """Seconds to wait before the next attempt, or None to give up and raise."""
        if attempt >= self.max_attempts:
            return None
        if code in RETRYABLE_IF_IDEMPOTENT:
            return self.backoff(attempt, rng) if idempotent else None
        if code not in RETRYABLE:
            return None
        if server_delay_ms is None:
            if not idempotent:
                return None
            return self.backoff(attempt, rng)
        server_delay = server_delay_ms / 1000
        if server_delay > self.max_server_delay:
            return None
        return server_delay + self.backoff(attempt, rng)


NO_RETRY = RetryPolicy(max_attempts=1)


async def call_with_retry(
    attempt: Callable[[], Awaitable[T]],
    *,
    policy: RetryPolicy,
    idempotent: bool,
    on_unauthenticated: Callable[[], Awaitable[bool]] | None = None,
    sleep: Sleep = asyncio.sleep,
    rng: random.Random | None = None,
) -> T:
    """Runs `attempt` until it succeeds or the policy gives up; raises FairlaneError.

    On UNAUTHENTICATED, `on_unauthenticated` is awaited once; if it returns True (new
    credentials were obtained) the call is tried once more, without counting as a retry.
    """
    tries = 0
    reauthenticated = False
    while True:
        tries += 1
        try:
            return await attempt()
        except grpc.aio.AioRpcError as err:
            code = err.code()
            if (
                code == grpc.StatusCode.UNAUTHENTICATED
                and on_unauthenticated is not None
                and not reauthenticated
            ):
                reauthenticated = True
                tries -= 1
                if await on_unauthenticated():
                    continue
                raise error_from_rpc(err) from err
            wait = policy.delay(
                tries, code.name, retry_delay_ms(err), idempotent=idempotent, rng=rng
            )
            if wait is None:
                raise error_from_rpc(err) from err
            await sleep(wait)
