"""The repository explains itself: no tracked file sends its reader to a design document
that is not in it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# A design document kept outside the repository, by name or by the path it was reached at.
OUTSIDE = re.compile(r"DESIGN\.md|\.\./shared\b", re.IGNORECASE)
THIS_FILE = Path(__file__).resolve().relative_to(ROOT).as_posix()


SKIPPED_DIRS = {".git", ".venv", ".tools", "node_modules", "build", "dist"}


def _tracked() -> list[str]:
    """The files git tracks; outside a checkout (an unpacked sdist), every file."""
    try:
        listed = subprocess.run(
            ["git", "-C", str(ROOT), "ls-files", "-z"],
            check=True,
            capture_output=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return [
            p.relative_to(ROOT).as_posix()
            for p in ROOT.rglob("*")
            if p.is_file() and not SKIPPED_DIRS.intersection(p.relative_to(ROOT).parts)
        ]
    return [name for name in listed.decode().split("\0") if name]


def test_no_tracked_file_cites_a_design_document_outside_the_repository() -> None:
    found = []
    for name in _tracked():
        if name == THIS_FILE:
            continue
        path = ROOT / name
        if not path.is_file():
            continue  # deleted in the working tree, not yet committed
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary
        found += [
            f"{name}:{number}: {line.strip()}"
            for number, line in enumerate(text.splitlines(), 1)
            if OUTSIDE.search(line)
        ]
    assert not found, "say the thing itself or point to docs/architecture.md:\n" + "\n".join(found)
