"""Fixtures of the integration tests: one broker of each kind for the lane contract, and
the request log on each database."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from fairlane_server.auth.service import AuthService
from fairlane_server.core.amqp import AmqpBroker
from fairlane_server.core.broker import Broker
from fairlane_server.core.db import create_engine, drop_schema, migrate
from fairlane_server.core.memory_broker import MemoryBroker
from fairlane_server.core.settings import Settings
from tests.conftest import DATABASE_URL, broker_url, unique

MAX_LENGTH = 5


@pytest.fixture(params=["amqp", "amqp-quorum", "memory"])
async def broker(request: pytest.FixtureRequest) -> AsyncIterator[Broker]:
    b: Broker
    if request.param.startswith("amqp"):
        vhost = request.getfixturevalue("vhost")
        queue_type = "quorum" if request.param == "amqp-quorum" else "classic"
        b = AmqpBroker(broker_url(vhost), lane_max_length=MAX_LENGTH, queue_type=queue_type)
    else:
        b = MemoryBroker(lane_max_length=MAX_LENGTH)
    await b.connect()
    try:
        yield b
    finally:
        await b.close()


@pytest.fixture(params=["postgresql", "sqlite"])
async def engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    """The request log, migrated, on PostgreSQL (in a schema of its own, dropped after) and
    on SQLite. A module that needs another kind of engine defines its own `engine`."""
    if request.param == "postgresql":
        url, schema = DATABASE_URL, unique()
    else:
        url, schema = f"sqlite+aiosqlite:///{tmp_path}/log.db", ""
    await migrate(url, schema=schema)
    e = create_engine(url, schema=schema, pool_size=4)
    try:
        yield e
    finally:
        await e.dispose()
        if schema:
            await drop_schema(url, schema)


@contextlib.asynccontextmanager
async def database_at(kind: str, tmp_path: Path, revision: str) -> AsyncIterator[tuple[str, str]]:
    """(url, schema) of a database of `kind` ("postgresql", in a schema of its own, or
    "sqlite") migrated to `revision`, for tests of the next migration; dropped after."""
    if kind == "postgresql":
        url, schema = DATABASE_URL, unique()
    else:
        url, schema = f"sqlite+aiosqlite:///{tmp_path}/log.db", ""
    await migrate(url, schema=schema, revision=revision)
    try:
        yield url, schema
    finally:
        if schema:
            await drop_schema(url, schema)


@pytest.fixture
async def auth_service(pg_schema: str) -> AsyncIterator[AuthService]:
    """A running auth service on PostgreSQL (its own schema), on a free port."""
    service = AuthService(
        Settings(
            database_url=DATABASE_URL,
            database_schema=pg_schema,
            auth_listen="127.0.0.1:0",
            service_secret="the-secret",
        )
    )
    await service.start()
    try:
        yield service
    finally:
        await service.stop(1)
