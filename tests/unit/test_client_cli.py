"""The CLI's shared connection options: every client command has them, resolved once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from fairlane.cli import config
from fairlane.cli.connection import Connection, connected
from fairlane.cli.main import build_app
from fairlane.client import Tokens
from tests.certs import Authority
from tests.unit.loopback_services import LoopbackServices

app = build_app()

SERVER_COMMANDS = {"serve", "migrate", "maintain", "keys", "dev", "bench"}
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


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["enqueue", "echo", "hi", "--deadline", "nan"], 2, "a finite number of seconds, not nan"),
        (["enqueue", "echo", "hi", "--deadline", "inf"], 2, "a finite number of seconds, not inf"),
        (
            ["enqueue", "echo", "hi", "--deadline", "1e12"],
            2,
            "deadline 1000000000000.0 is out of range",
        ),
        (["enqueue", "echo", "hi", "--max-attempts", "-1"], 2, "--max-attempts"),
        (["enqueue", "echo", "hi", "--max-attempts", str(10**20)], 1, "max_attempts must be"),
        (["enqueue", "echo", "hi", "--wait", "--wait-timeout", "0"], 2, "more than 0 seconds"),
        (["watch", "--after", "-1"], 2, "--after"),
        (["watch", "--after", str(10**20)], 1, "after_lane_seq must be"),
        (["requests", "--status", "bogus"], 1, "unknown status 'bogus'"),
        (["whoami", "--timeout", "0"], 2, "must be more than 0 seconds"),
        (["whoami", "--timeout", "-1"], 2, "must be more than 0 seconds"),
        (["whoami", "--timeout", "nan"], 2, "must be more than 0 seconds"),
        (["enqueue", "echo", "hi", "--wait", "--wait-timeout", "nan"], 2, "more than 0 seconds"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else str(v),
)
def test_bad_values_are_told_clearly_before_any_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], code: int, message: str
) -> None:
    """Refused on the spot: a usage error (2) for what the option itself rules out, else
    one `error:` line (1), never "unexpected ValueError" (the targets lead nowhere: no
    call is made)."""
    monkeypatch.setenv("FAIRLANE_CONFIG_DIR", str(tmp_path))
    done = CliRunner().invoke(
        app,
        [*args, "--token", "t", "--queue-target", "127.0.0.1:1", "--timeout", "1"]
        if "--timeout" not in args
        else [*args, "--token", "t"],
    )
    assert done.exit_code == code, done.output
    assert message in " ".join(done.output.replace("│", " ").split()), done.output
    assert "unexpected" not in done.output
    if code == 1:
        assert done.output.startswith("error: ")
        assert done.output.count("\n") == 1, done.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["login", ""], "error: the username is empty"),
        (["register", "", "--password", "long enough password"], "the username is empty"),
        (["login"], "no username given and no terminal to ask on: give it as the USERNAME"),
        (["login", "alice"], "no password given and no terminal to ask on: use --password-stdin"),
        (["enqueue", "echo", "hi", "--token", ""], "--token is empty"),
    ],
    ids=lambda v: " ".join(repr(a) for a in v) if isinstance(v, list) else "",
)
def test_missing_names_passwords_and_tokens_are_told_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], message: str
) -> None:
    # With nothing on stdin and no terminal; an empty --token must not fall back on the
    # login cached here.
    monkeypatch.setenv("FAIRLANE_CONFIG_DIR", str(tmp_path))
    config.save(config.Credentials("bob", "bobs-token", "refresh", 2e9, 900, "a:1", "q:1", "w:1"))
    done = CliRunner().invoke(app, args, input="")
    assert done.exit_code == 1, done.output
    assert message in done.output
    assert "unexpected" not in done.output
    assert done.output.count("error: ") == 1, done.output


@pytest.mark.parametrize(
    "args",
    [
        ["whoami", "--timeout", "inf"],
        ["whoami", "--timeout", "1e20"],
        ["enqueue", "echo", "hi", "--wait", "--wait-timeout", "inf"],
        ["enqueue", "echo", "hi", "--wait", "--wait-timeout", "1e20", "--timeout", "1e12"],
    ],
    ids=" ".join,
)
def test_an_infinite_or_huge_timeout_waits_instead_of_failing_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str]
) -> None:
    """inf is no deadline, a huge value the longest one (a year); gRPC would fail the call
    at once (DEADLINE_EXCEEDED) for either."""
    monkeypatch.setenv("FAIRLANE_CONFIG_DIR", str(tmp_path))
    with LoopbackServices() as services:
        targets = ["--auth-target", services.target, "--queue-target", services.target]
        done = CliRunner().invoke(app, [*args, "--token", "t", *targets])
    assert done.exit_code == 0, done.output
    assert ("alice" if args[0] == "whoami" else "hi") in done.output


def test_requests_with_no_matches_print_the_count_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAIRLANE_CONFIG_DIR", str(tmp_path))
    with LoopbackServices(listed=0) as services:
        targets = ["--token", "t", "--queue-target", services.target]
        done = CliRunner().invoke(app, ["requests", *targets])
        assert (done.exit_code, done.output) == (0, "0 requests\n")
        done = CliRunner().invoke(app, ["requests", "--json", *targets])
        assert (done.exit_code, done.output) == (0, "[]\n")


def test_an_empty_fairlane_token_is_refused_not_read_as_the_login(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `export FAIRLANE_TOKEN=$(fairlane admin-token ...)` that failed leaves it empty; the
    # command line reads an empty variable as unset, and would act as the cached login.
    monkeypatch.setenv("FAIRLANE_CONFIG_DIR", str(tmp_path))
    config.save(config.Credentials("bob", "bobs-token", "refresh", 2e9, 900, "a:1", "q:1", "w:1"))
    done = CliRunner().invoke(app, ["whoami"], env={"FAIRLANE_TOKEN": ""})
    assert done.exit_code == 1, done.output
    assert "FAIRLANE_TOKEN is set but empty" in done.output
    assert done.output.count("error: ") == 1, done.output


def test_the_client_certificate_given_at_login_goes_on_being_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only the paths are kept: the next commands read the files again, as the CA file's.
    monkeypatch.setenv("FAIRLANE_CONFIG_DIR", str(tmp_path / "config"))
    leaf = Authority(tmp_path / "ca").issue("alice", server=False)
    at_login = Connection.resolve(
        auth_target=None,
        queue_target=None,
        worker_target=None,
        tls=None,
        ca_file=None,
        timeout=1.0,
        client_cert=leaf.cert,
        client_key=leaf.key,
    )
    config.save(at_login.credentials_for(Tokens.issued("token", "refresh", 900)))
    stored = json.loads(config.credentials_path().read_text())
    assert (stored["client_cert_file"], stored["client_key_file"]) == (
        str(leaf.cert),
        str(leaf.key),
    )
    assert "PRIVATE KEY" not in config.credentials_path().read_text()
    later = Connection.resolve(
        auth_target=None, queue_target=None, worker_target=None, tls=None, ca_file=None, timeout=1.0
    )
    assert later.tls
    assert (later.client_cert, later.client_key) == (leaf.cert.read_bytes(), leaf.key.read_bytes())
