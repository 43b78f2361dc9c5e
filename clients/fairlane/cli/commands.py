"""Client commands of the `fairlane` CLI: login, enqueue, watch, worker control, ...

One module per service (auth, queue, worker), built on `connection` (the shared
options) and `rendering` (output). Every command prints one clear `error: ...` line on
stderr and exits non-zero on failure; a traceback is shown only with FAIRLANE_DEBUG=1.
"""

from __future__ import annotations

import typer

from fairlane.cli import auth, queue, worker


def register_commands(app: typer.Typer) -> None:
    """Adds the client commands to the `fairlane` app."""
    auth.register_commands(app)
    queue.register_commands(app)
    worker.register_commands(app)
