"""Connection.Blocked and Connection.Unblocked as aiormq's reader hands them over: what the
broker connections make of them (logs, `is_blocked`, the `fairlane_broker_blocked` gauge).
tests/integration/test_broker_alarms.py raises a real memory alarm."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import aiormq
import pytest
from aiormq import spec
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from fairlane_server.core import amqp_connection, metrics
from fairlane_server.core.amqp import AmqpBroker
from fairlane_server.core.amqp_connection import NodeConnection

URL = "amqp://guest:guest@127.0.0.1:1/"


class FakeConnection:
    """An aio-pika connection as NodeConnection sees it: a real (unconnected) aiormq
    connection underneath, whose frame handlers the reader would call."""

    def __init__(self) -> None:
        self.underlay = aiormq.Connection(URL)
        self.transport = SimpleNamespace(connection=self.underlay)

    async def block(self, reason: str) -> None:
        handler = getattr(self.underlay, amqp_connection._ON_BLOCKED)
        await handler(spec.Connection.Blocked(reason=reason))

    async def unblock(self) -> None:
        await getattr(self.underlay, amqp_connection._ON_UNBLOCKED)(spec.Connection.Unblocked())

    @property
    def writes_held(self) -> bool:
        """aiormq's own state: its writer does not start while blocked."""
        return not self.underlay._Connection__connection_unblocked.is_set()  # type: ignore[attr-defined]

    async def close(self) -> None:
        pass


async def nothing(_connection: Any) -> None:
    pass


def connected(name: str) -> tuple[NodeConnection, FakeConnection]:
    node = NodeConnection([URL], name=name, on_connected=nothing)
    node.node = "127.0.0.1:1"
    fake = FakeConnection()
    node._watch_blocking(fake)  # type: ignore[arg-type]
    node.connection = fake  # type: ignore[assignment]
    return node, fake


def gauge() -> float | None:
    return REGISTRY.get_sample_value("fairlane_broker_blocked")


@pytest.fixture(autouse=True)
async def no_block_left_over() -> AsyncIterator[None]:
    yield
    amqp_connection._BLOCKED_NOW.clear()
    metrics.BROKER_BLOCKED.set(0)


def test_aiormq_still_passes_the_frames_to_the_methods_wrapped() -> None:
    """An aiormq upgrade that renames them would leave blocks unseen (a warning at each
    connect, broker_blocking_not_watched): this fails first."""
    reader = inspect.getsource(aiormq.Connection)
    for name in (amqp_connection._ON_BLOCKED, amqp_connection._ON_UNBLOCKED):
        assert inspect.iscoroutinefunction(getattr(aiormq.Connection, name))
        assert f"self.{name.removeprefix('_Connection')}(frame)" in reader


async def test_a_block_is_logged_counted_and_shown_until_it_ends() -> None:
    node, fake = connected("data")
    with capture_logs() as logs:
        await fake.block("low on memory")
        assert node.is_blocked
        assert node.blocked_reason == "low on memory"
        assert gauge() == 1
        assert fake.writes_held  # aiormq's own handling still runs
        await fake.unblock()
    assert not node.is_blocked
    assert node.blocked_reason is None
    assert gauge() == 0
    assert not fake.writes_held
    blocked, unblocked = logs
    assert blocked == {
        "event": "broker_blocked",
        "log_level": "warning",
        "connection": "data",
        "node": "127.0.0.1:1",
        "reason": "low on memory",
    }
    assert unblocked["event"] == "broker_unblocked"
    assert unblocked["log_level"] == "info"
    assert unblocked["connection"] == "data"
    assert unblocked["blocked_seconds"] >= 0


async def test_the_gauge_stays_up_while_any_connection_is_blocked() -> None:
    data, data_conn = connected("data")
    housekeeping, admin_conn = connected("housekeeping")
    await data_conn.block("low on disk")
    await admin_conn.block("low on disk")
    await data_conn.unblock()
    assert gauge() == 1
    assert housekeeping.is_blocked
    assert not data.is_blocked
    await admin_conn.unblock()
    assert gauge() == 0


async def test_a_closed_connection_takes_its_block_along_quietly() -> None:
    node, fake = connected("data")
    await fake.block("low on memory")
    with capture_logs() as logs:
        await node.close()
    assert not node.is_blocked
    assert gauge() == 0
    assert not [e for e in logs if e["event"] == "broker_unblocked"]


async def test_a_lost_connection_takes_its_block_along() -> None:
    node, fake = connected("data")
    node._closing = True  # no reconnect: this test is about the block only
    await fake.block("low on memory")
    node._lost(fake, ConnectionResetError())
    assert not node.is_blocked
    assert gauge() == 0


async def test_an_unblock_from_a_connection_given_up_on_is_ignored() -> None:
    node, old = connected("data")
    new = FakeConnection()
    node._watch_blocking(new)  # type: ignore[arg-type]
    node.connection = new  # type: ignore[assignment]
    await new.block("low on memory")
    await old.unblock()
    assert node.is_blocked
    await new.unblock()
    assert not node.is_blocked


async def test_the_broker_reports_a_block_of_any_of_its_connections() -> None:
    broker = AmqpBroker(URL, lane_max_length=10)
    assert not broker.is_blocked
    assert broker.blocked_reason is None
    fake = FakeConnection()
    broker._admin._watch_blocking(fake)  # type: ignore[arg-type]
    await fake.block("low on disk")
    assert broker.is_blocked
    assert broker.blocked_reason == "low on disk"
    await fake.unblock()
    assert not broker.is_blocked
