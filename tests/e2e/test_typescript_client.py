"""The TypeScript client (clients/typescript) against the three service processes.

The node tests (clients/typescript/test/e2e) get the targets in their environment and ask
this harness, over a loopback socket, to kill and restart the queue replica when they need
it. The example in docs/typescript.md is compiled with tsc --strict and run as written.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import DATABASE_URL, broker_url
from tests.e2e.suite import ROOT, Suite, serving

pytestmark = pytest.mark.e2e

TS = ROOT / "clients" / "typescript"
TOKEN_TTL = 2
USER_RATE = 2
USER_BURST = 60
DOC = ROOT / "docs" / "typescript.md"


def _require_packages() -> None:
    if not (TS / "node_modules" / ".bin" / "tsc").exists():
        pytest.fail("clients/typescript has no node_modules: run `make install`")


@pytest.fixture
async def ts_suite(pg_schema: str, vhost: str, tmp_path: Path) -> AsyncIterator[Suite]:
    """The suite with short-lived access tokens, strict refresh rotation and a small
    per-user token bucket."""
    s = Suite(DATABASE_URL, pg_schema, broker_url(vhost), tmp_path)
    s.extra_env.update(
        FAIRLANE_ACCESS_TOKEN_TTL_SECONDS=str(TOKEN_TTL),
        FAIRLANE_USER_RATE_PER_SECOND=str(USER_RATE),
        FAIRLANE_USER_BURST=str(USER_BURST),
        # Strict rotation: a spent refresh token presented again revokes its login at once.
        FAIRLANE_REFRESH_REUSE_INTERVAL_SECONDS="0",
    )
    # The queue replica the tests kill is replaced by one that stops cleanly.
    async with serving(s):
        yield s


@contextlib.asynccontextmanager
async def _control(suite: Suite) -> AsyncIterator[str]:
    """A loopback line protocol: "restart queue" SIGKILLs the queue replica, starts a new
    one on the same port and answers "ok" once it is SERVING."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = (await reader.readline()).decode().strip()
            if line == "restart queue":
                suite.stop("queue", signal.SIGKILL)
                suite.start("queue")
                await suite.wait_serving("queue")
                writer.write(b"ok\n")
            else:
                writer.write(f"unknown command {line!r}\n".encode())
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"127.0.0.1:{port}"


def _node_env(suite: Suite, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        FAIRLANE_AUTH_TARGET=suite.target("auth"),
        FAIRLANE_QUEUE_TARGET=suite.target("queue"),
        FAIRLANE_WORKER_TARGET=suite.target("worker"),
        **extra,
    )
    return env


async def _run(args: list[str], env: dict[str, str], cwd: Path, timeout: float) -> str:
    """Runs a command without blocking the loop (the control server lives on it); fails
    with its output unless it exits 0."""
    proc = await asyncio.create_subprocess_exec(
        *args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    text = out.decode(errors="replace")
    assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}:\n{text[-8000:]}"
    return text


def _tap_count(output: str, name: str) -> int:
    found = re.findall(rf"^# {name} (\d+)$", output, re.MULTILINE)
    assert found, f"no '# {name}' line in the node test output:\n{output[-4000:]}"
    return int(found[-1])


async def test_typescript_client_against_the_suite(ts_suite: Suite) -> None:
    _require_packages()
    async with _control(ts_suite) as address:
        output = await _run(
            ["npm", "run", "--silent", "test:e2e"],
            _node_env(
                ts_suite,
                FAIRLANE_TEST_CONTROL=address,
                FAIRLANE_TEST_TOKEN_TTL_SECONDS=str(TOKEN_TTL),
                FAIRLANE_TEST_USER_BURST=str(USER_BURST),
            ),
            TS,
            timeout=240,
        )
    assert _tap_count(output, "fail") == 0, output[-8000:]
    assert _tap_count(output, "pass") == _tap_count(output, "tests") >= 7, output[-8000:]


def _doc_example() -> str:
    blocks = re.findall(r"```ts\n(.*?)```", DOC.read_text(), re.DOTALL)
    assert blocks, "docs/typescript.md has no ```ts example"
    return str(blocks[0])


async def test_the_documented_example_runs_as_written(suite: Suite, tmp_path: Path) -> None:
    _require_packages()
    env = _node_env(suite)
    await _run(["npm", "run", "--silent", "build"], env, TS, timeout=180)
    # A project of the reader's own that depends on the package.
    project = tmp_path / "example"
    (project / "node_modules" / "@fairlane").mkdir(parents=True)
    (project / "node_modules" / "@fairlane" / "client").symlink_to(TS)
    (project / "package.json").write_text('{"type": "module"}\n')
    (project / "example.ts").write_text(_doc_example())
    tsc = [
        str(TS / "node_modules/.bin/tsc"),
        "--strict",
        "--target", "ES2022",
        "--module", "NodeNext",
        "--moduleResolution", "NodeNext",
        "--lib", "ES2022,DOM",
        "--typeRoots", str(TS / "node_modules/@types"),
        "--types", "node",
        "--outDir", "out",
        "example.ts",
    ]  # fmt: skip
    await _run(tsc, env, project, timeout=180)
    output = await _run(["node", "out/example.js"], env, project, timeout=120)
    # What the page says it prints.
    printed = re.search(r"it prints:\n\n```text\n(.*?)```", DOC.read_text(), re.DOTALL)
    assert printed, "docs/typescript.md does not show the example's output"
    assert output.splitlines() == printed.group(1).splitlines(), output
