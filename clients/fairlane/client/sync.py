"""A blocking wrapper: the async client running on a private event-loop thread.

SyncClient takes Client's constructor arguments and exposes Client's calls, each derived
from the async method (`_blocking`), so the two cannot drift apart.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, TypedDict, TypeVar, Unpack

from fairlane.client._wire import Deadline, Payload
from fairlane.client.async_client import Client
from fairlane.client.errors import ClientClosed
from fairlane.client.types import Result, Tokens

__all__ = ["SyncClient"]

P = ParamSpec("P")
T = TypeVar("T")
S = TypeVar("S")


class _SubmitOptions(TypedDict, total=False):
    idempotency_key: str | None
    deadline: Deadline
    max_attempts: int
    client_ref: str


def _takes_arguments_of(
    source: Callable[P, object],
) -> Callable[[Callable[Concatenate[S, ...], None]], Callable[Concatenate[S, P], None]]:
    """Gives an `__init__(self, *args, **kwargs)` the parameters of `source`, for type
    checkers and for help(), without writing them out again."""

    def apply(init: Callable[Concatenate[S, ...], None]) -> Callable[Concatenate[S, P], None]:
        own = inspect.signature(init).parameters["self"]
        params = [own, *inspect.signature(source).parameters.values()]
        init.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        return init

    return apply


def _blocking(
    method: Callable[Concatenate[Client, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[SyncClient, P], T]:
    """Client.<method> as a blocking SyncClient method with the same parameters."""

    @functools.wraps(method)
    def call(self: SyncClient, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._run(method(self.aio, *args, **kwargs))

    return call


def _blocking_iterator(
    method: Callable[Concatenate[Client, P], AsyncIterator[T]],
) -> Callable[Concatenate[SyncClient, P], Iterator[T]]:
    """Client.<async generator> as a plain iterator with the same parameters."""

    @functools.wraps(method)
    def call(self: SyncClient, /, *args: P.args, **kwargs: P.kwargs) -> Iterator[T]:
        return self._iterate(method(self.aio, *args, **kwargs))

    return call


class SyncClient:
    """The same calls as Client, blocking. Use it from threads or scripts without
    asyncio; it must not be called from inside the event loop it owns.

    ```python
    with SyncClient("127.0.0.1:50051", "127.0.0.1:50052") as client:
        client.login("alice", "secret-password")
        result = client.submit_and_wait("echo", b"hello")
    ```

    It takes Client's constructor arguments (see Client).
    """

    @_takes_arguments_of(Client)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Fail on bad arguments here, in the caller's thread, not on the loop's.
        inspect.signature(Client).bind(*args, **kwargs)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="fairlane-sync-client", daemon=True
        )
        self._thread.start()

        async def make() -> Client:
            return Client(*args, **kwargs)

        self._closed = False
        self.aio: Client = self._run(make())
        """The underlying async client (its coroutines must run on this client's loop)."""

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._closed:
            coro.close()
            raise ClientClosed()
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

    register = _blocking(Client.register)
    login = _blocking(Client.login)
    logout = _blocking(Client.logout)
    refresh = _blocking(Client.refresh)
    whoami = _blocking(Client.whoami)
    enqueue = _blocking(Client.enqueue)
    get = _blocking(Client.get)
    requests = _blocking_iterator(Client.requests)
    cancel = _blocking(Client.cancel)
    lane = _blocking(Client.lane)
    watch = _blocking_iterator(Client.watch)
    worker_status = _blocking(Client.worker_status)
    list_handlers = _blocking(Client.list_handlers)
    pause = _blocking(Client.pause)
    resume = _blocking(Client.resume)
    drain = _blocking(Client.drain)

    def submit_and_wait(
        self,
        handler: str,
        payload: Payload = b"",
        *,
        timeout: float | None = None,
        **options: Unpack[_SubmitOptions],
    ) -> Result:
        """Sends one request on a Session and waits for its Result (any status; see
        Result.raise_for_status). Takes Session.submit's options; raises Rejected if it
        was not accepted, and DeadlineExceeded when `timeout` seconds pass first."""

        async def run() -> Result:
            async with self.aio.session(record_events=False, timeout=timeout) as session:
                future = await session.submit(handler, payload, **options)
                await session.close()
                return await future

        return self._run(run())
