"""The handler API: what a worker handler receives and how it signals failure.

A handler is `async def name(ctx: HandlerContext, payload: bytes) -> bytes` (or a plain
function, which the worker runs in a thread), registered through the `fairlane.handlers`
entry-point group or `fairlane serve worker --handlers module:attr`.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, Protocol, TypeVar


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


F = TypeVar("F", bound=Callable[..., Any])


def handler(
    *, name: str | None = None, max_attempts: int | None = None, timeout: float | None = None
) -> Callable[[F], F]:
    """Declares a handler's defaults: its name, attempts before dead-lettering, and a
    per-attempt time limit in seconds."""

    def mark(fn: F) -> F:
        fn.__fairlane__ = {  # type: ignore[attr-defined]
            "name": name,
            "max_attempts": max_attempts,
            "timeout": timeout,
        }
        return fn

    return mark
