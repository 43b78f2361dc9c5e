"""Attempts of one request: the retry loop (backoff with full jitter, in place so the
lane's order holds), timeouts, executors for sync and CPU-bound handlers, lifecycle hooks,
tracing and dead-lettering once the attempts are used up.

A sync handler runs in a thread (threads.py) or a process, which nothing can stop: when
its attempt is cancelled or times out, the attempt ends at once, but the call keeps its
concurrency slot and its lane until it has returned (see `_abandon`)."""

from __future__ import annotations

import asyncio
import functools
import multiprocessing
import os
import random
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import Future as CallFuture
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Span

from fairlane.common.v1 import lane_pb2
from fairlane.handlers import Hooks, PermanentError, PlainContext
from fairlane_server.core import metrics, status, tracing
from fairlane_server.core.describe import describe_error
from fairlane_server.core.logging import get_logger
from fairlane_server.worker.context import AttemptContext
from fairlane_server.worker.dead_letters import DeadLetters
from fairlane_server.worker.registry import Handler
from fairlane_server.worker.store import Attempt, Outcome
from fairlane_server.worker.threads import HandlerThreads
from fairlane_server.worker.writer import ResultWriter, WriteFailed

log = get_logger(__name__)

RUNNING_MARK_SECONDS = 0.05  # handlers that take longer show RUNNING in the log
CANCELLED_MEMORY = 10_000  # recent cancel requests remembered for requests not yet started


class RequestCancelled(Exception):
    pass


# An attempt's error as stored and sent: a message of megabytes (a payload in an
# exception) made the request unreadable (every reply carrying it passed gRPC's limit).
MAX_ERROR_CHARS = 4096


