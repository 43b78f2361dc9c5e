"""The server's commands of the `fairlane` CLI: serve, migrate, maintain, keys, dev, bench.

The client distribution owns the `fairlane` command; the server adds these through the
`fairlane.cli` entry-point group (see `register`), so the client never imports the server.
"""

from __future__ import annotations

import enum
from typing import Annotated

import typer

from fairlane_server.bench import bench_command

app = typer.Typer()


class ServiceName(enum.StrEnum):
    auth = "auth"
    queue = "queue"
    worker = "worker"


@app.command()
def serve(
    service: Annotated[ServiceName, typer.Argument(help="Which service to run.")],
    handlers: Annotated[
        list[str] | None,
        typer.Option("--handlers", help="Extra worker handlers as module:attr (repeatable)."),
    ] = None,
    hooks: Annotated[
        list[str] | None,
        typer.Option("--hooks", help="Worker lifecycle hooks as module:attr (repeatable)."),
    ] = None,
    json_logs: Annotated[bool, typer.Option("--json-logs/--console-logs")] = True,
) -> None:
    """Run one service against RabbitMQ and PostgreSQL (settings: FAIRLANE_* variables)."""
    from fairlane_server.cli import serve_one

    serve_one(service.value, handlers or [], hooks or [], json_logs=json_logs)


@app.command()
def migrate() -> None:
    """Bring the database schema to the newest version (Alembic)."""
    from fairlane_server.cli import migrate_database

    migrate_database()


@app.command()
def maintain(
    retention_days: Annotated[
        float | None,
        typer.Option(
            "--retention-days",
            min=0,
            help="Override FAIRLANE_RETENTION_DAYS for this pass (0 keeps everything).",
        ),
    ] = None,
) -> None:
    """Run one request-log maintenance pass now: create the coming days' partitions, drop
    those past retention (the queue service does this every hour by itself)."""
    from fairlane_server.cli import maintain_database

    maintain_database(retention_days=retention_days)


keys_app = typer.Typer(
    help="Signing keys of access tokens: list, rotate, retire (straight on the database, "
    "like migrate; docs/security.md, 'Signing-key rotation').",
    no_args_is_help=True,
)
app.add_typer(keys_app, name="keys")


@keys_app.command("list")
def keys_list() -> None:
    """Every signing key and what the auth replicas do with it."""
    from fairlane_server.auth.keys_cli import list_keys

    list_keys()


@keys_app.command("rotate")
def keys_rotate() -> None:
    """Add a new signing key: published at once, signed with two reloads and 5 s later."""
    from fairlane_server.auth.keys_cli import rotate_key

    rotate_key()


@keys_app.command("retire")
def keys_retire(
    kid: Annotated[str, typer.Argument(help="The key's id (`fairlane keys list`).")],
    force: Annotated[
        bool,
        typer.Option("--force", help="Retire it even while the replicas still sign with it."),
    ] = False,
) -> None:
    """Stop publishing and signing with a key: tokens it signed are refused from then."""
    from fairlane_server.auth.keys_cli import retire_key

    retire_key(kid, force=force)


@app.command()
def dev(
    broker: Annotated[
        str, typer.Option(help="'memory' (embedded) or an amqp:// URL for real RabbitMQ.")
    ] = "memory",
    database: Annotated[
        str,
        typer.Option(
            help="SQLAlchemy URL; default: SQLite in --data-dir (postgresql+asyncpg://...)."
        ),
    ] = "",
    data_dir: Annotated[
        str, typer.Option(help="Where the embedded SQLite database lives.")
    ] = ".fairlane-dev",
    demo: Annotated[
        bool, typer.Option("--demo/--no-demo", help="Run a short client round trip once up.")
    ] = False,
    trace_console: Annotated[bool, typer.Option(help="Print spans to the console.")] = False,
) -> None:
    """Run auth, queue and worker in one process on embedded backends (nothing to install)."""
    from fairlane_server.dev import run_dev

    run_dev(
        broker=broker,
        database=database,
        data_dir=data_dir,
        demo=demo,
        trace_console=trace_console,
    )


app.command(name="bench")(bench_command)


def register(main: typer.Typer) -> None:
    """Adds the server's commands to the `fairlane` app (entry point `fairlane.cli`)."""
    main.registered_commands.extend(app.registered_commands)
    main.registered_groups.extend(app.registered_groups)
