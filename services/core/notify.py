"""Change notifications between services: PostgreSQL LISTEN/NOTIFY.

Two channels, one per schema each: the worker notifies, in the transaction that writes
results, which users have new results, and every queue replica wakes the watchers of those
users, so a watcher never polls the database while nothing happens; and a queue replica
that cannot take a lane's publish lock names the lane on the lane-wanted channel, so the
replica holding it lets go as soon as it has published what it has (services/queue/relay.py).
Each queue replica listens on both over one connection. The embedded default (SQLite) runs
everything in one process, where neither is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy.engine import make_url

from fairlane_server.core.logging import get_logger
from fairlane_server.core.tasks import cancel_and_wait, wait_event

log = get_logger(__name__)

_PAYLOAD_LIMIT = 7900  # PostgreSQL refuses NOTIFY payloads of 8000 bytes and more


def results_channel(schema: str) -> str:
    """One channel per schema: schemas in one database are separate deployments."""
    return f"fairlane_results_{schema}"[:63] if schema else "fairlane_results"


def lane_wanted_channel(schema: str) -> str:
    """Where a queue replica names the lanes whose publish lock it could not take."""
    return f"fairlane_lane_wanted_{schema}"[:63] if schema else "fairlane_lane_wanted"


def notify_statements(user_ids: Sequence[str]) -> list[str]:
    """The payloads announcing these users, each within PostgreSQL's payload limit."""
    payloads: list[str] = []
    current = ""
    for user in sorted(set(user_ids)):
        if current and len(current) + 1 + len(user) > _PAYLOAD_LIMIT:
            payloads.append(current)
            current = ""
        current = f"{current},{user}" if current else user
    if current:
        payloads.append(current)
    return payloads


class NotifyListener:
    """Listens on the channels of `handlers` and calls each channel's handler with the
    names in a notification; on every (re)connect it calls `on_reconnect`, since
    notifications may have been missed meanwhile."""

    def __init__(
        self,
        database_url: str,
        handlers: Mapping[str, Callable[[list[str]], None]],
        on_reconnect: Callable[[], None],
    ) -> None:
        url = make_url(database_url).set(drivername="postgresql")
        self._dsn = url.render_as_string(hide_password=False)
        self._handlers = dict(handlers)
        self._on_reconnect = on_reconnect
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="notify-listener")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    def _on_notify(self, _conn: Any, _pid: int, channel: str, payload: str) -> None:
        handler = self._handlers.get(channel)
        if handler is not None:
            handler([u for u in payload.split(",") if u])

    async def _run(self) -> None:
        delay = 0.2
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(self._dsn, timeout=10)
                lost = asyncio.Event()
                conn.add_termination_listener(functools.partial(_set, lost))
                for channel in self._handlers:
                    await conn.add_listener(channel, self._on_notify)
                self._on_reconnect()
                delay = 0.2
                while not lost.is_set():
                    # A dead peer is noticed by this probe even when no FIN arrived.
                    if not await wait_event(lost, 15):
                        await conn.execute("SELECT 1", timeout=10)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("notify_listener_lost", error=str(exc)[:200], retry_in=delay)
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close(timeout=2)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def _set(event: asyncio.Event, _conn: Any) -> None:
    event.set()
