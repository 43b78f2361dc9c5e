"""`fairlane dev`: auth, queue and worker in one process on embedded backends."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

from rich.console import Console
from sqlalchemy.engine import make_url

from fairlane_server.auth.service import AuthService
from fairlane_server.core import logging as fl_logging
from fairlane_server.core import metrics, telemetry
from fairlane_server.core.amqp import broker_for
from fairlane_server.core.backends import Backends
from fairlane_server.core.broker import Broker
from fairlane_server.core.db import engine_for, migrate
from fairlane_server.core.memory_broker import MemoryBroker
from fairlane_server.core.runtime import Component, run, run_until_signalled
from fairlane_server.core.settings import Settings
from fairlane_server.dev_demo import demo_round_trip
from fairlane_server.queue.service import QueueService
from fairlane_server.worker.service import WorkerService

console = Console(stderr=True, soft_wrap=True)


def _banner(settings: Settings, broker: str, database: str) -> str:
    auth, queue, worker = settings.auth_listen, settings.queue_listen, settings.worker_listen
    return f"""[bold green]Fairlane dev is up[/] (broker: {broker}, database: {database})
  auth    grpc://{auth}
  queue   grpc://{queue}
  worker  grpc://{worker}
  metrics http://{settings.metrics_host}:{settings.queue_metrics_port}/metrics

Try it (grpcurl; the Python CLI has `fairlane register/login/enqueue` too):
  grpcurl -plaintext -d '{{"username":"alice","password":"correct horse"}}' \\
      {auth} fairlane.auth.v1.AuthService/Register
  TOKEN=$(grpcurl -plaintext -d '{{"username":"alice","password":"correct horse"}}' \\
      {auth} fairlane.auth.v1.AuthService/Login | python3 -c \\
      'import json,sys; d=json.load(sys.stdin); print(d.get("access_token") or d["accessToken"])')
  grpcurl -plaintext -H "authorization: Bearer $TOKEN" -d '{{"handler":"echo","payload":"aGk="}}' \\
      {queue} fairlane.queue.v1.QueueService/Enqueue
Ctrl-C stops it."""


def _lock_sqlite(database: str) -> IO[bytes] | None:
    """Holds `<database file>.lock` for the life of the process. Two processes on one
    SQLite file would both run a relay (its lane locks are in-process there) and both
    consume their own in-memory lanes: requests of one lane would run out of order and at
    once. flock, not a pid file: the kernel lets go of it however the process ends."""
    url = make_url(database)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    path = Path(url.database).resolve().with_name(Path(url.database).name + ".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = path.open("wb")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        console.print(
            f"[red]fairlane dev: another process is running on {url.database} "
            f"(it holds {path}); stop it first, or give this one its own --data-dir[/]"
        )
        raise SystemExit(1) from None
    return handle


def run_dev(*, broker: str, database: str, data_dir: str, demo: bool, trace_console: bool) -> None:
    if not database:
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        database = f"sqlite+aiosqlite:///{os.path.abspath(data_dir)}/fairlane.db"
    lock = _lock_sqlite(database)
    # Reflection on, for the grpcurl lines of the banner; loopback listeners need no TLS.
    settings = Settings(database_url=database, reflection=True)
    if broker != "memory":
        settings = settings.model_copy(update={"broker_url": broker})
    fl_logging.configure("dev", json=False, level="WARNING")
    telemetry.configure("fairlane-dev", console=trace_console)

    async def main() -> None:
        await migrate(settings.database_url, schema=settings.database_schema)
        engine = engine_for(settings)
        shared: Broker = (
            MemoryBroker(lane_max_length=settings.lane_max_length)
            if broker == "memory"
            else broker_for(settings)
        )
        await shared.connect()
        backends = Backends(settings, engine=engine, broker=shared)  # closed here, not by them
        # One Prometheus registry per process: serve it once.
        metrics.serve_metrics(settings.metrics_host, settings.queue_metrics_port)
        components: list[Component] = [
            AuthService(settings, engine=engine, dev=True),
            WorkerService(settings, backends=backends),
            # The embedded broker starts empty: the log's unfinished requests go back in.
            QueueService(settings, backends=backends, rebuild_lanes=broker == "memory"),
        ]

        async def started() -> None:
            console.print(_banner(settings, broker, database))
            if demo:
                await demo_round_trip(settings, console)

        try:
            await run_until_signalled(
                components,
                grace=settings.grace_seconds,
                on_started=started,
                gc_full_every=settings.gc_full_collection_every,
            )
        finally:
            await shared.close()
            await engine.dispose()

    try:
        run(main())
    except OSError as exc:
        console.print(f"[red]fairlane dev: {exc}[/]")
        raise SystemExit(1) from exc
    finally:
        telemetry.shutdown()
        if lock is not None:
            lock.close()
