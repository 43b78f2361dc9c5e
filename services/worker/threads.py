"""The threads a worker runs plain (sync) handlers in: its own, not the event loop's
default executor.

Written out rather than a concurrent.futures.ThreadPoolExecutor, for two reasons:

- That pool's threads are joined when the interpreter exits (concurrent.futures registers
  the join with threading._register_atexit), and Python cannot stop a thread: one handler
  that hangs kept a stopped worker process alive until the handler returned, after SIGTERM
  and past the grace period, until the deployment's stop timeout killed it (measured: a
  hung handler held a worker 38.7 s after SIGTERM with a grace of 5 s). These are daemon
  threads: the interpreter exits without waiting for them, and a handler still running
  then is cut off as in a killed process (its request is handed back, or its outcome was
  written when its attempt was cancelled or timed out).
- That pool queues work behind busy threads once max_workers run; the work then waited
  unseen while its attempt counted as running (and was marked RUNNING in the log). Here a
  call waits only for an idle thread, one for each call waiting (a new one is started when
  there is none), never for a busy one; the caller bounds how many run (a worker's
  concurrency slots, each held until its thread has returned).

The calls wait in one queue that the idle threads take them from, rather than each being
handed to a thread of its own: a thread that has just returned takes the next call without
being woken. With 64 lanes of noop sync handlers through the attempts, an attempt took
18-21 us this way, 25-58 us with a thread per call, and 28-34 us on the default executor.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any

# An idle thread ends after this long without a call; a burst's threads do not linger.
IDLE_SECONDS = 60.0

# A call for a thread: the loop and future to report to, the function and its arguments.
_Call = tuple[asyncio.AbstractEventLoop, asyncio.Future[Any], Callable[..., Any], tuple[Any, ...]]


class HandlerThreads:
    """Runs each call in a daemon thread at once, for as long as it takes."""

    def __init__(self, *, idle_seconds: float = IDLE_SECONDS, name: str = "handler") -> None:
        self._idle_seconds = idle_seconds
        self._name = name
        self._lock = threading.Lock()
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        # Never more calls waiting in the queue than idle threads: each waits for one
        # that is free, none for a thread that runs (maybe hangs in) another call.
        self._waiting = 0  # calls in the queue, not taken yet
        self._idle = 0  # threads not running a call (waiting for one, or about to)
        self._started = 0
        self._closed = False
        self.busy = 0  # calls not returned yet (waiting or running)

    @property
    def threads(self) -> int:
        """Threads alive: those running a call and the idle ones."""
        return self.busy - self._waiting + self._idle

    def run(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """Calls fn(*args) in a thread now. The future, of the running loop, gets the call's
        result or exception once it returns; cancelling it does not stop the call (nothing
        can), and the result of a cancelled one is dropped."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the handler threads are closed")
            self.busy += 1
            self._waiting += 1
            spawn = self._waiting > self._idle  # every idle thread has a call already
            if spawn:
                self._idle += 1
                self._started += 1
            number = self._started
        if spawn:
            try:
                threading.Thread(
                    target=self._serve,
                    name=f"{self._name}-{number}",
                    daemon=True,  # see the module's docstring
                ).start()
            except BaseException:  # no thread to be had: the call is not made
                with self._lock:
                    self.busy -= 1
                    self._waiting -= 1
                    self._idle -= 1
                raise
        self._calls.put((loop, future, fn, args))
        return future

    def close(self) -> int:
        """Ends the idle threads and takes no more calls; returns how many calls still run
        (their threads are left to end on their own, or with the process)."""
        with self._lock:
            self._closed = True
            idle = self._idle
            busy = self.busy
        for _ in range(idle):
            self._calls.put(None)
        return busy

    def _serve(self) -> None:
        calls = self._calls
        while True:
            try:
                call = calls.get(timeout=self._idle_seconds)
            except queue.Empty:
                with self._lock:
                    if self._idle - 1 >= self._waiting:  # the others cover what waits
                        self._idle -= 1
                        return
                continue
            if call is None:
                with self._lock:
                    self._idle -= 1
                return
            with self._lock:
                self._waiting -= 1
                self._idle -= 1
            loop, future, fn, args = call
            call = None
            error: BaseException | None = None
            result: Any = None
            try:
                result = fn(*args)
            except BaseException as exc:  # SystemExit too: it fails the attempt, not the worker
                error = exc
            del fn, args
            with self._lock:
                # Idle before the caller hears of the result: once it frees the call's
                # slot, a thread is free for the next call.
                self.busy -= 1
                closed = self._closed
                if not closed:
                    self._idle += 1
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
                loop.call_soon_threadsafe(_settle, future, result, error)
            del loop, future, result, error
            if closed:
                return


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return  # cancelled: nobody waits for this result
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
