"""The auth and queue services' API on a real grpc.aio server on loopback, for client tests
that need real calls (deadlines, cancellation, channels closing under calls) without the
suite: the server runs on an event loop in a thread of its own, so blocking code (a
SyncClient, a CLI subprocess) can call it.

Every user is "alice" and every login succeeds. Unary calls answer after `delay` seconds.
On a Session, each enqueue is accepted at once; its result follows by handler: `echo`
returns the payload at once, `sleep` after float(payload) seconds, anything else never
(the stream stays open). WatchResults sends `stored` results, then nothing more, without
end. ListRequests lists `listed` requests on its first page; with `more=True` the first
page says there is another, and asking for it is never answered. The threading.Events
`accepted` (a Session accepted an enqueue) and `held` (a call that is never answered is
waiting) tell a test that a client is in the middle of a call.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator, Coroutine
from types import TracebackType
from typing import Any, TypeVar

import grpc

from fairlane.auth.v1 import auth_pb2, auth_pb2_grpc
from fairlane.common.v1 import common_pb2
from fairlane.queue.v1 import queue_pb2, queue_pb2_grpc

T = TypeVar("T")

USER = "alice"
USER_ID = "0190a5f0-0000-7000-8000-000000000001"


class _Auth(auth_pb2_grpc.AuthServiceServicer):
    def __init__(self, services: LoopbackServices) -> None:
        self._services = services

    async def Register(self, request: Any, context: Any) -> auth_pb2.RegisterResponse:
        await self._services.wait()
        return auth_pb2.RegisterResponse(user_id=USER_ID)

    async def Login(self, request: Any, context: Any) -> auth_pb2.LoginResponse:
        await self._services.wait()
        return auth_pb2.LoginResponse(
            access_token="access", refresh_token="refresh", expires_in=3600
        )

    async def WhoAmI(self, request: Any, context: Any) -> auth_pb2.WhoAmIResponse:
        await self._services.wait()
        return auth_pb2.WhoAmIResponse(user_id=USER_ID, username=USER)


class _Queue(queue_pb2_grpc.QueueServiceServicer):
    def __init__(self, services: LoopbackServices) -> None:
        self._services = services
        self._lane_seq = 0

    def _result(self, request_id: str, request: queue_pb2.EnqueueRequest) -> common_pb2.Result:
        self._lane_seq += 1
        return common_pb2.Result(
            request_id=request_id,
            lane_seq=self._lane_seq,
            status=common_pb2.REQUEST_STATUS_SUCCEEDED,
            output=request.payload,
            client_ref=request.client_ref,
            handler=request.handler,
        )

    async def Enqueue(self, request: Any, context: Any) -> queue_pb2.EnqueueResponse:
        await self._services.wait()
        return queue_pb2.EnqueueResponse(request_id=str(uuid.uuid4()))

    async def Session(
        self, requests: AsyncIterator[queue_pb2.SessionRequest], context: Any
    ) -> AsyncIterator[queue_pb2.SessionResponse]:
        await context.send_initial_metadata(())  # accepted (the client waits for this)
        async for message in requests:
            kind = message.WhichOneof("kind")
            if kind == "enqueue":
                batch = [message.enqueue]
            elif kind == "enqueue_batch":
                batch = list(message.enqueue_batch.requests)
            else:
                continue
            for request in batch:
                request_id = str(uuid.uuid4())
                accepted = queue_pb2.Accepted(client_ref=request.client_ref, request_id=request_id)
                yield queue_pb2.SessionResponse(accepted=accepted)
                self._services.accepted.set()
                if request.handler == "sleep":
                    await asyncio.sleep(float(request.payload))
                elif request.handler != "echo":
                    await self._services.hold()  # never finishes
                yield queue_pb2.SessionResponse(result=self._result(request_id, request))

    async def WatchResults(
        self, request: queue_pb2.WatchResultsRequest, context: Any
    ) -> AsyncIterator[queue_pb2.WatchResultsResponse]:
        for seq in range(request.after_lane_seq + 1, self._services.stored + 1):
            yield queue_pb2.WatchResultsResponse(
                result=common_pb2.Result(
                    request_id=str(uuid.uuid4()),
                    lane_seq=seq,
                    status=common_pb2.REQUEST_STATUS_SUCCEEDED,
                    output=f"result {seq}".encode(),
                    handler="echo",
                )
            )
        await self._services.hold()  # live results: none come

    async def ListRequests(
        self, request: queue_pb2.ListRequestsRequest, context: Any
    ) -> queue_pb2.ListRequestsResponse:
        await self._services.wait()
        if request.page_token:
            await self._services.hold()
        return queue_pb2.ListRequestsResponse(
            next_page_token="more" if self._services.more else "",
            requests=[
                common_pb2.Request(
                    request_id=str(uuid.uuid4()),
                    user_id=USER_ID,
                    handler="echo",
                    status=common_pb2.REQUEST_STATUS_SUCCEEDED,
                    lane_seq=n + 1,
                )
                for n in range(self._services.listed)
            ],
        )


class LoopbackServices:
    """`with LoopbackServices() as services:` serves on `services.target` for the block."""

    def __init__(
        self, *, delay: float = 0.0, stored: int = 1, listed: int = 3, more: bool = False
    ) -> None:
        self.delay = delay
        self.stored = stored
        self.listed = listed
        self.more = more
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="loopback-services", daemon=True
        )
        self._server: grpc.aio.Server | None = None
        self.port = 0
        self.accepted = threading.Event()
        self.held = threading.Event()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def wait(self) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)

    async def hold(self) -> None:
        """Never returns (until the call is cancelled)."""
        self.held.set()
        await asyncio.Event().wait()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        """Runs `coro` on the server's loop, from another thread."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _start(self) -> None:
        self._server = grpc.aio.server()
        # The calls left out answer UNIMPLEMENTED (the generated base class's).
        auth = _Auth(self)  # type: ignore[abstract]
        queue = _Queue(self)  # type: ignore[abstract]
        auth_pb2_grpc.add_AuthServiceServicer_to_server(auth, self._server)
        queue_pb2_grpc.add_QueueServiceServicer_to_server(queue, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()

    async def _stop(self) -> None:
        assert self._server is not None
        await self._server.stop(0)
        await self._server.wait_for_termination()

    def __enter__(self) -> LoopbackServices:
        self._thread.start()
        self.call(self._start())
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.call(self._stop())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)
            if not self._thread.is_alive():
                self._loop.close()
