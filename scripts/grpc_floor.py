"""The floor: a bare grpc.aio bidi-stream echo of the bench's shape, in messages/s.

The server (a child process, as a Fairlane service would be) echoes every message of every
stream back; the client opens `--streams` streams (default 50, the bench's lanes) and keeps
`--window` messages in flight on each (default 32), one message per request, like
`fairlane bench --no-batch`. No database, broker or auth: it is what gRPC in Python on this
machine does at this shape at best, so a throughput figure measured in the same run can be
given as a ratio to it.

    .venv/bin/python scripts/grpc_floor.py                      # 50 x 32, 10 s after 2 s
    .venv/bin/python scripts/grpc_floor.py --streams 1 --window 1 --duration 5 --json

Counts only echoes received inside the measured window (after the warm-up), and prints how
busy the whole machine was meanwhile (100 % = every CPU), since a loaded machine lowers it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import psutil

METHOD = "/floor.Echo/Stream"


async def _serve() -> None:
    async def echo(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        async for message in requests:
            yield message

    server = grpc.aio.server()
    # No protobuf on either side: the messages are the payload bytes themselves.
    handler = grpc.method_handlers_generic_handler(
        "floor.Echo", {"Stream": grpc.stream_stream_rpc_method_handler(echo)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)  # the parent reads the port from here
    await server.wait_for_termination()


class Counter:
    def __init__(self) -> None:
        self.received = 0
        self.measuring = False
        self.measured = 0


async def _stream(channel: grpc.aio.Channel, window: int, payload: bytes, c: Counter) -> None:
    call = channel.stream_stream(METHOD)()
    room = asyncio.Semaphore(window)

    async def send() -> None:
        while True:
            await room.acquire()
            await call.write(payload)

    sender = asyncio.create_task(send())
    try:
        while True:
            message = await call.read()
            if message is grpc.aio.EOF:
                return
            c.received += 1
            if c.measuring:
                c.measured += 1
            room.release()
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await sender
        call.cancel()


async def _drive(args: argparse.Namespace, port: int) -> dict[str, Any]:
    counter = Counter()
    payload = os.urandom(args.payload_bytes)
    # Streams spread over HTTP/2 connections as the bench spreads its lanes (100 a channel).
    channels = [
        grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
        )
        for _ in range(max(1, -(-args.streams // 100)))
    ]
    tasks = [
        asyncio.create_task(_stream(channels[i % len(channels)], args.window, payload, counter))
        for i in range(args.streams)
    ]
    await asyncio.sleep(args.warmup)
    psutil.cpu_percent()  # starts the machine's busy measurement
    load_before = os.getloadavg()[0]
    counter.measuring = True
    started = time.perf_counter()
    await asyncio.sleep(args.duration)
    counter.measuring = False
    elapsed = time.perf_counter() - started
    busy = psutil.cpu_percent()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for ch in channels:
        await ch.close()
    return {
        "streams": args.streams,
        "window": args.window,
        "payload_bytes": args.payload_bytes,
        "duration_s": round(elapsed, 3),
        "messages": counter.measured,
        "messages_per_s": round(counter.measured / elapsed, 1),
        "machine_busy_percent": busy,
        "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "cpu_count": psutil.cpu_count(),
    }


def _loop_runner() -> Any:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        return asyncio.run
    return uvloop.run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=50, help="bidi streams (bench: lanes)")
    parser.add_argument("--window", type=int, default=32, help="messages in flight per stream")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    parser.add_argument("--payload-bytes", type=int, default=16)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    run = _loop_runner()
    if args.serve:
        run(_serve())
        return
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        if not line.strip().isdigit():
            sys.exit("the echo server did not start")
        report = run(_drive(args, int(line)))
    finally:
        server.terminate()
        server.wait(timeout=10)
    if args.json:
        print(json.dumps(report))
    else:
        print(
            f"grpc floor: {report['messages_per_s']:,.1f} messages/s "
            f"({args.streams} streams x {args.window} in flight, {report['duration_s']} s, "
            f"{args.payload_bytes} B); machine busy {report['machine_busy_percent']} % "
            f"of {report['cpu_count']} CPUs, load {report['load_average_1m'][0]}"
            f" -> {report['load_average_1m'][1]}"
        )


if __name__ == "__main__":
    main()
