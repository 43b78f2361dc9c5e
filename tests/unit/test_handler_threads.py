"""Sync handlers whose attempt ends while their thread (or process) runs on: cancelled by
the client, timed out, or the worker stopping. Python cannot stop a thread, so the call
keeps its concurrency slot and its lane until it returns; a free slot always has a free
thread, other lanes' handlers run meanwhile, and the threads do not hold up the process's
exit.

Attempts run here as a lane runs them, one request after another, with a result writer
and dead letters that only record; handlers block on events the test sets."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from fairlane.common.v1 import lane_pb2
from fairlane_server.worker.attempts import Attempts
from fairlane_server.worker.registry import Handler
from fairlane_server.worker.store import Outcome
from fairlane_server.worker.threads import HandlerThreads
from tests import polling

ROOT = Path(__file__).resolve().parents[2]


class Writer:
    """What attempts use of the result writer: the RUNNING marks."""

    def __init__(self) -> None:
        self.marks: list[tuple[uuid.UUID, int]] = []

    def running(self, request_id: uuid.UUID, attempt: int, at: Any) -> None:
        self.marks.append((request_id, attempt))

    async def running_written(self, request_id: uuid.UUID, attempt: int, at: Any) -> None:
        self.marks.append((request_id, attempt))

    def publish(self, *args: Any, **kwargs: Any) -> None:
        pass


class DeadLetters:
    async def request(self, *args: Any) -> None:
        pass


class Blocking:
    """A sync handler: records each start and end in order, and blocks while the event
    named by its payload is unset (a payload with no event returns at once). `first_only`:
    only the first attempt blocks."""

    def __init__(self, *gated: bytes, first_only: bool = False) -> None:
        self.gates = {name: threading.Event() for name in gated}
        self.first_only = first_only
        self.log: list[tuple[str, bytes, int]] = []
        self.overlaps: list[bytes] = []  # a request started while its lane ran another
        self._running: Counter[str] = Counter()
        self._lock = threading.Lock()

    def __call__(self, ctx: Any, payload: bytes) -> bytes:
        with self._lock:
            self.log.append(("start", payload, ctx.attempt))
            self._running[ctx.user_id] += 1
            if self._running[ctx.user_id] > 1:
                self.overlaps.append(payload)
        gate = self.gates.get(payload)
        if gate is not None and not (self.first_only and ctx.attempt > 1):
            gate.wait(60)
        with self._lock:
            self._running[ctx.user_id] -= 1
            self.log.append(("end", payload, ctx.attempt))
        return payload

    def started(self, payload: bytes, attempt: int = 1) -> bool:
        with self._lock:
            return ("start", payload, attempt) in self.log

    def index(self, event: str, payload: bytes, attempt: int = 1) -> int:
        with self._lock:
            return self.log.index((event, payload, attempt))

    def release_all(self) -> None:
        for gate in self.gates.values():
            gate.set()


def spec(fn: Callable[..., Any], *, attempts: int = 1, timeout: float | None = None) -> Handler:
    return Handler("block", fn, False, attempts, timeout, "")


class Lane:
    """One user's lane: its requests run through the attempts one at a time, in order."""

    def __init__(self, lanes: Lanes, handler: Handler, payloads: tuple[bytes, ...]) -> None:
        self.user = str(uuid.uuid4())
        self._lanes = lanes
        for payload in payloads:
            lanes.ids[payload] = uuid.uuid4()
        self.task = asyncio.create_task(self._run(handler, payloads))

    async def _run(self, handler: Handler, payloads: tuple[bytes, ...]) -> None:
        async def gate() -> None:
            pass

        batch = lane_pb2.LaneBatch(user_id=self.user, reply_route="r")
        for payload in payloads:
            rid = self._lanes.ids[payload]
            item = lane_pb2.LaneItem(request_id=str(rid), payload=payload)
            self._lanes.outcomes[payload] = await self._lanes.attempts.run(
                batch, item, handler, 0, request_id=rid, user=uuid.UUID(self.user), gate=gate
            )

    def waits_for_abandoned_call(self) -> bool:
        """The attempts hold a call of this lane that was abandoned and has not returned
        (read from their own record: the one state the old code lacks, so a test that waits
        for it or for the wrong thing to happen ends either way)."""
        return self.user in getattr(self._lanes.attempts, "_abandoned", {})


