"""Library loggers come out as the services' JSON lines (in a fresh process, since the
configuration is global)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import logging
from fairlane_server.core import logging as fl_logging
fl_logging.configure("svc")
logging.getLogger("aiormq.connection").warning("connection lost %s", "x")
logging.getLogger("sqlalchemy.pool.impl").info("chatter")
try:
    raise RuntimeError("inner")
except RuntimeError:
    logging.getLogger("grpc._cython.cygrpc").exception("callback failed")
fl_logging.get_logger("own").warning("own_event", n=1)
from types import SimpleNamespace
returned = SimpleNamespace(
    delivery=SimpleNamespace(exchange="fairlane.requests", routing_key="lane-1"),
    body=b"a user's secret payload",
)
logging.getLogger("aiormq.channel").error("Unhandled message %r returning", returned)
"""


def test_library_records_are_json_lines() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=True,
    )
    lines = [json.loads(line) for line in proc.stderr.splitlines()]
    assert [(e["event"], e["level"], e["service"]) for e in lines] == [
        ("connection lost x", "warning", "svc"),
        ("callback failed", "error", "svc"),
        ("own_event", "warning", "svc"),
        (
            "returned message of a publish given up on: exchange 'fairlane.requests', "
            "routing key 'lane-1'",
            "warning",
            "svc",
        ),
    ]
    assert "secret payload" not in proc.stderr
    assert lines[0]["logger"] == "aiormq.connection"
    assert "RuntimeError: inner" in lines[1]["exception"]
