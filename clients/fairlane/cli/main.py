"""The `fairlane` command. Client commands (login, enqueue, watch, worker control) are
here; installing the server (`fairlane-server`) adds serve, migrate, maintain, dev and
bench through the `fairlane.cli` entry-point group."""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import typer

# Ctrl-C while the command starts (it imports typer, rich, grpc and the plugins: about
# half a second) exits with this code and prints nothing, as it does once running.
EXIT_INTERRUPTED = 130


def build_app() -> typer.Typer:
    from importlib.metadata import entry_points

    import typer

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
    # gRPC core logs each failed TLS handshake as an unstructured INFO line: any TCP
    # client could grow a service's log without limit, outside its JSON lines. It reads
    # the variable once, when grpc is first imported, which is below.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    # The imports happen here, not at the top of the module, so that a Ctrl-C during
    # them is caught (the console script imports this module before calling main).
    try:
        if importlib.util.find_spec("typer") is None:  # installed without its `cli` extra
            sys.exit("fairlane: the command line needs the cli extra: pip install 'fairlane[cli]'")
        app = build_app()
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)
    # From here on typer exits 130 on Ctrl-C, and each command reports it (see connected).
    app()


if __name__ == "__main__":
    main()
