"""What idle WatchResults streams cost the queue: N watchers open and silent, the queue's
CPU measured over a window, then other users' Enqueue latency while they stay open, then
proof that every watcher is still live (one result reaches each of them).

    scripts/bench_suite.sh up
    .venv/bin/python scripts/idle_watchers.py \\
        --queue-pid "$(cat /tmp/fairlane-bench-suite/queue.pid)" \\
        --auth-target 127.0.0.1:56051 --queue-target 127.0.0.1:56052 --watchers 1000
    scripts/bench_suite.sh down

Watchers are spread over `--users` users (a user may hold 32 streams at once). The
queue's CPU is read from the process (psutil), so run it on the machine that runs the queue.
Prints one JSON report; exit code 0 when every watcher got its result and the probe's
enqueues all succeeded, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time

import psutil

from fairlane.client import AlreadyExists, Client, NotFound, Tokens


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def rss_mib(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss) / 2**20


class Watchers:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.clients: list[Client] = []
        self.received: list[int] = []  # results seen, per watcher
        self.broken = 0
        self.waiting = args.watchers  # watchers yet to see a result
        self.all_reached = asyncio.Event()

    def _client(self, tokens: Tokens | None = None) -> Client:
        return Client(self.args.auth_target, self.args.queue_target, tokens=tokens)

    async def _login(self, name: str, gate: asyncio.Semaphore) -> Tokens:
        # Register first: a login of an unknown user is a failed login, and failures from
        # one address are throttled.
        async with gate, self._client() as client:
            with contextlib.suppress(AlreadyExists):
                await client.register(name, self.args.password)
            return await client.login(name, self.args.password)

    async def _watch(self, client: Client, index: int, after: int) -> None:
        try:
            async for _ in client.watch(after, reconnect=False):
                self.received[index] += 1
                if self.received[index] == 1:
                    self.waiting -= 1
                    if not self.waiting:
                        self.all_reached.set()
        except Exception:
            self.broken += 1

    async def run(self) -> dict[str, object]:
        args = self.args
        gate = asyncio.Semaphore(8)
        names = [f"{args.user_prefix}-{i}" for i in range(args.users)]
        tokens = await asyncio.gather(*(self._login(n, gate) for n in names))
        self.clients = [self._client(t) for t in tokens]
        # Where each lane stands, so a watcher sees only the result sent at the end.
        after = []
        for client in self.clients:
            try:
                after.append((await client.lane()).last_lane_seq)
            except NotFound:  # no lane yet
                after.append(0)
        self.received = [0] * args.watchers
        tasks = [
            asyncio.create_task(self._watch(self.clients[i % args.users], i, after[i % args.users]))
            for i in range(args.watchers)
        ]
        # Streams open lazily; let them reach the server and the first catch-up read end.
        await asyncio.sleep(args.settle)
        cpu_before, wall_before = cpu_seconds(args.queue_pid), time.monotonic()
        await asyncio.sleep(args.duration)
        cpu = cpu_seconds(args.queue_pid) - cpu_before
        wall = time.monotonic() - wall_before
        idle_broken = self.broken

        # Other users' enqueues while the watchers stay open.
        probe = self._client(await self._login(f"{args.user_prefix}-probe", gate))
        latencies = []
        failed = 0
        for _ in range(args.probes):
            started = time.perf_counter()
            try:
                await probe.enqueue("noop", b"", timeout=10)
                latencies.append(1000 * (time.perf_counter() - started))
            except Exception:
                failed += 1
        # One result per watched user: every watcher of that user must see it.
        for client in self.clients:
            await client.enqueue("noop", b"", timeout=10)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.all_reached.wait(), args.result_timeout)
        reached = sum(1 for n in self.received if n > 0)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for client in [*self.clients, probe]:
            await client.close()
        latencies.sort()
        report: dict[str, object] = {
            "valid": reached == args.watchers and failed == 0 and idle_broken == 0,
            "watchers": args.watchers,
            "users": args.users,
            "queue_cpu_percent_of_a_core": round(100 * cpu / wall, 2),
            "queue_rss_mib": round(rss_mib(args.queue_pid), 1),
            "window_s": round(wall, 1),
            "broken_while_idle": idle_broken,
            "watchers_that_got_their_result": reached,
            "probe_enqueues": len(latencies),
            "probe_failed": failed,
            "probe_ms": {
                "p50": round(statistics.median(latencies), 1) if latencies else None,
                "p99": round(latencies[int(0.99 * (len(latencies) - 1))], 1) if latencies else None,
                "max": round(latencies[-1], 1) if latencies else None,
            },
        }
        return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--auth-target", default="127.0.0.1:56051")
    parser.add_argument("--queue-target", default="127.0.0.1:56052")
    parser.add_argument("--queue-pid", type=int, required=True)
    parser.add_argument("--watchers", type=int, default=1000)
    parser.add_argument("--users", type=int, default=100, help="watchers are spread over them")
    parser.add_argument("--duration", type=float, default=30.0, help="measured idle seconds")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds before measuring")
    parser.add_argument("--probes", type=int, default=200, help="other users' enqueues")
    parser.add_argument("--result-timeout", type=float, default=30.0)
    parser.add_argument("--user-prefix", default="watcher")
    parser.add_argument("--password", default="fairlane-bench-password")
    args = parser.parse_args()
    if args.watchers > 32 * args.users:
        parser.error("a user holds at most 32 streams: raise --users")
    report = asyncio.run(Watchers(args).run())
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0 if report["valid"] else 1


if __name__ == "__main__":
    sys.exit(main())
