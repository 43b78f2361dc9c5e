"""The `fairlane bench` command: load generator and correctness check for a running suite."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Coroutine
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from fairlane_server.bench.report import render
from fairlane_server.bench.runner import BenchConfig, BenchRun, BenchSetupError, RunProgress
from fairlane_server.core.runtime import freeze_startup_objects


def _ints(text: str) -> list[int]:
    try:
        return [int(p) for p in text.replace(" ", "").split(",") if p]
    except ValueError:
        raise typer.BadParameter("expected PID,PID,...") from None


def _run(coro: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
    # The bench's own generation 2 collections would stall every lane's clock at once and
    # count as the services' latency; the services freeze theirs the same way.
    freeze_startup_objects()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - platforms without uvloop
        return asyncio.run(coro)
    return uvloop.run(coro)


class _Display:
    """A rich progress bar fed by the run's ticks (time-based for --duration)."""

    def __init__(self, console: Console, enabled: bool) -> None:
        self.enabled = enabled
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.fields[phase]:<9}"),
            BarColumn(),
            TextColumn("{task.fields[line]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
            refresh_per_second=4,
            disable=not enabled,
        )
        self.task: TaskID | None = None
        self._last = (0.0, 0)
        self._rate = 0.0

    def tick(self, p: RunProgress) -> None:
        if not self.enabled:
            return
        if self.task is None:
            self.task = self.progress.add_task("bench", total=None, phase=p.phase, line="")
        now = time.perf_counter()
        last_t, last_n = self._last
        if now - last_t >= 1.0:
            if last_t:
                self._rate = (p.results - last_n) / (now - last_t)
            self._last = (now, p.results)
        if p.phase == "login":
            completed, total = 0.0, None
        elif isinstance(p.total, float):  # --duration: warm-up + duration seconds
            completed, total = min(now - p.started, p.total), p.total
        else:
            completed, total = float(p.sent), float(p.total) if p.total else None
        line = (
            f"sent {p.sent:,}  results {p.results:,}  in flight {p.in_flight:,}  "
            f"rejected {p.rejected:,}  {self._rate:,.0f} results/s"
        )
        self.progress.update(self.task, completed=completed, total=total, phase=p.phase, line=line)


