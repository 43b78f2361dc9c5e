"""Runs service components until SIGTERM/SIGINT, then stops them within a grace period."""

from __future__ import annotations

import asyncio
import gc
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import grpc

from fairlane_server.core import dberrors, metrics
from fairlane_server.core.broker import BrokerError
from fairlane_server.core.logging import get_logger

log = get_logger(__name__)


class StartupFailed(Exception):
    """A dependency did not answer while a component started. Unlike a configuration
    refused (exit 2), this may pass: the process exits 1 for its supervisor to start it
    again, with one log line, not a traceback."""

    def __init__(self, component: str, dependency: str, reason: str) -> None:
        super().__init__(f"{component}: {dependency}: {reason}")
        self.component = component
        self.dependency = dependency
        self.reason = reason


def _startup_failure(component: str, exc: Exception) -> StartupFailed | None:
    """What an exception from a component's start says about its dependencies, if anything."""
    if isinstance(exc, BrokerError):
        return StartupFailed(component, "broker", str(exc)[:500])
    if isinstance(exc, grpc.aio.AioRpcError):
        # The only calls made while starting are to the auth service.
        reason = f"{exc.code().name}: {(exc.details() or '')[:300]}"
        return StartupFailed(component, "auth", reason)
    if dberrors.is_database_error(exc):
        first_line = str(getattr(exc, "orig", None) or exc).splitlines()[0][:300]
        if dberrors.sqlstate(exc) in _NOT_MIGRATED or "no such table" in first_line:
            return StartupFailed(
                component,
                "database",
                f"the schema is not migrated ({first_line}): run `fairlane migrate`",
            )
        return StartupFailed(component, "database", f"{type(exc).__name__}: {first_line}")
    return None


# PostgreSQL's undefined table, undefined column and invalid schema name.
_NOT_MIGRATED = {"42P01", "42703", "3F000"}


class Component(Protocol):
    name: str

    @property
    def address(self) -> str: ...

    async def start(self) -> None: ...
    async def stop(self, grace: float) -> None: ...


