"""SyncClient against a real grpc.aio server on loopback: close() racing calls from many
threads, Ctrl-C in a blocking call (in a subprocess, signalled once it is in the call),
and timeouts."""

from __future__ import annotations

import collections
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fairlane.client import ClientClosed, InvalidArgument, Status, SyncClient, Tokens, sync
from fairlane.client.async_client import MAX_TIMEOUT, checked_timeout
from tests.sync_child import AFTER_THE_INTERRUPT
from tests.unit.loopback_services import USER, LoopbackServices

ROOT = Path(__file__).resolve().parents[2]
NOISE = (
    "Traceback",
    "Event loop is closed",
    "Task was destroyed",
    "Exception ignored",
    "Exception in callback",
    "RuntimeError",
)


def _client(services: LoopbackServices, **options: Any) -> SyncClient:
    return SyncClient(
        services.target, services.target, tokens=Tokens.issued("access", "", 3600), **options
    )


@pytest.fixture
def noise(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """What asyncio logs (an exception in a callback, a task destroyed pending) and what
    Python reports as ignored, on any loop and thread of this process."""
    heard: list[str] = []
    monkeypatch.setattr(
        sys, "unraisablehook", lambda u: heard.append(f"{u.exc_type.__name__}: {u.exc_value}")
    )
    with caplog.at_level(logging.WARNING, logger="asyncio"):
        yield heard
    heard.extend(r.getMessage() for r in caplog.records if r.name == "asyncio")


def _call_until_it_fails(
    client: SyncClient, i: int, calls: threading.Semaphore, ends: list[BaseException]
) -> None:
    try:
        while True:
            if i % 2:
                assert client.whoami().username == USER
            else:
                client.enqueue("noop", b"")
            calls.release()
    except BaseException as exc:
        ends.append(exc)


def test_close_racing_calls_from_many_threads_returns_every_call(noise: list[str]) -> None:
    """8 threads call one SyncClient in a loop while another closes it (and, in some
    rounds, three close it at once): every call returns, with its result or ClientClosed,
    within a bound; calls after close raise ClientClosed at once; nothing is logged."""
    endings: collections.Counter[str] = collections.Counter()
    with LoopbackServices(delay=0.002) as services:
        for round_ in range(10):
            client = _client(services)
            calls = threading.Semaphore(0)
            ends: list[BaseException] = []
            threads = [
                threading.Thread(
                    target=_call_until_it_fails, args=(client, i, calls, ends), daemon=True
                )
                for i in range(8)
            ]
            for thread in threads:
                thread.start()
            for _ in range(8 + 10 * round_):  # close at a different point each round
                assert calls.acquire(timeout=10)
            closers = [
                threading.Thread(target=client.close, daemon=True)
                for _ in range(3 if round_ % 3 == 0 else 1)
            ]
            for closer in closers:
                closer.start()
            deadline = time.monotonic() + 10
            for thread in [*closers, *threads]:
                thread.join(max(0.0, deadline - time.monotonic()))
            assert [t for t in [*closers, *threads] if t.is_alive()] == [], f"round {round_}"
            assert all(isinstance(e, ClientClosed) for e in ends), ends
            endings.update(type(e).__name__ for e in ends)

            started = time.monotonic()
            with pytest.raises(ClientClosed):
                client.whoami()
            with pytest.raises(ClientClosed):
                next(iter(client.watch()))
            with pytest.raises(ClientClosed):
                client.submit_and_wait("echo", b"x")
            client.close()  # again: nothing to do
            assert time.monotonic() - started < 1
            assert not client._thread.is_alive()
    assert endings == {"ClientClosed": 80}
    assert noise == []


def test_close_ends_streams_and_sessions_in_other_threads(noise: list[str]) -> None:
    """A watch, a listing and a submit_and_wait blocked in other threads end with
    ClientClosed when the client is closed."""
    with LoopbackServices(stored=0, more=True) as services:
        client = _client(services)
        ends: dict[str, BaseException] = {}

        def run(name: str, call: Callable[[], object]) -> None:
            try:
                call()
            except BaseException as exc:
                ends[name] = exc

        jobs: dict[str, Callable[[], object]] = {
            "watch": lambda: list(client.watch()),
            "requests": lambda: list(client.requests()),
            "submit_and_wait": lambda: client.submit_and_wait("hold"),
        }
        threads = [threading.Thread(target=run, args=job, daemon=True) for job in jobs.items()]
        for thread in threads:
            thread.start()
        assert services.accepted.wait(10)
        assert services.held.wait(10)
        client.close()
        for thread in threads:
            thread.join(10)
        assert not any(t.is_alive() for t in threads)
        assert {name: type(e) for name, e in ends.items()} == dict.fromkeys(jobs, ClientClosed)
    assert noise == []


# A script that blocks in a SyncClient call until SIGINT, then checks that the client still
# works and that nothing of the interrupted call is left on its loop.
INTERRUPTED = (
    """
import asyncio, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # even where SIGINT is ignored
from fairlane.client import SyncClient, Tokens

target, mode = sys.argv[1], sys.argv[2]
client = SyncClient(target, target, tokens=Tokens.issued("access", "", 3600))
try:
    if mode == "watch":
        for result in client.watch():
            print("result", result.lane_seq, flush=True)
    elif mode == "requests":
        for page in client.requests():
            print("page", len(page), flush=True)
    else:
        client.submit_and_wait("hold")
    print("returned", flush=True)
except KeyboardInterrupt:
    print("KeyboardInterrupt", flush=True)
print("whoami", client.whoami().username, flush=True)

"""
    + AFTER_THE_INTERRUPT
)


@pytest.mark.parametrize("mode", ["watch", "requests", "submit_and_wait"])
def test_ctrl_c_in_a_blocking_call_raises_keyboard_interrupt_and_leaves_nothing(
    mode: str,
) -> None:
    """Ctrl-C while a watch()/requests() iterator or submit_and_wait waits: the caller
    gets KeyboardInterrupt (not "aclose(): asynchronous generator is already running"),
    the call is cancelled and ended on the loop, and close() later is silent."""
    with LoopbackServices(stored=1, listed=2, more=True) as services:
        env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join([str(ROOT / "clients"), str(ROOT)]),
            GRPC_VERBOSITY="ERROR",
        )
        proc = subprocess.Popen(
            [sys.executable, "-c", INTERRUPTED, services.target, mode],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=ROOT,
            text=True,
        )
        try:
            assert proc.stdout is not None
            # In the middle of the call: the server holds it unanswered.
            if mode == "watch":
                assert proc.stdout.readline() == "result 1\n"
            elif mode == "requests":
                assert proc.stdout.readline() == "page 2\n"
            else:
                assert services.accepted.wait(30)
            assert services.held.wait(30)
            interrupted = time.monotonic()
            proc.send_signal(signal.SIGINT)
            rest, stderr = proc.communicate(timeout=30)
            took = time.monotonic() - interrupted
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0, (rest, stderr)
    lines = rest.splitlines()
    assert lines[0] == "KeyboardInterrupt", rest
    assert lines[1] == f"whoami {USER}", rest
    assert lines[2].startswith("left 0 "), rest
    assert lines[3:] == ["closed"], rest
    assert took < 10
    assert not [n for n in NOISE if n in stderr], stderr


