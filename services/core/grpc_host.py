"""gRPC server bootstrap shared by every service: health, reflection, options, shutdown."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NoReturn, TypeAlias

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from fairlane.client.channels import CHANNEL_OPTIONS, grpc_target
from fairlane_server.core import tracing
from fairlane_server.core.authz import AuthzInterceptor
from fairlane_server.core.errors import ErrorInterceptor
from fairlane_server.core.grpc_metrics import MetricsInterceptor
from fairlane_server.core.logging import get_logger
from fairlane_server.core.tokens import TokenVerifier
from fairlane_server.core.transport import Transport

log = get_logger(__name__)

MAX_MESSAGE_BYTES = 8 * 1024 * 1024

SERVER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Ping idle streams so a half-open client is noticed and its session cleaned up.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.so_reuseport", 0),
    # Calls that arrived but that the event loop has not picked up yet. Past the soft
    # limit grpc refuses a growing share of new calls at random (random early detection),
    # and the client sees CANCELLED for a call that never ran: with the defaults (1,000 /
    # 3,000) about a quarter of 3,000 clients reconnecting at once (a replica restart) were
    # refused so. Pending calls cost little memory; the per-user stream limit and the
    # Session window bound the work they bring.
    ("grpc.server.max_pending_requests", 20_000),
    ("grpc.server.max_pending_requests_hard_limit", 40_000),
    # How long such a call may wait before grpc cancels it (CANCELLED at the client, the
    # servicer never sees it). The default, 30 s, was reached by 2 of 1,000 Sessions
    # opened at once on a queue whose loop was slowed down (a profiler attached): on a
    # busy replica grpc.aio takes new calls slowly (docs/scaling.md, Probes). Unary calls
    # carry their own deadlines; a stream that waits longer still gets served.
    ("grpc.server_max_unrequested_time_in_server", 300),
]


# The health service name that answers for the process alone: SERVING while its event loop
# runs (a stuck loop cannot answer), whatever its dependencies do. Liveness and startup
# probes ask this one; readiness asks "" or the service's name, which follow the
# dependencies (services/core/health.py).
LIVENESS = "liveness"

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class GrpcHost:
    """One grpc.aio server with health (and reflection, when asked) for the given services;
    every call goes through the authorization policy (fairlane_server.core.authz). It listens
    with TLS when `transport` has a certificate, else in plaintext where that is allowed
    (fairlane_server.core.transport)."""

    def __init__(
        self,
        listen: str,
        service_names: Iterable[str],
        *,
        verifier: TokenVerifier | None = None,
        transport: Transport | None = None,
        reflection_enabled: bool = False,
        retry_after_ms: int = 1000,
    ) -> None:
        transport = transport or Transport()
        self.service_names = list(service_names)
        # retry_after_ms: the RetryInfo of a busy database pool or unreachable token keys.
        self.authz = AuthzInterceptor(verifier=verifier, retry_after_ms=retry_after_ms)
        self.server = grpc.aio.server(
            options=SERVER_OPTIONS,
            # Outermost first: metrics see the final status; errors map what escapes the
            # authorization and the servicer.
            interceptors=[
                *tracing.server_interceptors(),
                MetricsInterceptor(),
                ErrorInterceptor(retry_after_ms=retry_after_ms),
                self.authz,
            ],
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if reflection_enabled:
            reflection.enable_server_reflection(
                [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
            )
        self.tls = transport.server is not None
        self.port = transport.add_port(self.server, listen)
        if self.port == 0:
            raise RuntimeError(f"cannot listen on {listen}")
        self.address = f"{listen.rsplit(':', 1)[0]}:{self.port}"

    async def start(self) -> None:
        await self.health.set(LIVENESS, SERVING)
        await self.server.start()

    async def set_serving(self, serving: bool) -> None:
        status = SERVING if serving else NOT_SERVING
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def stop(self, grace: float) -> None:
        """NOT_SERVING first so load balancers move away, then let calls finish."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


def channel(target: str, transport: Transport | None = None) -> grpc.aio.Channel:
    """A channel to another service: one replica, a comma-separated list of IP:port
    replicas, or any gRPC URI (dns:///queue:50052 uses every address the name has); TLS
    when `transport` has client credentials."""
    return (transport or Transport()).channel(
        grpc_target(target), CHANNEL_OPTIONS, tracing.client_interceptors()
    )


# grpcio ships no type information; this alias keeps servicer signatures readable.
ServicerContext: TypeAlias = grpc.aio.ServicerContext


async def abort(context: ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    """context.abort, typed as never returning (it raises to end the call)."""
    await context.abort(code, message)
    raise AssertionError("context.abort returned")  # pragma: no cover
