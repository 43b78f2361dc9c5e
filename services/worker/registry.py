"""The handlers a worker can run: from the `fairlane.handlers` entry points and module:attr."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from fairlane.handlers import Hooks

ENTRY_POINT_GROUP = "fairlane.handlers"
HOOKS_GROUP = "fairlane.hooks"


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
    meta: dict[str, Any] = getattr(fn, "__fairlane__", {})
    doc = inspect.getdoc(fn) or ""
    return Handler(
        name=meta.get("name") or name,
        fn=fn,
        is_async=inspect.iscoroutinefunction(fn),
        max_attempts=meta.get("max_attempts") or default_attempts,
        timeout=meta.get("timeout"),
        description=doc.splitlines()[0] if doc else "",
        executor=meta.get("executor") or "auto",
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
        found[spec.name] = spec
    return found


def _import(ref: str) -> Any:
    module_name, sep, attr = ref.partition(":")
    if not sep or not attr:
        raise ValueError(f"reference {ref!r} must look like module:attr")
    return getattr(importlib.import_module(module_name), attr)


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
