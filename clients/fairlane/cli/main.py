"""The `fairlane` command. Client commands (login, enqueue, watch, worker control) are
here; installing the server (`fairlane-server`) adds serve, migrate, maintain, dev and
bench through the `fairlane.cli` entry-point group."""

from __future__ import annotations

import sys
from importlib.metadata import entry_points

try:
    import typer
except ImportError:  # the client installed without its `cli` extra
    typer = None  # type: ignore[assignment]


def build_app() -> typer.Typer:
    from fairlane.cli.commands import register_commands

    app = typer.Typer(
        name="fairlane",
        help="Per-client FIFO request lanes over gRPC, RabbitMQ and PostgreSQL.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
    )
    register_commands(app)
    for plugin in entry_points(group="fairlane.cli"):
        plugin.load()(app)
    return app


def main() -> None:
    if typer is None:
        sys.exit("fairlane: the command line needs the cli extra: pip install 'fairlane[cli]'")
    build_app()()


if __name__ == "__main__":
    main()