class Lanes:
    """Attempts, and the lanes that run requests through them."""

    def __init__(self, concurrency: int, processes: int | None = None) -> None:
        self.writer = Writer()
        self.sleeps: list[float] = []

        async def sleep(seconds: float) -> None:
            self.sleeps.append(seconds)

        self.attempts = Attempts(
            writer=self.writer,  # type: ignore[arg-type]
            dead_letters=DeadLetters(),  # type: ignore[arg-type]
            concurrency=concurrency,
            retry_base=0.1,
            retry_max=1.0,
            sleep=sleep,
            processes=processes,
        )
        self.outcomes: dict[bytes, Outcome] = {}
        self.ids: dict[bytes, uuid.UUID] = {}

    def lane(self, handler: Handler, *payloads: bytes) -> Lane:
        return Lane(self, handler, payloads)

    def cancel(self, payload: bytes) -> None:
        self.attempts.cancel(str(self.ids[payload]))

    def status(self, payload: bytes) -> str | None:
        outcome = self.outcomes.get(payload)
        return None if outcome is None else outcome.status


async def until(check: Callable[[], bool]) -> None:
    """Waits for a condition, never for a time; the bound only ends a failing test."""
    await polling.until(check, timeout=10)


@pytest.fixture
def blocking() -> Iterator[list[Blocking]]:
    """Handlers made by a test; whatever still blocks is released at the end."""
    made: list[Blocking] = []
    yield made
    for handler in made:
        handler.release_all()


async def test_a_cancelled_thread_keeps_its_slot_and_its_lane_until_it_returns(
    blocking: list[Blocking],
) -> None:
    fn = Blocking(b"hang")
    blocking.append(fn)
    lanes = Lanes(concurrency=4)
    handler = spec(fn)
    lane = lanes.lane(handler, b"hang", b"next")
    await until(lambda: fn.started(b"hang"))
    lanes.cancel(b"hang")
    await until(lambda: b"hang" in lanes.outcomes)
    # The outcome is decided at once; the thread runs on, holding its slot and its lane.
    assert lanes.status(b"hang") == "CANCELLED"
    assert lanes.attempts.in_flight == 1
    assert lanes.attempts.stats.running["block"] == 1
    # Other lanes' thread handlers run meanwhile.
    others = [lanes.lane(handler, *(f"{n}-{i}".encode() for i in range(3))) for n in range(3)]
    await asyncio.wait_for(asyncio.gather(*(o.task for o in others)), 10)
    assert [lanes.status(f"{n}-{i}".encode()) for n in range(3) for i in range(3)] == [
        "SUCCEEDED"
    ] * 9
    assert not fn.started(b"next")
    assert lane.waits_for_abandoned_call()
    assert lanes.attempts.in_flight == 1
    fn.gates[b"hang"].set()
    await asyncio.wait_for(lane.task, 10)
    assert lanes.status(b"next") == "SUCCEEDED"
    # The lane's next request started only once the abandoned thread had ended.
    assert fn.index("end", b"hang") < fn.index("start", b"next")
    assert fn.overlaps == []
    assert lanes.attempts.in_flight == 0
    assert lanes.attempts.stats.running["block"] == 0
    assert not lane.waits_for_abandoned_call()


