"""WorkerService commands: `fairlane worker status|handlers|pause|resume|drain`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import typer
from rich.console import Group
from rich.table import Table

from fairlane.cli.connection import Connection, connected
from fairlane.cli.rendering import JsonOutput, out, show
from fairlane.client import Client, HandlerInfo, WorkerState, WorkerStatus

app = typer.Typer(
    name="worker",
    help="Control a worker replica (--worker-target); a lane's pause holds on every replica.",
    no_args_is_help=True,
)

T = TypeVar("T")

LaneOption = Annotated[
    str,
    typer.Option(
        "--lane",
        help="Only this lane (a user id), on every worker replica, whichever one is asked; "
        "default: this whole replica, and only it.",
    ),
]


async def _ask(conn: Connection, call: Callable[[Client], Awaitable[T]]) -> T:
    """One call to the worker; its control RPCs need no login."""
    async with conn.client(require_login=False) as client:
        return await call(client)


@app.command("status")
@connected
async def status(conn: Connection, *, json_output: JsonOutput = False) -> None:
    """Show state, lanes, in-flight requests and per-handler counters."""
    worker = await _ask(conn, Client.worker_status)
    show(worker, json_output, lambda w: _status_view(w, conn.worker_target))


def _status_view(worker: WorkerStatus, target: str) -> Group:
    paused = f", paused lanes: {', '.join(worker.paused_lanes)}" if worker.paused_lanes else ""
    table = Table(title_justify="left")
    for column in ("handler", "succeeded", "failed", "retried", "running"):
        table.add_column(column, justify="left" if column == "handler" else "right")
    for h in worker.handlers:
        table.add_row(h.name, str(h.succeeded), str(h.failed), str(h.retried), str(h.running))
    return Group(
        f"worker [bold]{worker.worker_id}[/] at {target}: {worker.state.name}, "
        f"{worker.in_flight}/{worker.concurrency} running, {len(worker.lanes)} lanes{paused}",
        table,
    )


@app.command("handlers")
@connected
async def handlers(conn: Connection, *, json_output: JsonOutput = False) -> None:
    """List the handlers the worker can run."""
    show(await _ask(conn, Client.list_handlers), json_output, _handlers_view)


def _handlers_view(found: list[HandlerInfo]) -> Table:
    table = Table()
    for column in ("handler", "max attempts", "timeout", "description"):
        table.add_column(column)
    for h in found:
        limit = f"{h.timeout_seconds:g} s" if h.timeout_seconds else "-"
        table.add_row(h.name, str(h.max_attempts), limit, h.description)
    return table


def _lane_switch(
    name: str, call: Callable[[Client, str], Awaitable[WorkerState]], done: str, summary: str
) -> None:
    """`worker pause` and `worker resume`: the same command around a different call."""

    async def command(conn: Connection, *, lane: LaneOption = "") -> None:
        state = await _ask(conn, lambda client: call(client, lane))
        out.print(f"{'lane ' + lane if lane else 'worker'} {done}; worker is {state.name}")

    command.__doc__ = summary
    app.command(name)(connected(command))


_lane_switch(
    "pause",
    Client.pause,
    "paused",
    "Stop starting new requests; running ones finish. With --lane: that lane on every worker "
    "replica until it is resumed (on any replica). Without: this replica only.",
)
_lane_switch(
    "resume",
    Client.resume,
    "resumed",
    "Undo pause: with --lane, of that lane on every worker replica; without, of this replica.",
)


@app.command("drain")
@connected
async def drain(
    conn: Connection,
    *,
    grace: Annotated[
        float,
        typer.Option("--grace", min=0, help="Wait this long for running requests (0: server's)."),
    ] = 0.0,
) -> None:
    """Finish running requests, then release every lane to other replicas."""
    state, abandoned = await _ask(conn, lambda client: client.drain(grace))
    note = f"; {abandoned} requests handed back unfinished" if abandoned else ""
    out.print(f"worker is {state.name}{note}")


def register_commands(parent: typer.Typer) -> None:
    parent.add_typer(app)
