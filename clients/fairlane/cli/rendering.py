"""What the client commands print: text and JSON for results, one-line errors on stderr."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import enum
import errno
import functools
import json
import os
import sys
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, ParamSpec, TypeVar

import typer
from rich.console import Console, RenderableType
from rich.table import Table

from fairlane.cli import config
from fairlane.client import FairlaneError, NotLoggedIn, Rejected, Result, Status

P = ParamSpec("P")
T = TypeVar("T")

# A command whose stdout is closed under it (`fairlane watch | head -1`) ends quietly with
# this exit code, as a Unix tool killed by SIGPIPE does (128 + 13).
EXIT_BROKEN_PIPE = 141


class _Console(Console):
    def on_broken_pipe(self) -> None:
        # Rich's own exits 1 on the spot; cli_errors ends the command instead.
        raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))


# Piped output is not cut to 80 columns: tables keep whole ids.
out = _Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err = _Console(stderr=True, highlight=False, soft_wrap=True)

JsonOutput = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]


# -- errors --------------------------------------------------------------------------------


def fail(message: str, code: int = 1) -> typer.Exit:
    """Prints `error: <message>` as one line on stderr; raise what it returns."""
    line = " ".join(message.split())  # one line, whatever the server sent
    typer.echo(f"error: {line}", err=True)
    return typer.Exit(code)


def describe(exc: FairlaneError) -> str:
    if isinstance(exc, NotLoggedIn):
        return "not logged in: run `fairlane login` first"
    if isinstance(exc, Rejected):
        return str(exc)
    code = f" ({exc.code})" if exc.code else ""
    retry = f"; retry after {exc.retry_after_ms} ms" if exc.retry_after_ms else ""
    return f"{exc.message}{code}{retry}"


def output_closed() -> typer.Exit:
    """The output was closed under the command (its reader is gone): nothing more can be
    printed, and there is nothing to say. Points stdout at /dev/null so that Python's
    last flush at exit cannot fail again; raise what it returns."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    out.quiet = True
    return typer.Exit(EXIT_BROKEN_PIPE)


def cli_errors(fn: Callable[P, T]) -> Callable[P, T]:
    """Turns every failure into one `error: ...` line and a non-zero exit code; a closed
    stdout ends the command quietly (EXIT_BROKEN_PIPE)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except BrokenPipeError:
            raise output_closed() from None
        except FairlaneError as exc:
            raise fail(describe(exc)) from None
        except config.ConfigError as exc:
            raise fail(str(exc)) from None
        except KeyboardInterrupt:
            raise fail("interrupted", 130) from None
        except OSError as exc:
            where = f": {exc.filename}" if exc.filename else ""
            raise fail(f"{exc.strerror or exc}{where}") from None
        except Exception as exc:
            if os.environ.get("FAIRLANE_DEBUG"):
                raise
            raise fail(
                f"unexpected {type(exc).__name__}: {exc} (FAIRLANE_DEBUG=1 shows a traceback)"
            ) from None

    return wrapper


# -- values ----------------------------------------------------------------------------------


def text(data: bytes) -> str:
    """Bytes for a terminal: UTF-8 text as is, anything else as base64."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "base64:" + base64.b64encode(data).decode()


def jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, bytes):
        return text(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    return value


def print_json(value: Any) -> None:
    typer.echo(json.dumps(jsonable(value), ensure_ascii=False))


def show(value: T, json_output: bool, render: Callable[[T], RenderableType]) -> None:
    """`value` as one JSON line with --json, else as `render(value)` (text or a table)."""
    if json_output:
        print_json(value)
    else:
        out.print(render(value))


def when(value: datetime | None, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    """Local time, or '-' when unset."""
    return value.astimezone().strftime(fmt) if value else "-"


def key_values(rows: list[tuple[str, str]]) -> Table:
    table = Table(show_header=False, box=None)
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    return table


def one_line(data: bytes, limit: int = 80) -> str:
    flat = " ".join(text(data).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def status_style(status: Status) -> str:
    return {
        Status.SUCCEEDED: "green",
        Status.QUEUED: "cyan",
        Status.RUNNING: "yellow",
    }.get(status, "red")


def styled_status(status: Status) -> str:
    return f"[{status_style(status)}]{status.name}[/]"


def result_line(result: Result) -> str:
    detail = one_line(result.output) if result.ok else result.error
    return (
        f"{result.lane_seq:>6}  {result.request_id}  {result.handler or '-':<12} "
        f"[{status_style(result.status)}]{result.status.name:<9}[/]  {detail}"
    )


def failure(result: Result) -> str:
    detail = f": {result.error}" if result.error else ""
    return f"request {result.request_id} {result.status.name}{detail}"
