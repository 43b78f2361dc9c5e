"""A blocking wrapper: the async client running on a private event-loop thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from types import TracebackType
from typing import Any, TypeVar

from fairlane.client._wire import Deadline, Payload
from fairlane.client.async_client import Client, TokenListener
from fairlane.client.retry import RetryPolicy
from fairlane.client.types import (
    Enqueued,
    HandlerInfo,
    Identity,
    Lane,
    Request,
    Result,
    Status,
    Tokens,
    WorkerState,
    WorkerStatus,
)

T = TypeVar("T")


class SyncClient:
    """The same calls as Client, blocking. Use it from threads or scripts without
    asyncio; it must not be called from inside the event loop it owns.

    ```python
    with SyncClient("127.0.0.1:50051", "127.0.0.1:50052") as client:
        client.login("alice", "secret-password")
        result = client.submit_and_wait("echo", b"hello")
    ```
    """

    def __init__(
        self,
        auth_target: str,
        queue_target: str,
        worker_target: str | None = None,
        *,
        tls: bool = False,
        root_certificates: bytes | None = None,
        timeout: float | None = 10.0,
        tokens: Tokens | None = None,
        on_tokens: TokenListener | None = None,
        retry: RetryPolicy | None = None,
        reconnect: RetryPolicy | None = None,
        refresh_margin: float | None = None,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="fairlane-sync-client", daemon=True
        )
        self._thread.start()

        async def make() -> Client:
            return Client(
                auth_target,
                queue_target,
                worker_target,
                tls=tls,
                root_certificates=root_certificates,
                timeout=timeout,
                tokens=tokens,
                on_tokens=on_tokens,
                retry=retry,
                reconnect=reconnect,
                refresh_margin=refresh_margin,
            )

        self._closed = False
        self.aio: Client = self._run(make())
        """The underlying async client (its coroutines must run on this client's loop)."""

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._closed:
            coro.close()
            raise RuntimeError("the client is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _iterate(self, agen: AsyncIterator[T]) -> Iterator[T]:
        try:
            while True:
                try:
                    yield self._run(agen.__anext__())  # type: ignore[arg-type]
                except StopAsyncIteration:
                    return
        finally:
            aclose = getattr(agen, "aclose", None)
            if aclose is not None and not self._closed:
                self._run(aclose())

    def close(self) -> None:
        if self._closed:
            return
        self._run(self.aio.close())
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def tokens(self) -> Tokens | None:
        return self.aio.tokens

    def set_tokens(self, tokens: Tokens | None) -> None:
        self.aio.set_tokens(tokens)

    # -- auth --------------------------------------------------------------------------

    def register(self, username: str, password: str) -> str:
        return self._run(self.aio.register(username, password))

    def login(self, username: str, password: str) -> Tokens:
        return self._run(self.aio.login(username, password))

    def logout(self) -> None:
        self._run(self.aio.logout())

    def refresh(self) -> Tokens:
        return self._run(self.aio.refresh())

    def whoami(self) -> Identity:
        return self._run(self.aio.whoami())

    # -- queue -------------------------------------------------------------------------

    def enqueue(
        self,
        handler: str,
        payload: Payload = b"",
        *,
        idempotency_key: str | None = None,
        deadline: Deadline = None,
        max_attempts: int = 0,
        client_ref: str = "",
    ) -> Enqueued:
        return self._run(
            self.aio.enqueue(
                handler,
                payload,
                idempotency_key=idempotency_key,
                deadline=deadline,
                max_attempts=max_attempts,
                client_ref=client_ref,
            )
        )

    def submit_and_wait(
        self,
        handler: str,
        payload: Payload = b"",
        *,
        idempotency_key: str | None = None,
        deadline: Deadline = None,
        max_attempts: int = 0,
        client_ref: str = "",
        timeout: float | None = None,
    ) -> Result:
        """Sends one request on a Session and waits for its Result (any status; see
        Result.raise_for_status). Raises Rejected if it was not accepted, and
        DeadlineExceeded when `timeout` seconds pass first."""

        async def run() -> Result:
            async with self.aio.session(record_events=False, timeout=timeout) as session:
                future = await session.submit(
                    handler,
                    payload,
                    idempotency_key=idempotency_key,
                    deadline=deadline,
                    max_attempts=max_attempts,
                    client_ref=client_ref,
                )
                await session.close()
                return await future

        return self._run(run())

    def get(self, request_id: str) -> Request:
        return self._run(self.aio.get(request_id))

    def requests(
        self, status: Status | str | None = None, page_size: int = 50
    ) -> Iterator[list[Request]]:
        """Pages of the caller's requests, newest first."""
        return self._iterate(self.aio.requests(status, page_size))

    def cancel(self, request_id: str) -> Status:
        return self._run(self.aio.cancel(request_id))

    def lane(self) -> Lane:
        return self._run(self.aio.lane())

    def watch(self, after_lane_seq: int = 0) -> Iterator[Result]:
        """Results with lane_seq > after_lane_seq, without end (break out of the loop)."""
        return self._iterate(self.aio.watch(after_lane_seq))

    # -- worker ------------------------------------------------------------------------

    def worker_status(self) -> WorkerStatus:
        return self._run(self.aio.worker_status())

    def list_handlers(self) -> list[HandlerInfo]:
        return self._run(self.aio.list_handlers())

    def pause(self, lane: str = "") -> WorkerState:
        return self._run(self.aio.pause(lane))

    def resume(self, lane: str = "") -> WorkerState:
        return self._run(self.aio.resume(lane))

    def drain(self, timeout_seconds: float = 0.0) -> tuple[WorkerState, int]:
        return self._run(self.aio.drain(timeout_seconds))
