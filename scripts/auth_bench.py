"""Auth service figures, run by hand against `scripts/bench_suite.sh up` (never in tests).

    scripts/bench_suite.sh up
    .venv/bin/python scripts/auth_bench.py            # reads the suite's ports and pids
    scripts/bench_suite.sh down

Measures, each phase a few seconds:
  1. logins/s with 8 clients logging in, auth CPU per login and auth's peak RSS;
  2. a login storm: 16 guessers with wrong passwords, each guess from a new address and
     username (a botnet: no throttle rule ever trips, so every guess costs a hash), while
     a user logs in (from an address it logged in from before, and from new ones) and
     GetJwks, Refresh and WhoAmI run in loops: their latencies beside the same loops
     without the storm;
  3. the storm from one address (the throttle's case): how soon it is cut off;
  4. the revocation bound: Revoke, then how long until the queue refuses the login's
     access token (ListRequests polled every 20 ms);
  5. the bench's user creation: 1,000 new users registered and logged in.
The suite's auth trusts 127.0.0.1 as a proxy, so `x-forwarded-for` sets each caller's
address.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import psutil

from fairlane.auth.v1 import auth_pb2, auth_pb2_grpc
from fairlane.queue.v1 import queue_pb2, queue_pb2_grpc
from fairlane_server.bench.runner import BenchConfig, login_users

PASSWORD = "correct horse battery"


def _from(address: str) -> tuple[tuple[str, str]]:
    return (("x-forwarded-for", address),)


def _bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _ms(values: list[float]) -> str:
    return (
        f"n={len(values)} p50={_pct(values, 0.5) * 1000:.1f} ms "
        f"p99={_pct(values, 0.99) * 1000:.1f} ms max={max(values, default=0) * 1000:.1f} ms"
    )


class Loop:
    """Runs `call` back to back until stopped, recording each latency."""

    def __init__(self, call: Callable[[], Awaitable[Any]]) -> None:
        self.call = call
        self.latencies: list[float] = []
        self.errors: dict[str, int] = {}

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            start = time.perf_counter()
            try:
                await self.call()
            except grpc.aio.AioRpcError as exc:
                self.errors[exc.code().name] = self.errors.get(exc.code().name, 0) + 1
                continue
            self.latencies.append(time.perf_counter() - start)


async def _run_for(seconds: float, loops: list[Loop]) -> None:
    stop = asyncio.Event()
    tasks = [asyncio.create_task(loop.run(stop)) for loop in loops]
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.gather(*tasks)


async def _register(stub: auth_pb2_grpc.AuthServiceStub, name: str, address: str) -> None:
    await stub.Register(
        auth_pb2.RegisterRequest(username=name, password=PASSWORD), metadata=_from(address)
    )


async def logins_per_second(
    stub: auth_pb2_grpc.AuthServiceStub, auth: psutil.Process, seconds: float
) -> None:
    names = [f"ab-{uuid.uuid4().hex[:8]}" for _ in range(8)]
    for i, name in enumerate(names):
        await _register(stub, name, f"10.1.0.{i}")

    def login(i: int) -> Callable[[], Awaitable[Any]]:
        request = auth_pb2.LoginRequest(username=names[i], password=PASSWORD)
        return lambda: stub.Login(request, metadata=_from(f"10.2.0.{i}"))

    loops = [Loop(login(i)) for i in range(8)]
    cpu0 = sum(auth.cpu_times()[:2])
    peak = auth.memory_info().rss
    start = time.perf_counter()

    async def watch_rss() -> None:
        nonlocal peak
        while True:
            peak = max(peak, auth.memory_info().rss)
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch_rss())
    await _run_for(seconds, loops)
    watcher.cancel()
    elapsed = time.perf_counter() - start
    cpu = sum(auth.cpu_times()[:2]) - cpu0
    latencies = [t for loop in loops for t in loop.latencies]
    print(
        f"logins: {len(latencies) / elapsed:.1f}/s with 8 clients, auth CPU "
        f"{cpu / len(latencies) * 1000:.1f} ms per login, auth peak RSS {peak / 2**20:.0f} MiB;"
        f" latency {_ms(latencies)}"
    )


async def storm(stub: auth_pb2_grpc.AuthServiceStub, seconds: float, guessers: int) -> None:
    normal = f"ab-normal-{uuid.uuid4().hex[:6]}"
    await _register(stub, normal, "10.3.0.1")
    first = await stub.Login(
        auth_pb2.LoginRequest(username=normal, password=PASSWORD), metadata=_from("10.3.0.1")
    )
    refresh_token = first.refresh_token
    access = first.access_token

    async def refresh() -> None:
        nonlocal refresh_token, access
        pair = await stub.Refresh(auth_pb2.RefreshRequest(refresh_token=refresh_token))
        refresh_token, access = pair.refresh_token, pair.access_token

    counter = 0

    def guess(g: int) -> Callable[[], Awaitable[Any]]:
        async def one() -> None:
            nonlocal counter
            counter += 1
            address = f"172.{16 + g % 16}.{counter // 250 % 250}.{counter % 250}"
            request = auth_pb2.LoginRequest(username=f"victim-{counter}", password="guess-123")
            try:
                await stub.Login(request, metadata=_from(address))
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAUTHENTICATED:
                    raise

        return one

    fresh = 0

    async def login_from_new_address() -> None:
        nonlocal fresh
        fresh += 1
        address = f"10.5.{fresh // 250}.{fresh % 250}"
        await stub.Login(
            auth_pb2.LoginRequest(username=normal, password=PASSWORD), metadata=_from(address)
        )

    def probes() -> dict[str, Loop]:
        login = auth_pb2.LoginRequest(username=normal, password=PASSWORD)
        return {
            "Login (user, known address)": Loop(
                lambda: stub.Login(login, metadata=_from("10.3.0.1"))
            ),
            "Login (user, new address)": Loop(login_from_new_address),
            "GetJwks": Loop(lambda: stub.GetJwks(auth_pb2.GetJwksRequest())),
            "Refresh": Loop(refresh),
            "WhoAmI": Loop(lambda: stub.WhoAmI(auth_pb2.WhoAmIRequest(), metadata=_bearer(access))),
        }

    quiet = probes()
    await _run_for(seconds, list(quiet.values()))
    stormy = probes()
    attackers = [Loop(guess(g)) for g in range(guessers)]
    await _run_for(seconds, [*stormy.values(), *attackers])
    guesses = sum(len(a.latencies) for a in attackers)
    refused = {code: n for a in attackers for code, n in a.errors.items()}
    print(f"storm: {guessers} guessers made {guesses / seconds:.1f} guesses/s (refused: {refused})")
    for name in quiet:
        print(f"  {name:28} quiet: {_ms(quiet[name].latencies)}")
        print(f"  {'':28} storm: {_ms(stormy[name].latencies)} errors={stormy[name].errors}")


async def storm_from_one_address(stub: auth_pb2_grpc.AuthServiceStub, guessers: int) -> None:
    address = f"192.0.2.{uuid.uuid4().int % 250}"
    codes: dict[str, int] = {}
    start = time.perf_counter()
    first_refusal = None

    async def one(g: int) -> None:
        nonlocal first_refusal
        for n in range(20):
            request = auth_pb2.LoginRequest(username=f"v-{g}-{n}", password="guess-123")
            try:
                await stub.Login(request, metadata=_from(address))
            except grpc.aio.AioRpcError as exc:
                codes[exc.code().name] = codes.get(exc.code().name, 0) + 1
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and first_refusal is None:
                    first_refusal = time.perf_counter() - start

    await asyncio.gather(*(one(g) for g in range(guessers)))
    print(
        f"one-address storm: {guessers}x20 guesses -> {codes}; first refusal after "
        f"{(first_refusal or 0) * 1000:.0f} ms, all done in {time.perf_counter() - start:.2f} s"
    )


async def revocation_bound(
    auth: auth_pb2_grpc.AuthServiceStub, queue: queue_pb2_grpc.QueueServiceStub, rounds: int
) -> None:
    name = f"ab-rev-{uuid.uuid4().hex[:6]}"
    await _register(auth, name, "10.4.0.1")
    delays = []
    for _ in range(rounds):
        login = await auth.Login(
            auth_pb2.LoginRequest(username=name, password=PASSWORD), metadata=_from("10.4.0.1")
        )
        await queue.ListRequests(
            queue_pb2.ListRequestsRequest(page_size=1), metadata=_bearer(login.access_token)
        )
        await auth.Revoke(auth_pb2.RevokeRequest(refresh_token=login.refresh_token))
        revoked = time.perf_counter()
        while True:
            try:
                await queue.ListRequests(
                    queue_pb2.ListRequestsRequest(page_size=1),
                    metadata=_bearer(login.access_token),
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                    break
                raise
            await asyncio.sleep(0.02)
        delays.append(time.perf_counter() - revoked)
        # Start the next round at another point of the refetch cycle.
        await asyncio.sleep(1.3)
    print(
        f"revocation -> refused by the queue: max {max(delays):.2f} s, "
        f"median {statistics.median(delays):.2f} s over {rounds} revocations"
    )


async def user_creation(auth_target: str, auth: psutil.Process, users: int) -> None:
    config = BenchConfig(
        auth_target=auth_target, lanes=users, user_prefix=f"ab{uuid.uuid4().hex[:6]}"
    )
    cpu0 = sum(auth.cpu_times()[:2])
    start = time.perf_counter()
    await login_users(config)
    print(
        f"bench user creation: {users} new users registered and logged in in "
        f"{time.perf_counter() - start:.1f} s, auth CPU {sum(auth.cpu_times()[:2]) - cpu0:.1f} s"
    )


def _suite() -> tuple[str, str, int]:
    state = Path(os.environ.get("BENCH_STATE", "/tmp/fairlane-bench-suite"))
    env = dict(
        line.split("=", 1) for line in (state / "suite.env").read_text().split() if "=" in line
    )
    pid = int((state / "auth.pid").read_text())
    return f"127.0.0.1:{env['AUTH_PORT']}", f"127.0.0.1:{env['QUEUE_PORT']}", pid


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--guessers", type=int, default=16)
    parser.add_argument("--revocations", type=int, default=6)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--only-users", action="store_true", help="run phase 5 alone")
    args = parser.parse_args()
    auth_target, queue_target, pid = _suite()
    auth_process = psutil.Process(pid)
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
    if args.only_users:
        await user_creation(auth_target, auth_process, args.users)
        return
    async with (
        grpc.aio.insecure_channel(auth_target) as auth_channel,
        grpc.aio.insecure_channel(queue_target) as queue_channel,
    ):
        auth = auth_pb2_grpc.AuthServiceStub(auth_channel)
        queue = queue_pb2_grpc.QueueServiceStub(queue_channel)
        await logins_per_second(auth, auth_process, args.seconds)
        await storm(auth, args.seconds, args.guessers)
        await storm_from_one_address(auth, args.guessers)
        await revocation_bound(auth, queue, args.revocations)
    await user_creation(auth_target, auth_process, args.users)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
