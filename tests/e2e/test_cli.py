"""The `fairlane` client commands through their real entry point, against the suite."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.suite import ROOT, SERVICE_SECRET, Suite

pytestmark = pytest.mark.e2e

PASSWORD = "correct horse battery"


class Cli:
    """Runs `python -m fairlane.cli.main ...` with its own config dir."""

    def __init__(self, config_dir: Path, **env: str) -> None:
        self.config_dir = config_dir
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FAIRLANE_")}
        self.env.update(
            PYTHONPATH=os.pathsep.join([str(ROOT / "clients"), str(ROOT)]),
            FAIRLANE_CONFIG_DIR=str(config_dir),
            COLUMNS="200",
            **env,
        )

    @property
    def credentials(self) -> Path:
        return self.config_dir / "credentials.json"

    def _run(
        self, args: tuple[str, ...], stdin: bytes | None
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [sys.executable, "-m", "fairlane.cli.main", *args],
            input=stdin if stdin is not None else b"",
            capture_output=True,
            env=self.env,
            cwd=ROOT,
            timeout=120,
            check=False,
        )

    async def __call__(
        self, *args: str, stdin: bytes | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        return await asyncio.to_thread(self._run, args, stdin)

    async def ok(self, *args: str, stdin: bytes | None = None) -> str:
        done = await self(*args, stdin=stdin)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        return done.stdout.decode()

    async def json(self, *args: str) -> Any:
        return json.loads(await self.ok(*args, "--json"))

    async def fails(self, *args: str, stdin: bytes | None = None) -> str:
        """Runs a command that must fail with exactly one `error: ...` line on stderr."""
        done = await self(*args, stdin=stdin)
        stderr = done.stderr.decode()
        assert done.returncode not in (0, None), (args, done.stdout, stderr)
        assert stderr.startswith("error: "), stderr
        assert stderr.endswith("\n"), stderr
        assert stderr.count("\n") == 1, stderr
        assert "Traceback" not in stderr
        return stderr.removeprefix("error: ").strip()


def _interrupted_watch(cli: Cli) -> tuple[int, bytes]:
    # `python -m fairlane.cli.main watch`, with Ctrl-C handled as in a terminal even if
    # this test runs where SIGINT is ignored (a background job).
    start = (
        "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler);"
        " sys.argv = ['fairlane', 'watch'];"
        " runpy.run_module('fairlane.cli.main', run_name='__main__')"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", start],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli.env,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline()  # it is streaming results
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=20)
    return proc.returncode, stderr


def _into_a_closed_pipe(cli: Cli, *args: str) -> tuple[int, bytes]:
    """Runs a command whose stdout is a pipe nobody reads any more (`... | true`)."""
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "fairlane.cli.main", *args],
            stdin=subprocess.DEVNULL,
            stdout=write,
            stderr=subprocess.PIPE,
            env=cli.env,
            cwd=ROOT,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write)
    return done.returncode, done.stderr


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_cli_commands_against_the_suite(suite: Suite, tmp_path: Path) -> None:
    cli = Cli(tmp_path / "config")
    targets = (
        "--auth-target",
        suite.target("auth"),
        "--queue-target",
        suite.target("queue"),
        "--worker-target",
        suite.target("worker"),
    )
    name = f"cli-{uuid.uuid4().hex[:8]}"

    assert await cli.fails("whoami") == "not logged in: run `fairlane login` first"

    # Register (password from stdin) logs in and caches the targets, 0600.
    out = await cli.ok(
        "register", name, "--password-stdin", *targets, stdin=f"{PASSWORD}\n".encode()
    )
    assert f"registered {name}" in out
    assert _mode(cli.credentials) == 0o600
    cached = json.loads(cli.credentials.read_text())
    assert cached["username"] == name
    assert cached["queue_target"] == suite.target("queue")
    assert cached["refresh_token"]

    # Bad credentials and a taken name: one line, non-zero.
    message = await cli.fails("login", name, "--password", "not the password", *targets)
    assert "UNAUTHENTICATED" in message
    message = await cli.fails("register", name, "--password", PASSWORD, *targets)
    assert "ALREADY_EXISTS" in message

    # Login again with the password from the environment; commands use the cache.
    cli.credentials.unlink()
    cli.env["FAIRLANE_PASSWORD"] = PASSWORD
    assert "logged in as" in await cli.ok("login", name, *targets)
    del cli.env["FAIRLANE_PASSWORD"]
    assert _mode(cli.credentials) == 0o600
    me = await cli.json("whoami")
    assert me["username"] == name
    assert me["auth_target"] == suite.target("auth")

    # enqueue: the id; --wait: the output bytes.
    request_id = (await cli.ok("enqueue", "echo", "hello", "--ref", "one")).strip()
    assert uuid.UUID(request_id)
    waited = await cli("enqueue", "echo", "-", "--wait", stdin=b"bytes\x00\xff")
    assert waited.returncode == 0, waited.stderr
    assert waited.stdout == b"bytes\x00\xff"
    # An infinite or huge time limit is none (or a year), not an instant DEADLINE_EXCEEDED.
    for limit in ("inf", "1e20"):
        waited = await cli("enqueue", "echo", limit, "--wait", "--wait-timeout", limit)
        assert (waited.returncode, waited.stdout) == (0, limit.encode()), waited.stderr
        assert (await cli.json("whoami", "--timeout", limit))["username"] == name
    waited_json = await cli.json("enqueue", "echo", "json please", "--wait")
    assert waited_json["status"] == "SUCCEEDED"
    assert waited_json["output"] == "json please"

    # Unknown handler: unary and on a Session.
    message = await cli.fails("enqueue", "no-such-handler", "x")
    assert "unknown handler 'no-such-handler'" in message
    assert "INVALID_ARGUMENT" in message
    message = await cli.fails("enqueue", "no-such-handler", "x", "--wait")
    assert message == "rejected (INVALID_ARGUMENT): unknown handler 'no-such-handler'"
    # A request that runs and fails: its status, non-zero.
    message = await cli.fails("enqueue", "fail", '{"permanent": true}', "--wait")
    assert "FAILED: asked to fail permanently" in message

    request = await _until_final(cli, request_id)
    assert request["status"] == "SUCCEEDED"
    assert request["output"] == "hello"
    assert request["client_ref"] == "one"
    assert "SUCCEEDED" in await cli.ok("get", request_id)
    assert "NOT_FOUND" in await cli.fails("get", str(uuid.uuid4()))
    assert "INVALID_ARGUMENT" in await cli.fails("get", "not-an-id")

    # submit-file: one Session, lines in order, blank lines skipped.
    lines = [f"line {i}" for i in range(25)]
    source = tmp_path / "requests.txt"
    source.write_text("\n".join(lines[:10]) + "\n\n" + "\n".join(lines[10:]) + "\n")
    results = tmp_path / "results.jsonl"
    out = await cli.ok("submit-file", str(source), "--results", str(results), "--window", "4")
    assert "25 requests" in out
    assert "SUCCEEDED" in out
    written = [json.loads(x) for x in results.read_text().splitlines()]
    assert [w["output"] for w in written] == lines
    refs = [f"line-{n}" for n in range(1, 11)] + [f"line-{n}" for n in range(12, 27)]
    assert [w["client_ref"] for w in written] == refs
    seqs = [w["lane_seq"] for w in written]
    assert seqs == list(range(seqs[0], seqs[0] + 25))
    mixed = tmp_path / "mixed.txt"
    mixed.write_text('{"times": 0}\n{"permanent": true}\n')
    message = await cli.fails("submit-file", str(mixed), "--handler", "fail")
    assert message == "1 of 2 requests did not succeed"
    assert "No such file" in await cli.fails("submit-file", str(tmp_path / "missing.txt"))

    # watch: resume after a lane_seq, stop after N.
    watched = await cli.ok("watch", "--after", str(seqs[4]), "--count", "3", "--json")
    outputs = [json.loads(x)["output"] for x in watched.splitlines()]
    assert outputs == lines[5:8]
    text = await cli.ok("watch", "--after", str(seqs[0]), "-n", "1")
    assert "SUCCEEDED" in text
    assert "line 1" in text

    # Ctrl-C ends watch quietly with exit code 0.
    assert await asyncio.to_thread(_interrupted_watch, cli) == (0, b"")
    # A closed stdout ends a command quietly, 141 as SIGPIPE would (not `error: Broken pipe`).
    for args in (("watch", "--json"), ("watch",), ("requests",), ("get", request_id)):
        assert await asyncio.to_thread(_into_a_closed_pipe, cli, *args) == (141, b"")

    listed = await cli.json("requests", "--status", "succeeded", "--limit", "5")
    assert len(listed) == 5
    assert all(r["status"] == "SUCCEEDED" for r in listed)
    assert "FAILED" in await cli.ok("requests", "-s", "failed")
    assert await cli.ok("requests", "-s", "cancelled") == "0 requests\n"  # and no empty table
    assert "unknown status" in await cli.fails("requests", "--status", "bogus")
    lane = await cli.json("lanes")
    assert lane["last_lane_seq"] == seqs[-1] + 2  # the two lines of mixed.txt
    assert lane["user_id"] == me["user_id"]

    # An expired (or unusable) cached access token is refreshed and the cache rewritten.
    for expires_at in (time.time() - 10, time.time() + 3600):
        cached = json.loads(cli.credentials.read_text())
        cached.update(access_token="not-a-valid-token", expires_at=expires_at)
        cli.credentials.write_text(json.dumps(cached))
        assert (await cli.json("whoami"))["username"] == name
        refreshed = json.loads(cli.credentials.read_text())
        assert refreshed["access_token"] != "not-a-valid-token"
        assert refreshed["refresh_token"] != cached["refresh_token"]
        assert _mode(cli.credentials) == 0o600

    # Worker control.
    handlers = {h["name"] for h in await cli.json("worker", "handlers")}
    assert {"echo", "sleep", "fail"} <= handlers
    assert (await cli.json("worker", "status"))["state"] == "RUNNING"
    # Control is for operators: a user's token is refused; an operator's token, from
    # `fairlane admin-token` and the service secret, is not.
    assert "PERMISSION_DENIED" in await cli.fails("worker", "pause")
    assert (await cli.json("worker", "status"))["state"] == "RUNNING"
    assert "no service secret" in await cli.fails("admin-token", *targets)
    operator = Cli(cli.config_dir, FAIRLANE_SERVICE_SECRET=SERVICE_SECRET)
    token = (await operator.ok("admin-token", "--name", "cli-operator", *targets)).strip()
    assert "wrong service secret" in await cli.fails(
        "admin-token", "--secret-stdin", *targets, stdin=b"not-the-secret\n"
    )
    admin = Cli(cli.config_dir, FAIRLANE_TOKEN=token)
    assert "PAUSED" in await admin.ok("worker", "pause")
    assert (await admin.json("worker", "status"))["state"] == "PAUSED"
    assert "RUNNING" in await admin.ok("worker", "resume")
    assert "NOT_FOUND" in await admin.fails("worker", "pause", "--lane", str(uuid.uuid4()))
    assert "INVALID_ARGUMENT" in await admin.fails("worker", "pause", "--lane", "no-such-lane")
    assert "DRAINED" in await admin.ok("worker", "drain", "--grace", "2")
    assert "FAILED_PRECONDITION" in await admin.fails("worker", "resume")

    # Unreachable service: one line naming it.
    message = await cli.fails("whoami", "--auth-target", "127.0.0.1:1", "--timeout", "2")
    assert "auth service at 127.0.0.1:1 is unavailable" in message

    # Logout revokes the refresh token and forgets the credentials.
    refresh_token = json.loads(cli.credentials.read_text())["refresh_token"]
    assert f"logged out {name}" in await cli.ok("logout")
    assert not cli.credentials.exists()
    assert await cli.fails("lanes") == "not logged in: run `fairlane login` first"
    cli.credentials.write_text(
        json.dumps({**cached, "refresh_token": refresh_token, "expires_at": 0})
    )
    assert "log in again" in await cli.fails("whoami")


async def _until_final(cli: Cli, request_id: str) -> Any:
    deadline = time.monotonic() + 30
    while True:
        request = await cli.json("get", request_id)
        if request["status"] not in ("QUEUED", "RUNNING"):
            return request
        assert time.monotonic() < deadline, request
        await asyncio.sleep(0.2)
