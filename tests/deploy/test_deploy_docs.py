"""docs/deploy.md is true to the deploy files and to the services' settings."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.deploy.support import DEPLOY, REPO, load_yaml, settings_defaults

DOC = REPO / "docs" / "deploy.md"


def doc() -> str:
    return DOC.read_text()


def section(heading: str) -> str:
    return doc().split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]


def table_rows(text: str) -> dict[str, list[str]]:
    """First cell of every Markdown table row -> the row's other cells."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("|") and not set(line) <= set("|-: "):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_every_setting_documented_with_its_default() -> None:
    rows = table_rows(doc())
    for env, default in settings_defaults().items():
        row = rows.get(f"`{env}`")
        assert row is not None, f"docs/deploy.md does not list {env}"
        if default is None:  # computed per process, or an empty list
            continue
        cell = row[0]
        shown = re.match(r"`([^`]*)`", cell)
        assert shown, f"{env}: default {cell!r} is not a `literal`"
        value = shown.group(1)
        if isinstance(default, bool):
            assert value == str(default).lower(), env
        elif isinstance(default, int | float):
            assert float(value) == float(default), f"{env}: docs {value}, code {default}"
        else:
            assert value == (default or '""'), f"{env}: docs {value}, code {default!r}"


def test_no_setting_documented_that_does_not_exist() -> None:
    table = table_rows(section("## Settings"))
    documented = {name.strip("`") for name in table if name.startswith("`FAIRLANE_")}
    assert documented - set(settings_defaults()) == set()


def test_every_deploy_file_is_mentioned() -> None:
    text = doc()
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_dir() or path.parent.name == "templates":
            continue
        rel = path.relative_to(REPO).as_posix()
        short = rel.removeprefix("deploy/")
        parent = path.parent.relative_to(REPO).as_posix()
        assert rel in text or short in text or path.name in text or f"{parent}/" in text, rel


def test_compose_variables_and_defaults() -> None:
    compose = (DEPLOY / "compose.yaml").read_text()
    found = dict(re.findall(r"\$\{(\w+):-([^}]*)\}", compose))
    rows = table_rows(section("## Docker Compose"))
    for var, default in found.items():
        row = rows.get(f"`{var}`")
        assert row is not None, f"compose variable {var} is not documented"
        assert row[0] == f"`{default}`", var


def _lookup(values: dict[str, Any], dotted: str) -> bool:
    node: Any = values
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def test_helm_values_table_names_real_values() -> None:
    values = load_yaml(DEPLOY / "helm" / "fairlane" / "values.yaml")
    names = 0
    for first in table_rows(section("## Kubernetes (Helm)")):
        for name in re.findall(r"`([\w.|*]+)`", first):
            heads, _, rest = name.partition(".")
            for head in heads.split("|"):
                for alt in rest.split("|") if "|" in rest else [rest]:
                    dotted = f"{head}.{alt}".rstrip(".*") if alt else head
                    assert _lookup(values, dotted), f"values.yaml has no {dotted}"
                    names += 1
    assert names >= 15


@pytest.mark.parametrize("alert", ["FairlaneInstanceDown", "FairlaneDbBatchSlow"])
def test_runbook_sections(alert: str) -> None:
    assert f"#### {alert}\n" in doc()
