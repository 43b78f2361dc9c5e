"""Handler declarations are checked when a worker loads them: a bad one stops the worker
at start with a message naming it (`fairlane serve worker` exits 2), instead of reaching
the log and every request of that handler (a negative max_attempts stopped their lanes)."""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest

from fairlane.handlers import handler
from fairlane_server.worker.registry import HandlerError, load


def _fine() -> Any:
    """A new function each time: handler() marks the function it is given."""

    async def fine(ctx: Any, payload: bytes) -> bytes:
        return payload

    return fine


def _module(**attrs: Any) -> str:
    name = f"fake_handlers_{len(sys.modules)}"
    module = types.ModuleType(name)
    for key, value in attrs.items():
        setattr(module, key, value)
    sys.modules[name] = module
    return name


def _load(fn: Any) -> dict[str, Any]:
    return load([f"{_module(h=fn)}:h"], default_attempts=3)


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"max_attempts": -3}, "max_attempts must be a whole number from 1 to 100"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": 101}, "max_attempts"),
        ({"max_attempts": 2.5}, "max_attempts"),
        ({"timeout": -1}, "timeout must be a number of seconds above 0"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": float("nan")}, "timeout"),
        ({"timeout": "soon"}, "timeout"),
        ({"executor": "proces"}, "executor must be one of auto, thread, process"),
        ({"executor": "process"}, "an async handler runs on the event loop"),
        ({"name": "with space"}, "a name is 1-128 letters"),
        ({"name": "nul\x00"}, "a name is"),
        ({"name": "x" * 129}, "a name is"),
    ],
)
def test_a_bad_declaration_is_refused_by_name(options: dict[str, Any], says: str) -> None:
    fn = handler(**options)(_fine())
    with pytest.raises(HandlerError, match=says) as refused:
        _load(fn)
    assert "handler" in str(refused.value)


def test_references_that_do_not_resolve_or_call_are_refused() -> None:
    with pytest.raises(HandlerError, match="must look like module:attr"):
        load(["no_colon"], default_attempts=3)
    with pytest.raises(HandlerError, match="cannot import"):
        load(["no_such_module_anywhere:h"], default_attempts=3)
    with pytest.raises(HandlerError, match="has no missing"):
        load([f"{_module()}:missing"], default_attempts=3)
    with pytest.raises(HandlerError, match="is not callable"):
        load([f"{_module(h=42)}:h"], default_attempts=3)


def test_good_declarations_load_with_their_values() -> None:
    async def timed(ctx: Any, payload: bytes) -> bytes:
        return payload

    spec = _load(handler(name="mine.v1", max_attempts=7, timeout=2)(timed))["mine.v1"]
    assert (spec.max_attempts, spec.timeout, spec.executor) == (7, 2.0, "auto")
    plain = _load(_fine())["h"]
    assert (plain.max_attempts, plain.timeout) == (3, None)
