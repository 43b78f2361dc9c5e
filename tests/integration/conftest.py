"""Fixtures of the integration tests: one broker of each kind for the lane contract."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from fairlane_server.core.amqp import AmqpBroker
from fairlane_server.core.broker import Broker
from fairlane_server.core.memory_broker import MemoryBroker
from tests.conftest import broker_url

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
