"""The Dockerfile (hadolint + BuildKit's parser), the build context (.dockerignore) and the
image's gRPC health-check script. No container engine runs here, so the image is checked
statically; the health-check script runs for real against a gRPC server."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import dockerfile  # type: ignore[import-not-found]
import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.certs import Authority
from tests.deploy.support import DEPLOY, REPO, run, tool
from tests.ports import free_ports

HEALTHCHECK = DEPLOY / "docker" / "healthcheck.py"


def stages() -> list[list[Any]]:
    """The Dockerfile's instructions, split into build stages (FROM starts one)."""
    out: list[list[Any]] = []
    for cmd in dockerfile.parse_file(str(REPO / "Dockerfile")):
        if cmd.cmd.upper() == "FROM":
            out.append([])
        if out:
            out[-1].append(cmd)
    return out


def instructions(stage: list[Any], name: str) -> list[Any]:
    return [c for c in stage if c.cmd.upper() == name]


def test_hadolint() -> None:
    out = run([tool("hadolint"), "--no-color", "--failure-threshold", "style", "Dockerfile"])
    assert out.stdout.strip() == ""


def test_multi_stage_slim_non_root() -> None:
    all_stages = stages()
    assert len(all_stages) >= 2
    args = {
        c.value[0].split("=", 1)[0]: c.value[0].split("=", 1)[1]
        for c in dockerfile.parse_file(str(REPO / "Dockerfile"))
        if c.cmd.upper() == "ARG" and "=" in c.value[0]
    }
    final = all_stages[-1]
    base = final[0].value[0]
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    assert re.fullmatch(r"python:3\.11[\w.-]*-slim[\w.-]*", base), base
    (user,) = instructions(final, "USER")
    uid = user.value[0].split(":")[0]
    assert uid.isdigit(), "numeric user, so runAsNonRoot can check it"
    assert int(uid) >= 1000, "non-root user"
    # Nothing is compiled or installed with a package manager in the final stage.
    for run_cmd in instructions(final, "RUN"):
        text = " ".join(run_cmd.value)
        for word in ("apt-get", "apk ", "gcc", "build-essential", "pip install", "make "):
            assert word not in text, f"final stage runs {word!r}"
    copies = instructions(final, "COPY")
    assert any("--from=builder" in c.flags for c in copies)
    assert all("--from=builder" in c.flags or c.value[0].startswith("deploy/") for c in copies)


def test_entrypoint_and_ports() -> None:
    final = stages()[-1]
    (entry,) = instructions(final, "ENTRYPOINT")
    assert entry.json, "exec form, so SIGTERM reaches fairlane directly"
    assert list(entry.value) == ["fairlane"]
    (stop,) = instructions(final, "STOPSIGNAL")
    assert stop.value[0] == "SIGTERM"
    exposed = {p for c in instructions(final, "EXPOSE") for p in c.value}
    assert exposed == {"50051", "50052", "50053", "9101", "9102", "9103"}
    env: dict[str, str] = {}
    for c in instructions(final, "ENV"):
        env.update(zip(c.value[::2], c.value[1::2], strict=True))
    assert env["FAIRLANE_METRICS_HOST"] == "0.0.0.0"
    for name, port in (("AUTH", 50051), ("QUEUE", 50052), ("WORKER", 50053)):
        assert env[f"FAIRLANE_{name}_LISTEN"] == f"0.0.0.0:{port}"


# --- build context ---------------------------------------------------------------------


def _pattern(rule: str) -> re.Pattern[str]:
    """A .dockerignore rule as a regex (Go filepath.Match plus **, as Docker does)."""
    out = ""
    i = 0
    while i < len(rule):
        if rule.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif rule.startswith("**", i):
            out += ".*"
            i += 2
        elif rule[i] == "*":
            out += "[^/]*"
            i += 1
        elif rule[i] == "?":
            out += "[^/]"
            i += 1
        elif rule[i] == "[":
            j = rule.index("]", i)
            out += rule[i : j + 1]
            i = j + 1
        else:
            out += re.escape(rule[i])
            i += 1
    return re.compile(out)


