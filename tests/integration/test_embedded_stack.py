"""The three services in one process on the embedded backends (in-memory broker, SQLite),
driven by the Python client: the same behaviour as on RabbitMQ and PostgreSQL."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fairlane.client import Client, Status
from fairlane_server.core.settings import Settings
from tests.integration.embedded import embedded_services
from tests.integration.embedded_handlers import Recorder

pytestmark = pytest.mark.integration


@pytest.fixture
async def embedded(tmp_path: Path) -> AsyncIterator[Client]:
    settings = Settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path}/fairlane.db",
        auth_listen="127.0.0.1:0",
        queue_listen="127.0.0.1:0",
        worker_listen="127.0.0.1:0",
        handlers=["tests.integration.embedded_handlers:square"],
        hooks=["tests.integration.embedded_handlers:Recorder"],
        service_secret="embedded-secret",
    )
    Recorder.calls.clear()
    async with embedded_services(settings, lane_max_length=100) as (client, _):
        yield client
    assert Recorder.calls[-1] == "shutdown"


async def test_client_on_embedded_backends_with_process_handler_and_hooks(
    embedded: Client,
) -> None:
    await embedded.register("embedded-user", "correct horse battery")
    await embedded.login("embedded-user", "correct horse battery")
    async with embedded.session() as session:
        futures = [
            await session.submit("echo", b"one"),
            await session.submit("square", b"12"),
            await session.submit("fail", b'{"times": 1}', max_attempts=2),
            await session.submit("echo", b"two"),
        ]
        results = [await f for f in futures]
    assert [r.status for r in results] == [Status.SUCCEEDED] * 4
    assert [r.lane_seq for r in results] == [1, 2, 3, 4]
    assert results[0].output == b"one"
    value, pid = results[1].output.decode().split(" pid=")
    assert value == "144"
    assert int(pid) != os.getpid()  # ran in the worker's process pool
    assert results[2].attempts == 2
    assert results[3].output == b"two"

    handlers = {h.name for h in await embedded.list_handlers()}
    assert {"echo", "square", "fail", "sleep", "cpu", "noop"} <= handlers
    assert Recorder.calls[0] == "startup"
    assert Recorder.calls[1:11] == [
        "before echo 1",
        "after echo SUCCEEDED",
        "before square 1",
        "after square SUCCEEDED",
        "before fail 1",
        "after fail RETRY",
        "before fail 2",
        "after fail SUCCEEDED",
        "before echo 1",
        "after echo SUCCEEDED",
    ]
