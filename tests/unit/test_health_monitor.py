"""Readiness from the broker: disconnected, or connected but blocked by a RabbitMQ memory
or disk alarm (every publish held: a worker would run requests whose results it cannot
send), is NOT_SERVING, naming the broker and how."""

from __future__ import annotations

from structlog.testing import capture_logs

from fairlane_server.core.health import DependencyMonitor


class Host:
    def __init__(self) -> None:
        self.serving: list[bool] = []

    async def set_serving(self, serving: bool) -> None:
        self.serving.append(serving)


class Broker:
    is_connected = True
    blocked_reason: str | None = None


async def test_a_blocked_broker_is_not_ready_and_says_why() -> None:
    host, broker = Host(), Broker()
    monitor = DependencyMonitor(host, broker=broker)  # type: ignore[arg-type]
    assert await monitor.check()
    broker.blocked_reason = "low on memory"
    with capture_logs() as logs:
        assert not await monitor.check()
    assert monitor.failed == ("broker",)
    [change] = [e for e in logs if e["event"] == "health_changed"]
    assert change["reasons"] == {"broker": "blocked: low on memory"}
    broker.blocked_reason = None
    assert await monitor.check()
    broker.is_connected = False
    assert not await monitor.check()
    assert host.serving == [True, False, True, False]
