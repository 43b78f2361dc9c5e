"""The CLI's shared connection options: every client command has them, resolved once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from fairlane.cli.connection import Connection, connected
from fairlane.cli.main import build_app

app = build_app()

SERVER_COMMANDS = {"serve", "migrate", "maintain", "dev", "bench"}
CONNECTION_OPTIONS = {
    "--auth-target",
    "--queue-target",
    "--worker-target",
    "--tls",
    "--ca-file",
    "--timeout",
}


def _client_commands() -> dict[str, Any]:
    root: Any = typer.main.get_command(app)
    found: dict[str, Any] = {}
    for name, command in root.commands.items():
        if name in SERVER_COMMANDS:
            continue
        for sub, leaf in getattr(command, "commands", {name: command}).items():
            found[name if sub == name else f"{name} {sub}"] = leaf
    return found


def test_every_client_command_takes_the_connection_options() -> None:
    commands = _client_commands()
    assert len(commands) == 16
    for name, command in commands.items():
        options = {o for p in command.params for o in p.opts}
        assert options >= CONNECTION_OPTIONS, name


def test_connected_resolves_options_then_cache_then_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAIRLANE_CONFIG_DIR", str(tmp_path))
    seen: list[tuple[Connection, int]] = []

    @connected
    async def probe(conn: Connection, *, n: int = 1) -> None:
        seen.append((conn, n))

    probe_app = typer.Typer()
    probe_app.command()(probe)
    runner = CliRunner()
    done = runner.invoke(probe_app, ["--n", "3", "--queue-target", "q:1", "--timeout", "2"])
    assert done.exit_code == 0, done.output
    conn, n = seen[-1]
    assert n == 3
    assert (conn.auth_target, conn.queue_target, conn.worker_target) == (
        "127.0.0.1:50051",
        "q:1",
        "127.0.0.1:50053",
    )
    assert (conn.tls, conn.timeout, conn.credentials) == (False, 2.0, None)

    # A missing CA file is one error line, not a traceback.
    done = runner.invoke(probe_app, ["--ca-file", str(tmp_path / "missing.pem")])
    assert done.exit_code == 1
    assert "cannot read the CA file" in done.output


def test_a_command_cannot_redefine_a_connection_option() -> None:
    async def clash(conn: Connection, *, timeout: float = 1.0) -> None:
        raise AssertionError("never runs")

    with pytest.raises(TypeError, match="timeout"):
        connected(clash)
