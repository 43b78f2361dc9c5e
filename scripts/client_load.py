"""Load through the Python client: L users, one fairlane.client Session each, W in flight.

The counterpart of `fairlane bench`, which drives raw gRPC stubs: the same shape (lanes x
window, noop handler, warm-up then a measured window) and the same headline figure
(results received inside the measured window per second), so the client's own cost shows
as the difference between the two in one suite:

    scripts/bench_suite.sh up
    scripts/bench_suite.sh bench --lanes 50 --window 32 --duration 10
    .venv/bin/python scripts/client_load.py --auth-target 127.0.0.1:56051 \\
        --queue-target 127.0.0.1:56052 --lanes 50 --window 32 --duration 10
    scripts/bench_suite.sh down

It logs in as the bench's users (registering missing ones) and checks what a client can
see: every request accepted and SUCCEEDED, each lane's results in submit order with no
lane_seq gap. Prints one JSON report; exit code 0 for a valid run, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import sys
import time
from dataclasses import asdict, dataclass

from fairlane.client import AlreadyExists, Client, SubmitFuture, Tokens, Unauthenticated


@dataclass
class Lane:
    sent: int = 0
    results: int = 0
    not_succeeded: int = 0  # rejected, lost with the stream, or finished otherwise
    out_of_order: int = 0
    last_lane_seq: int = 0


class LoadRun:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.lanes = [Lane() for _ in range(args.lanes)]
        self.measured = 0
        self.warm_end = self.send_end = 0.0
        self.cpu_seconds = 0.0  # this process's CPU time inside the measured window

    def _client(self, tokens: Tokens | None = None) -> Client:
        return Client(self.args.auth_target, self.args.queue_target, tokens=tokens)

    async def _login(self, index: int, gate: asyncio.Semaphore) -> Tokens:
        name, password = f"{self.args.user_prefix}-{index}", self.args.password
        async with gate, self._client() as client:
            try:
                return await client.login(name, password)
            except Unauthenticated:
                with contextlib.suppress(AlreadyExists):
                    await client.register(name, password)
                return await client.login(name, password)

    def _finished(self, lane: Lane, future: SubmitFuture) -> None:
        now = time.perf_counter()
        if future.cancelled() or future.exception() is not None:
            lane.not_succeeded += 1
            return
        result = future.result()
        lane.results += 1
        lane.not_succeeded += not result.ok
        if lane.last_lane_seq and result.lane_seq != lane.last_lane_seq + 1:
            lane.out_of_order += 1
        lane.last_lane_seq = result.lane_seq
        if self.warm_end <= now <= self.send_end:
            self.measured += 1

    async def _drive(self, lane: Lane, tokens: Tokens) -> None:
        payload = b"x" * self.args.payload_bytes
        async with (
            self._client(tokens) as client,
            client.session(max_in_flight=self.args.window, record_events=False) as session,
        ):
            while time.perf_counter() < self.send_end:
                future = await session.submit(self.args.handler, payload)
                lane.sent += 1
                future.add_done_callback(functools.partial(self._finished, lane))
        await asyncio.sleep(0)  # the last done-callbacks

    async def _clock_cpu(self) -> None:
        await asyncio.sleep(self.warm_end - time.perf_counter())
        started = time.process_time()
        await asyncio.sleep(self.send_end - time.perf_counter())
        self.cpu_seconds = time.process_time() - started

    async def run(self) -> dict[str, object]:
        gate = asyncio.Semaphore(8)
        tokens = await asyncio.gather(*(self._login(i, gate) for i in range(self.args.lanes)))
        start = time.perf_counter()
        self.warm_end = start + self.args.warmup
        self.send_end = self.warm_end + self.args.duration
        await asyncio.gather(
            self._clock_cpu(),
            *(self._drive(lane, t) for lane, t in zip(self.lanes, tokens, strict=True)),
        )
        counts = {
            key: sum(getattr(lane, key) for lane in self.lanes)
            for key in ("sent", "results", "not_succeeded", "out_of_order")
        }
        lost = counts["sent"] - counts["results"]
        return {
            "valid": lost == 0 and counts["not_succeeded"] == 0 and counts["out_of_order"] == 0,
            "results_per_s": round(self.measured / self.args.duration, 1),
            "results_in_window": self.measured,
            "client_cpu_us_per_result": round(1e6 * self.cpu_seconds / max(self.measured, 1)),
            "counts": counts | {"lost": lost},
            "config": {k: v for k, v in vars(self.args).items() if k != "password"},
            "lanes": [asdict(lane) for lane in self.lanes] if self.args.per_lane else None,
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--auth-target", default="127.0.0.1:56051")
    parser.add_argument("--queue-target", default="127.0.0.1:56052")
    parser.add_argument("--lanes", type=int, default=50)
    parser.add_argument("--window", type=int, default=32, help="requests in flight per lane")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--handler", default="noop")
    parser.add_argument("--payload-bytes", type=int, default=0)
    parser.add_argument("--user-prefix", default="bench")
    parser.add_argument("--password", default="fairlane-bench-password")
    parser.add_argument("--per-lane", action="store_true", help="add per-lane counts")
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - platforms without uvloop
        report = asyncio.run(LoadRun(args).run())
    else:  # the same loop as `fairlane bench`, so the two compare like for like
        report = uvloop.run(LoadRun(args).run())
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0 if report["valid"] else 1


if __name__ == "__main__":
    sys.exit(main())