async def run_until_signalled(
    components: Sequence[Component],
    *,
    grace: float,
    on_started: Callable[[], Awaitable[None]] | None = None,
    gc_full_every: int | None = None,
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    started: list[Component] = []
    lag = asyncio.create_task(watch_loop_lag(), name="loop-lag")
    try:
        for component in components:
            try:
                await component.start()
            except Exception as exc:
                failed = _startup_failure(component.name, exc)
                if failed is None:
                    raise
                # The components started so far stop in the finally below.
                raise failed from exc
            started.append(component)
            log.info("service_started", component=component.name, address=component.address)
        if on_started is not None:
            await on_started()
        log.info("gc_frozen", objects=freeze_startup_objects(), full_every=gc_full_every)
        if gc_full_every is not None:
            space_full_collections(gc_full_every)
        await stop.wait()
        log.info("shutdown_requested", grace=grace)
    finally:
        # Stop in reverse start order: workers first hand lanes back, auth goes last.
        for component in reversed(started):
            try:
                await stop_component(component, grace)
            except Exception:
                log.exception("stop_failed", component=component.name)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        lag.cancel()
        await asyncio.gather(lag, return_exceptions=True)


LOOP_LAG_INTERVAL = 0.25
# A loop held up this long was blocked by something (an async handler that sleeps or
# computes, most often): said in the log, since it stalls every lane of the process.
LOOP_BLOCKED_SECONDS = 1.0


async def watch_loop_lag(
    interval: float = LOOP_LAG_INTERVAL,
    observe: Callable[[float], None] = metrics.LOOP_LAG_SECONDS.observe,
    blocked_after: float = LOOP_BLOCKED_SECONDS,
) -> None:
    """Observes how late a timer fires (`fairlane_event_loop_lag_seconds`), for as long as
    it runs. Every task waits that long for its turn: a new RPC needs several turns before
    its handler runs, so a lag of a few milliseconds already shows in every latency. A lag
    past `blocked_after` is also logged (event_loop_blocked)."""
    while True:
        started = time.perf_counter()
        await asyncio.sleep(interval)
        lag = max(0.0, time.perf_counter() - started - interval)
        observe(lag)
        if lag >= blocked_after:
            log.warning(
                "event_loop_blocked",
                seconds=round(lag, 3),
                hint="an async handler or hook that blocks (time.sleep, a CPU loop, blocking "
                "I/O) stalls every lane of this process; run such work in a thread or process",
            )


# A component's stop normally takes well under a second; past this, what it waits on is
# logged, so that a shutdown that hangs names its cause in the first place anyone looks.
SLOW_STOP_SECONDS = 5.0


async def stop_component(
    component: Component, grace: float, *, slow_after: float = SLOW_STOP_SECONDS
) -> None:
    """component.stop(grace), given up after grace + 5 s; logs what it waits on if it
    is still stopping after `slow_after` seconds."""

    async def bounded() -> None:
        async with asyncio.timeout(grace + 5):
            await component.stop(grace)

    stopping = asyncio.create_task(bounded(), name=f"stop {component.name}")
    try:
        done, _ = await asyncio.wait({stopping}, timeout=slow_after)
        if not done:
            log.warning(
                "stop_slow", component=component.name, seconds=slow_after, waiting=waiting_tasks()
            )
        await stopping
    except asyncio.CancelledError:
        stopping.cancel()
        raise


def waiting_tasks(limit: int = 40) -> list[str]:
    """Where the loop's unfinished tasks wait: the chain of awaits each is suspended in.

    Task.get_stack shows only a suspended task's outermost coroutine; the await chain
    (cr_await) is what says where it waits. Tasks waiting at the same place are counted
    together, since a service can hold thousands of Session tasks, and only the `limit`
    most common places are listed, so that the log line stays small."""
    current = asyncio.current_task()
    places: Counter[str] = Counter()
    named: dict[str, str] = {}
    for task in asyncio.all_tasks():
        if task is current or task.done():
            continue
        chain = []
        awaited: Any = task.get_coro()
        while awaited is not None:
            frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "ag_frame", None)
            if frame is None:
                break
            chain.append(f"{frame.f_code.co_name}:{frame.f_lineno}")
            awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "ag_await", None)
        place = " > ".join(chain)
        places[place] += 1
        named.setdefault(place, task.get_name())
    lines = [
        f"{count} tasks like {named[place]}: {place}" if count > 1 else f"{named[place]}: {place}"
        for place, count in places.most_common(limit)
    ]
    if len(places) > limit:
        lines.append(f"and {len(places) - limit} more places")
    return lines


def freeze_startup_objects() -> int:
    """Moves what is alive once the service has started (modules, protobuf descriptors,
    SQLAlchemy metadata, gRPC and AMQP machinery) out of the garbage collector's sight.

    Those objects live as long as the process, yet every generation 2 collection walked
    them all: measured at 110 ms a collection on the bench machine, during which the event
    loop, and every request in flight, stood still (`fairlane_gc_pause_seconds`). Frozen,
    such a collection took 3 ms. What is collected first is freed as usual; only the
    survivors are frozen, so nothing leaks that would not have lived on anyway. Returns how
    many objects are frozen.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def space_full_collections(every: int) -> None:
    """A full collection after every `every` collections of generation 1 (Python: 10).

    Requests in flight outlive two young collections and are promoted to the oldest
    generation, where they die by reference counting a second later; Python counts each
    promotion towards the next full collection, which walks every object the service
    holds. With 1,000 Sessions open that took about 100 ms, 25 times in a 20 s bench run of
    the queue and the worker, and 35 of them had found 2,804 objects to free, in all.
    Cycles of garbage still go at the next full collection, only later.
    """
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, every)


def run(main: Awaitable[None]) -> None:
    """asyncio.run on uvloop where available (faster gRPC/AMQP I/O)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - platforms without uvloop
        asyncio.run(main)  # type: ignore[arg-type]
        return
    uvloop.run(main)  # type: ignore[arg-type]