@pytest.mark.parametrize("timeout", [math.inf, 1e12, 1e20, MAX_TIMEOUT * 2])
def test_an_infinite_or_huge_timeout_is_no_deadline_or_the_longest(timeout: float) -> None:
    """inf is no deadline and a huge timeout is cut to MAX_TIMEOUT; neither fails the
    call at once with DEADLINE_EXCEEDED as gRPC would."""
    assert checked_timeout(timeout) == (None if math.isinf(timeout) else MAX_TIMEOUT)
    with LoopbackServices() as services, _client(services, timeout=timeout) as client:
        assert client.aio.timeout == checked_timeout(timeout)
        assert client.whoami().username == USER
        assert client.whoami(timeout=timeout).username == USER
        result = client.submit_and_wait("echo", b"x", timeout=timeout)
        assert (result.status, result.output) == (Status.SUCCEEDED, b"x")


@pytest.mark.parametrize("timeout", [math.nan, -1, 0, -math.inf, "10", True])
def test_a_timeout_that_is_not_more_than_0_is_invalid_argument(timeout: Any) -> None:
    sync_threads = sum(t.name == "fairlane-sync-client" for t in threading.enumerate())
    with LoopbackServices() as services:
        with pytest.raises(InvalidArgument, match="timeout"):
            _client(services, timeout=timeout)
        # The client that could not be made left no loop thread behind.
        assert sum(t.name == "fairlane-sync-client" for t in threading.enumerate()) == (
            sync_threads
        )
        with _client(services) as client:
            with pytest.raises(InvalidArgument, match="timeout"):
                client.whoami(timeout=timeout)
            with pytest.raises(InvalidArgument, match="timeout"):
                client.submit_and_wait("echo", b"x", timeout=timeout)
            assert client.whoami().username == USER


def test_an_iterator_whose_step_still_runs_when_it_is_left_ends_that_step_first(
    monkeypatch: pytest.MonkeyPatch, noise: list[str]
) -> None:
    """Ctrl-C in a watch() loop whose step is still running when the iterator is left (the
    interrupt came just after the step was handed to the loop, before the caller began to
    wait and could cancel it; or the step outlasted the wait for its cancel): the
    iterator's close ends that step on the loop before it closes the generator, so the
    caller gets KeyboardInterrupt, not "aclose(): asynchronous generator is already
    running" (seen once in CI)."""
    # The caller neither cancels the step nor waits for it: as when the interrupt comes
    # between handing the step to the loop and beginning to wait for it.
    monkeypatch.setattr(sync, "_CANCEL_WAIT", 0.0)
    monkeypatch.setattr(sync._Call, "cancel", lambda self: None)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with LoopbackServices(stored=1, more=True) as services, _client(services) as client:
            main = threading.main_thread().ident
            assert main is not None

            def interrupt() -> None:
                # Once the next step runs on the loop (the caller is inside next(watch)) and
                # the server holds the watch: the interrupt lands in that call, not before.
                deadline = time.monotonic() + 30
                while not (services.held.is_set() and client._tasks):
                    if time.monotonic() > deadline:
                        return
                    time.sleep(0.005)
                # To the main thread itself: a signal raised in this thread would not wake
                # it from its wait.
                signal.pthread_kill(main, signal.SIGINT)

            watch = client.watch()
            assert next(watch).lane_seq == 1
            threading.Thread(target=interrupt, daemon=True).start()
            with pytest.raises(KeyboardInterrupt):
                next(watch)
            assert client.whoami().username == USER
    finally:
        signal.signal(signal.SIGINT, previous)
    assert noise == []
