"""What the broker code logs about errors: timeouts by name rather than an empty string, and
a lane channel RabbitMQ closed for its consumer_timeout by lane and cure."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from typing import Any

import aiormq
import pytest
from structlog.testing import capture_logs

from fairlane_server.core.amqp import AmqpBroker, AmqpLaneConsumer, consumer_timed_out
from fairlane_server.core.broker import BrokerError
from fairlane_server.core.describe import describe_error
from tests.polling import until
from tests.unit.test_relay import FakeOutbox, FlakyBroker, relay_for

# RabbitMQ 3.10's words (rabbit_channel:handle_consumer_timed_out), as aiormq raises them.
TIMED_OUT = aiormq.exceptions.ChannelPreconditionFailed(
    "PRECONDITION_FAILED - delivery acknowledgement on channel 3 timed out. Timeout value "
    "used: 1800000 ms. This timeout value can be configured, see consumers doc guide to "
    "learn more"
)


def test_an_error_without_text_is_named_by_its_type() -> None:
    assert describe_error(TimeoutError()) == "TimeoutError"
    assert describe_error(asyncio.CancelledError()) == "CancelledError"
    assert describe_error(ConnectionResetError("reset by peer")) == "reset by peer"


async def test_a_publish_that_timed_out_says_so() -> None:
    broker = AmqpBroker("amqp://guest:guest@127.0.0.1:1/", lane_max_length=10)

    async def timing_out(*_: Any, **__: Any) -> Any:
        raise TimeoutError

    broker._publish = timing_out  # type: ignore[method-assign]
    with pytest.raises(BrokerError, match=r"^publish to lane failed: TimeoutError$"):
        await broker.publish_lane("u", b"x", {})
    with pytest.raises(BrokerError, match=r"^publish of results failed: TimeoutError$"):
        await broker.publish_results("r", b"x")


async def test_the_relay_names_a_timeout_it_logs() -> None:
    broker = FlakyBroker()
    await broker.connect()
    broker.error = TimeoutError()  # not a BrokerError: the relay's unexpected-error path
    broker.failures = 1
    outbox = FakeOutbox()
    release = outbox.release
    failed = False

    async def timing_out_release(
        published: Sequence[uuid.UUID], unlock: Sequence[uuid.UUID]
    ) -> None:
        nonlocal failed
        if not failed and published:
            failed = True
            raise TimeoutError
        await release(published, unlock)

    outbox.release = timing_out_release  # type: ignore[method-assign]
    relay = relay_for(outbox, broker)
    with capture_logs() as logs:
        relay.start()
        try:
            relay.hand(outbox.commit(uuid.uuid4(), 1))
            await until(lambda: not outbox.rows and failed)
        finally:
            await relay.stop()
    errors = {e["event"]: e["error"] for e in logs if "error" in e}
    assert errors["lane_publish_failed"] == "TimeoutError"
    assert errors["relay_store_failed"] == "TimeoutError"


def test_a_consumer_timeout_is_told_from_other_channel_closes() -> None:
    assert consumer_timed_out(TIMED_OUT)
    other = aiormq.exceptions.ChannelPreconditionFailed(
        "PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue 'lane.u'"
    )
    assert not consumer_timed_out(other)
    assert not consumer_timed_out(aiormq.exceptions.ChannelNotFoundEntity("NOT_FOUND"))
    assert not consumer_timed_out(TimeoutError("delivery acknowledgement timed out"))


class FakeChannel:
    def __init__(self) -> None:
        self.closing: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.number = 3
        self.is_closed = False
        self.on_consumer_cancel_callbacks: set[Any] = set()


@pytest.mark.parametrize(
    ("closed_with", "logged"),
    [(TIMED_OUT, True), (aiormq.exceptions.ChannelClosed(None, None), False), (None, False)],
)
async def test_a_lane_channel_closed_for_its_consumer_timeout_is_logged(
    closed_with: BaseException | None, logged: bool
) -> None:
    channel = FakeChannel()
    AmqpLaneConsumer(channel, "lane-user")  # type: ignore[arg-type]
    with capture_logs() as logs:
        if closed_with is None:
            channel.closing.cancel()  # closed by us
        else:
            channel.closing.set_exception(closed_with)
        await asyncio.sleep(0)  # the future's callbacks run on the next turn of the loop
    timeouts = [e for e in logs if e["event"] == "broker_consumer_timeout"]
    if not logged:
        assert timeouts == []
        return
    [event] = timeouts
    assert event["log_level"] == "error"
    assert event["lane"] == "lane-user"
    assert event["channel"] == 3
    assert "1800000 ms" in event["error"]
    assert "consumer_timeout" in event["fix"]
    assert "FAIRLANE_LANE_PREFETCH" in event["fix"]