def bench_command(  # every option is keyword-only; typer passes them by name
    *,
    target: Annotated[
        str,
        typer.Option(
            help="QueueService replicas: HOST:PORT, IP:PORT,IP:PORT,... or dns:///NAME:PORT. "
            "Sessions spread over them; a lane whose replica dies collects its results "
            "from WatchResults on another and goes on."
        ),
    ] = "127.0.0.1:50052",
    auth_target: Annotated[
        str, typer.Option(help="AuthService: HOST:PORT, IP:PORT,IP:PORT,... or dns:///NAME:PORT.")
    ] = "127.0.0.1:50051",
    lanes: Annotated[
        int, typer.Option(min=1, help="Concurrent lanes: one user and one Session each.")
    ] = 10,
    requests: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Requests to send after the warm-up, in total over all lanes "
            "(each lane sends an equal share; at least --lanes). Exclusive with --duration.",
        ),
    ] = None,
    duration: Annotated[
        float | None,
        typer.Option(
            min=0.1,
            help="Seconds to send for after the warm-up. Default when neither is given: 10.",
        ),
    ] = None,
    window: Annotated[
        int, typer.Option(min=1, help="Requests in flight per lane (sent, no result yet).")
    ] = 32,
    rate: Annotated[
        float,
        typer.Option(
            min=0,
            help="Send at most this many requests per second over all lanes (open loop, "
            "still capped by --window); 0: as fast as the window allows.",
        ),
    ] = 0.0,
    batch: Annotated[
        bool,
        typer.Option(
            "--batch/--no-batch",
            help="Send the requests that are ready together as enqueue_batch messages (and "
            "so receive batched responses); --no-batch sends one message per request.",
        ),
    ] = True,
    handler: Annotated[
        str, typer.Option(help="Worker handler: noop, echo or sleep (any registered name works).")
    ] = "noop",
    payload_bytes: Annotated[
        int, typer.Option(min=0, help="Payload size for noop/echo (echo outputs are checked).")
    ] = 0,
    sleep: Annotated[
        float, typer.Option(min=0, help="Seconds each request sleeps with --handler sleep.")
    ] = 0.01,
    warmup: Annotated[
        float, typer.Option(min=0, help="Seconds of load before measuring (left out of figures).")
    ] = 2.0,
    json_out: Annotated[
        bool,
        typer.Option(
            "--json", help="Print the full report as JSON on stdout (tables go to stderr)."
        ),
    ] = False,
    pids: Annotated[
        str,
        typer.Option(
            help="PID,PID,... of processes to watch (CPU, RSS) besides those found by port."
        ),
    ] = "",
    worker_target: Annotated[
        list[str] | None,
        typer.Option(
            help="Worker HOST:PORT to watch by port (repeatable; workers connected "
            "to a local queue are found anyway)."
        ),
    ] = None,
    backends: Annotated[
        bool,
        typer.Option(help="Also watch local RabbitMQ (beam.smp) and PostgreSQL processes."),
    ] = True,
    user_prefix: Annotated[
        str, typer.Option(help="Bench users are PREFIX-0 .. PREFIX-(L-1), registered if missing.")
    ] = "bench",
    password: Annotated[
        str, typer.Option(envvar="FAIRLANE_BENCH_PASSWORD", help="Password of the bench users.")
    ] = "fairlane-bench-password",
    channels: Annotated[
        int, typer.Option(min=0, help="HTTP/2 connections to the queue; 0: one per 100 lanes.")
    ] = 0,
    drain_timeout: Annotated[
        float,
        typer.Option(min=1, help="Give up (invalid run) when nothing arrives for this long."),
    ] = 30.0,
    database_url: Annotated[
        str,
        typer.Option(
            envvar="FAIRLANE_DATABASE_URL",
            help="Check the request log too (postgresql+asyncpg://...); empty: no check.",
        ),
    ] = "",
    database_schema: Annotated[
        str, typer.Option(envvar="FAIRLANE_DATABASE_SCHEMA", help="Schema of the request log.")
    ] = "",
    ca_file: Annotated[
        str,
        typer.Option(
            envvar="FAIRLANE_CA_FILE", help="PEM CA of the services' certificates (turns TLS on)."
        ),
    ] = "",
    client_cert: Annotated[
        str,
        typer.Option(
            envvar="FAIRLANE_CLIENT_CERT_FILE",
            help="PEM client certificate for services that require one (mTLS).",
        ),
    ] = "",
    client_key: Annotated[
        str, typer.Option(envvar="FAIRLANE_CLIENT_KEY_FILE", help="PEM key of --client-cert.")
    ] = "",
    progress: Annotated[
        bool, typer.Option(help="Show a progress bar (default: when stderr is a terminal).")
    ] = sys.stderr.isatty(),
    metrics: Annotated[
        str,
        typer.Option(
            help="The services' /metrics URLs, comma-separated: adds per-stage latency "
            "(intake, relay, queue wait, handler, result write) over the measured phase."
        ),
    ] = "",
) -> None:
    """Drive a running suite with L lanes and report throughput, latency and correctness.

    The run is valid when every accepted request's result arrives exactly once, in lane
    order, also across a queue replica's death (its Sessions are resumed elsewhere).

    Exit code 1: invalid run (lost, duplicated, out of order, or not as in the request log).
    Exit code 2: the run could not start.
    """
    if requests is not None and duration is not None:
        raise typer.BadParameter("give --requests or --duration, not both")
    if requests is None and duration is None:
        duration = 10.0
    if requests is not None and requests < lanes:
        raise typer.BadParameter("--requests must be at least --lanes (each lane sends a share)")
    config = BenchConfig(
        target=target,
        auth_target=auth_target,
        lanes=lanes,
        requests=requests,
        duration=duration,
        window=window,
        batch=batch,
        rate=rate,
        handler=handler,
        payload_bytes=payload_bytes,
        sleep_seconds=sleep,
        warmup=warmup,
        user_prefix=user_prefix,
        password=password,
        channels=channels,
        drain_timeout=drain_timeout,
        pids=_ints(pids),
        worker_targets=[t for item in worker_target or [] for t in item.split(",") if t],
        backends=backends,
        database_url=database_url,
        database_schema=database_schema,
        ca_file=ca_file,
        client_cert=client_cert,
        client_key=client_key,
        metrics=[u for u in metrics.split(",") if u],
    )
    # Tables written to a file or pipe get room enough not to wrap.
    err = Console(stderr=True, width=None if sys.stderr.isatty() else 120)
    out = err if json_out else Console(width=None if sys.stdout.isatty() else 120)
    display = _Display(err, progress)
    run = BenchRun(config, on_tick=display.tick)
    try:
        with display.progress:
            report = _run(run.run())
    except BenchSetupError as exc:
        err.print(f"[red]bench could not start:[/] {exc}")
        raise typer.Exit(2) from None
    render(report, out)
    if json_out:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        sys.stdout.flush()
    if not report["valid"]:
        raise typer.Exit(1)
