"""gRPC surface of WorkerService (control of one replica)."""

from __future__ import annotations

import grpc

from fairlane.worker.v1 import worker_pb2, worker_pb2_grpc
from services.core.grpc_host import ServicerContext, abort
from services.worker.runner import Runner

Context = ServicerContext


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    def __init__(self, runner: Runner, *, grace_seconds: float) -> None:
        self._runner = runner
        self._grace = grace_seconds

    async def GetStatus(
        self, request: worker_pb2.GetStatusRequest, context: Context
    ) -> worker_pb2.GetStatusResponse:
        r = self._runner
        return worker_pb2.GetStatusResponse(
            state=r.state,
            worker_id=r.worker_id,
            lanes=sorted(r.lanes),
            in_flight=r.in_flight,
            concurrency=r.concurrency,
            paused_lanes=r.paused_lanes(),
            handlers=[
                worker_pb2.HandlerStats(
                    name=name,
                    succeeded=r.stats.succeeded[name],
                    failed=r.stats.failed[name],
                    retried=r.stats.retried[name],
                    running=r.stats.running[name],
                )
                for name in sorted(r.handlers)
            ],
        )

    async def ListHandlers(
        self, request: worker_pb2.ListHandlersRequest, context: Context
    ) -> worker_pb2.ListHandlersResponse:
        return worker_pb2.ListHandlersResponse(
            handlers=[
                worker_pb2.HandlerInfo(
                    name=h.name,
                    description=h.description,
                    max_attempts=h.max_attempts,
                    timeout_seconds=h.timeout or 0.0,
                )
                for h in sorted(self._runner.handlers.values(), key=lambda h: h.name)
            ]
        )

    async def Pause(
        self, request: worker_pb2.PauseRequest, context: Context
    ) -> worker_pb2.PauseResponse:
        if request.lane and request.lane not in self._runner.lanes:
            await abort(
                context, grpc.StatusCode.NOT_FOUND, "this replica does not consume that lane"
            )
        self._runner.pause(request.lane)
        return worker_pb2.PauseResponse(state=self._runner.state)

    async def Resume(
        self, request: worker_pb2.ResumeRequest, context: Context
    ) -> worker_pb2.ResumeResponse:
        if request.lane and request.lane not in self._runner.lanes:
            await abort(
                context, grpc.StatusCode.NOT_FOUND, "this replica does not consume that lane"
            )
        self._runner.resume(request.lane)
        return worker_pb2.ResumeResponse(state=self._runner.state)

    async def Drain(
        self, request: worker_pb2.DrainRequest, context: Context
    ) -> worker_pb2.DrainResponse:
        if request.timeout_seconds < 0:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "timeout_seconds must be >= 0")
        abandoned = await self._runner.drain(request.timeout_seconds or self._grace)
        return worker_pb2.DrainResponse(state=self._runner.state, abandoned=abandoned)
