"""ResultWatcher: WatchResults as an endless iterator that reopens a broken stream."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncGenerator

import grpc

from fairlane.client._wire import UINT64_MAX, bearer, unsigned
from fairlane.client.channels import Channels
from fairlane.client.errors import FairlaneError, Unavailable, error_from_rpc, retry_delay_ms
from fairlane.client.retry import RetryPolicy, Sleep
from fairlane.client.tokens import TokenManager
from fairlane.client.types import Result
from fairlane.queue.v1 import queue_pb2

__all__ = ["STREAM_RECONNECT", "ResultWatcher"]

STREAM_RECONNECT = RetryPolicy(max_attempts=10, base_backoff=0.25, max_backoff=5.0)
"""Reopening WatchResults: 10 attempts, at most about 28 s of jittered waits in all."""


class ResultWatcher:
    """Streams a lane's results; shared by Client.watch and a Session resuming after a
    break."""

    def __init__(
        self,
        channels: Channels,
        tokens: TokenManager,
        policy: RetryPolicy = STREAM_RECONNECT,
        *,
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self._channels = channels
        self._tokens = tokens
        self.policy = policy
        self._sleep = sleep
        self._rng = rng or random.Random()

    async def back_off(self, failures: int, code: str, server_delay_ms: int | None) -> bool:
        """Waits before reopening a stream that broke `failures` times in a row, per
        `policy`; returns False, at once, when the policy gives up."""
        wait = self.policy.delay(failures, code, server_delay_ms, idempotent=True, rng=self._rng)
        if wait is None:
            return False
        await self._sleep(wait)
        return True

    async def watch(
        self, after_lane_seq: int = 0, *, reconnect: bool = True
    ) -> AsyncGenerator[Result, None]:
        """Results with lane_seq > after_lane_seq, stored ones first, then live ones,
        without end. A broken stream (UNAVAILABLE, or ended by a server shutting down) is
        reopened after the last result seen, with jittered backoff, up to
        `policy.max_attempts` times in a row; an expired token is refreshed once. If the
        client is closed meanwhile, raises ClientClosed."""
        last = unsigned("after_lane_seq", after_lane_seq, UINT64_MAX)
        failures = 0
        reauthenticated = False
        while True:
            token = await self._tokens.access_token()
            call = self._channels.queue().WatchResults(
                queue_pb2.WatchResultsRequest(after_lane_seq=last), metadata=bearer(token)
            )
            try:
                while True:
                    with self._channels.interrupted_by_close():
                        message = await call.read()
                    if message is grpc.aio.EOF:
                        break
                    result = Result.from_proto(message.result)
                    if result.lane_seq <= last:
                        continue
                    last = result.lane_seq
                    failures = 0
                    reauthenticated = False
                    yield result
                # The server ended the stream (it is shutting down): reopen elsewhere.
                code, server_delay = "UNAVAILABLE", None
                ended: FairlaneError = Unavailable("the server ended the result stream")
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.UNAUTHENTICATED and not reauthenticated:
                    reauthenticated = True
                    if await self._tokens.refresh_if_current(token):
                        continue
                code, server_delay = err.code().name, retry_delay_ms(err)
                ended = error_from_rpc(err)
            finally:
                call.cancel()
            failures += 1
            if not reconnect or not await self.back_off(failures, code, server_delay):
                raise ended
