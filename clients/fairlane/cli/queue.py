"""QueueService commands: enqueue, submit-file, watch, get, requests, lanes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, BinaryIO

import typer
from rich import box
from rich.console import RenderableType
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fairlane.cli.connection import Connection, connected, positive_seconds
from fairlane.cli.rendering import (
    JsonOutput,
    err,
    fail,
    failure,
    jsonable,
    key_values,
    one_line,
    out,
    print_json,
    result_line,
    show,
    styled_status,
    when,
)
from fairlane.client import InvalidArgument, Lane, Rejected, Request, Status, SubmitFuture
from fairlane.client import Progress as ProgressEvent
from fairlane.client._wire import deadline_timestamp

MaxAttempts = Annotated[
    int,
    typer.Option("--max-attempts", min=0, help="Attempts before dead-lettering; 0: default."),
]


def _request_deadline(value: float | None) -> float | None:
    """Option callback for --deadline: a value the client could not send (nan, inf, past
    the year 9999) is a usage error, like any option value out of its range."""
    if value is None:
        return None
    if not math.isfinite(value):
        raise typer.BadParameter(f"must be a finite number of seconds, not {value:g}")
    try:
        deadline_timestamp(value)
    except InvalidArgument as exc:
        raise typer.BadParameter(str(exc)) from None
    return value


def _read_payload(payload: str | None) -> bytes:
    if payload is None:
        return b""
    if payload == "-":
        return sys.stdin.buffer.read()
    return payload.encode()


@connected
async def enqueue(
    conn: Connection,
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
        typer.Option(
            "--deadline",
            help="Expire unless started within this many seconds.",
            callback=_request_deadline,
        ),
    ] = None,
    max_attempts: MaxAttempts = 0,
    ref: Annotated[str, typer.Option("--ref", help="Client reference, echoed back.")] = "",
    wait_timeout: Annotated[
        float | None,
        typer.Option(
            "--wait-timeout",
            help="With --wait: give up after this many seconds (inf: never).",
            callback=positive_seconds,
        ),
    ] = None,
    json_output: JsonOutput = False,
) -> None:
    """Enqueue one request; print its id, or with --wait its output.

    With --wait the output goes to stdout as raw bytes, and the exit code is 0 only if it SUCCEEDED.
    """
    data = _read_payload(payload)
    options: dict[str, Any] = {
        "idempotency_key": idempotency_key,
        "deadline": deadline,
        "max_attempts": max_attempts,
        "client_ref": ref,
    }
    async with conn.client() as client:
        if not wait:
            enqueued = await client.enqueue(handler, data, **options)
            if json_output:
                print_json(enqueued)
            else:
                typer.echo(enqueued.request_id)
                if enqueued.duplicate:
                    err.print("note: an earlier request with this idempotency key was returned")
            return
        async with client.session(timeout=wait_timeout) as session:
            future = await session.submit(handler, data, **options)
            await session.close()
            if err.is_terminal:
                with err.status("waiting for the result…") as status:
                    async for event in session.events():
                        if isinstance(event, ProgressEvent):
                            total = f"/{event.total}" if event.total else ""
                            status.update(f"running: {event.done}{total} {event.message}")
            result = await future
    if json_output:
        print_json(result)
    elif result.ok:
        sys.stdout.buffer.write(result.output)
        if sys.stdout.isatty() and not result.output.endswith(b"\n"):
            sys.stdout.buffer.write(b"\n")
        sys.stdout.flush()
    if not result.ok:
        raise fail(failure(result))


def _lines(source: BinaryIO) -> Iterator[tuple[int, bytes]]:
    """(line number, payload) for every non-blank line."""
    for number, raw in enumerate(source, start=1):
        line = raw.rstrip(b"\r\n")
        if line.strip():
            yield number, line


@connected
async def submit_file(
    conn: Connection,
    *,
    file: Annotated[Path, typer.Argument(help="One payload per line; - reads stdin.")],
    handler: Annotated[
        str, typer.Option("--handler", "-H", help="Handler for every line.")
    ] = "echo",
    max_attempts: MaxAttempts = 0,
    results: Annotated[
        Path | None,
        typer.Option("--results", help="Write one JSON line per result here, in lane order."),
    ] = None,
    window: Annotated[
        int, typer.Option("--window", min=1, help="Requests in flight at most.")
    ] = 512,
    json_output: JsonOutput = False,
) -> None:
    """Send every line of FILE as one request, on one Session, in order.

    Blank lines are skipped; client_ref is line-N. Exits non-zero unless all SUCCEEDED.
    """
    stdin = str(file) == "-"
    total: int | None = None
    if not stdin:
        with file.open("rb") as counting:
            total = sum(1 for _ in _lines(counting))
    statuses: Counter[str] = Counter()
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

    with contextlib.ExitStack() as stack:
        stack.enter_context(progress)
        sink = stack.enter_context(results.open("w", encoding="utf-8")) if results else None
        source = sys.stdin.buffer if stdin else stack.enter_context(file.open("rb"))

        def finished(future: SubmitFuture) -> None:
            exc = future.exception()
            if exc is None:
                result = future.result()
                statuses[result.status.name] += 1
                record: dict[str, Any] = jsonable(result)
            else:
                label = f"REJECTED {exc.code}" if isinstance(exc, Rejected) else "LOST"
                statuses[label] += 1
                record = {"client_ref": future.client_ref, "status": label, "error": str(exc)}
            if sink is not None:
                sink.write(json.dumps(record, ensure_ascii=False) + "\n")
            progress.advance(done_task)

        async with conn.client() as client:
            async with client.session(max_in_flight=window, record_events=False) as session:
                for number, payload in _lines(source):
                    future = await session.submit(
                        handler, payload, max_attempts=max_attempts, client_ref=f"line-{number}"
                    )
                    future.add_done_callback(finished)
                    progress.advance(sent_task)
                if total is None:
                    progress.update(sent_task, total=progress.tasks[sent_task].completed)
                    progress.update(done_task, total=progress.tasks[sent_task].completed)
            # Let the last done-callbacks run.
            await asyncio.sleep(0)
    elapsed = time.monotonic() - started
    count = sum(statuses.values())
    ok = statuses.get(Status.SUCCEEDED.name, 0)
    if json_output:
        print_json(
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
        raise fail(f"{count - ok} of {count} requests did not succeed")


@connected(quiet_interrupt=True)
async def watch(
    conn: Connection,
    *,
    after: Annotated[
        int,
        typer.Option("--after", min=0, help="Start after this lane_seq (0: from the first)."),
    ] = 0,
    count: Annotated[
        int | None, typer.Option("--count", "-n", min=1, help="Stop after N results.")
    ] = None,
    json_output: JsonOutput = False,
) -> None:
    """Print your results as they finish (stored ones after --after first). Ctrl-C stops."""
    seen = 0
    async with conn.client() as client, contextlib.aclosing(client.watch(after)) as results:
        async for result in results:
            show(result, json_output, result_line)
            sys.stdout.flush()
            seen += 1
            if count is not None and seen >= count:
                return


@connected
async def get(
    conn: Connection,
    *,
    request_id: Annotated[str, typer.Argument(help="Request id.")],
    json_output: JsonOutput = False,
) -> None:
    """Show one of your requests."""
    async with conn.client() as client:
        show(await client.get(request_id), json_output, _request_view)


def _request_view(request: Request) -> Table:
    rows: list[tuple[str, str]] = [
        ("request", request.request_id),
        ("handler", request.handler),
        ("status", styled_status(request.status)),
        ("attempts", f"{request.attempts} of {request.max_attempts}"),
        ("lane_seq", str(request.lane_seq or "-")),
        ("client_ref", request.client_ref or "-"),
        ("idempotency_key", request.idempotency_key or "-"),
        ("enqueued", when(request.enqueued_at)),
        ("started", when(request.started_at)),
        ("finished", when(request.finished_at)),
        ("deadline", when(request.deadline)),
        ("payload", one_line(request.payload, 200)),
        ("output", one_line(request.output, 200)),
    ]
    if request.error:
        rows.append(("error", request.error))
    if request.trace_id:
        rows.append(("trace", request.trace_id))
    return key_values(rows)


@connected
async def requests(
    conn: Connection,
    *,
    status: Annotated[
        str | None,
        typer.Option("--status", "-s", help="Only this status (queued, succeeded, failed, ...)."),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="At most this many.")] = 20,
    json_output: JsonOutput = False,
) -> None:
    """List your requests, newest first."""
    try:
        wanted = Status.parse(status) if status else None
    except ValueError as exc:
        raise fail(str(exc)) from None
    found: list[Request] = []
    async with conn.client() as client:
        async for page in client.requests(wanted, page_size=min(limit, 500)):
            found.extend(page)
            if len(found) >= limit:
                break
    show(found[:limit], json_output, _requests_view)


def _requests_view(found: list[Request]) -> RenderableType:
    if not found:
        return "0 requests"  # the count alone: no empty table under it
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
            styled_status(r.status),
            str(r.lane_seq or "-"),
            when(r.enqueued_at, "%m-%d %H:%M:%S"),
        )
    return table


@connected
async def lanes(conn: Connection, *, json_output: JsonOutput = False) -> None:
    """Show your lane: its queue, pending requests and newest lane_seq."""
    async with conn.client() as client:
        show(await client.lane(), json_output, _lane_view)


def _lane_view(lane: Lane) -> Table:
    return key_values(
        [
            ("user", lane.user_id),
            ("queue", lane.queue_name),
            ("pending", str(lane.pending)),
            ("last lane_seq", str(lane.last_lane_seq)),
            ("created", when(lane.created_at)),
            ("last active", when(lane.last_active_at)),
            *([("paused", when(lane.paused_at))] if lane.paused_at is not None else []),
        ]
    )


def register_commands(app: typer.Typer) -> None:
    app.command("enqueue")(enqueue)
    app.command("submit-file")(submit_file)
    app.command("watch")(watch)
    app.command("get")(get)
    app.command("requests")(requests)
    app.command("lanes")(lanes)
