"""The running suite for end-to-end tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import DATABASE_URL, broker_url
from tests.e2e.suite import Suite, serving


@pytest.fixture
async def suite(pg_schema: str, vhost: str, tmp_path: Path) -> AsyncIterator[Suite]:
    s = Suite(DATABASE_URL, pg_schema, broker_url(vhost), tmp_path)
    async with serving(s):
        yield s
