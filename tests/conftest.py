"""Fixtures shared by every test layer: an isolated PostgreSQL schema and RabbitMQ vhost."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from fairlane_server.core.db import drop_schema, migrate

DATABASE_URL = os.environ.get(
    "FAIRLANE_TEST_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
BROKER_ROOT = os.environ.get("FAIRLANE_TEST_BROKER_ROOT", "amqp://guest:guest@127.0.0.1:5672/")


def unique(prefix: str = "t") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def pg_schema() -> AsyncIterator[str]:
    """A fresh schema migrated to head, dropped afterwards."""
    schema = unique()
    await migrate(DATABASE_URL, schema=schema)
    try:
        yield schema
    finally:
        await drop_schema(DATABASE_URL, schema)


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture
def vhost() -> Iterator[str]:
    """A fresh RabbitMQ vhost, so exchanges and lanes of one test never meet another's."""
    name = unique()
    _rabbitmqctl("add_vhost", name)
    try:
        _rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield name
    finally:
        _rabbitmqctl("delete_vhost", name)


def broker_url(vhost: str) -> str:
    return f"{BROKER_ROOT}{vhost}"
