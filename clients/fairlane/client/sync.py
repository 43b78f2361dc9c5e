"""A blocking wrapper: the async client running on a private event-loop thread.

SyncClient takes Client's constructor arguments and exposes Client's calls, each derived
from the async method (`_blocking`), so the two cannot drift apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from types import TracebackType
from typing import (
    Any,
    Concatenate,
    Generic,
    ParamSpec,
    TypedDict,
    TypeVar,
    TypeVarTuple,
    Unpack,
    cast,
)

from fairlane.client._wire import Deadline, Payload
from fairlane.client.async_client import Client
from fairlane.client.errors import ClientClosed
from fairlane.client.types import Result, Tokens

__all__ = ["SyncClient"]

P = ParamSpec("P")
T = TypeVar("T")
S = TypeVar("S")
Ts = TypeVarTuple("Ts")


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


# How long an interrupted call (Ctrl-C in the caller's thread) may take to end once
# cancelled, and how long close() waits for what is still on the loop before cancelling
# it. Both only bound a coroutine that ignores its cancellation: the client's own end at
# once.
_CANCEL_WAIT = 10.0
_SETTLE_WAIT = 10.0


class _ClientLoop(asyncio.SelectorEventLoop):
    """The client's private loop, which ignores callbacks handed to it once it is closed.

    grpc.aio ends a call cancelled by Channel.close() in Python at once, while gRPC core
    finishes the call's batch of operations a moment later. That completion event reaches
    the process through whichever loop reads grpc's shared socket first, which hands it
    to the call's own loop with call_soon_threadsafe; that raises 'Event loop is closed'
    in the other loop if this one was closed meanwhile, although the call, its task and
    its future are long over. So, once closed, this loop drops such callbacks."""

    def call_soon_threadsafe(
        self,
        callback: Callable[[*Ts], object],
        *args: *Ts,
        context: contextvars.Context | None = None,
    ) -> asyncio.Handle:
        try:
            return super().call_soon_threadsafe(callback, *args, context=context)
        except RuntimeError:
            if not self.is_closed():
                raise
            dropped = asyncio.Handle(callback, args, self, context)
            dropped.cancel()
            return dropped


class _Call(Generic[T]):
    """One blocking call: its coroutine runs as a task on the client's loop while the
    caller's thread waits for `ended`."""

    def __init__(self, coro: Coroutine[Any, Any, T]) -> None:
        self._coro = coro
        self._task: asyncio.Task[T] | None = None
        self._value: T | None = None
        self._error: BaseException | None = None
        self.ended = threading.Event()

    def start(self, tasks: set[asyncio.Task[Any]]) -> None:
        """On the loop: starts the task and keeps it in `tasks` while it runs."""
        task = self._task = asyncio.get_running_loop().create_task(self._coro)
        tasks.add(task)

        def finished(task: asyncio.Task[T]) -> None:
            tasks.discard(task)
            if task.cancelled():  # by close(), or by the caller, who is gone by now
                self._error = ClientClosed()
            elif (error := task.exception()) is not None:
                self._error = error
            else:
                self._value = task.result()
            self.ended.set()

        task.add_done_callback(finished)

    def cancel(self) -> None:
        """On the loop: cancels the task (started before this runs: both are callbacks
        of the loop, in the order they were asked for)."""
        if self._task is not None:
            self._task.cancel()

    def outcome(self) -> T:
        """In the caller's thread, once ended: the value, or the error raised."""
        error, self._error = self._error, None
        if error is not None:
            raise error
        return cast(T, self._value)


