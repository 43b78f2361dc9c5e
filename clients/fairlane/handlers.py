"""The handler API: what a worker handler receives and how it signals failure.

A handler is `async def name(ctx: HandlerContext, payload: bytes) -> bytes` (or a plain
function, which the worker runs in a thread), registered through the `fairlane.handlers`
entry-point group or `fairlane serve worker --handlers module:attr`.

A cancel or a timeout stops an async handler (it gets CancelledError) but cannot stop a
plain function's thread or process: its request ends at once, and the call runs on,
holding its concurrency slot and its lane (the lane's next request, or the retry, starts
once it has returned). Plain functions that may block should bound their own waits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, Protocol, TypeVar


class PermanentError(Exception):
    """Raise from a handler to fail the request at once, without retries."""


class HandlerContext(Protocol):
    @property
    def request_id(self) -> str: ...
    @property
    def attempt(self) -> int:
        """1 for the first attempt, 2 for the first retry, ..."""

    @property
    def deadline(self) -> datetime | None: ...
    @property
    def user_id(self) -> str: ...
    @property
    def logger(self) -> Any: ...

    async def progress(self, done: int, total: int = 0, message: str = "") -> None:
        """Sends a Progress event to the client's Session; never blocks on the client."""


@dataclass(frozen=True, slots=True)
class PlainContext:
    """What a handler run in a separate process gets: the same facts, no progress
    reporting (another process cannot reach the worker's event loop)."""

    request_id: str
    user_id: str
    attempt: int
    deadline: datetime | None


class Hooks:
    """Lifecycle hooks of a worker. Subclass, override what you need, and register an
    instance (or the class) with `fairlane serve worker --hooks module:attr` or the
    `fairlane.hooks` entry-point group. A hook that raises is logged and does not change
    the request's outcome."""

    async def on_startup(self) -> None:
        """Called once before the worker takes its first request."""

    async def on_shutdown(self) -> None:
        """Called once after the worker has drained."""

    async def before_request(self, ctx: HandlerContext, handler: str) -> None:
        """Called before every attempt."""

    async def after_request(
        self, ctx: HandlerContext, handler: str, status: str, error: str
    ) -> None:
        """Called after every attempt; status is SUCCEEDED, FAILED, RETRY, DEAD or CANCELLED."""


F = TypeVar("F", bound=Callable[..., Any])
Executor = Literal["auto", "thread", "process"]


def handler(
    *,
    name: str | None = None,
    max_attempts: int | None = None,
    timeout: float | None = None,
    executor: Executor = "auto",
) -> Callable[[F], F]:
    """Declares a handler's defaults: its name, attempts before dead-lettering, a
    per-attempt time limit in seconds, and where a plain (sync) function runs: "auto" and
    "thread" use a thread, "process" a process pool for CPU-bound work (the function must
    be importable at module level, and receives a PlainContext).

    Past the time limit the attempt fails (and is retried, if attempts are left). An async
    handler is cancelled; a plain function's thread or process cannot be, and keeps its
    concurrency slot and its lane until it returns: the retry starts only then."""

    def mark(fn: F) -> F:
        fn.__fairlane__ = {  # type: ignore[attr-defined]
            "name": name,
            "max_attempts": max_attempts,
            "timeout": timeout,
            "executor": executor,
        }
        return fn

    return mark