async def test_abandoned_threads_count_against_the_concurrency_slots(
    blocking: list[Blocking],
) -> None:
    fn = Blocking(b"a", b"b")
    blocking.append(fn)
    lanes = Lanes(concurrency=2)
    handler = spec(fn)
    first, second = lanes.lane(handler, b"a"), lanes.lane(handler, b"b")
    await until(lambda: fn.started(b"a") and fn.started(b"b"))
    lanes.cancel(b"a")
    lanes.cancel(b"b")
    await asyncio.wait_for(asyncio.gather(first.task, second.task), 10)
    assert [lanes.status(b"a"), lanes.status(b"b")] == ["CANCELLED", "CANCELLED"]
    # Both threads still run: both slots are taken, and a third lane waits for one.
    assert lanes.attempts.in_flight == 2
    third = lanes.lane(handler, b"c")
    fn.gates[b"a"].set()
    await asyncio.wait_for(third.task, 10)
    assert lanes.status(b"c") == "SUCCEEDED"
    assert fn.index("end", b"a") < fn.index("start", b"c")
    assert lanes.attempts.in_flight == 1  # b's thread
    fn.gates[b"b"].set()
    await until(lambda: lanes.attempts.in_flight == 0)


async def test_a_timed_out_threads_retry_waits_for_it(blocking: list[Blocking]) -> None:
    fn = Blocking(b"stuck", first_only=True)
    blocking.append(fn)
    lanes = Lanes(concurrency=4)
    lane = lanes.lane(spec(fn, attempts=2, timeout=0.2), b"stuck")
    # Attempt 1 times out and backs off; then either its retry starts beside the thread
    # still running (the bug) or the lane waits for that thread.
    await until(
        lambda: bool(lanes.sleeps) and (fn.started(b"stuck", 2) or lane.waits_for_abandoned_call())
    )
    assert not fn.started(b"stuck", 2)
    rid = lanes.ids[b"stuck"]
    assert (rid, 2) not in lanes.writer.marks  # not marked RUNNING either
    fn.gates[b"stuck"].set()
    await asyncio.wait_for(lane.task, 10)
    outcome = lanes.outcomes[b"stuck"]
    assert (outcome.status, outcome.attempt_count) == ("SUCCEEDED", 2)
    assert outcome.attempts[0].error == "TimeoutError: handler timed out after 0.2 s"
    assert fn.log == [
        ("start", b"stuck", 1),
        ("end", b"stuck", 1),
        ("start", b"stuck", 2),
        ("end", b"stuck", 2),
    ]
    assert fn.overlaps == []


async def test_a_request_waiting_behind_an_abandoned_thread_can_be_cancelled_at_once(
    blocking: list[Blocking],
) -> None:
    fn = Blocking(b"hang")
    blocking.append(fn)
    lanes = Lanes(concurrency=4)
    lane = lanes.lane(spec(fn), b"hang", b"waiting", b"after")
    await until(lambda: fn.started(b"hang"))
    lanes.cancel(b"hang")
    await until(lambda: b"hang" in lanes.outcomes)
    await until(lane.waits_for_abandoned_call)
    lanes.cancel(b"waiting")
    await until(lambda: b"waiting" in lanes.outcomes)
    waiting = lanes.outcomes[b"waiting"]
    assert (waiting.status, waiting.attempt_count) == ("CANCELLED", 0)
    assert not fn.started(b"after")  # the lane still waits for the thread
    fn.gates[b"hang"].set()
    await asyncio.wait_for(lane.task, 10)
    assert lanes.status(b"after") == "SUCCEEDED"
    assert not fn.started(b"waiting")


async def test_the_running_mark_means_the_handler_started(blocking: list[Blocking]) -> None:
    """More calls than the default executor's threads (min(32, cpu + 4)) block at once:
    each still starts at once, none waits in a queue while marked RUNNING."""
    count = min(32, (os.cpu_count() or 1) + 4) + 2
    payloads = [f"{i}".encode() for i in range(count)]
    fn = Blocking(*payloads)
    blocking.append(fn)
    lanes = Lanes(concurrency=count)
    running = [lanes.lane(spec(fn), payload) for payload in payloads]
    await until(lambda: all(fn.started(p) for p in payloads))
    fn.release_all()
    await asyncio.wait_for(asyncio.gather(*(lane.task for lane in running)), 10)
    assert {lanes.status(p) for p in payloads} == {"SUCCEEDED"}


