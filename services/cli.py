"""Server-side command implementations behind `fairlane serve`, `migrate` and `maintain`."""

from __future__ import annotations

import asyncio
import sys
from typing import NoReturn

from fairlane_server.core import logging as fl_logging
from fairlane_server.core import metrics, telemetry
from fairlane_server.core.db import MigrationRefused, migrate
from fairlane_server.core.runtime import Component, StartupFailed, run, run_until_signalled
from fairlane_server.core.settings import Settings, service_secret_problem
from fairlane_server.core.transport import TransportError
from fairlane_server.worker.registry import HandlerError

log = fl_logging.get_logger(__name__)


def _refuse(reason: str) -> NoReturn:
    """Startup refused for a configuration the operator must fix: exit 2, not a crash."""
    log.error("startup_refused", reason=reason)
    raise SystemExit(2)


def _failed(exc: StartupFailed) -> NoReturn:
    """A dependency did not answer at start: exit 1 for the supervisor to try again."""
    log.error(
        "startup_failed", component=exc.component, dependency=exc.dependency, reason=exc.reason
    )
    raise SystemExit(1)


def _build(service: str, settings: Settings) -> tuple[Component, int]:
    if service == "auth":
        from fairlane_server.auth.service import AuthService

        return AuthService(settings), settings.auth_metrics_port
    if service == "queue":
        from fairlane_server.queue.service import QueueService

        return QueueService(settings), settings.queue_metrics_port
    from fairlane_server.worker.service import WorkerService

    return WorkerService(settings), settings.worker_metrics_port


def serve_one(service: str, handlers: list[str], hooks: list[str], *, json_logs: bool) -> None:
    base = Settings()
    settings = base.model_copy(
        update={"handlers": [*base.handlers, *handlers], "hooks": [*base.hooks, *hooks]}
    )
    fl_logging.configure(service, json=json_logs)
    problem = service_secret_problem(settings)
    if problem is not None:
        _refuse(problem)
    telemetry.configure(f"fairlane-{service}")

    async def main() -> None:
        # gRPC aio objects bind to the running loop, so build them inside it.
        component, metrics_port = _build(service, settings)
        metrics.serve_metrics(settings.metrics_host, metrics_port)
        await run_until_signalled(
            [component],
            grace=settings.grace_seconds,
            gc_full_every=settings.gc_full_collection_every,
        )

    try:
        run(main())
    except (TransportError, HandlerError) as exc:
        _refuse(str(exc))
    except StartupFailed as exc:
        _failed(exc)
    finally:
        telemetry.shutdown()


def migrate_database() -> None:
    settings = Settings()
    fl_logging.configure("migrate")
    try:
        asyncio.run(migrate(settings.database_url, schema=settings.database_schema))
    except OSError as exc:
        print(f"fairlane migrate: cannot reach the database: {exc}", file=sys.stderr)
        raise SystemExit(1) from exc
    except MigrationRefused as exc:
        print(f"fairlane migrate: {exc}", file=sys.stderr)
        raise SystemExit(1) from exc
    print("database is at the newest schema version")


def maintain_database(*, retention_days: float | None) -> None:
    """One log maintenance pass: partitions ahead, retention (see services/queue/retention)."""
    from fairlane_server.core.db import create_engine
    from fairlane_server.queue.retention import Retention, describe
    from fairlane_server.queue.retention_store import RetentionStore

    settings = Settings()
    fl_logging.configure("maintain")
    days = settings.retention_days if retention_days is None else retention_days

    async def main() -> str:
        engine = create_engine(
            settings.database_url, schema=settings.database_schema, pool_size=1, timeout=300.0
        )
        try:
            report = await Retention(RetentionStore(engine), days=days).run_once()
        finally:
            await engine.dispose()
        return describe(report)

    try:
        print(asyncio.run(main()))
    except OSError as exc:
        print(f"fairlane maintain: cannot reach the database: {exc}", file=sys.stderr)
        raise SystemExit(1) from exc
