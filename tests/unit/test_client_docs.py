"""docs/client.md is true to the client and the CLI: names, parameters, options."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import typer

from fairlane.cli.main import build_app
from fairlane.client import Client, Session, SyncClient

app = build_app()

DOC = (Path(__file__).resolve().parents[2] / "docs" / "client.md").read_text()


def _section(title: str) -> str:
    start = DOC.index(title)
    end = DOC.find("\n## ", start + 1)
    return DOC[start : end if end != -1 else None]


def _table_rows(text: str) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        if line.startswith("| `"):
            cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
            rows.append([c.strip() for c in cells])
    return rows


def test_every_documented_client_call_exists_with_those_parameters() -> None:
    calls = _section("### Calls")
    rows = _table_rows(calls)
    assert len(rows) >= 15
    for row in rows:
        for signature in re.findall(r"`([a-z_]+\([^`]*\))`", row[0]):
            name, params = signature.split("(", 1)
            method = getattr(Client, name)
            real = inspect.signature(method).parameters
            for part in params.rstrip(")").split(","):
                param = part.split("=")[0].strip()
                if param and param != "*":
                    assert param in real, f"Client.{name} has no parameter {param!r}"
    for name in ("submit", "events", "close", "cancel"):
        assert f"{name}(" in DOC
        assert callable(getattr(Session, name))
    assert callable(SyncClient.submit_and_wait)


def _command(path: list[str]) -> Any:
    command: Any = typer.main.get_command(app)
    for word in path:
        found = getattr(command, "commands", {}).get(word)
        assert found is not None, f"`fairlane {' '.join(path)}` does not exist"
        command = found
    return command


def test_every_documented_command_and_option_exists() -> None:
    commands = _section("## Shell")
    rows = _table_rows(commands)
    assert len(rows) >= 13
    for row in rows:
        for usage in re.findall(r"`([a-z][a-z -]*[a-z])(?: [A-Z\[]|`)", row[0]):
            for variant in usage.split(" / "):
                words = [w for w in variant.split() if w.islower()]
                command = _command(words)
                options = {o for p in command.params for o in [*p.opts, *p.secondary_opts]}
                for option in re.findall(r"`(--[a-z-]+)", row[1]):
                    assert option in options, f"`fairlane {variant}` has no {option}"
    everywhere = _command(["enqueue"])
    envvars = {getattr(p, "envvar", None) for p in everywhere.params}
    for variable in re.findall(r"`(FAIRLANE_[A-Z_]+)`", commands):
        if variable not in (
            "FAIRLANE_CONFIG_DIR",
            "FAIRLANE_PASSWORD",
            "FAIRLANE_DEBUG",
            "FAIRLANE_SERVICE_SECRET",  # read by `admin-token` alone
        ):
            assert variable in envvars or variable == "FAIRLANE_WORKER_TARGET", variable
    assert "FAIRLANE_WORKER_TARGET" in {
        getattr(p, "envvar", None) for p in _command(["worker", "status"]).params
    }