async def test_shutdown_logs_the_threads_left_running(blocking: list[Blocking]) -> None:
    fn = Blocking(b"hang")
    blocking.append(fn)
    lanes = Lanes(concurrency=4)
    lane = lanes.lane(spec(fn), b"hang")
    await until(lambda: fn.started(b"hang"))
    lanes.cancel(b"hang")
    await asyncio.wait_for(lane.task, 10)
    with capture_logs() as logs:
        await lanes.attempts.shutdown()
    assert [(e["event"], e["threads"]) for e in logs] == [("handler_threads_abandoned_at_exit", 1)]


def wait_for_file(ctx: Any, payload: bytes) -> bytes:
    """A process handler: announces its start (PATH.started), then waits for PATH."""
    path = Path(payload.decode())
    path.with_suffix(".started").touch()
    deadline = time.monotonic() + 60
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return b"done"


async def test_a_cancelled_process_call_keeps_its_lane_and_is_stopped_at_shutdown(
    tmp_path: Path,
) -> None:
    lanes = Lanes(concurrency=4)
    handler = Handler("proc", wait_for_file, False, 1, None, "", "process")
    hang, after = tmp_path / "hang", tmp_path / "after"
    after.touch()
    lane = lanes.lane(handler, str(hang).encode(), str(after).encode())
    try:
        await polling.until(hang.with_suffix(".started").exists, timeout=60)
        lanes.cancel(str(hang).encode())
        await until(lambda: lanes.status(str(hang).encode()) == "CANCELLED")
        assert lanes.attempts.in_flight == 1
        assert lane.waits_for_abandoned_call()
        assert not after.with_suffix(".started").exists()
        hang.touch()
        await asyncio.wait_for(lane.task, 30)
        assert lanes.status(str(after).encode()) == "SUCCEEDED"
        assert lanes.attempts.in_flight == 0
        # One that hangs when the worker stops is cut off: the process exit would wait.
        stuck = tmp_path / "stuck"
        lane = lanes.lane(handler, str(stuck).encode())
        await polling.until(stuck.with_suffix(".started").exists, timeout=60)
        lanes.cancel(str(stuck).encode())
        await asyncio.wait_for(lane.task, 10)
        with capture_logs() as logs:
            await lanes.attempts.shutdown()
        assert [(e["event"], e["calls"]) for e in logs] == [
            ("handler_processes_stopped_at_exit", 1)
        ]
        await until(lambda: lanes.attempts.in_flight == 0)
    finally:
        hang.touch()
        (tmp_path / "stuck").touch()


async def test_a_request_waits_for_a_free_process_without_its_timeout_running(
    tmp_path: Path,
) -> None:
    """Process handlers: one user's hung, cancelled call holds the pool's only process.
    Another lane's request (timeout 1 s, one attempt) waits for a process without its
    timeout running and without being marked RUNNING, then runs and succeeds (submitted
    to the busy pool, it used to time out, DEAD, without ever starting). A request
    cancelled while it waits for a process ends CANCELLED at once."""
    lanes = Lanes(concurrency=8, processes=1)
    hung = Handler("proc", wait_for_file, False, 1, None, "", "process")
    quick = Handler("quick", wait_for_file, False, 1, 1.0, "", "process")
    hang, other, gone = tmp_path / "hang", tmp_path / "other", tmp_path / "gone"
    other.touch()
    try:
        lanes.lane(hung, str(hang).encode())
        await polling.until(hang.with_suffix(".started").exists, timeout=60)
        lanes.cancel(str(hang).encode())
        await until(lambda: lanes.status(str(hang).encode()) == "CANCELLED")
        waiting = lanes.lane(quick, str(other).encode())
        cancelled = lanes.lane(quick, str(gone).encode())
        lanes.cancel(str(gone).encode())
        await asyncio.wait_for(cancelled.task, 10)
        assert lanes.status(str(gone).encode()) == "CANCELLED"
        # Well past the 1 s timeout, the request still waits, unstarted and unmarked.
        await asyncio.sleep(2.5)
        assert lanes.status(str(other).encode()) is None
        assert not other.with_suffix(".started").exists()
        assert all(rid != lanes.ids[str(other).encode()] for rid, _ in lanes.writer.marks)
        hang.touch()  # the hung call returns: its process is free
        await asyncio.wait_for(waiting.task, 60)
        assert lanes.status(str(other).encode()) == "SUCCEEDED"
        assert other.with_suffix(".started").exists()
        await until(lambda: lanes.attempts.in_flight == 0)
    finally:
        hang.touch()
        await lanes.attempts.shutdown()


