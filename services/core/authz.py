"""Authorization for every gRPC server: one policy table, one interceptor.

Every method any Fairlane server registers has a row in POLICY; the interceptor
authenticates the caller's bearer token as the row asks, refuses the call otherwise, and
hands the principal to the servicer through a context variable (`principal()`). A method
without a row is refused with UNIMPLEMENTED, the answer a method the server does not have
gets, so an unlisted method is never reachable and cannot be told apart from a missing one.
tests/unit/test_authz_policy.py walks the protos, so a new RPC cannot ship without its row.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Any

import grpc

from fairlane_server.core.audit import audit
from fairlane_server.core.grpc_wrap import wrap
from fairlane_server.core.log_limit import LogLimiter, peer_host
from fairlane_server.core.rich_status import abort_retry
from fairlane_server.core.tokens import (
    ROLE_ADMIN,
    ROLE_SERVICE,
    ROLE_USER,
    InvalidToken,
    KeysUnavailable,
    Principal,
    TokenVerifier,
    bearer_token,
)


class Access(enum.Enum):
    """Who may call a method."""

    OPEN = "open"
    """Anyone; no token is read (the request carries its own credential, or none is due)."""
    AUTHENTICATED = "authenticated"
    """Any valid access token: a user, a service or an operator."""
    USER = "user"
    """A user's token: the call acts on that user's own lane and requests only."""
    SERVICE = "service"
    """A Fairlane service's token, or an operator's (admin)."""
    ADMIN = "admin"
    """An operator's token only."""


ROLES: Mapping[Access, frozenset[str]] = {
    Access.AUTHENTICATED: frozenset({ROLE_USER, ROLE_SERVICE, ROLE_ADMIN}),
    Access.USER: frozenset({ROLE_USER}),
    Access.SERVICE: frozenset({ROLE_SERVICE, ROLE_ADMIN}),
    Access.ADMIN: frozenset({ROLE_ADMIN}),
}

_AUTH = "/fairlane.auth.v1.AuthService/"
_QUEUE = "/fairlane.queue.v1.QueueService/"
_WORKER = "/fairlane.worker.v1.WorkerService/"

POLICY: Mapping[str, Access] = {
    # Auth: the credential of the open calls is in the request (password, refresh token,
    # service secret), or there is none to give (public keys, random revoked family ids).
    _AUTH + "Register": Access.OPEN,
    _AUTH + "Login": Access.OPEN,
    _AUTH + "Refresh": Access.OPEN,
    _AUTH + "Revoke": Access.OPEN,
    _AUTH + "WhoAmI": Access.AUTHENTICATED,
    _AUTH + "GetJwks": Access.OPEN,
    _AUTH + "GetRevokedFamilies": Access.OPEN,
    _AUTH + "IssueServiceToken": Access.OPEN,
    # Queue: a user works on its own lane; only services list every lane.
    _QUEUE + "Session": Access.USER,
    _QUEUE + "Enqueue": Access.USER,
    _QUEUE + "WatchResults": Access.USER,
    _QUEUE + "GetRequest": Access.USER,
    _QUEUE + "ListRequests": Access.USER,
    _QUEUE + "CancelRequest": Access.USER,
    _QUEUE + "GetLane": Access.USER,
    _QUEUE + "ListLanes": Access.SERVICE,
    _QUEUE + "ListDeadRequests": Access.USER,
    _QUEUE + "ReplayDeadRequest": Access.USER,
    # Worker: anyone signed in reads the state (lane ids and host only for admins);
    # control is for services and operators.
    _WORKER + "GetStatus": Access.AUTHENTICATED,
    _WORKER + "ListHandlers": Access.AUTHENTICATED,
    _WORKER + "Pause": Access.SERVICE,
    _WORKER + "Resume": Access.SERVICE,
    _WORKER + "Drain": Access.SERVICE,
    # Every server: load balancers and orchestrators probe health without a token;
    # reflection (off unless FAIRLANE_REFLECTION) only describes the public protos.
    "/grpc.health.v1.Health/Check": Access.OPEN,
    "/grpc.health.v1.Health/Watch": Access.OPEN,
    "/grpc.health.v1.Health/List": Access.OPEN,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": Access.OPEN,
}

_principal: ContextVar[Principal | None] = ContextVar("fairlane_principal", default=None)


def principal() -> Principal:
    """The authenticated caller of the current call (set by AuthzInterceptor)."""
    found = _principal.get()
    if found is None:
        # A servicer asked for a principal in a method whose row does not authenticate.
        raise LookupError("no authenticated principal in this call")
    return found


def peer(context: Any) -> str | None:
    try:
        found: str | None = context.peer()
    except Exception:  # a context of a finished call may have no peer any more
        return None
    return found


class AuthzInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Enforces POLICY. The verifier may be given after construction (`use`), since the
    auth service builds its own from keys it loads at start."""

    def __init__(
        self,
        policy: Mapping[str, Access] = POLICY,
        verifier: TokenVerifier | None = None,
        *,
        retry_after_ms: int = 1000,
    ) -> None:
        self._policy = policy
        self._verifier = verifier
        self._retry_after_ms = retry_after_ms
        self._denials = LogLimiter()

    def use(self, verifier: TokenVerifier) -> None:
        self._verifier = verifier

    async def intercept_service(
        self,
        continuation: Callable[[Any], Awaitable[Any]],
        handler_call_details: Any,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # no such method: grpc answers UNIMPLEMENTED
        method: str = handler_call_details.method
        access = self._policy.get(method)
        if access is None:
            return wrap(handler, _refuse_unlisted)
        if access is Access.OPEN:
            return handler
        metadata = handler_call_details.invocation_metadata

        @asynccontextmanager
        async def authorized(request: Any, context: Any) -> AsyncIterator[Any]:
            found = await self._authenticate(method, access, metadata, context)
            # Each call runs in its own task, so the value dies with the call.
            _principal.set(found)
            yield request

        return wrap(handler, authorized)

    async def _authenticate(
        self, method: str, access: Access, metadata: Any, context: Any
    ) -> Principal:
        if self._verifier is None:
            await abort_retry(
                context, grpc.StatusCode.UNAVAILABLE, "starting, try again", self._retry_after_ms
            )
        try:
            found = await self._verifier.verify(bearer_token(metadata))
        except KeysUnavailable as exc:
            await abort_retry(context, grpc.StatusCode.UNAVAILABLE, str(exc), self._retry_after_ms)
        except InvalidToken as exc:
            self._deny(method, access, None, context, "unauthenticated")
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        if found.role not in ROLES[access]:
            self._deny(method, access, found, context, "permission_denied")
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED, f"this call needs a {access.value} token"
            )
        return found

    def _deny(
        self,
        method: str,
        access: Access,
        found: Principal | None,
        context: Any,
        outcome: str,
    ) -> None:
        """Audits refused calls to service/admin methods, once per peer host, method and
        minute: an anonymous flood must not turn into a log flood."""
        if access not in (Access.SERVICE, Access.ADMIN):
            return
        address = peer(context)
        allowed, held_back = self._denials.allow(f"{peer_host(address)} {method} {outcome}")
        if allowed:
            audit(
                "authz.denied",
                found,
                peer=address,
                method=method,
                outcome=outcome,
                suppressed=held_back,
            )


@asynccontextmanager
async def _refuse_unlisted(request: Any, context: Any) -> AsyncIterator[Any]:
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
    yield request  # pragma: no cover - abort raised