class SyncClient:
    """The same calls as Client, blocking. Use it from threads or scripts without
    asyncio; it must not be called from inside the event loop it owns.

    ```python
    with SyncClient("127.0.0.1:50051", "127.0.0.1:50052") as client:
        client.login("alice", "secret-password")
        result = client.submit_and_wait("echo", b"hello")
    ```

    It takes Client's constructor arguments (see Client).

    Any number of threads may call one SyncClient at once. Each call runs as a task on
    the client's loop thread while the caller waits. A caller interrupted while it waits
    (Ctrl-C: KeyboardInterrupt) has its call cancelled on the loop, waits for it to end
    (a Session is cancelled, a stream closed), and gets the KeyboardInterrupt. close()
    may be called from any thread, any number of times: every call in progress returns
    (its result, or ClientClosed), later ones raise ClientClosed at once, and the loop
    ends only once nothing runs on it.
    """

    @_takes_arguments_of(Client)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Fail on bad arguments here, in the caller's thread, not on the loop's.
        inspect.signature(Client).bind(*args, **kwargs)
        # _closed and the calls started are read and changed under _lock: a call is
        # started on the loop only while the client is open, so close() sees every one.
        self._lock = threading.Lock()
        self._closed = False
        self._tasks: set[asyncio.Task[Any]] = set()  # of the calls running (on the loop)
        self._close_requested = asyncio.Event()
        self._loop = _ClientLoop()
        self._thread = threading.Thread(
            target=self._serve, name="fairlane-sync-client", daemon=True
        )
        self._thread.start()

        async def make() -> Client:
            return Client(*args, **kwargs)

        try:
            self.aio: Client = self._run(make())
            """The underlying async client (its coroutines must run on this client's loop)."""
        except BaseException:
            self.close()
            raise

    # -- the loop thread -----------------------------------------------------------------

    def _serve(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._until_closed())
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                loop.close()

    async def _until_closed(self) -> None:
        await self._close_requested.wait()
        try:
            aio: Client | None = getattr(self, "aio", None)
            if aio is not None:
                await aio.close()  # calls in progress end with ClientClosed
        finally:
            # What still runs is cancelled (a call waiting to retry, say): ClientClosed too.
            for task in list(self._tasks):
                task.cancel()
            await self._settle()

    async def _settle(self) -> None:
        """Waits until no other task runs on the loop: the calls, and grpc's own tasks,
        which end once their calls' cancellation has come back. Closing the loop before
        would leave grpc's completion events for it to fail ('Event loop is closed') and
        tasks pending ('Task was destroyed but it is pending!')."""
        me = asyncio.current_task()
        deadline = self._loop.time() + _SETTLE_WAIT
        while tasks := {t for t in asyncio.all_tasks() if t is not me}:
            left = deadline - self._loop.time()
            if left <= 0:
                for task in tasks:
                    task.cancel()
                await asyncio.wait(tasks, timeout=1.0)
                return
            await asyncio.wait(tasks, timeout=left)

    # -- calls ---------------------------------------------------------------------------

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError(
                "a SyncClient call from its own event loop would wait for itself: "
                "await client.aio's coroutine instead"
            )
        call = _Call(coro)
        scheduled = False
        try:
            with self._lock:
                if not self._closed:
                    self._loop.call_soon_threadsafe(call.start, self._tasks)
                    scheduled = True
            if scheduled:
                call.ended.wait()
        except BaseException:
            # Interrupted (KeyboardInterrupt) once the call was handed to the loop, while
            # waiting or just before: the call is cancelled on the loop and ends there (a
            # Session is cancelled, a stream closed) before the interruption goes on, so
            # nothing of it is left running.
            if scheduled:
                with contextlib.suppress(RuntimeError):  # the loop has ended: so has the call
                    self._loop.call_soon_threadsafe(call.cancel)
                call.ended.wait(_CANCEL_WAIT)
            raise
        if not scheduled:
            coro.close()
            raise ClientClosed()
        return call.outcome()

    def _iterate(self, agen: AsyncIterator[T]) -> Iterator[T]:
        stepping: asyncio.Task[Any] | None = None  # the step running on the loop, if any

        async def step() -> T:
            nonlocal stepping
            stepping = asyncio.current_task()
            try:
                return await agen.__anext__()
            finally:
                stepping = None

        try:
            while True:
                try:
                    item = self._run(step())
                except StopAsyncIteration:
                    return
                yield item
        finally:
            # Normally no step runs now: each has ended (or been cancelled and ended) in
            # _run; close() below ends one that still does.
            aclose = getattr(agen, "aclose", None)
            if aclose is not None:

                async def close() -> None:
                    # A step still running (the caller was interrupted before it could be
                    # cancelled, or it outlasted the wait for its cancel) is ended first:
                    # aclose() of a generator that runs raises RuntimeError.
                    running = stepping
                    if running is not None and not running.done():
                        running.cancel()
                        await asyncio.wait([running])
                    await aclose()

                with contextlib.suppress(ClientClosed):  # closed: the loop closed it
                    self._run(close())

    def close(self) -> None:
        """Closes the client: calls in progress in other threads end (ClientClosed),
        later calls raise ClientClosed, and the loop thread ends. Safe from any thread
        and more than once; returns once the client is closed."""
        with self._lock:
            first = not self._closed
            self._closed = True
        if first:
            self._loop.call_soon_threadsafe(self._close_requested.set)
        if threading.current_thread() is not self._thread:
            self._thread.join()

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
        was not accepted, and DeadlineExceeded when `timeout` seconds pass first (None
        or inf: no limit; see Client.session)."""

        async def run() -> Result:
            async with self.aio.session(record_events=False, timeout=timeout) as session:
                future = await session.submit(handler, payload, **options)
                await session.close()
                return await future

        return self._run(run())