def _text(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # a __str__ of the handler's own that fails
        return "(its message could not be read)"


def describe(exc: BaseException, *, kind: bool = True) -> str:
    """What a handler's exception says, fit to store: whatever its __str__ does (raise,
    return megabytes, NULs or lone surrogates, which PostgreSQL refuses)."""
    text = _text(exc)
    if kind:
        text = f"{type(exc).__name__}: {text}"
    text = text or type(exc).__name__
    if len(text) > MAX_ERROR_CHARS:
        text = f"{text[:MAX_ERROR_CHARS]}... ({len(text)} characters in all)"
    return text.replace("\x00", "\\0").encode("utf-8", "replace").decode("utf-8")


class HandlerExit(Exception):
    """A handler raised a BaseException that is not an Exception (SystemExit,
    KeyboardInterrupt, GeneratorExit, its own): its attempt failed.

    Left as they are, asyncio re-raises the first two out of the event loop (one handler's
    `sys.exit()` stopped the whole worker, and, redelivered, the next one), and the others
    ended the lane's task (its requests then ended DEAD as if a worker had died)."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__(f"the handler raised {type(exc).__name__}({_text(exc)[:MAX_ERROR_CHARS]})")


async def _contained(coro: Awaitable[Any]) -> Any:
    try:
        return await coro
    except (Exception, asyncio.CancelledError):
        raise
    except BaseException as exc:
        raise HandlerExit(exc) from None


class Stats:
    def __init__(self) -> None:
        self.succeeded: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.retried: Counter[str] = Counter()
        self.running: Counter[str] = Counter()


class Attempts:
    def __init__(
        self,
        *,
        writer: ResultWriter,
        dead_letters: DeadLetters,
        concurrency: int,
        retry_base: float,
        retry_max: float,
        max_output_bytes: int = 4 * 1024 * 1024,
        hooks: list[Hooks] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
        processes: int | None = None,
    ) -> None:
        self._writer = writer
        self._dead = dead_letters
        self.concurrency = concurrency
        self._slots = asyncio.Semaphore(concurrency)
        self._retry_base = retry_base
        self._retry_max = retry_max
        self._max_output = max_output_bytes
        self._hooks = hooks or []
        self._sleep = sleep
        self._rng = rng or random.Random()
        self.in_flight = 0
        self.stats = Stats()
        self._running: dict[str, asyncio.Future[Any]] = {}
        self._cancelled: dict[str, None] = {}  # insertion-ordered, bounded
        self._processes: ProcessPoolExecutor | None = None
        self._process_count = processes or os.cpu_count() or 1
        # One per process of the pool, held by a call until it returns (also one whose
        # attempt was abandoned): a call is submitted only when a process is free.
        self._process_slots = asyncio.Semaphore(self._process_count)
        self._process_calls: set[asyncio.Future[Any]] = set()  # submitted, not returned
        self._threads = HandlerThreads()
        # Per lane: the call (thread or process) of an attempt that was cancelled or timed
        # out and has not returned yet. The lane's next attempt waits for it.
        self._abandoned: dict[str, asyncio.Future[Any]] = {}

    # -- cancels ---------------------------------------------------------------------------

    def cancel(self, request_id: str) -> None:
        """Stops the handler running `request_id` here, or skips it when its turn comes."""
        self._cancelled[request_id] = None
        while len(self._cancelled) > CANCELLED_MEMORY:
            self._cancelled.pop(next(iter(self._cancelled)))
        task = self._running.get(request_id)
        if task is not None:
            task.cancel()

    def cancelled(self, request_id: str) -> bool:
        return request_id in self._cancelled

    # -- the retry loop --------------------------------------------------------------------

    async def run(
        self,
        batch: lane_pb2.LaneBatch,
        item: lane_pb2.LaneItem,
        spec: Handler,
        previous_attempts: int,
        *,
        request_id: uuid.UUID,
        user: uuid.UUID,
        gate: Callable[[], Awaitable[None]],
        span: Span | None = None,
        interrupted: bool = False,
        redelivered: bool = False,
    ) -> Outcome:
        """Runs the request until it succeeds, fails for good, is cancelled or has used up
        its attempts (then it is dead-lettered). `request_id` and `user` are the item's and
        the batch's ids, parsed once by the caller. `gate` is awaited before each attempt
        (pause/resume); retries wait in place, so the lane's order holds.

        `interrupted`: the log shows attempt `previous_attempts` started and never
        finished, so the worker running it stopped (it crashed, was killed, or was stopped
        before the handler ended): that attempt counts as used. `redelivered`: the message
        came back from the broker, so a worker may have died running it; each attempt's
        start is then written to the log before the handler runs. Together they end a
        request whose handler kills the worker process (os._exit, a segfault, the OOM
        killer) DEAD after at most `max_attempts` + 1 runs (the first, unrecorded, one
        included), instead of killing every worker that takes its lane, forever."""
        max_attempts = item.max_attempts or spec.max_attempts
        deadline = item.deadline.ToDatetime(tzinfo=UTC) if item.HasField("deadline") else None
        attempts: list[Attempt] = []
        number = previous_attempts + 1
        if interrupted and previous_attempts >= max_attempts:
            return await self._give_up_interrupted(
                batch, item, spec, Outcome(request_id, user, status.DEAD), previous_attempts
            )
        while True:
            await gate()
            if self._abandoned:
                await self._lane_free(batch.user_id, item.request_id, gate)
            if item.request_id in self._cancelled:
                return Outcome(
                    request_id,
                    user,
                    status.CANCELLED,
                    error="cancelled by the client",
                    attempts=attempts,
                )
            if not attempts and deadline is not None and deadline <= datetime.now(UTC):
                # Checked again after the gate: a paused worker or lane held it past its
                # deadline, and a request not started by then ends EXPIRED.
                return Outcome(
                    request_id, user, status.EXPIRED, error="deadline passed before start"
                )
            if number == 1:
                # Once the first attempt starts, as metrics.md says: not for a request that
                # is cancelled or expires first, and with any time held at the gate (a
                # paused worker or lane). UUIDv7 ids carry their acceptance time (ms since
                # the epoch, top 48 bits).
                accepted_ms = request_id.int >> 80
                metrics.QUEUE_WAIT_SECONDS.observe(max(0.0, time.time() - accepted_ms / 1000))
            attempt = Attempt(number, datetime.now(UTC))
            attempts.append(attempt)
            if redelivered or number > 1:
                # In the log before the handler runs: retries are rare, and a redelivered
                # request may be the one that killed the last worker (see above).
                await self._mark_written(request_id, attempt)
            ctx = AttemptContext(
                request_id=item.request_id,
                user_id=batch.user_id,
                attempt=number,
                deadline=deadline,
                writer=self._writer,
                route=batch.reply_route,
            )
            await self._before(ctx, spec.name)
            outcome: Outcome | None = None
            attempt_span = (
                None
                if span is None
                else tracing.start(
                    f"attempt {number}",
                    parent_span=span,
                    attributes={"fairlane.request_id": item.request_id, "fairlane.attempt": number},
                )
            )
            try:
                with tracing.current(attempt_span):
                    try:
                        output = await self._call(spec, ctx, item.payload, request_id, number)
                    finally:
                        ctx.end()
            except RequestCancelled:
                attempt.error = "cancelled by the client"
                outcome = Outcome(
                    request_id, user, status.CANCELLED, error=attempt.error, attempts=attempts
                )
            except PermanentError as exc:
                attempt.error = describe(exc, kind=False)
                self.stats.failed[spec.name] += 1
                outcome = Outcome(
                    request_id, user, status.FAILED, error=attempt.error, attempts=attempts
                )
            except (Exception, HandlerExit) as exc:
                attempt.error = describe(exc)
                with tracing.current(attempt_span):
                    log.warning(
                        "attempt_failed",
                        request_id=item.request_id,
                        handler=spec.name,
                        attempt=number,
                        max_attempts=max_attempts,
                        error=attempt.error[:500],
                    )
            else:
                self.stats.succeeded[spec.name] += 1
                outcome = Outcome(
                    request_id, user, status.SUCCEEDED, output=output, attempts=attempts
                )
            if outcome is None and number >= max_attempts:
                self.stats.failed[spec.name] += 1
                await self._dead.request(batch, item, attempts)
                outcome = Outcome(
                    request_id,
                    user,
                    status.DEAD,
                    error=f"gave up after {number} attempts: {attempt.error}",
                    attempts=attempts,
                )
            if attempt_span is not None:
                attempt_span.set_attribute(
                    "fairlane.outcome", outcome.status if outcome else "RETRY"
                )
                if attempt.error:
                    attempt_span.set_status(trace.Status(trace.StatusCode.ERROR, attempt.error))
                attempt_span.end()
            await self._after(ctx, spec.name, outcome.status if outcome else "RETRY", attempt.error)
            if outcome is not None:
                return outcome
            self.stats.retried[spec.name] += 1
            metrics.RETRIES.labels(spec.name).inc()
            # Exponential backoff with full jitter; the lane waits, so order holds.
            cap = min(self._retry_max, self._retry_base * 2 ** (number - 1))
            await self._sleep(self._rng.uniform(0, cap))
            number += 1

    async def _give_up_interrupted(
        self,
        batch: lane_pb2.LaneBatch,
        item: lane_pb2.LaneItem,
        spec: Handler,
        dead: Outcome,
        used: int,
    ) -> Outcome:
        error = (
            f"the worker stopped during attempt {used} (it crashed, was killed or was "
            "stopped before the handler ended)"
        )
        log.error(
            "attempts_used_by_stopped_workers",
            request_id=item.request_id,
            handler=spec.name,
            attempts=used,
        )
        dead.attempts = [Attempt(used, datetime.now(UTC), error)]
        dead.error = f"gave up after {used} attempts: {error}"
        self.stats.failed[spec.name] += 1
        await self._dead.request(batch, item, dead.attempts)
        return dead

    # -- one attempt -----------------------------------------------------------------------

    def _elsewhere(
        self, spec: Handler, ctx: AttemptContext, payload: bytes
    ) -> tuple[asyncio.Future[Any], CallFuture[Any] | None]:
        """Starts a sync handler in a thread or a process. Returns the future of its call,
        done once the call has returned (nobody cancels it), and for a process the pool's
        own future (cancelling it drops a call still queued for a process)."""
        if spec.executor != "process":
            return self._threads.run(spec.fn, ctx, payload), None
        if self._processes is None:
            # Forkserver, not fork: a child forked from this process would inherit
            # gRPC's and asyncio's threads mid-state, and dies at random under load.
            self._processes = ProcessPoolExecutor(
                max_workers=self._process_count,
                mp_context=multiprocessing.get_context("forkserver"),
            )
        plain = PlainContext(ctx.request_id, ctx.user_id, ctx.attempt, ctx.deadline)
        try:
            submitted = self._processes.submit(spec.fn, plain, payload)
        except BaseException:
            self._process_slots.release()
            raise
        call = asyncio.wrap_future(submitted)
        self._process_calls.add(call)
        call.add_done_callback(self._process_calls.discard)
        call.add_done_callback(lambda _: self._process_slots.release())
        return call, submitted

    async def _process_slot(self, request_id: str) -> None:
        """Waits for a free process of the pool (the caller then submits, see _elsewhere).
        Submitted to a busy pool, a call waited in its queue with its timeout running and
        its RUNNING mark written: a user's hung process handlers made other users'
        requests time out, and end DEAD, without ever starting. A cancel of `request_id`
        ends the wait at once (RequestCancelled)."""
        waiting = asyncio.ensure_future(self._process_slots.acquire())
        self._running[request_id] = waiting  # what cancel() cancels
        try:
            await waiting
        except asyncio.CancelledError:
            if waiting.done() and not waiting.cancelled():
                self._process_slots.release()  # taken just as this task was cancelled
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the worker itself is stopping
            raise RequestCancelled from None
        finally:
            self._running.pop(request_id, None)

    async def _call(
        self,
        spec: Handler,
        ctx: AttemptContext,
        payload: bytes,
        request_id: uuid.UUID,
        number: int,
    ) -> bytes:
        await self._slots.acquire()
        self.in_flight += 1
        self.stats.running[spec.name] += 1
        metrics.IN_FLIGHT.inc()
        started = time.perf_counter()
        # A sync handler's call, which runs on when its attempt is cancelled or times out.
        call: asyncio.Future[Any] | None = None
        queued: CallFuture[Any] | None = None
        watch: _Watch | None = None
        reason = "the worker stopped"  # why an attempt ends while its call runs on
        try:
            if spec.is_async:
                running: asyncio.Future[Any] = asyncio.ensure_future(
                    _contained(spec.fn(ctx, payload))
                )
            else:
                if spec.executor == "process":
                    await self._process_slot(ctx.request_id)
                call, queued = self._elsewhere(spec, ctx, payload)
                # Cancelling the attempt stops the waiting, not the call.
                running = asyncio.shield(call)
            self._running[ctx.request_id] = running
            watch = _Watch(
                running,
                spec.timeout,
                functools.partial(self._mark_running, request_id, number),
            )
            try:
                result = await running
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # the worker itself is stopping
                if watch.timed_out:
                    reason = "timed out"
                    raise TimeoutError(f"handler timed out after {spec.timeout} s") from None
                if ctx.request_id not in self._cancelled:
                    # Nobody cancelled it: the handler raised CancelledError itself (a task
                    # of its own that was cancelled, say). A failed attempt, not the
                    # client's cancel.
                    raise RuntimeError("the handler raised CancelledError") from None
                # Only the handler was cancelled: the client asked for it. A thread or
                # process runs on to its end (see _abandon); its result is discarded.
                reason = "cancelled"
                raise RequestCancelled from None
            except Exception:
                raise
            except BaseException as exc:
                # From a thread or process handler (SystemExit, KeyboardInterrupt,
                # GeneratorExit, its own): the attempt fails, the worker and lane live.
                raise HandlerExit(exc) from None
        finally:
            if watch is not None:
                watch.cancel()
            self._running.pop(ctx.request_id, None)
            _handler_seconds(spec.name).observe(time.perf_counter() - started)
            if call is None or call.done():
                self._free(spec.name)
            else:
                self._abandon(ctx, spec.name, call, queued, reason)
        if result is None:
            return b""
        if isinstance(result, str):
            output = result.encode()
        elif isinstance(result, bytes | bytearray | memoryview):
            output = bytes(result)
        else:
            raise PermanentError(f"handler returned {type(result).__name__}, not bytes")
        if len(output) > self._max_output:
            # Stored, it would be a result no response can carry: GetRequest, WatchResults
            # and the Session would fail on it for good (gRPC's message limit).
            raise PermanentError(
                f"handler output is {len(output)} bytes; the limit is {self._max_output} "
                "(FAIRLANE_MAX_OUTPUT_BYTES)"
            )
        return output

    def _free(self, handler: str) -> None:
        metrics.IN_FLIGHT.dec()
        self.stats.running[handler] -= 1
        self.in_flight -= 1
        self._slots.release()

    def _abandon(
        self,
        ctx: AttemptContext,
        handler: str,
        call: asyncio.Future[Any],
        queued: CallFuture[Any] | None,
        reason: str,
    ) -> None:
        """An attempt ended (cancelled, timed out, or the worker stops) while its thread
        or process still runs, which nothing can stop. The call keeps the attempt's
        concurrency slot, and counts in flight, until it returns: a free slot always has a
        free thread (threads.py), and one user cancelling hung handlers in a loop holds at
        most one of them per lane. The lane's next attempt (its next request, or a retry of
        this one) waits for it too (`_lane_free`), so no two requests of a lane run at once
        here."""
        if queued is not None:
            queued.cancel()  # a process call still queued in the pool never starts
        lane = ctx.user_id
        self._abandoned[lane] = call
        log.warning(
            "handler_abandoned",
            request_id=ctx.request_id,
            handler=handler,
            lane=lane,
            reason=reason,
        )
        call.add_done_callback(
            functools.partial(self._abandoned_returned, lane, handler, ctx.request_id)
        )

    def _abandoned_returned(
        self, lane: str, handler: str, request_id: str, call: asyncio.Future[Any]
    ) -> None:
        if not call.cancelled():
            call.exception()  # retrieved: the attempt's outcome was decided without it
        if self._abandoned.get(lane) is call:
            del self._abandoned[lane]
        self._free(handler)
        log.info("abandoned_handler_returned", request_id=request_id, handler=handler, lane=lane)

    async def _lane_free(
        self, lane: str, request_id: str, gate: Callable[[], Awaitable[None]]
    ) -> None:
        """Waits until no abandoned call of `lane` runs (then through the gate again). A
        cancel of `request_id` ends the wait at once: a request waiting here has not
        started, and ends CANCELLED without waiting for the call before it."""
        while (call := self._abandoned.get(lane)) is not None:
            if request_id in self._cancelled:
                return
            cancelled = asyncio.get_running_loop().create_future()
            self._running[request_id] = cancelled  # what cancel() cancels
            try:
                await asyncio.wait((call, cancelled), return_when=asyncio.FIRST_COMPLETED)
            finally:
                del self._running[request_id]
                cancelled.cancel()
            await gate()

    async def _mark_written(self, request_id: uuid.UUID, attempt: Attempt) -> None:
        try:
            await self._writer.running_written(request_id, attempt.number, attempt.started_at)
        except WriteFailed as exc:
            # Only a safeguard: the attempt runs unrecorded rather than not at all.
            log.warning(
                "running_mark_failed", request_id=str(request_id), error=describe_error(exc)[:200]
            )

    def _mark_running(self, request_id: uuid.UUID, number: int) -> None:
        self._writer.running(request_id, number, datetime.now(UTC))

    # -- hooks -----------------------------------------------------------------------------

    async def _before(self, ctx: AttemptContext, handler: str) -> None:
        for hooks in self._hooks:
            try:
                await hooks.before_request(ctx, handler)
            except Exception:
                log.exception("before_request_hook_failed", handler=handler)

    async def _after(self, ctx: AttemptContext, handler: str, outcome: str, error: str) -> None:
        for hooks in self._hooks:
            try:
                await hooks.after_request(ctx, handler, outcome, error)
            except Exception:
                log.exception("after_request_hook_failed", handler=handler)

    async def start(self) -> None:
        for hooks in self._hooks:
            await hooks.on_startup()

    async def shutdown(self) -> None:
        for hooks in self._hooks:
            try:
                await hooks.on_shutdown()
            except Exception:
                log.exception("on_shutdown_hook_failed")
        if self._processes is not None:
            processes = list((self._processes._processes or {}).values())
            self._processes.shutdown(wait=False, cancel_futures=True)
            running = sum(1 for call in self._process_calls if not call.done())
            if running:
                # The interpreter's exit waits for the pool, and the pool for its calls:
                # a hung process handler held the worker after its grace period. Drained
                # already (within the grace), so what still runs is cut off, as threads are.
                log.warning("handler_processes_stopped_at_exit", calls=running)
                for process in processes:
                    process.terminate()
        running = self._threads.close()
        if running:
            # Daemon threads (threads.py): the process exits without them, cutting them off.
            log.warning("handler_threads_abandoned_at_exit", threads=running)


class _Watch:
    """One timer per attempt for both things that happen to a handler that runs long: the
    RUNNING mark after RUNNING_MARK_SECONDS, then its timeout, which cancels it.

    Written out rather than `asyncio.timeout` plus a `call_later` for the mark: those are
    two timers and a context manager per request, and py-spy put them at a fifth of the
    worker's per-request handler path with a noop handler. Most handlers finish before
    either, and then the one timer is cancelled."""

    __slots__ = ("_deadline", "_handle", "_mark", "_task", "timed_out")

    def __init__(
        self, task: asyncio.Future[Any], timeout: float | None, mark: Callable[[], None]
    ) -> None:
        loop = asyncio.get_running_loop()
        self.timed_out = False
        self._task = task
        self._mark: Callable[[], None] | None = mark
        now = loop.time()
        self._deadline = None if timeout is None else now + timeout
        first = now + RUNNING_MARK_SECONDS
        if self._deadline is not None:
            first = min(first, self._deadline)
        self._handle = loop.call_at(first, self._fire)

    def _fire(self) -> None:
        loop = asyncio.get_running_loop()
        # A timer may fire a hair before its time (the loop rounds to its clock's tick).
        if self._deadline is not None and loop.time() >= self._deadline - 0.001:
            self.timed_out = True
            self._task.cancel()
            return
        if self._mark is not None:
            mark, self._mark = self._mark, None
            mark()
        if self._deadline is not None:
            self._handle = loop.call_at(self._deadline, self._fire)

    def cancel(self) -> None:
        self._handle.cancel()


@functools.cache
def _handler_seconds(handler: str) -> Any:
    """The histogram child of one handler, looked up once rather than per request."""
    return metrics.HANDLER_SECONDS.labels(handler)
