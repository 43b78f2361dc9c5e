"""Starting components: a dependency that does not answer fails the start with what it
was (StartupFailed), the components started before it are stopped, and a bug stays a bug;
a service waiting for auth says so in the log."""

from __future__ import annotations

import grpc
import pytest
from structlog.testing import capture_logs

from fairlane_server.core.auth_client import AuthClient
from fairlane_server.core.broker import BrokerError
from fairlane_server.core.runtime import StartupFailed, run_until_signalled
from tests.ports import free_port


class _Component:
    address = "127.0.0.1:0"

    def __init__(self, name: str, error: Exception | None = None) -> None:
        self.name = name
        self.error = error
        self.stopped = False

    async def start(self) -> None:
        if self.error is not None:
            raise self.error

    async def stop(self, grace: float) -> None:
        self.stopped = True


@pytest.mark.parametrize(
    ("error", "dependency", "reason"),
    [
        (BrokerError("cannot connect to RabbitMQ"), "broker", "cannot connect to RabbitMQ"),
        (ConnectionRefusedError(111, "Connection refused"), "database", "Connection refused"),
    ],
)
async def test_a_dependency_that_fails_the_start_is_named_and_the_started_ones_stop(
    error: Exception, dependency: str, reason: str
) -> None:
    first, second = _Component("auth"), _Component("queue", error)
    with pytest.raises(StartupFailed) as failed:
        await run_until_signalled([first, second], grace=1.0)
    assert (failed.value.component, failed.value.dependency) == ("queue", dependency)
    assert reason in failed.value.reason
    assert first.stopped


async def test_a_bug_in_a_start_is_not_taken_for_a_dependency() -> None:
    with pytest.raises(KeyError):
        await run_until_signalled([_Component("queue", KeyError("x"))], grace=1.0)


async def test_waiting_for_auth_is_said_with_the_reason_then_fails_as_auth() -> None:
    client = AuthClient(f"127.0.0.1:{free_port()}", timeout=0.2)  # nothing listens there
    try:
        with capture_logs() as logs, pytest.raises(grpc.aio.AioRpcError):
            await client.wait_ready(timeout=0.5)
    finally:
        await client.close()
    waits = [e for e in logs if e["event"] == "waiting_for_auth"]
    assert len(waits) == 1  # said again only every WAIT_LOG_SECONDS
    assert waits[0]["code"] == "UNAVAILABLE"
    assert waits[0]["target"] == client.target
