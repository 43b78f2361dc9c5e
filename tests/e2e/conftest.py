"""The running suite for end-to-end tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import DATABASE_URL, broker_url
from tests.e2e.suite import Suite


@pytest.fixture
async def suite(pg_schema: str, vhost: str, tmp_path: Path) -> AsyncIterator[Suite]:
    s = Suite(DATABASE_URL, pg_schema, broker_url(vhost), tmp_path)
    try:
        s.start("auth")
        await s.wait_serving("auth")
        s.start("queue")
        s.start("worker")
        await s.wait_serving("queue")
        await s.wait_serving("worker")
        yield s
    finally:
        codes = s.stop_all()
    assert codes == {"worker": 0, "queue": 0, "auth": 0}, {n: s.log(n) for n in codes}