# -- the threads themselves -----------------------------------------------------------------


async def test_each_call_gets_a_daemon_thread_at_once_and_idle_ones_are_reused() -> None:
    threads = HandlerThreads()
    release = threading.Event()
    started: list[str] = []

    def block(n: int) -> int:
        started.append(threading.current_thread().name)
        assert threading.current_thread().daemon
        release.wait(30)
        return n

    futures = [threads.run(block, n) for n in range(8)]
    await until(lambda: len(started) == 8)
    assert threads.busy == 8
    release.set()
    assert await asyncio.gather(*futures) == list(range(8))
    assert (threads.busy, threads.threads) == (0, 8)  # idle, kept for the next calls
    assert await threads.run(lambda: "again") == "again"
    assert threads.threads == 8  # an idle thread took it
    assert threads.close() == 0


async def test_a_call_reports_its_exception_and_system_exit_is_only_an_exception() -> None:
    threads = HandlerThreads()

    def exits() -> None:
        sys.exit(3)

    def raises() -> None:
        raise ValueError("boom")

    with pytest.raises(SystemExit):
        await threads.run(exits)
    with pytest.raises(ValueError, match="boom"):
        await threads.run(raises)
    threads.close()


async def test_a_cancelled_future_does_not_stop_the_call_and_its_result_is_dropped() -> None:
    threads = HandlerThreads()
    release = threading.Event()
    returned = threading.Event()

    def block() -> str:
        release.wait(30)
        returned.set()
        raise RuntimeError("nobody sees this")

    future = threads.run(block)
    future.cancel()
    assert threads.busy == 1
    release.set()
    await until(returned.is_set)
    await until(lambda: threads.busy == 0)
    assert threads.close() == 0


async def test_idle_threads_end_after_a_while_and_on_close() -> None:
    threads = HandlerThreads(idle_seconds=0.05, name="idle-test")
    await asyncio.gather(*(threads.run(time.sleep, 0) for _ in range(3)))
    await until(lambda: threads.threads == 0)
    await until(lambda: not any(t.name.startswith("idle-test") for t in threading.enumerate()))
    closing = HandlerThreads(name="close-test")
    await asyncio.gather(*(closing.run(time.sleep, 0) for _ in range(3)))
    assert closing.close() == 0
    await until(lambda: not any(t.name.startswith("close-test") for t in threading.enumerate()))
    with pytest.raises(RuntimeError):
        closing.run(time.sleep, 0)


def test_a_hung_call_does_not_hold_up_the_process_exit() -> None:
    """The stdlib's ThreadPoolExecutor (the loop's default executor) joins its threads
    when the interpreter exits: a hung handler kept a stopped worker alive."""
    script = (
        "import asyncio, time\n"
        "from fairlane_server.worker.threads import HandlerThreads\n"
        "async def main():\n"
        "    threads = HandlerThreads()\n"
        "    threads.run(time.sleep, 600)\n"
        "    print(threads.close(), flush=True)\n"
        "asyncio.run(main())\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "clients"), str(ROOT)])}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, timeout=120, check=False
    )
    assert (done.returncode, done.stdout) == (0, b"1\n"), done.stderr
    assert time.monotonic() - started < 60  # not the 600 s of the call
