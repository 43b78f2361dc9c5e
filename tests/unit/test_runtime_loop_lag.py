"""The event loop's lag: a loop held up is observed as late by about as long."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from fairlane_server.core.runtime import watch_loop_lag


class _Lags:
    def __init__(self) -> None:
        self.seen: list[float] = []
        self.more = asyncio.Event()

    def observe(self, lag: float) -> None:
        self.seen.append(lag)
        self.more.set()

    async def next(self) -> float:
        self.more.clear()
        await asyncio.wait_for(self.more.wait(), 5)
        return self.seen[-1]


async def test_a_loop_held_up_is_observed_as_late_by_as_long() -> None:
    lags = _Lags()
    watcher = asyncio.create_task(watch_loop_lag(interval=0.02, observe=lags.observe))
    try:
        await lags.next()
        # A callback that does not give the loop back for 0.4 s (a long computation, a
        # blocking call): the watcher's timer, due within 0.02 s, fires that much late.
        asyncio.get_running_loop().call_soon(time.sleep, 0.4)
        assert await lags.next() >= 0.35
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)


async def test_by_default_it_feeds_the_histogram() -> None:
    count = REGISTRY.get_sample_value("fairlane_event_loop_lag_seconds_count") or 0.0
    watcher = asyncio.create_task(watch_loop_lag(interval=0.01))
    try:
        # Timers fire in deadline order: the watcher's (due in 0.01 s) before this one.
        await asyncio.sleep(0.1)
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    assert (REGISTRY.get_sample_value("fairlane_event_loop_lag_seconds_count") or 0.0) > count


async def test_a_loop_blocked_past_the_bound_is_logged() -> None:
    lags = _Lags()
    watcher = asyncio.create_task(
        watch_loop_lag(interval=0.02, observe=lags.observe, blocked_after=0.3)
    )
    try:
        await lags.next()
        with capture_logs() as logs:
            asyncio.get_running_loop().call_soon(time.sleep, 0.4)
            assert await lags.next() >= 0.35
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    blocked = [e["seconds"] for e in logs if e["event"] == "event_loop_blocked"]
    assert any(seconds >= 0.35 for seconds in blocked), logs
