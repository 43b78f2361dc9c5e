"""Drives the suite: L users, one Session each, up to W requests in flight per lane."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc

from fairlane.auth.v1 import auth_pb2, auth_pb2_grpc
from fairlane.client.channels import grpc_target
from fairlane.common.v1 import common_pb2
from fairlane.queue.v1 import queue_pb2, queue_pb2_grpc
from fairlane_server.bench.procs import ProcessWatch, addresses
from fairlane_server.bench.stages import StageWatch
from fairlane_server.bench.stats import LaneRecord, summarize
from fairlane_server.core.tasks import wait_event

CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
STATUS_PREFIX = "REQUEST_STATUS_"
MAX_SEND_BATCH = 256  # enqueues per enqueue_batch message
# A Session that breaks with one of these (its queue replica died or restarted) is resumed:
# its results are collected from WatchResults on a live replica, like the Python client.
RESUMABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})
STARTING_LANES = 500
RETRIED_READS = frozenset({grpc.StatusCode.UNAVAILABLE})
MAX_RESUMES_WITHOUT_PROGRESS = 3
LIST_PAGE = 500
ROUND_ROBIN = ("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]}))


class _ResumeFailed(Exception):
    """The results of a broken Session could not be collected elsewhere."""


class BenchSetupError(Exception):
    """The run could not start (unreachable target, bad credentials, ...)."""


@dataclass
class BenchConfig:
    target: str = "127.0.0.1:50052"
    auth_target: str = "127.0.0.1:50051"
    lanes: int = 10
    requests: int | None = None  # total over all lanes, after the warm-up
    duration: float | None = None  # seconds after the warm-up
    window: int = 32
    rate: float = 0.0  # cap on requests sent per second over all lanes; 0: no cap
    batch: bool = True  # ready requests go out together as one enqueue_batch message
    handler: str = "noop"
    payload_bytes: int = 0
    sleep_seconds: float = 0.01
    warmup: float = 2.0
    user_prefix: str = "bench"
    password: str = "fairlane-bench-password"
    channels: int = 0  # 0: one per 100 lanes
    drain_timeout: float = 30.0
    login_concurrency: int = 8
    pids: list[int] = field(default_factory=list)
    worker_targets: list[str] = field(default_factory=list)
    backends: bool = True
    database_url: str = ""
    database_schema: str = ""
    metrics: list[str] = field(default_factory=list)  # /metrics URLs of the services
    # TLS (all empty: plaintext): PEM files of the CA, and of a client certificate for
    # servers that require one (mTLS).
    ca_file: str = ""
    client_cert: str = ""
    client_key: str = ""

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not (self.ca_file or self.client_cert):
            return None

        def read(path: str) -> bytes | None:
            return Path(path).read_bytes() if path else None

        return grpc.ssl_channel_credentials(
            read(self.ca_file), read(self.client_key), read(self.client_cert)
        )

    def payload(self) -> bytes:
        if self.handler == "sleep":
            return f"{self.sleep_seconds:g}".encode()
        return b"x" * self.payload_bytes

    def channel_count(self) -> int:
        return self.channels or max(1, math.ceil(self.lanes / 100))


@dataclass
class RunProgress:
    """Live figures for the progress display."""

    phase: str = "login"
    started: float = 0.0
    sent: int = 0
    results: int = 0
    rejected: int = 0
    in_flight: int = 0
    total: float | None = None  # requests to send in the measured phase, or seconds


def _bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def _open(
    target: str, credentials: grpc.ChannelCredentials | None, options: list[tuple[str, Any]]
) -> grpc.aio.Channel:
    if credentials is None:
        return grpc.aio.insecure_channel(grpc_target(target), options=options)
    return grpc.aio.secure_channel(grpc_target(target), credentials, options=options)


def _channel(
    target: str, index: int, credentials: grpc.ChannelCredentials | None
) -> grpc.aio.Channel:
    """A channel to the queue: one replica, IP:port,IP:port or dns:///name:port; with
    several, each Session goes to the next live replica (round robin)."""
    # A local subchannel pool gives every channel its own HTTP/2 connections.
    return _open(
        target,
        credentials,
        [
            ("grpc.use_local_subchannel_pool", 1),
            ("grpc.bench_channel_index", index),
            ("grpc.max_receive_message_length", 16 * 1024 * 1024),
            ("grpc.max_send_message_length", 16 * 1024 * 1024),
            ROUND_ROBIN,
        ],
    )


async def login_users(config: BenchConfig) -> list[tuple[str, str, str]]:
    """(username, user_id, access token) for bench users 0..L-1, registering missing ones."""
    gate = asyncio.Semaphore(config.login_concurrency)
    async with _open(config.auth_target, config.credentials(), [ROUND_ROBIN]) as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)

        async def register(name: str) -> None:
            try:
                await stub.Register(
                    auth_pb2.RegisterRequest(username=name, password=config.password),
                    timeout=30,
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise BenchSetupError(
                        f"auth refused to register {name}: {exc.details()} (registrations "
                        "per address are throttled; raise FAIRLANE_REGISTER_PEER_FREE on "
                        "the auth service, or reuse users with --user-prefix)"
                    ) from None
                if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                    raise

        async def login(name: str) -> auth_pb2.LoginResponse:
            return await stub.Login(  # type: ignore[no-any-return]
                auth_pb2.LoginRequest(username=name, password=config.password), timeout=30
            )

        # Auth throttles failed logins and registrations per address. When the last user
        # exists (a rerun), the others most likely do too: log in first and register only
        # the missing. Otherwise register first: a taken name costs auth no hash.
        last: auth_pb2.LoginResponse | None = None

        async def probe() -> None:
            nonlocal last
            try:
                last = await login(f"{config.user_prefix}-{config.lanes - 1}")
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAUTHENTICATED:
                    raise

        async def one(i: int) -> tuple[str, str, str]:
            name = f"{config.user_prefix}-{i}"
            async with gate:
                try:
                    if i == config.lanes - 1 and last is not None:
                        pair = last
                    elif last is not None:
                        try:
                            pair = await login(name)
                        except grpc.aio.AioRpcError as exc:
                            if exc.code() != grpc.StatusCode.UNAUTHENTICATED:
                                raise
                            await register(name)
                            pair = await login(name)
                    else:
                        await register(name)
                        pair = await login(name)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                        raise BenchSetupError(
                            f"user {name} exists with another password "
                            "(use --password or --user-prefix)"
                        ) from None
                    raise
                who = await stub.WhoAmI(
                    auth_pb2.WhoAmIRequest(), metadata=_bearer(pair.access_token), timeout=30
                )
            return name, who.user_id, pair.access_token

        try:
            await probe()
            return list(await asyncio.gather(*(one(i) for i in range(config.lanes))))
        except grpc.aio.AioRpcError as exc:
            raise BenchSetupError(
                f"auth at {config.auth_target}: {exc.code().name}: {exc.details()}"
            ) from None


class BenchRun:
    """One run. `await run()` returns the report as a plain dict (see `report`)."""

    def __init__(
        self, config: BenchConfig, on_tick: Callable[[RunProgress], None] | None = None
    ) -> None:
        self.config = config
        self.on_tick = on_tick
        self.run_tag = f"b{secrets.token_hex(5)}"
        self.progress = RunProgress()
        self.lanes: list[LaneRecord] = []
        self.accept_latency: list[float] = []
        self.result_latency: list[float] = []
        self.queue_latency: list[float] = []
        self.output_mismatches = 0
        self.watch = ProcessWatch()
        self.stages = StageWatch(config.metrics)
        self.budget: int | None = config.requests
        # --requests: each lane's share of it, left to send. One budget drawn from by all
        # lanes let the first lanes take it all and the last ones send nothing.
        self.quotas: list[int] | None = None
        self.t_start = 0.0
        self.t_warm_planned = 0.0
        # Measuring begins after the warm-up and once every lane has had its first answer
        # (see _ticker): until then, inf.
        self.t_warm_end = math.inf
        self.t_lanes_started: float | None = None
        self.lanes_started_when_measuring = 0
        self.t_send_end = math.inf
        self.t_measure_end = 0.0
        self._stages_stop: asyncio.Task[None] | None = None
        self.t_done = 0.0
        self.measured_results = 0
        self.last_result_at = 0.0
        self.last_activity = 0.0
        self.stalled = False
        self.payload = config.payload()
        self.check_echo = config.handler == "echo"
        self.next_slot = 0.0  # --rate: when the next request may be sent
        # Lanes ask for their lane's state a few hundred at a time, as clients that back
        # off would: 10,000 first calls at once kept one queue replica on two cores busy
        # past their deadline.
        self.starting = asyncio.Semaphore(STARTING_LANES)
        # Lanes whose first Session the queue has taken (or that failed before): all of them
        # begin sending together, once every lane is open (see _open_together).
        self._open: set[int] = set()
        self._all_open = asyncio.Event()

    # -- the run ------------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        config = self.config
        if (config.requests is None) == (config.duration is None):
            raise BenchSetupError("give exactly one of --requests and --duration")
        if config.requests is not None:
            if config.requests < config.lanes:
                raise BenchSetupError("--requests must be at least --lanes (a share per lane)")
            share, extra = divmod(config.requests, config.lanes)
            self.quotas = [share + (1 if i < extra else 0) for i in range(config.lanes)]
        queues = addresses(config.target)
        self.watch.discover(
            {f"auth{i or ''}": a for i, a in enumerate(addresses(config.auth_target))}
            | {f"queue{i or ''}": a for i, a in enumerate(queues)}
            | {f"worker{i or ''}": t for i, t in enumerate(config.worker_targets)},
            config.pids,
            follow_clients_of=queues,
        )
        if config.backends:
            self.watch.add_backends()
        self._tick()
        users = await login_users(config)
        for i, (name, user_id, _) in enumerate(users):
            self.lanes.append(
                LaneRecord(index=i, username=name, user_id=user_id, prefix=f"{self.run_tag}.{i}.")
            )
        credentials = config.credentials()
        channels = [_channel(config.target, i, credentials) for i in range(config.channel_count())]
        try:
            await self._drive(channels, [token for _, _, token in users])
        finally:
            await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)
        report = self.report()
        if config.database_url:
            from fairlane_server.bench.dbcheck import compare, request_log_counts

            try:
                counts = await request_log_counts(
                    config.database_url, config.database_schema, self.run_tag
                )
            except Exception as exc:
                report["database"] = {"checked": False, "error": repr(exc), "ok": False}
            else:
                report["database"] = compare(counts, report["lanes"])
            if not report["database"]["ok"]:
                report["valid"] = False
                report["invalid_reasons"].append("request log does not match results")
        return report

    async def _drive(self, channels: list[grpc.aio.Channel], tokens: list[str]) -> None:
        config = self.config
        self.t_start = time.perf_counter()
        self.progress.started = self.t_start
        self.t_warm_planned = self.t_start + config.warmup
        if config.duration is not None:
            self.progress.total = config.warmup + config.duration
        else:
            self.progress.total = config.requests
        self.last_activity = self.t_start
        self.progress.phase = "warm-up"
        if config.warmup <= 0:
            # No warm-up: the lanes' start is part of what is measured (new-lane runs).
            await self._start_measuring(self.t_start)
        tasks = [
            asyncio.create_task(self._lane(lane, channels[lane.index % len(channels)], token))
            for lane, token in zip(self.lanes, tokens, strict=True)
        ]
        ticker = asyncio.create_task(self._ticker(tasks))
        try:
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)
        self.t_done = time.perf_counter()
        if math.isinf(self.t_warm_end):  # ended before measuring began (lanes that failed)
            self.t_warm_end = self.t_done
        if self._stages_stop is not None:
            await self._stages_stop
        if config.duration is None or self.t_measure_end == 0.0:
            # --requests (or a run that ended early): measured up to the last result.
            self.t_measure_end = max(self.last_result_at, self.t_warm_end)
            self.watch.stop()
            await self.stages.stop()
        self.progress.phase = "done"
        self._tick()

    async def _ticker(self, tasks: list[asyncio.Task[None]]) -> None:
        """Phase changes, RSS samples, progress updates and the stall guard."""
        next_rss = 0.0
        while True:
            await asyncio.sleep(0.2)
            now = time.perf_counter()
            if self.t_lanes_started is None and self._started_lanes() == len(self.lanes):
                self.t_lanes_started = now
            if (
                self.progress.phase == "warm-up"
                and now >= self.t_warm_planned
                and (
                    self.t_lanes_started is not None
                    or now >= self.t_warm_planned + self.config.drain_timeout
                )
            ):
                await self._start_measuring(now)
            if self.progress.phase == "measuring" and now >= self.t_send_end:
                self.progress.phase = "draining"
                self.t_measure_end = self.t_send_end
                self.watch.stop()
                # A task of its own: this ticker is cancelled as soon as the last lane has
                # drained, which at high rates comes while the services are still being
                # scraped, and the run's stage figures were lost with it.
                self._stages_stop = asyncio.create_task(self.stages.stop())
            if self.progress.phase == "measuring" and self.budget is not None and self.budget <= 0:
                self.progress.phase = "draining"
            if now >= next_rss:
                self.watch.sample_rss()
                next_rss = now + 1.0
            self.progress.in_flight = sum(lane.in_flight for lane in self.lanes)
            self._tick()
            if self.progress.in_flight and now - self.last_activity > self.config.drain_timeout:
                self.stalled = True
                for task in tasks:
                    task.cancel()
                return

    def _started_lanes(self) -> int:
        """Lanes whose Session has had an answer (or that failed): a lane still waiting
        for its first answer is not running yet. Many lanes at once take seconds to open
        their Sessions on a busy queue, and a rate measured before then is not the rate
        of that many lanes."""
        return sum(1 for lane in self.lanes if lane.answered or lane.stream_error)

    async def _start_measuring(self, now: float) -> None:
        self.progress.phase = "measuring"
        self.t_warm_end = now
        if self.config.duration is not None:
            self.t_send_end = now + self.config.duration
        self.lanes_started_when_measuring = self._started_lanes()
        self.watch.start()
        await self.stages.start()

    def _tick(self) -> None:
        if self.on_tick is not None:
            self.on_tick(self.progress)

    async def _lane(self, lane: LaneRecord, channel: grpc.aio.Channel, token: str) -> None:
        stub = queue_pb2_grpc.QueueServiceStub(channel)
        try:
            async with self.starting:
                lane.last_lane_seq = await self._lane_seq_now(stub, token)
        except grpc.aio.AioRpcError as exc:
            lane.stream_error = f"{exc.code().name}: {exc.details()}"
            self._lane_open(lane)
            return
        except asyncio.CancelledError:
            lane.stream_error = "stalled: cancelled by the drain timeout"
            self._lane_open(lane)
            return
        fruitless = 0
        while True:
            broke = await self._session(lane, stub, token)
            if broke is None:
                return
            # A lane that never had an answer (its Session went to a replica that died under
            # it) is opened again too, as a client would; a target that never answers is no
            # run, so only a few times without progress, with a short backoff.
            if fruitless >= MAX_RESUMES_WITHOUT_PROGRESS:
                lane.stream_error = f"{broke.code().name}: {broke.details()}"
                return
            before = lane.results
            try:
                if not lane.answered:
                    await asyncio.sleep(random.uniform(0.05, 0.2 * 2**fruitless))
                await self._resume(lane, stub, token)
            except _ResumeFailed as exc:
                lane.stream_error = f"{broke.code().name}: {broke.details()}; {exc}"
                return
            except asyncio.CancelledError:
                lane.stream_error = "stalled: cancelled by the drain timeout while resuming"
                return
            lane.resumes += 1
            fruitless = 0 if lane.results > before else fruitless + 1
            if not self._sending:
                return

    @property
    def _sending(self) -> bool:
        return self.progress.phase in ("warm-up", "measuring")

    async def _lane_seq_now(self, stub: Any, token: str) -> int:
        """The lane's newest lane_seq before this run: results after it are this run's.

        One call may take the whole drain timeout: a queue busy with the lanes that have
        started takes new calls slowly (thousands of lanes start at once), and a call given
        up on still waits in the server's line and takes its turn there, so asking again
        on a deadline only lengthens that line for every lane behind it. Asked again only
        while the queue is unavailable, for up to the drain timeout."""
        give_up = time.perf_counter() + self.config.drain_timeout
        while True:
            try:
                reply = await stub.GetLane(
                    queue_pb2.GetLaneRequest(),
                    metadata=_bearer(token),
                    timeout=max(1.0, give_up - time.perf_counter()),
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    return 0  # a new user: no lane yet
                if exc.code() not in RETRIED_READS or time.perf_counter() > give_up:
                    raise
                await asyncio.sleep(random.uniform(0.1, 1.0))
                continue
            return int(reply.lane.last_lane_seq)

    async def _session(
        self, lane: LaneRecord, stub: Any, token: str
    ) -> grpc.aio.AioRpcError | None:
        """One Session until it ends; returns the error if it broke in a resumable way."""
        call = stub.Session(metadata=_bearer(token))
        window = asyncio.Semaphore(self.config.window)
        pause = [0.0]  # send nothing before this instant (after a rejection with retry_after)
        sender: asyncio.Task[None] | None = None
        try:
            # Runs without a warm-up measure the lanes' start (new lanes): each lane sends
            # as soon as its Session is open, and no more Sessions are open at once than
            # that takes (10,000 held open together took the queue to 767 MB).
            if self.config.warmup > 0 and lane.index not in self._open:
                await self._open_together(lane, call)
            sender = asyncio.create_task(self._send(lane, call, window, pause))
            await self._read(lane, call, window, pause)
            failed = sender.exception() if sender.done() and not sender.cancelled() else None
            if failed is not None:
                raise failed
        except grpc.aio.AioRpcError as exc:
            if exc.code() in RESUMABLE:
                return exc
            lane.stream_error = f"{exc.code().name}: {exc.details()}"
        except asyncio.CancelledError:
            lane.stream_error = lane.stream_error or "stalled: cancelled by the drain timeout"
            call.cancel()
        finally:
            if sender is not None:
                sender.cancel()
                await asyncio.gather(sender, return_exceptions=True)
        return None

    async def _open_together(self, lane: LaneRecord, call: Any) -> None:
        """Waits until the queue has taken this lane's Session (it then sends its initial
        metadata), then until every lane's is, up to the drain timeout from the start.

        A queue busy with lanes that send takes new calls slowly (a few turns of its event
        loop each: docs/scaling.md, Probes), so lanes that began sending as soon as they
        were open kept the queue from taking the others' calls: the last of 1,000 lanes
        waited up to 226 s for their first call, and some gave up. Opened on an idle queue,
        they all are within seconds, and the run measures them all from the start."""
        try:
            # A refusal ends the call; its status is read below, as any other error.
            with contextlib.suppress(grpc.aio.AioRpcError):
                await call.initial_metadata()
        finally:
            self._lane_open(lane)
        remaining = self.t_start + self.config.drain_timeout - time.perf_counter()
        await wait_event(self._all_open, max(0.0, remaining))

    def _lane_open(self, lane: LaneRecord) -> None:
        self._open.add(lane.index)
        if len(self._open) == len(self.lanes):
            self._all_open.set()

    async def _resume(self, lane: LaneRecord, stub: Any, token: str) -> None:
        """The Session broke. Requests it accepted are in the log, so their results are
        collected from WatchResults (on whichever replica the channel reaches now).
        Requests it sent but never answered may or may not have been accepted: the log
        says which (ListRequests), and the accepted ones' results are collected too."""
        self.last_activity = time.perf_counter()
        unanswered = lane.unanswered_refs()
        if unanswered:
            found = await self._retrying(
                lambda: self._accepted_in_log(lane, stub, token, unanswered)
            )
            now = time.perf_counter()
            for i in sorted(unanswered):
                lane.on_answer(i)
                if i in found:
                    lane.accepted_at[i] = now
                    lane.accepted_by_log += 1
                else:
                    lane.never_accepted.add(i)
                    lane.done.add(i)
                    lane.in_flight -= 1
        if lane.waiting():
            await self._retrying(lambda: self._watch(lane, stub, token))

    async def _retrying(self, attempt: Callable[[], Any]) -> Any:
        """Calls `attempt` until it works, while replicas are UNAVAILABLE, for up to the
        drain timeout."""
        deadline = time.perf_counter() + self.config.drain_timeout
        delay = 0.1
        while True:
            try:
                return await attempt()
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RESUMABLE or time.perf_counter() + delay > deadline:
                    raise _ResumeFailed(
                        f"resume failed: {exc.code().name}: {exc.details()}"
                    ) from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _accepted_in_log(
        self, lane: LaneRecord, stub: Any, token: str, refs: set[int]
    ) -> set[int]:
        """Which of `refs` the request log holds, newest first (they are the newest)."""
        found: set[int] = set()
        oldest = min(refs)
        page = ""
        while True:
            reply = await stub.ListRequests(
                queue_pb2.ListRequestsRequest(page_size=LIST_PAGE, page_token=page),
                metadata=_bearer(token),
                timeout=30,
            )
            for request in reply.requests:
                i = lane.parse_ref(request.client_ref)
                if i is None:
                    continue
                if i in refs:
                    found.add(i)
                if i < oldest:
                    return found  # older than every request in question
            if not reply.next_page_token or found == refs:
                return found
            page = reply.next_page_token

    async def _watch(self, lane: LaneRecord, stub: Any, token: str) -> None:
        call = stub.WatchResults(
            queue_pb2.WatchResultsRequest(after_lane_seq=lane.last_lane_seq),
            metadata=_bearer(token),
        )
        try:
            async for reply in call:
                now = time.perf_counter()
                self.last_activity = now
                self._on_result(lane, reply.result, now, None)
                if not lane.waiting():
                    return
        finally:
            call.cancel()

    async def _send(
        self,
        lane: LaneRecord,
        call: Any,
        window: asyncio.Semaphore,
        pause: list[float],
    ) -> None:
        handler, payload = self.config.handler, self.payload
        progress = self.progress
        done = False
        while not done:
            await window.acquire()
            # Whatever else the window allows right now goes in the same message.
            slots = 1
            while self.config.batch and slots < MAX_SEND_BATCH and not window.locked():
                await window.acquire()
                slots += 1
            now = time.perf_counter()
            if pause[0] > now:
                await asyncio.sleep(pause[0] - now)
                now = time.perf_counter()
            if self.config.rate > 0:
                slot = max(self.next_slot, now)
                self.next_slot = slot + slots / self.config.rate
                if slot > now:
                    await asyncio.sleep(slot - now)
                    now = time.perf_counter()
            measured = now >= self.t_warm_end
            batch: list[queue_pb2.EnqueueRequest] = []
            for _ in range(slots):
                quotas = self.quotas
                if now >= self.t_send_end or (
                    measured and quotas is not None and quotas[lane.index] <= 0
                ):
                    done = True
                    window.release()
                    continue
                if measured and quotas is not None and self.budget is not None:
                    quotas[lane.index] -= 1
                    self.budget -= 1
                i = len(lane.sent_at)
                lane.sent_at.append(now)
                lane.measured.append(measured)
                lane.in_flight += 1
                progress.sent += 1
                batch.append(
                    queue_pb2.EnqueueRequest(
                        handler=handler, payload=payload, client_ref=lane.ref(i)
                    )
                )
            if not batch:
                continue
            if self.config.batch:
                message = queue_pb2.SessionRequest(
                    enqueue_batch=queue_pb2.EnqueueBatch(requests=batch)
                )
                await call.write(message)
            else:
                await call.write(queue_pb2.SessionRequest(enqueue=batch[0]))
        await call.done_writing()

    async def _read(
        self,
        lane: LaneRecord,
        call: Any,
        window: asyncio.Semaphore,
        pause: list[float],
    ) -> None:
        eof = grpc.aio.EOF
        while True:
            message = await call.read()
            if message is eof:
                return
            now = time.perf_counter()
            self.last_activity = now
            if message.WhichOneof("kind") == "batch":
                for response in message.batch.responses:
                    self._on_response(lane, response, now, window, pause)
            else:
                self._on_response(lane, message, now, window, pause)

    def _on_result(
        self,
        lane: LaneRecord,
        result: common_pb2.Result,
        now: float,
        window: asyncio.Semaphore | None,
    ) -> None:
        i = lane.parse_ref(result.client_ref)
        if i is None:
            lane.unknown += 1
            return
        if not lane.on_result(i, result.lane_seq):
            return
        lane.in_flight -= 1
        if window is not None:
            window.release()
        self.progress.results += 1
        status_name = common_pb2.RequestStatus.Name(result.status)
        status_name = status_name.removeprefix(STATUS_PREFIX)
        lane.results_by_status[status_name] += 1
        if result.status == common_pb2.REQUEST_STATUS_SUCCEEDED:
            lane.results_succeeded += 1
            if self.check_echo and result.output != self.payload:
                self.output_mismatches += 1
        self.last_result_at = now
        if self.t_warm_end <= now <= self.t_send_end:
            self.measured_results += 1
        if lane.measured[i]:
            sent = lane.sent_at[i]
            self.result_latency.append(now - sent)
            accepted = lane.accepted_at.get(i)
            if accepted is not None:
                self.queue_latency.append(now - accepted)

    def _on_response(
        self,
        lane: LaneRecord,
        response: queue_pb2.SessionResponse,
        now: float,
        window: asyncio.Semaphore,
        pause: list[float],
    ) -> None:
        progress = self.progress
        kind = response.WhichOneof("kind")
        if kind == "result":
            self._on_result(lane, response.result, now, window)
        elif kind == "accepted":
            i = lane.parse_ref(response.accepted.client_ref)
            if i is None:
                lane.unknown += 1
                return
            lane.on_answer(i)
            lane.accepted_at[i] = now
            if lane.measured[i]:
                self.accept_latency.append(now - lane.sent_at[i])
        elif kind == "rejected":
            rejected = response.rejected
            i = lane.parse_ref(rejected.client_ref)
            if i is None:
                lane.unknown += 1
                return
            lane.on_answer(i)
            lane.rejected[CODE_NAMES.get(rejected.code, str(rejected.code))] += 1
            lane.done.add(i)
            lane.in_flight -= 1
            progress.rejected += 1
            if rejected.retry_after_ms:
                pause[0] = max(pause[0], now + rejected.retry_after_ms / 1000)
            window.release()
        elif kind == "progress":
            lane.progress += 1

    # -- the report -----------------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        config = self.config
        lanes = self.lanes
        measured_s = max(self.t_measure_end - self.t_warm_end, 1e-9)
        results_in_window = self.measured_results
        rejections: Counter[str] = Counter()
        by_status: Counter[str] = Counter()
        for lane in lanes:
            rejections.update(lane.rejected)
            by_status.update(lane.results_by_status)
        counts = {
            "sent": sum(len(lane.sent_at) for lane in lanes),
            "sent_measured": sum(sum(lane.measured) for lane in lanes),
            "accepted": sum(lane.accepted for lane in lanes),
            "rejected": sum(rejections.values()),
            "results": sum(lane.results for lane in lanes),
            "results_in_window": results_in_window,
            "unanswered": sum(lane.unanswered for lane in lanes),
            "lost": sum(lane.lost for lane in lanes),
            "duplicates": sum(lane.duplicates for lane in lanes),
            "unknown": sum(lane.unknown for lane in lanes),
            "fifo_violations": sum(lane.fifo_violations for lane in lanes),
            "answer_order_violations": sum(lane.answer_order_violations for lane in lanes),
            "results_before_accepted": sum(lane.early_results for lane in lanes),
            "lane_seq_gaps": sum(lane.lane_seq_gaps for lane in lanes),
            "output_mismatches": self.output_mismatches,
            "progress_messages": sum(lane.progress for lane in lanes),
            "stream_errors": sum(1 for lane in lanes if lane.stream_error),
            "resumed_streams": sum(lane.resumes for lane in lanes),
            "accepted_by_log": sum(lane.accepted_by_log for lane in lanes),
            "never_accepted": sum(len(lane.never_accepted) for lane in lanes),
        }
        reasons = [
            f"{counts[key]} {key.replace('_', ' ')}"
            for key in (
                "unanswered",
                "lost",
                "duplicates",
                "unknown",
                "fifo_violations",
                "answer_order_violations",
                "results_before_accepted",
                "output_mismatches",
                "stream_errors",
            )
            if counts[key]
        ]
        if self.stalled:
            reasons.append(f"stalled: nothing received for {config.drain_timeout:g} s")
        if counts["accepted"] == 0:
            reasons.append("nothing was accepted")
        lane_rows = [
            {
                "lane": lane.index,
                "user": lane.username,
                "user_id": lane.user_id,
                "sent": len(lane.sent_at),
                "sent_measured": sum(lane.measured),
                "accepted": lane.accepted,
                "rejected": dict(lane.rejected),
                "results": lane.results,
                "results_succeeded": lane.results_succeeded,
                "unanswered": lane.unanswered,
                "lost": lane.lost,
                "duplicates": lane.duplicates,
                "fifo_violations": lane.fifo_violations,
                "answer_order_violations": lane.answer_order_violations,
                "lane_seq_gaps": lane.lane_seq_gaps,
                "last_lane_seq": lane.last_lane_seq,
                "stream_error": lane.stream_error,
                "resumes": lane.resumes,
            }
            for lane in lanes
        ]
        config_out = asdict(config)
        config_out.pop("password", None)
        return {
            "valid": not reasons,
            "invalid_reasons": reasons,
            "run_tag": self.run_tag,
            "config": config_out,
            "seconds": {
                "warmup": round(min(self.t_warm_end, self.t_done) - self.t_start, 3),
                # When the last lane had its first answer (None: some never did).
                "lanes_started": (
                    None
                    if self.t_lanes_started is None
                    else round(self.t_lanes_started - self.t_start, 3)
                ),
                "measured": round(measured_s, 3),
                "total": round(self.t_done - self.t_start, 3),
            },
            "throughput": {
                "results_per_s": round(results_in_window / measured_s, 1),
                "sent_per_s": round(sum(sum(lane.measured) for lane in lanes) / measured_s, 1),
            },
            "latency_ms": {
                "send_to_result": summarize(self.result_latency),
                "send_to_accepted": summarize(self.accept_latency),
                "accepted_to_result": summarize(self.queue_latency),
            },
            "counts": counts,
            "lanes_started_when_measuring": self.lanes_started_when_measuring,
            "rejections": dict(rejections),
            "results_by_status": dict(by_status),
            "lanes": lane_rows,
            **self.watch.report(),
            **self.stages.report(),
        }
