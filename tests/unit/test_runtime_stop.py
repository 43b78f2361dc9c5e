"""Stopping a component: one that takes long names what it is waiting on."""

from __future__ import annotations

import asyncio

import pytest
from structlog.testing import capture_logs

from fairlane_server.core.runtime import stop_component, waiting_tasks


class _Stubborn:
    """A component whose stop waits until released."""

    name = "stubborn"
    address = "127.0.0.1:0"

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.stopped = False

    async def start(self) -> None:
        return None

    async def stop(self, grace: float) -> None:
        await self._flush_the_last_batch()
        self.stopped = True

    async def _flush_the_last_batch(self) -> None:
        await self.release.wait()


async def test_a_slow_stop_logs_the_await_chain_it_is_stuck_in_then_finishes() -> None:
    component = _Stubborn()
    with capture_logs() as logs:
        stopping = asyncio.create_task(stop_component(component, 10.0, slow_after=0.05))
        # Timers fire in deadline order: the 0.05 s warning comes before this wait ends.
        done, _ = await asyncio.wait({stopping}, timeout=0.5)
        assert not done
        assert logs
        component.release.set()
        await stopping
    assert component.stopped
    (slow,) = logs
    assert slow["event"] == "stop_slow"
    assert slow["component"] == "stubborn"
    chains = [line for line in slow["waiting"] if "_flush_the_last_batch" in line]
    assert len(chains) == 1
    assert "stop:" in chains[0]
    assert "wait:" in chains[0]  # down to the Event it waits for


async def test_a_quick_stop_logs_nothing() -> None:
    component = _Stubborn()
    component.release.set()
    with capture_logs() as logs:
        await stop_component(component, 10.0, slow_after=5.0)
    assert component.stopped
    assert logs == []


async def test_a_stop_past_its_grace_is_given_up() -> None:
    component = _Stubborn()
    with capture_logs(), pytest.raises(TimeoutError):
        await stop_component(component, -4.95, slow_after=5.0)  # gives up after grace + 5 s
    assert not component.stopped


async def test_tasks_waiting_at_one_place_make_one_line() -> None:
    release = asyncio.Event()

    async def session() -> None:
        await release.wait()

    sessions = [asyncio.create_task(session(), name=f"session-{i}") for i in range(500)]
    await asyncio.sleep(0)
    try:
        waiting = waiting_tasks()
        (line,) = [w for w in waiting if "session:" in w]
        assert line.startswith("500 tasks like session-")
        assert "> wait:" in line  # down to the Event.wait each one is suspended in
        assert len(waiting_tasks(limit=0)) == 1  # only the "and N more places" line
    finally:
        release.set()
        await asyncio.gather(*sessions)