def build_context() -> set[str]:
    """The files `docker build .` sends, by Docker's .dockerignore rules (last match wins,
    a rule matching a parent directory matches everything under it)."""
    rules = []
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        rules.append((negate, line.lstrip("!").strip("/")))
    compiled = [(negate, _pattern(rule)) for negate, rule in rules]
    # Literal beginnings of the re-include rules: an excluded directory that none of them
    # reaches into is not walked (it holds .venv, .git, node_modules...).
    reincluded = [re.split(r"[*?\[]", rule, maxsplit=1)[0] for negate, rule in rules if negate]

    def excluded(rel: str) -> bool:
        parts = rel.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        out = False
        for negate, pattern in compiled:
            if any(pattern.fullmatch(p) for p in prefixes):
                out = not negate
        return out

    files: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(REPO):
        base = Path(dirpath).relative_to(REPO).as_posix()
        base = "" if base == "." else base + "/"
        dirnames[:] = [
            d
            for d in dirnames
            if not excluded(base + d)
            or any(r == "" or r.startswith(base + d + "/") for r in reincluded)
        ]
        files.update(base + f for f in filenames if not excluded(base + f))
    return files


def test_build_context_is_small_and_complete() -> None:
    files = build_context()
    assert "pyproject.toml" in files
    assert "deploy/docker/healthcheck.py" in files
    assert any(f.startswith("services/core/") for f in files)
    assert any(f.startswith("clients/fairlane/queue/v1/") for f in files)
    assert any(f.startswith("services/core/migrations/") for f in files)
    for f in files:
        top = f.split("/")[0]
        assert top in {
            "pyproject.toml",
            "README.md",
            "LICENSE",
            "clients",
            "services",
            "fairlane_server",
            "deploy",
        }, f
        assert "__pycache__" not in f, f
        assert not f.endswith((".pyc", ".db")), f
        assert not f.startswith(("deploy/helm", "deploy/compose", "clients/typescript")), f


def test_dockerfile_copies_only_what_the_context_has() -> None:
    files = build_context()
    for stage in stages():
        for copy in instructions(stage, "COPY"):
            if any(flag.startswith("--from=") for flag in copy.flags):
                continue
            for src in copy.value[:-1]:
                if src == ".":
                    continue
                assert src in files, f"COPY {src}: not in the build context"


# --- the health-check script ------------------------------------------------------------


@pytest.fixture
async def health_server() -> AsyncIterator[tuple[str, health.aio.HealthServicer]]:
    (port,) = free_ports(1)
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        await server.stop(None)


async def healthcheck(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    import asyncio

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(HEALTHCHECK),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={k: v for k, v in os.environ.items() if not k.startswith("FAIRLANE_")} | (env or {}),
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_healthcheck_script(health_server: tuple[str, health.aio.HealthServicer]) -> None:
    target, servicer = health_server
    name = "fairlane.queue.v1.QueueService"
    await servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    await servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert await healthcheck(target, name) == (0, f"{target} {name}: SERVING\n")
    code, out = await healthcheck(target)
    assert (code, out.split(": ")[1]) == (1, "NOT_SERVING\n")
    code, out = await healthcheck(target, "no.such.Service")
    assert (code, out.split(": ")[1]) == (1, "NOT_FOUND\n")
    (closed,) = free_ports(1)
    code, out = await healthcheck("--timeout", "0.5", f"127.0.0.1:{closed}")
    assert (code, out.split(": ")[1]) == (1, "UNAVAILABLE\n")


async def test_healthcheck_script_over_mutual_tls(tmp_path: Path) -> None:
    """In a container whose server has TLS settings, the script uses them (mTLS too)."""
    ca = Authority(tmp_path)
    leaf = ca.issue("server")
    chain, key = leaf.read()
    (port,) = free_ports(1)
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    credentials = grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=ca.cert.read_bytes(), require_client_auth=True
    )
    server.add_secure_port(f"127.0.0.1:{port}", credentials)
    await server.start()
    tls = {
        "FAIRLANE_TLS_CERT_FILE": str(leaf.cert),
        "FAIRLANE_TLS_KEY_FILE": str(leaf.key),
        "FAIRLANE_TLS_CA_FILE": str(ca.cert),
    }
    try:
        assert await healthcheck(f"127.0.0.1:{port}", env=tls) == (
            0,
            f"127.0.0.1:{port} (overall): SERVING\n",
        )
        code, out = await healthcheck("--timeout", "2", f"127.0.0.1:{port}")
        assert (code, out.split(": ")[1]) == (1, "UNAVAILABLE\n")
    finally:
        await server.stop(None)


def test_healthcheck_script_is_executable() -> None:
    assert HEALTHCHECK.stat().st_mode & 0o111
    assert HEALTHCHECK.read_text().startswith("#!/usr/bin/env python3\n")
    assert "fairlane-healthcheck" in (REPO / "Dockerfile").read_text()
