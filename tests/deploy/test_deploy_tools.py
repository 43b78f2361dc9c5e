"""The checking tools are the pinned ones (deploy/tools-requirements.txt), installed by
scripts/install_deploy_tools.sh."""

from __future__ import annotations

import re
from importlib.metadata import version

import pytest

from tests.deploy.support import DEPLOY, REPO, run, tool

REQUIREMENTS = DEPLOY / "tools-requirements.txt"
INSTALLER = REPO / "scripts" / "install_deploy_tools.sh"


def pins() -> dict[str, str]:
    out = {}
    for raw in REQUIREMENTS.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            name, _, pinned = line.partition("==")
            assert pinned, f"not pinned exactly: {line}"
            out[name] = pinned
    return out


@pytest.mark.parametrize("package", sorted(pins()))
def test_installed_versions_match_pins(package: str) -> None:
    assert version(package) == pins()[package], "run scripts/install_deploy_tools.sh"


@pytest.mark.parametrize(
    ("command", "args", "expected"),
    [
        ("docker-compose", ["version"], r"v5\.6\.1"),
        ("envoy", ["--version"], r"/1\.40\.0/"),
        ("hadolint", ["--version"], r"2\.15\.1"),
        ("kubernetes-validate", ["--version"], r"1\.37\.0"),
        ("supervisord", ["--version"], r"4\.3\.0"),
        ("promtool", ["--version"], r"promtool, version 2\."),
        ("nginx", ["-v"], r"nginx/1\."),
        ("systemd-analyze", ["--version"], r"systemd \d+"),
    ],
)
def test_tool_runs(command: str, args: list[str], expected: str) -> None:
    out = run([tool(command), *args], timeout=60)
    assert re.search(expected, out.stdout + out.stderr), out.stdout + out.stderr


def test_installer_is_valid_bash() -> None:
    assert INSTALLER.stat().st_mode & 0o111, "executable"
    run(["bash", "-n", str(INSTALLER)])
    text = INSTALLER.read_text()
    assert "set -euo pipefail" in text
    assert "tools-requirements.txt" in text
