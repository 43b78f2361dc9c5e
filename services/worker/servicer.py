"""gRPC surface of WorkerService: control of one replica, and the pause of a lane on every
replica (stored in the request log and announced; see Runner.pause_lane).

Who may call what is in fairlane_server.core.authz.POLICY; this module adds what depends on the
principal (lane ids and the host name only for operators) and audits every control call.
"""

from __future__ import annotations

import uuid
from typing import Any

import grpc

from fairlane.worker.v1 import worker_pb2, worker_pb2_grpc
from fairlane_server.core import authz
from fairlane_server.core.audit import audit
from fairlane_server.core.broker import BrokerError
from fairlane_server.core.grpc_host import ServicerContext, abort
from fairlane_server.core.tokens import ROLE_ADMIN
from fairlane_server.worker.runner import Runner, RunnerState

MAX_DRAIN_SECONDS = 86_400
_FINISHED = (RunnerState.DRAINING, RunnerState.DRAINED)
_WIRE_STATE = {
    RunnerState.RUNNING: worker_pb2.WORKER_STATE_RUNNING,
    RunnerState.PAUSED: worker_pb2.WORKER_STATE_PAUSED,
    RunnerState.DRAINING: worker_pb2.WORKER_STATE_DRAINING,
    RunnerState.DRAINED: worker_pb2.WORKER_STATE_DRAINED,
}


def _wire(state: RunnerState) -> worker_pb2.WorkerState.ValueType:
    return _WIRE_STATE[state]


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    def __init__(self, runner: Runner, *, grace_seconds: float) -> None:
        self._runner = runner
        self._grace = grace_seconds

    async def GetStatus(
        self, request: worker_pb2.GetStatusRequest, context: ServicerContext
    ) -> worker_pb2.GetStatusResponse:
        r = self._runner
        # Lane ids are user ids and the worker id holds the host name: operators only.
        operator = authz.principal().role == ROLE_ADMIN
        return worker_pb2.GetStatusResponse(
            state=_wire(r.state),
            worker_id=r.worker_id if operator else "",
            lanes=sorted(r.lanes) if operator else [],
            in_flight=r.in_flight,
            concurrency=r.concurrency,
            paused_lanes=r.paused_lanes() if operator else [],
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
        self, request: worker_pb2.ListHandlersRequest, context: ServicerContext
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

    async def _refuse(
        self,
        event: str,
        context: ServicerContext,
        code: grpc.StatusCode,
        message: str,
        **fields: Any,
    ) -> None:
        self._audit(event, context, outcome=code.name, **fields)
        await abort(context, code, message)

    def _audit(self, event: str, context: ServicerContext, **fields: Any) -> None:
        audit(
            event,
            authz.principal(),
            peer=authz.peer(context),
            worker_id=self._runner.worker_id,
            **fields,
        )

    async def _check_lane(self, event: str, lane: str, context: ServicerContext) -> str:
        """The lane in canonical form ("" for the whole replica), or the call is refused.
        Whether the lane exists is for the request log to say (see _control)."""
        if lane:
            try:
                lane = str(uuid.UUID(lane))
            except ValueError:
                await self._refuse(
                    event,
                    context,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "lane must be a user id (a UUID)",
                    lane=lane[:64],
                )
        if self._runner.state in _FINISHED:
            await self._refuse(
                event,
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the worker is {self._runner.state.name}: restart it to take lanes again",
                lane=lane,
            )
        return lane

    async def _control(
        self, event: str, requested: str, paused: bool, context: ServicerContext
    ) -> None:
        """Pause (`paused`) or Resume: of this replica without a lane; of the lane, on every
        replica, with one."""
        lane = await self._check_lane(event, requested, context)
        if not lane:
            if paused:
                self._runner.pause()
            else:
                self._runner.resume()
        else:
            try:
                found = await self._runner.pause_lane(lane, paused)
            except BrokerError as exc:
                # Stored and applied here; the other replicas learn it from their next
                # lane listing. Calling again announces it again.
                await self._refuse(
                    event,
                    context,
                    grpc.StatusCode.UNAVAILABLE,
                    f"the lane is {'paused' if paused else 'resumed'} in the request log and "
                    "on this replica, but announcing it to the other replicas failed: they "
                    "apply it at their next lane listing; call again to announce it now",
                    lane=lane,
                    error=str(exc)[:200],
                )
            if not found:
                await self._refuse(
                    event, context, grpc.StatusCode.NOT_FOUND, "no such lane", lane=lane
                )
        self._audit(event, context, outcome="OK", lane=lane)

    async def Pause(
        self, request: worker_pb2.PauseRequest, context: ServicerContext
    ) -> worker_pb2.PauseResponse:
        await self._control("worker.pause", request.lane, True, context)
        return worker_pb2.PauseResponse(state=_wire(self._runner.state))

    async def Resume(
        self, request: worker_pb2.ResumeRequest, context: ServicerContext
    ) -> worker_pb2.ResumeResponse:
        await self._control("worker.resume", request.lane, False, context)
        return worker_pb2.ResumeResponse(state=_wire(self._runner.state))

    async def Drain(
        self, request: worker_pb2.DrainRequest, context: ServicerContext
    ) -> worker_pb2.DrainResponse:
        if not 0 <= request.timeout_seconds <= MAX_DRAIN_SECONDS:
            await self._refuse(
                "worker.drain",
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"timeout_seconds must be between 0 and {MAX_DRAIN_SECONDS}",
                timeout_seconds=request.timeout_seconds,
            )
        self._audit("worker.drain", context, outcome="STARTED")
        abandoned = await self._runner.drain(request.timeout_seconds or self._grace)
        self._audit("worker.drain", context, outcome="OK", abandoned=abandoned)
        return worker_pb2.DrainResponse(state=_wire(self._runner.state), abandoned=abandoned)
