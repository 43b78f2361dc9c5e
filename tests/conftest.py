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


class Vhosts:
    """Fresh RabbitMQ vhosts, made and deleted in bunches. Each `rabbitmqctl` call starts
    an Erlang VM (about a second of CPU on this machine): three calls per test (add, set
    permissions, delete) were minutes of a `make test`. One `rabbitmqctl eval` makes 20
    vhosts at once, and used ones are deleted 20 at a time and at the end of the run.
    Every test still gets a vhost nobody used before."""

    BUNCH = 20

    def __init__(self) -> None:
        self._ready: list[str] = []
        self._used: list[str] = []

    def take(self) -> str:
        if not self._ready:
            names = [unique() for _ in range(self.BUNCH)]
            _eval(
                'fun(V) -> ok = rabbit_vhost:add(V, <<"tests">>), '
                'ok = rabbit_auth_backend_internal:set_permissions(<<"guest">>, V, '
                '<<".*">>, <<".*">>, <<".*">>, <<"tests">>) end',
                names,
            )
            self._ready = names
        return self._ready.pop()

    def give_back(self, name: str) -> None:
        self._used.append(name)
        if len(self._used) >= self.BUNCH:
            self.close()

    def close(self) -> None:
        names = self._used + self._ready
        self._used, self._ready = [], []
        if names:
            _eval('fun(V) -> rabbit_vhost:delete(V, <<"tests">>) end', names)


def _eval(fun: str, vhosts: list[str]) -> None:
    """Applies an Erlang fun to each vhost name in the broker node."""
    assert all(v.replace("_", "").isalnum() for v in vhosts)
    names = ", ".join(f'<<"{v}">>' for v in vhosts)
    code = f"lists:foreach({fun}, [{names}]), ok."
    subprocess.run(["rabbitmqctl", "-q", "eval", code], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def vhosts() -> Iterator[Vhosts]:
    pool = Vhosts()
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture
def vhost(vhosts: Vhosts) -> Iterator[str]:
    """A fresh RabbitMQ vhost, so exchanges and lanes of one test never meet another's."""
    name = vhosts.take()
    try:
        yield name
    finally:
        vhosts.give_back(name)


def broker_url(vhost: str) -> str:
    return f"{BROKER_ROOT}{vhost}"
