"""Finds lanes to consume, and the lanes paused on every replica: QueueService.ListLanes at
start and periodically (so a missed event is caught up), and fairlane.control events as
they happen."""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc

from fairlane.common.v1 import lane_pb2
from fairlane.queue.v1 import queue_pb2, queue_pb2_grpc
from fairlane_server.core.auth_client import AuthClient
from fairlane_server.core.broker import Broker, BrokerError, LaneMissing
from fairlane_server.core.describe import describe_error
from fairlane_server.core.grpc_host import channel
from fairlane_server.core.logging import get_logger
from fairlane_server.core.tasks import cancel_and_wait, wait_event
from fairlane_server.core.transport import Transport
from fairlane_server.worker.runner import Runner

log = get_logger(__name__)


class LaneDiscovery:
    def __init__(
        self,
        runner: Runner,
        broker: Broker,
        auth: AuthClient,
        *,
        queue_target: str,
        service_secret: str,
        interval: float,
        transport: Transport | None = None,
    ) -> None:
        self._runner = runner
        self._broker = broker
        self._auth = auth
        self._channel = channel(queue_target, transport)
        self._queue = queue_pb2_grpc.QueueServiceStub(self._channel)
        self._secret = service_secret
        self._interval = interval
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    async def start(self) -> None:
        self._broker.on_reconnect(self._wake.set)
        # The lanes paused on every replica, before any lane is consumed; and read again
        # once the announcements reach this replica, for one made in between.
        await self._runner.load_lane_pauses()
        await self._broker.consume_control(self._on_control)
        await self._runner.load_lane_pauses()
        self._task = asyncio.create_task(self._poll(), name="lane-discovery")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        await self._channel.close()

    async def _on_control(self, body: bytes) -> None:
        try:
            event = lane_pb2.ControlEvent.FromString(body)
        except Exception:
            log.warning("bad_control_event", size=len(body))
            return
        kind = event.WhichOneof("kind")
        try:
            if kind == "lane_created":
                await self._runner.add_lane(event.lane_created)
            elif kind == "lane_deleted":
                await self._runner.remove_lane(event.lane_deleted)
            elif kind == "cancel_request":
                self._runner.cancel(event.cancel_request)
            elif kind in ("lane_paused", "lane_resumed"):
                try:
                    lane = str(uuid.UUID(getattr(event, kind)))
                except ValueError:
                    log.warning("bad_control_event", kind=kind)
                    return
                self._runner.heard_lane_pause(lane, kind == "lane_paused")
        except BrokerError as exc:
            log.warning("lane_consume_failed", error=describe_error(exc))

    async def sync_once(self) -> int:
        token = await self._auth.service_token("worker", self._secret)
        page = ""
        seen = 0
        # Every paused lane is listed (Lane.paused_at): one paused here that the whole
        # listing leaves out, or lists unpaused, was resumed meanwhile.
        since = time.monotonic()
        paused: set[str] = set()
        while True:
            response = await self._queue.ListLanes(
                # No page_size: the queue's own default page.
                queue_pb2.ListLanesRequest(page_token=page),
                metadata=(("authorization", f"Bearer {token}"),),
                timeout=10,
            )
            listed = {lane.user_id for lane in response.lanes if lane.HasField("paused_at")}
            paused |= listed
            # Before the lanes are consumed: a paused lane starts paused.
            self._runner.sync_lane_pauses(listed, since=since, complete=False)
            for lane in response.lanes:
                try:
                    await self._runner.add_lane(lane.user_id)
                except LaneMissing:
                    # Listed but not declared yet (or deleted since): its lane_created
                    # announcement, or the next sync, brings it.
                    continue
                seen += 1
            if not response.next_page_token:
                self._runner.sync_lane_pauses(paused, since=since, complete=True)
                return seen
            page = response.next_page_token

    async def _poll(self) -> None:
        delay = 0.2
        while True:
            try:
                repaired = await self._runner.repair()
                if repaired:
                    log.info("lanes_repaired", count=repaired)
                await self.sync_once()
                delay = self._interval
            except (grpc.aio.AioRpcError, BrokerError) as exc:
                log.warning("lane_sync_failed", error=describe_error(exc))
                delay = min(max(delay * 2, 0.2), self._interval)
            except Exception:
                # This loop is what brings lanes back after a broker fault: if it ended,
                # the worker would stay off every lane whose consumer died, for good.
                log.exception("lane_sync_failed_unexpectedly")
                delay = min(max(delay * 2, 0.2), self._interval)
            # After a broker reconnect, sync at once: lanes whose consumer died come back.
            await wait_event(self._wake, delay)
            self._wake.clear()
