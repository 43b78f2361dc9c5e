"""Client commands of the `fairlane` CLI: login, enqueue, watch, worker control, ...

Every command prints one clear `error: ...` line on stderr and exits non-zero on
failure; a traceback is shown only with FAIRLANE_DEBUG=1.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import enum
import functools
import json
import os
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, BinaryIO, ParamSpec, TypeVar

import typer
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fairlane.cli import config
from fairlane.client import (
    Client,
    FairlaneError,
    NotLoggedIn,
    Rejected,
    Request,
    Result,
    Status,
    SubmitFuture,
    Tokens,
)
from fairlane.client import Progress as ProgressEvent

P = ParamSpec("P")
T = TypeVar("T")

DEFAULT_AUTH_TARGET = "127.0.0.1:50051"
DEFAULT_QUEUE_TARGET = "127.0.0.1:50052"
DEFAULT_WORKER_TARGET = "127.0.0.1:50053"

# Piped output is not cut to 80 columns: tables keep whole ids.
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, soft_wrap=True)


# -- shared options ------------------------------------------------------------------------

AuthTarget = Annotated[
    str | None,
    typer.Option(
        "--auth-target",
        envvar="FAIRLANE_AUTH_TARGET",
        help=f"AuthService host:port (default: cached by login, else {DEFAULT_AUTH_TARGET})",
        show_default=False,
    ),
]
QueueTarget = Annotated[
    str | None,
    typer.Option(
        "--queue-target",
        envvar="FAIRLANE_QUEUE_TARGET",
        help=f"QueueService host:port (default: cached by login, else {DEFAULT_QUEUE_TARGET})",
        show_default=False,
    ),
]
WorkerTarget = Annotated[
    str | None,
    typer.Option(
        "--worker-target",
        envvar="FAIRLANE_WORKER_TARGET",
        help=f"WorkerService host:port (default: cached by login, else {DEFAULT_WORKER_TARGET})",
        show_default=False,
    ),
]
Tls = Annotated[
    bool | None,
    typer.Option(
        "--tls/--no-tls",
        envvar="FAIRLANE_TLS",
        help="Use TLS (default: as at login, else no).",
        show_default=False,
    ),
]
CaFile = Annotated[
    Path | None,
    typer.Option(
        "--ca-file",
        envvar="FAIRLANE_CA_FILE",
        help="PEM root certificates for TLS (implies --tls; default: system roots).",
        show_default=False,
    ),
]
Timeout = Annotated[
    float,
    typer.Option("--timeout", envvar="FAIRLANE_TIMEOUT", help="Deadline of each call, seconds."),
]
JsonOutput = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]


@dataclasses.dataclass(frozen=True, slots=True)
class Connection:
    """Where to connect, from options/environment, else the cache, else defaults."""

    auth_target: str
    queue_target: str
    worker_target: str
    tls: bool
    ca_file: str
    timeout: float
    credentials: config.Credentials | None
    root_certificates: bytes | None = None

    @classmethod
    def resolve(
        cls,
        *,
        auth_target: str | None,
        queue_target: str | None,
        worker_target: str | None,
        tls: bool | None,
        ca_file: Path | None,
        timeout: float,
    ) -> Connection:
        cached = config.load()
        ca = str(ca_file) if ca_file else (cached.ca_file if cached else "")
        root = None
        if ca:
            try:
                root = Path(ca).read_bytes()
            except OSError as exc:
                raise FairlaneError(f"cannot read the CA file {ca}: {exc.strerror}") from exc
        return cls(
            auth_target=auth_target or (cached.auth_target if cached else DEFAULT_AUTH_TARGET),
            queue_target=queue_target or (cached.queue_target if cached else DEFAULT_QUEUE_TARGET),
            worker_target=worker_target
            or (cached.worker_target if cached else DEFAULT_WORKER_TARGET),
            tls=bool(ca) or (tls if tls is not None else bool(cached and cached.tls)),
            ca_file=ca,
            timeout=timeout,
            credentials=cached,
            root_certificates=root,
        )

    def credentials_for(self, tokens: Tokens) -> config.Credentials:
        return config.Credentials(
            username=tokens.username,
            access_token=tokens.access_token,
            refresh_token=tokens.refresh_token,
            expires_at=tokens.expires_at,
            lifetime=tokens.lifetime,
            auth_target=self.auth_target,
            queue_target=self.queue_target,
            worker_target=self.worker_target,
            tls=self.tls,
            ca_file=self.ca_file,
        )

    @asynccontextmanager
    async def client(
        self, *, use_login: bool = True, require_login: bool = True
    ) -> AsyncIterator[Client]:
        """A Client using (and keeping up to date in the cache) the cached tokens."""
        tokens = self.credentials.tokens if self.credentials and use_login else None
        if require_login and use_login and tokens is None:
            raise NotLoggedIn("not logged in: run `fairlane login` first")

        def persist(new: Tokens | None) -> None:
            if new is None:
                config.clear()
            elif self.credentials is not None:
                config.save(self.credentials.with_tokens(new))

        async with Client(
            self.auth_target,
            self.queue_target,
            self.worker_target,
            tls=self.tls,
            root_certificates=self.root_certificates,
            timeout=self.timeout,
            tokens=tokens,
            on_tokens=persist if tokens is not None else None,
        ) as client:
            yield client


# -- errors and output -----------------------------------------------------------------------


def _fail(message: str, code: int = 1) -> typer.Exit:
    line = " ".join(message.split())  # one line, whatever the server sent
    typer.echo(f"error: {line}", err=True)
    return typer.Exit(code)


def _describe(exc: FairlaneError) -> str:
    if isinstance(exc, NotLoggedIn):
        return "not logged in: run `fairlane login` first"
    if isinstance(exc, Rejected):
        return str(exc)
    code = f" ({exc.code})" if exc.code else ""
    retry = f"; retry after {exc.retry_after_ms} ms" if exc.retry_after_ms else ""
    return f"{exc.message}{code}{retry}"


def cli_errors(fn: Callable[P, T]) -> Callable[P, T]:
    """Turns every failure into one `error: ...` line and a non-zero exit code."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except FairlaneError as exc:
            raise _fail(_describe(exc)) from None
        except config.ConfigError as exc:
            raise _fail(str(exc)) from None
        except KeyboardInterrupt:
            raise _fail("interrupted", 130) from None
        except OSError as exc:
            where = f": {exc.filename}" if exc.filename else ""
            raise _fail(f"{exc.strerror or exc}{where}") from None
        except Exception as exc:
            if os.environ.get("FAIRLANE_DEBUG"):
                raise
            raise _fail(
                f"unexpected {type(exc).__name__}: {exc} (FAIRLANE_DEBUG=1 shows a traceback)"
            ) from None

    return wrapper


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def _text(data: bytes) -> str:
    """Bytes for a terminal: UTF-8 text as is, anything else as base64."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "base64:" + base64.b64encode(data).decode()


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, bytes):
        return _text(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(_jsonable(value), ensure_ascii=False))


def _when(value: datetime | None, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    """Local time, or '-' when unset."""
    return value.astimezone().strftime(fmt) if value else "-"


def _key_values(rows: list[tuple[str, str]]) -> Table:
    table = Table(show_header=False, box=None)
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    return table


def _one_line(data: bytes, limit: int = 80) -> str:
    text = " ".join(_text(data).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _status_style(status: Status) -> str:
    return {
        Status.SUCCEEDED: "green",
        Status.QUEUED: "cyan",
        Status.RUNNING: "yellow",
    }.get(status, "red")


def _result_line(result: Result) -> str:
    detail = _one_line(result.output) if result.ok else result.error
    return (
        f"{result.lane_seq:>6}  {result.request_id}  {result.handler or '-':<12} "
        f"[{_status_style(result.status)}]{result.status.name:<9}[/]  {detail}"
    )


def _read_payload(payload: str | None) -> bytes:
    if payload is None:
        return b""
    if payload == "-":
        return sys.stdin.buffer.read()
    return payload.encode()


# -- auth commands -------------------------------------------------------------------------


def _password(password: str | None, password_stdin: bool, *, confirm: bool) -> str:
    if password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if password is not None:
        return password
    return str(typer.prompt("Password", hide_input=True, confirmation_prompt=confirm))


Username = Annotated[
    str | None,
    typer.Argument(help="User name (asked for when left out).", show_default=False),
]
Password = Annotated[
    str | None,
    typer.Option(
        "--password",
        envvar="FAIRLANE_PASSWORD",
        help="Password (asked for when left out; prefer the prompt or --password-stdin).",
        show_default=False,
    ),
]
PasswordStdin = Annotated[
    bool, typer.Option("--password-stdin", help="Read the password from the first stdin line.")
]


@cli_errors
def register(
    *,
    username: Username = None,
    password: Password = None,
    password_stdin: PasswordStdin = False,
    login: Annotated[
        bool, typer.Option("--login/--no-login", help="Log in as the new user.")
    ] = True,
    auth_target: AuthTarget = None,
    queue_target: QueueTarget = None,
    worker_target: WorkerTarget = None,
    tls: Tls = None,
    ca_file: CaFile = None,
    timeout: Timeout = 10.0,
) -> None:
    """Create a user (and log in as it)."""
    conn = Connection.resolve(
        auth_target=auth_target,
        queue_target=queue_target,
        worker_target=worker_target,
        tls=tls,
        ca_file=ca_file,
        timeout=timeout,
    )
    name = username or str(typer.prompt("Username"))
    secret = _password(password, password_stdin, confirm=True)

    async def run() -> str:
        async with conn.client(use_login=False) as client:
            user_id = await client.register(name, secret)
            if login:
                tokens = await client.login(name, secret)
                config.save(conn.credentials_for(tokens))
            return user_id

    user_id = _run(run())
    out.print(f"registered [bold]{name}[/] (user id {user_id})" + ("; logged in" if login else ""))


@cli_errors
def login(
    *,
    username: Username = None,
    password: Password = None,
    password_stdin: PasswordStdin = False,
    auth_target: AuthTarget = None,
    queue_target: QueueTarget = None,
    worker_target: WorkerTarget = None,
    tls: Tls = None,
    ca_file: CaFile = None,
    timeout: Timeout = 10.0,
) -> None:
    """Log in; the tokens and targets are cached for the next commands."""
    conn = Connection.resolve(
        auth_target=auth_target,
        queue_target=queue_target,
        worker_target=worker_target,
        tls=tls,
        ca_file=ca_file,
        timeout=timeout,
    )
    name = username or str(typer.prompt("Username"))
    secret = _password(password, password_stdin, confirm=False)

    async def run() -> Tokens:
        async with conn.client(use_login=False) as client:
            return await client.login(name, secret)

    tokens = _run(run())
    path = config.save(conn.credentials_for(tokens))
    out.print(f"logged in as [bold]{name}[/] at {conn.auth_target} (credentials in {path})")


@cli_errors
def logout(
    *,
    auth_target: AuthTarget = None,
    tls: Tls = None,
    ca_file: CaFile = None,
    timeout: Timeout = 10.0,
) -> None:
    """Revoke the cached refresh token and forget the credentials."""
    conn = Connection.resolve(
        auth_target=auth_target,
        queue_target=None,
        worker_target=None,
        tls=tls,
        ca_file=ca_file,
        timeout=timeout,
    )
    if conn.credentials is None:
        out.print("not logged in")
        return

    async def run() -> None:
        async with conn.client() as client:
            await client.logout()

    try:
        _run(run())
    finally:
        config.clear()
    out.print(f"logged out {conn.credentials.username}")


@cli_errors
def whoami(
    *,
    json_output: JsonOutput = False,
    auth_target: AuthTarget = None,
    tls: Tls = None,
    ca_file: CaFile = None,
    timeout: Timeout = 10.0,
) -> None:
    """Show who the cached credentials belong to (asks the server)."""
    conn = Connection.resolve(
        auth_target=auth_target,
        queue_target=None,
        worker_target=None,
        tls=tls,
        ca_file=ca_file,
        timeout=timeout,
    )

    async def run() -> Any:
        async with conn.client() as client:
            return await client.whoami()

    me = _run(run())
    if json_output:
        _print_json({**_jsonable(me), "auth_target": conn.auth_target})
    else:
        out.print(f"[bold]{me.username}[/] (user id {me.user_id}) at {conn.auth_target}")


# -- queue commands ------------------------------------------------------------------------


@cli_errors
def enqueue(
    *,
    handler: Annotated[
        str, typer.Argument(help="Handler to run (see `fairlane worker handlers`).")
    ],
    payload: Annotated[
        str | None,
        typer.Argument(help="Payload text, or - to read bytes from stdin (default: empty)."),
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", "-w", help="Wait for the result and print its output.")
    ] = False,
    idempotency_key: Annotated[
        str | None, typer.Option("--idempotency-key", "-k", help="Repeat-safe key.")
    ] = None,
    deadline: Annotated[
        float | None,
        typer.Option("--deadline", help="Expire unless started within this many seconds."),
    ] = None,
    max_attempts: Annotated[
        int, typer.Option("--max-attempts", help="Attempts before dead-lettering; 0: default.")
    ] = 0,
    ref: Annotated[str, typer.Option("--ref", help="Client reference, echoed back.")] = "",
    wait_timeout: Annotated[
        float | None,
        typer.Option("--wait-timeout", help="With --wait: give up after this many seconds."),
    ] = None,
    json_output: JsonOutput = False,
    auth_target: AuthTarget = None,
    queue_target: QueueTarget = None,
    tls: Tls = None,
    ca_file: CaFile = None,
    timeout: Timeout = 10.0,
) -> None:
    """Enqueue one request; print its id, or with --wait its output.

    With --wait the output goes to stdout as raw bytes, and the exit code is 0 only if it SUCCEEDED.
    """
    conn = Connection.resolve(
        auth_target=auth_target,
        queue_target=queue_target,
        worker_target=None,
        tls=tls,
        ca_file=ca_file,
        timeout=timeout,
    )
    data = _read_payload(payload)
    options: dict[str, Any] = {
        "idempotency_key": idempotency_key,
        "deadline": deadline,
        "max_attempts": max_attempts,
        "client_ref": ref,
    }
    if not wait:

        async def run_enqueue() -> Any:
            async with conn.client() as client:
                return await client.enqueue(handler, data, **options)

        enqueued = _run(run_enqueue())
        if json_output:
            _print_json(enqueued)
        else:
            typer.echo(enqueued.request_id)
            if enqueued.duplicate:
                err.print("note: an earlier request with this idempotency key was returned")
        return

    async def run_wait() -> Result:
        async with conn.client() as client, client.session(timeout=wait_timeout) as session:
            future = await session.submit(handler, data, **options)
            await session.close()
            if err.is_terminal:
                with err.status("waiting for the result…") as status:
                    async for event in session.events():
                        if isinstance(event, ProgressEvent):
                            total = f"/{event.total}" if event.total else ""
                            status.update(f"running: {event.done}{total} {event.message}")
            return await future

    result = _run(run_wait())
    if json_output:
        _print_json(result)
    elif result.ok:
        sys.stdout.buffer.write(result.output)
        if sys.stdout.isatty() and not result.output.endswith(b"\n"):
            sys.stdout.buffer.write(b"\n")
        sys.stdout.flush()
    if not result.ok:
        raise _fail(_failure(result))


def _failure(result: Result) -> str:
    detail = f": {result.error}" if result.error else ""
    return f"request {result.request_id} {result.status.name}{detail}"


def _lines(source: BinaryIO) -> Iterator[tuple[int, bytes]]:
    """(line number, payload) for every non-blank line."""
    for number, raw in enumerate(source, start=1):
        line = raw.rstrip(b"\r\n")
        if line.strip():
            yield number, line


@cli_errors
def submit_file(
    *,
    file: Annotated[Path, typer.Argument(help="One payload per line; - reads stdin.")],
    handler: Annotated[
        str, typer.Option("--handler", "-H", help="Handler for every line.")
    ] = "echo",
    max_attempts: Annotated[
        int, typer.Option("--max-attempts", help="Attempts before dead-lettering; 0: default.")
    ] = 0,
    results: Annotated[
        Path | None,
        typer.Option("--results", help="Write one JSON line per result here, in lane order."),
    ] = None,
    window: Annotated[
        int, typer.Option("--window", min=1, help="Requests in flight at most.")
    ] = 512,
    json_output: JsonOutput = False,
    auth_target: AuthTarget = None,
    queue_target: QueueTarget = None,
    tls: Tls = None,
    ca_file: CaFile = None,
    timeout: Timeout = 10.0,
) -> None:
    """Send every line of FILE as one request, on one Session, in order.

    Blank lines are skipped; client_ref is line-N. Exits non-zero unless all SUCCEEDED.
    """
    conn = Connection.resolve(
        auth_target=auth_target,
        queue_target=queue_target,
        worker_target=None,
        tls=tls,
        ca_file=ca_file,
        timeout=timeout,
    )
    stdin = str(file) == "-"
    total: int | None = None
    if not stdin:
        with file.open("rb") as counting:
            total = sum(1 for _ in _lines(counting))
    statuses: Counter[str] = Counter()
    sink = results.open("w", encoding="utf-8") if results else None
    started = time.monotonic()

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        disable=not err.is_terminal,
    )
    sent_task = progress.add_task("accepted", total=total)
    done_task = progress.add_task("finished", total=total)

    def finished(future: SubmitFuture) -> None:
        exc = future.exception()
        if exc is None:
            result = future.result()
            statuses[result.status.name] += 1
            record: dict[str, Any] = _jsonable(result)
        else:
            label = f"REJECTED {exc.code}" if isinstance(exc, Rejected) else "LOST"
            statuses[label] += 1
            record = {"client_ref": future.client_ref, "status": label, "error": str(exc)}
        if sink is not None:
            sink.write(json.dumps(record, ensure_ascii=False) + "\n")
        progress.advance(done_task)

    async def run() -> None:
        source = sys.stdin.buffer if stdin else file.open("rb")
        try:
            async with conn.client() as client:
                async with client.session(max_in_flight=window, record_events=False) as session:
                    for number, payload in _lines(source):
                        future = await session.submit(
                            handler,
                            payload,
                            max_attempts=max_attempts,
                            client_ref=f"line-{number}",
                        )
                        future.add_done_callback(finished)
                        progress.advance(sent_task)
                    if total is None:
                        progress.update(sent_task, total=progress.tasks[sent_task].completed)
                        progress.update(done_task, total=progress.tasks[sent_task].completed)
                # Let the last done-callbacks run.
                await asyncio.sleep(0)
        finally:
            if not stdin:
                source.close()

    try:
        with progress:
            _run(run())
    finally:
        if sink is not None:
            sink.close()
    elapsed = time.monotonic() - started
    count = sum(statuses.values())
    ok = statuses.get(Status.SUCCEEDED.name, 0)
    if json_output:
        _print_json(
            {"requests": count, "succeeded": ok, "statuses": dict(statuses), "seconds": elapsed}
        )
    else:
        table = Table(title=f"{count} requests in {elapsed:.2f} s", title_justify="left")
        table.add_column("status")
        table.add_column("count", justify="right")
        for name, n in sorted(statuses.items()):
            table.add_row(name, str(n))
        out.print(table)
    if ok != count:
        raise _fail(f"{count - ok} of {count} requests did not succeed")


@cli_errors
def watch(
    *,
    after: Annotated[
        int, typer.Option("--after", help="Start after this lane_seq (0: from the first).")
    ] = 0,
    count: Annotated[
        int | None, typer.Option("--count", "-n", min=1, help="Stop after N results.")
    ] = None,
    json_output: JsonOutput = False,
    auth_target: AuthTarget = None,
    queue_target: QueueTarget = None,
    tls: Tls = None,
    ca_file: CaFile = None,
    timeout: Timeout = 10.0,
) -> None:
    """Print your results as they finish (stored ones after --after first). Ctrl-C stops."""
    conn = Connection.resolve(
        auth_target=auth_target,
        queue_target=queue_target,
        worker_target=None,
        tls=tls,
        ca_file=ca_file,
        timeout=timeout,
    )

    async def run() -> None:
        seen = 0
        async with conn.client() as client:
            async for result in client.watch(after_lane_seq=after):
                if json_output:
                    _print_json(result)
                else:
                    out.print(_result_line(result))
                sys.stdout.flush()
                seen += 1
                if count is not None and seen >= count:
                    return

    try:
        _run(run())
    except KeyboardInterrupt:
        return


@cli_errors
def get(
    *,
    request_id: Annotated[str, typer.Argument(help="Request id.")],
    json_output: JsonOutput = False,
    auth_target: AuthTarget = None,
    queue_target: QueueTarget = None,
    tls: Tls = None,
    ca_file: CaFile = None,
    timeout: Timeout = 10.0,
) -> None:
    """Show one of your requests."""
    conn = Connection.resolve(
        auth_target=auth_target,
        queue_target=queue_target,
        worker_target=None,
        tls=tls,
        ca_file=ca_file,
        timeout=timeout,
    )

    async def run() -> Request:
        async with conn.client() as client:
            return await client.get(request_id)

    request = _run(run())
    if json_output:
        _print_json(request)
        return
    rows: list[tuple[str, str]] = [
        ("request", request.request_id),
        ("handler", request.handler),
        ("status", f"[{_status_style(request.status)}]{request.status.name}[/]"),
        ("attempts", f"{request.attempts} of {request.max_attempts}"),
        ("lane_seq", str(request.lane_seq or "-")),
        ("client_ref", request.client_ref or "-"),
        ("idempotency_key", request.idempotency_key or "-"),
        ("enqueued", _when(request.enqueued_at)),
        ("started", _when(request.started_at)),
        ("finished", _when(request.finished_at)),
        ("deadline", _when(request.deadline)),
        ("payload", _one_line(request.payload, 200)),
        ("output", _one_line(request.output, 200)),
    ]
    if request.error:
        rows.append(("error", request.error))
    if request.trace_id:
        rows.append(("trace", request.trace_id))
    out.print(_key_values(rows))


@cli_errors
def requests(
    *,
    status: Annotated[
        str | None,
        typer.Option("--status", "-s", help="Only this status (queued, succeeded, failed, ...)."),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="At most this many.")] = 20,
    json_output: JsonOutput = False,
    auth_target: AuthTarget = None,
    queue_target: QueueTarget = None,
    tls: Tls = None,
    ca_file: CaFile = None,
    timeout: Timeout = 10.0,
) -> None:
    """List your requests, newest first."""
    conn = Connection.resolve(
        auth_target=auth_target,
        queue_target=queue_target,
        worker_target=None,
        tls=tls,
        ca_file=ca_file,
        timeout=timeout,
    )
    try:
        wanted = Status.parse(status) if status else None
    except ValueError as exc:
        raise _fail(str(exc)) from None

    async def run() -> list[Request]:
        found: list[Request] = []
        async with conn.client() as client:
            async for page in client.requests(wanted, page_size=min(limit, 500)):
                found.extend(page)
                if len(found) >= limit:
                    break
        return found[:limit]

    found = _run(run())
    if json_output:
        _print_json(found)
        return
    table = Table(title=f"{len(found)} requests", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("request", no_wrap=True, min_width=36)
    table.add_column("handler", min_width=8)
    table.add_column("status", no_wrap=True)
    table.add_column("seq", justify="right", no_wrap=True)
    table.add_column("enqueued", no_wrap=True)
    for r in found:
        table.add_row(
            r.request_id,
            r.handler,
            f"[{_status_style(r.status)}]{r.status.name}[/]",
            str(r.lane_seq or "-"),
            _when(r.enqueued_at, "%m-%d %H:%M:%S"),
        )
    out.print(table)


@cli_errors
def lanes(
    *,
    json_output: JsonOutput = False,
    auth_target: AuthTarget = None,
    queue_target: QueueTarget = None,
    tls: Tls = None,
    ca_file: CaFile = None,
    timeout: Timeout = 10.0,
) -> None:
    """Show your lane: its queue, pending requests and newest lane_seq."""
    conn = Connection.resolve(
        auth_target=auth_target,
        queue_target=queue_target,
        worker_target=None,
        tls=tls,
        ca_file=ca_file,
        timeout=timeout,
    )

    async def run() -> Any:
        async with conn.client() as client:
            return await client.lane()

    lane = _run(run())
    if json_output:
        _print_json(lane)
        return
    out.print(
        _key_values(
            [
                ("user", lane.user_id),
                ("queue", lane.queue_name),
                ("pending", str(lane.pending)),
                ("last lane_seq", str(lane.last_lane_seq)),
                ("created", _when(lane.created_at)),
                ("last active", _when(lane.last_active_at)),
            ]
        )
    )


# -- worker commands -----------------------------------------------------------------------

worker_app = typer.Typer(
    name="worker", help="Control one worker replica (--worker-target).", no_args_is_help=True
)


def _worker_conn(
    *,
    worker_target: str | None,
    auth_target: str | None,
    tls: bool | None,
    ca_file: Path | None,
    timeout: float,
) -> Connection:
    return Connection.resolve(
        auth_target=auth_target,
        queue_target=None,
        worker_target=worker_target,
        tls=tls,
        ca_file=ca_file,
        timeout=timeout,
    )


@worker_app.command("status")
@cli_errors
def worker_status(
    *,
    json_output: JsonOutput = False,
    worker_target: WorkerTarget = None,
    auth_target: AuthTarget = None,
    tls: Tls = None,
    ca_file: CaFile = None,
    timeout: Timeout = 10.0,
) -> None:
    """Show state, lanes, in-flight requests and per-handler counters."""
    conn = _worker_conn(
        worker_target=worker_target,
        auth_target=auth_target,
        tls=tls,
        ca_file=ca_file,
        timeout=timeout,
    )

    async def run() -> Any:
        async with conn.client(require_login=False) as client:
            return await client.worker_status()

    status = _run(run())
    if json_output:
        _print_json(status)
        return
    out.print(
        f"worker [bold]{status.worker_id}[/] at {conn.worker_target}: {status.state.name}, "
        f"{status.in_flight}/{status.concurrency} running, {len(status.lanes)} lanes"
        + (f", paused lanes: {', '.join(status.paused_lanes)}" if status.paused_lanes else "")
    )
    table = Table(title_justify="left")
    for column in ("handler", "succeeded", "failed", "retried", "running"):
        table.add_column(column, justify="left" if column == "handler" else "right")
    for h in status.handlers:
        table.add_row(h.name, str(h.succeeded), str(h.failed), str(h.retried), str(h.running))
    out.print(table)


@worker_app.command("handlers")
@cli_errors
def worker_handlers(
    *,
    json_output: JsonOutput = False,
    worker_target: WorkerTarget = None,
    auth_target: AuthTarget = None,
    tls: Tls = None,
    ca_file: CaFile = None,
    timeout: Timeout = 10.0,
) -> None:
    """List the handlers the worker can run."""
    conn = _worker_conn(
        worker_target=worker_target,
        auth_target=auth_target,
        tls=tls,
        ca_file=ca_file,
        timeout=timeout,
    )

    async def run() -> Any:
        async with conn.client(require_login=False) as client:
            return await client.list_handlers()

    handlers = _run(run())
    if json_output:
        _print_json(handlers)
        return
    table = Table()
    for column in ("handler", "max attempts", "timeout", "description"):
        table.add_column(column)
    for h in handlers:
        limit = f"{h.timeout_seconds:g} s" if h.timeout_seconds else "-"
        table.add_row(h.name, str(h.max_attempts), limit, h.description)
    out.print(table)


LaneOption = Annotated[
    str, typer.Option("--lane", help="Only this lane (a user id); default: the whole worker.")
]


@worker_app.command("pause")
@cli_errors
def worker_pause(
    *,
    lane: LaneOption = "",
    worker_target: WorkerTarget = None,
    auth_target: AuthTarget = None,
    tls: Tls = None,
    ca_file: CaFile = None,
    timeout: Timeout = 10.0,
) -> None:
    """Stop taking new requests (of one lane, or all); running ones finish."""
    conn = _worker_conn(
        worker_target=worker_target,
        auth_target=auth_target,
        tls=tls,
        ca_file=ca_file,
        timeout=timeout,
    )

    async def run() -> Any:
        async with conn.client(require_login=False) as client:
            return await client.pause(lane)

    state = _run(run())
    out.print(f"{'lane ' + lane if lane else 'worker'} paused; worker is {state.name}")


@worker_app.command("resume")
@cli_errors
def worker_resume(
    *,
    lane: LaneOption = "",
    worker_target: WorkerTarget = None,
    auth_target: AuthTarget = None,
    tls: Tls = None,
    ca_file: CaFile = None,
    timeout: Timeout = 10.0,
) -> None:
    """Undo pause."""
    conn = _worker_conn(
        worker_target=worker_target,
        auth_target=auth_target,
        tls=tls,
        ca_file=ca_file,
        timeout=timeout,
    )

    async def run() -> Any:
        async with conn.client(require_login=False) as client:
            return await client.resume(lane)

    state = _run(run())
    out.print(f"{'lane ' + lane if lane else 'worker'} resumed; worker is {state.name}")


@worker_app.command("drain")
@cli_errors
def worker_drain(
    *,
    grace: Annotated[
        float,
        typer.Option("--grace", min=0, help="Wait this long for running requests (0: server's)."),
    ] = 0.0,
    worker_target: WorkerTarget = None,
    auth_target: AuthTarget = None,
    tls: Tls = None,
    ca_file: CaFile = None,
    timeout: Timeout = 10.0,
) -> None:
    """Finish running requests, then release every lane to other replicas."""
    conn = _worker_conn(
        worker_target=worker_target,
        auth_target=auth_target,
        tls=tls,
        ca_file=ca_file,
        timeout=timeout,
    )

    async def run() -> tuple[Any, int]:
        async with conn.client(require_login=False) as client:
            return await client.drain(grace)

    state, abandoned = _run(run())
    note = f"; {abandoned} requests handed back unfinished" if abandoned else ""
    out.print(f"worker is {state.name}{note}")


def register_commands(app: typer.Typer) -> None:
    """Adds the client commands to the `fairlane` app."""
    app.command("register")(register)
    app.command("login")(login)
    app.command("logout")(logout)
    app.command("whoami")(whoami)
    app.command("enqueue")(enqueue)
    app.command("submit-file")(submit_file)
    app.command("watch")(watch)
    app.command("get")(get)
    app.command("requests")(requests)
    app.command("lanes")(lanes)
    app.add_typer(worker_app)
