"""docs/architecture.md is true to the tree: every module path it names exists, its table
says where every behaviour lives, and the drawings name every table and exchange there is."""

from __future__ import annotations

import re
from pathlib import Path

from fairlane_server.core import broker
from fairlane_server.core.models import metadata

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "architecture.md").read_text()
# A path of the repository in backticks: `services/queue/relay.py`, `clients/fairlane/cli/`.
PATH = re.compile(r"`((?:services|clients|protos|tests|docs|deploy|scripts)/[\w./-]*)`")
# The kinds of diagram every Git host that draws Mermaid has drawn for years.
PORTABLE_DIAGRAMS = ("flowchart ", "sequenceDiagram")


def _section(title: str) -> str:
    start = DOC.index(f"\n## {title}\n")
    end = DOC.find("\n## ", start + 1)
    return DOC[start : end if end != -1 else None]


def test_every_path_it_names_exists() -> None:
    named = set(PATH.findall(DOC))
    assert len(named) >= 40  # the table alone names more: a broken pattern finds none
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"


def test_where_to_find_what_names_a_module_on_every_row() -> None:
    rows = [
        line
        for line in _section("Where to find what").splitlines()
        if line.startswith("| ") and not line.startswith("| behaviour")
    ]
    assert len(rows) >= 30
    for row in rows:
        behaviour, modules = (cell.strip() for cell in row.strip().strip("|").split("|"))
        assert behaviour, row
        assert PATH.findall(modules), f"no module path on the row {row!r}"


def test_every_table_of_the_schema_is_drawn() -> None:
    missing = sorted(name for name in metadata.tables if f"`{name}`" not in DOC)
    assert not missing, f"tables missing from docs/architecture.md: {missing}"


def test_every_exchange_and_the_lane_queues_are_drawn() -> None:
    names = {
        broker.REQUESTS_EXCHANGE,
        broker.RESULTS_EXCHANGE,
        broker.CONTROL_EXCHANGE,
        broker.DEAD_EXCHANGE,
        broker.DEAD_QUEUE,
        broker.lane_queue("<user>"),
    }
    for name in names:
        assert f"`{name}`" in DOC, name


def test_the_drawings_are_mermaid_that_any_git_host_draws() -> None:
    blocks = re.findall(r"```mermaid\n(.*?)```", DOC, re.S)
    kinds = [block.lstrip().split("\n", 1)[0] for block in blocks]
    assert len(blocks) >= 5, kinds
    assert all(kind.startswith(PORTABLE_DIAGRAMS) for kind in kinds), kinds
    for block in blocks:
        # A semicolon ends a statement in Mermaid: inside a message it cuts the text.
        assert ";" not in block
    for title in (
        "Components and who calls whom",
        "One request, from Session to result",
        "A worker replica dies and its lane moves on",
        "A queue replica dies with unpublished outbox rows",
        "A client resumes with WatchResults on another replica",
    ):
        assert "```mermaid" in _section(title), title


def test_the_request_drawing_names_every_batch_stage() -> None:
    drawing = _section("One request, from Session to result")
    for stage in (
        "Session read",
        "admission",
        "intake batch",
        "outbox",
        "lanes",
        "pg_try_advisory_lock",
        "lane_pos order",
        "worker delivery",
        "RUNNING mark",
        "result writer batch",
        "pg_notify",
        "NOTIFY",
        "Result request_id",
    ):
        assert stage in drawing, stage
