"""The two distributions: both wheels build, and the client's installs alone into a fresh
virtualenv, brings no server module or server dependency, and does a round trip against
the running suite."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.e2e.suite import ROOT, Suite

pytestmark = pytest.mark.e2e

# What the client may bring: itself, its four dependencies and what they pull in.
CLIENT_CLOSURE = {
    "fairlane",
    "grpcio",
    "protobuf",
    "grpcio-status",
    "googleapis-common-protos",
    "typing-extensions",  # grpcio's
    "typing_extensions",
    "pip",
    "setuptools",
}
SERVER_ONLY = {
    "fairlane-server",
    "sqlalchemy",
    "asyncpg",
    "aiosqlite",
    "aio-pika",
    "aiormq",
    "alembic",
    "argon2-cffi",
    "pyjwt",
    "pydantic",
    "pydantic-settings",
    "structlog",
    "prometheus-client",
    "uvloop",
    "psutil",
    "zxcvbn",
    "typer",
    "rich",
}

ROUND_TRIP = """
import asyncio, sys
from fairlane.client import Client

auth, queue, user = sys.argv[1:4]

async def main() -> None:
    async with Client(auth, queue) as client:
        await client.register(user, "correct horse battery staple")
        await client.login(user, "correct horse battery staple")
        async with client.session() as session:
            futures = [await session.submit("echo", f"hello {i}") for i in range(3)]
        print([f.result().output.decode() for f in futures])

asyncio.run(main())
"""


def _run(*args: str, cwd: Path = ROOT) -> str:
    done = subprocess.run(args, check=False, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{args}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("wheels")
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    _run(*pip, "-w", str(out / "client"), str(ROOT / "clients"))
    _run(*pip, "-w", str(out / "server"), str(ROOT))
    (client,) = (out / "client").glob("fairlane-*.whl")
    (server,) = (out / "server").glob("fairlane_server-*.whl")
    return {"client": client, "server": server}


def test_the_server_wheel_holds_the_server_under_its_own_name(wheels: dict[str, Path]) -> None:
    listing = _run(sys.executable, "-m", "zipfile", "-l", str(wheels["server"]))
    assert "fairlane_server/queue/intake.py" in listing
    assert "fairlane_server/core/migrations/alembic.ini" in listing or (
        "fairlane_server/core/migrations/env.py" in listing
    )
    assert " services/" not in listing  # never the colliding name
    assert "fairlane/client/" not in listing  # the client is its own distribution
    metadata = _run(sys.executable, "-m", "zipfile", "-l", str(wheels["client"]))
    assert "fairlane/client/session.py" in metadata
    assert "fairlane_server" not in metadata


def test_the_client_installs_alone_and_talks_to_the_suite(
    wheels: dict[str, Path], suite: Suite, tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", str(venv))
    python = str(venv / "bin" / "python")
    _run(python, "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheels["client"]))

    installed = {
        d["name"].lower() for d in json.loads(_run(python, "-m", "pip", "list", "--format", "json"))
    }
    assert installed <= CLIENT_CLOSURE, installed - CLIENT_CLOSURE
    assert not installed & SERVER_ONLY
    probe = (
        "import importlib.util as u; print(u.find_spec('fairlane_server'), u.find_spec('services'))"
    )
    assert _run(python, "-c", probe, cwd=tmp_path).split() == ["None", "None"]

    # From a directory outside the repository, so nothing of it is importable by path.
    user = f"wheel_{uuid.uuid4().hex[:10]}"
    output = _run(
        python, "-c", ROUND_TRIP, suite.target("auth"), suite.target("queue"), user, cwd=tmp_path
    )
    assert output.strip() == "['hello 0', 'hello 1', 'hello 2']"

    # Without the cli extra the command explains what to install.
    done = subprocess.run(
        [str(venv / "bin" / "fairlane"), "--help"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "pip install 'fairlane[cli]'" in done.stderr
