"""How fast a busy grpc.aio server takes new RPCs: unary calls/s against event-loop lag.

A grpc.aio server (a child process) serves grpc.health.v1 while `--busy` tasks keep its
event loop occupied, each computing for 0.1 ms and then yielding, so that one turn of the
loop takes about `busy` x 0.1 ms, as in a service handling many streams. The client sends
`--calls` health checks at once over one channel and reports how many the server answered
per second, and one check alone before them.

    .venv/bin/python scripts/grpc_accept.py                 # --busy 0, 10 and 50
    .venv/bin/python scripts/grpc_accept.py --busy 50 --calls 300

grpc.aio takes each new call of a method only after the previous one has been handed to
its task, several turns of the loop later, so new calls are taken one after another at a
rate set by how long a turn lasts, however idle the CPU. Session streams pay this once
per stream; unary calls (and health checks) pay it every time.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import time
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

PORT = 50_871
TURN_WORK_SECONDS = 0.0001


def _compute(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


async def _serve(busy: int, ready: Any) -> None:
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    server.add_insecure_port(f"127.0.0.1:{PORT}")
    await server.start()

    async def occupy() -> None:
        while True:
            _compute(TURN_WORK_SECONDS)
            await asyncio.sleep(0)

    tasks = [asyncio.create_task(occupy()) for _ in range(busy)]
    ready.set()
    await server.wait_for_termination()
    for task in tasks:
        task.cancel()


def _server_process(busy: int, ready: Any) -> None:
    asyncio.run(_serve(busy, ready))


async def _measure(calls: int) -> tuple[float, float]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{PORT}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest()
        await stub.Check(request, timeout=60)  # connected
        started = time.perf_counter()
        await stub.Check(request, timeout=60)
        alone = time.perf_counter() - started
        started = time.perf_counter()
        await asyncio.gather(*(stub.Check(request, timeout=120) for _ in range(calls)))
        return alone, calls / (time.perf_counter() - started)


def run(busy: int, calls: int) -> None:
    ready = multiprocessing.Event()
    server = multiprocessing.Process(target=_server_process, args=(busy, ready), daemon=True)
    server.start()
    try:
        if not ready.wait(30):
            raise SystemExit("the server did not start")
        alone, rate = asyncio.run(_measure(calls))
    finally:
        server.terminate()
        server.join(10)
    print(
        f"busy {busy:3d} (a turn of its loop ~{busy * TURN_WORK_SECONDS * 1000:.1f} ms): "
        f"one check {alone * 1000:.1f} ms, {calls} at once {rate:,.0f} calls/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--busy", type=int, action="append", help="tasks keeping the loop busy")
    parser.add_argument("--calls", type=int, default=300, help="health checks sent at once")
    args = parser.parse_args()
    for busy in args.busy or [0, 10, 50]:
        run(busy, args.calls)


if __name__ == "__main__":
    main()
