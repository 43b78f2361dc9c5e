"""The handlers a worker can run: from the `fairlane.handlers` entry points and module:attr."""

from __future__ import annotations

import importlib
import inspect
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from fairlane.handlers import Hooks
from fairlane_server.core.logging import get_logger

log = get_logger(__name__)

ENTRY_POINT_GROUP = "fairlane.handlers"
HOOKS_GROUP = "fairlane.hooks"
# What an enqueue can name (the log keeps 128 characters): printable, no spaces or NULs.
NAME = re.compile(r"[A-Za-z0-9_.:/-]{1,128}")
# As the queue's limit on an enqueue's max_attempts (services/queue/validation.py).
MAX_ATTEMPTS = 100
EXECUTORS = ("auto", "thread", "process")


class HandlerError(ValueError):
    """A handler declaration the worker cannot run: it refuses to start, saying which."""


@dataclass(frozen=True, slots=True)
class Handler:
    name: str
    fn: Callable[..., Any]
    is_async: bool
    max_attempts: int
    timeout: float | None
    description: str
    executor: str = "auto"


def _describe(name: str, fn: Callable[..., Any], default_attempts: int) -> Handler:
    """The handler `fn` declares, checked here: a bad value stored in the log would reach
    every request of that handler (a negative max_attempts stopped their lanes for good)."""
    meta: dict[str, Any] = getattr(fn, "__fairlane__", {})
    name = meta.get("name") or name
    where = (
        f"handler {name!r} ({getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', fn)!s})"
    )
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise HandlerError(
            f"{where}: a name is 1-128 letters, digits or . _ : / - (no spaces or NULs)"
        )
    if not callable(fn):
        raise HandlerError(f"{where}: {type(fn).__name__} is not callable")
    attempts = meta.get("max_attempts")
    if attempts is not None and (
        isinstance(attempts, bool)
        or not isinstance(attempts, int)
        or not 1 <= attempts <= MAX_ATTEMPTS
    ):
        raise HandlerError(f"{where}: max_attempts must be a whole number from 1 to {MAX_ATTEMPTS}")
    timeout = meta.get("timeout")
    if timeout is not None and (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not math.isfinite(timeout)
        or timeout <= 0
    ):
        raise HandlerError(f"{where}: timeout must be a number of seconds above 0, or None")
    executor = meta.get("executor") or "auto"
    is_async = inspect.iscoroutinefunction(fn)
    if executor not in EXECUTORS:
        raise HandlerError(f"{where}: executor must be one of {', '.join(EXECUTORS)}")
    if is_async and executor != "auto":
        raise HandlerError(f"{where}: an async handler runs on the event loop, not a {executor}")
    doc = inspect.getdoc(fn) or ""
    return Handler(
        name=name,
        fn=fn,
        is_async=is_async,
        max_attempts=attempts or default_attempts,
        timeout=float(timeout) if timeout is not None else None,
        description=doc.splitlines()[0] if doc else "",
        executor=executor,
    )


def load(extra: Iterable[str], *, default_attempts: int) -> dict[str, Handler]:
    """Entry points first, then each `module:attr` (later names win)."""
    found: dict[str, Handler] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        spec = _describe(ep.name, ep.load(), default_attempts)
        found[spec.name] = spec
    if "echo" not in found:
        # Running from a source tree without the package installed: still offer built-ins.
        from fairlane_server.worker import builtins

        for name in ("noop", "echo", "sleep", "cpu", "fail"):
            found[name] = _describe(name, getattr(builtins, name), default_attempts)
    for ref in extra:
        spec = _describe(ref.partition(":")[2], _import(ref), default_attempts)
        if spec.name in found:
            log.warning("handler_replaced", handler=spec.name, by=ref)
        found[spec.name] = spec
    return found


def _import(ref: str) -> Any:
    module_name, sep, attr = ref.partition(":")
    if not sep or not attr:
        raise HandlerError(f"reference {ref!r} must look like module:attr")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise HandlerError(f"{ref}: cannot import {module_name}: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise HandlerError(f"{ref}: {module_name} has no {attr}") from None


def load_hooks(extra: Iterable[str]) -> list[Hooks]:
    """Hook objects from the `fairlane.hooks` entry points, then each `module:attr`."""
    found: list[Hooks] = []
    for ref in [*(ep.value for ep in entry_points(group=HOOKS_GROUP)), *extra]:
        hooks = _import(ref)
        if isinstance(hooks, type):
            hooks = hooks()
        if not isinstance(hooks, Hooks):
            raise TypeError(f"{ref} is not a fairlane.Hooks instance or subclass")
        found.append(hooks)
    return found
