"""The asyncio client: the API of the three services over Channels and a TokenManager."""

from __future__ import annotations

import asyncio
import contextlib
import math
import numbers
import random
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, Literal, TypeVar

import grpc

from fairlane.auth.v1 import auth_pb2
from fairlane.client._wire import (
    UINT32_MAX,
    UINT64_MAX,
    Deadline,
    Payload,
    bearer,
    enqueue_request,
    too_large,
    unsigned,
)
from fairlane.client.channels import Channels, ServiceName
from fairlane.client.errors import InvalidArgument, NotFound, Unavailable
from fairlane.client.results import STREAM_RECONNECT, ResultWatcher
from fairlane.client.retry import RetryPolicy, Sleep, call_with_retry
from fairlane.client.session import Session
from fairlane.client.tokens import TokenListener, TokenManager
from fairlane.client.types import (
    Enqueued,
    HandlerInfo,
    Identity,
    Lane,
    Request,
    Result,
    Status,
    Tokens,
    WorkerState,
    WorkerStatus,
)
from fairlane.common.v1 import common_pb2
from fairlane.queue.v1 import queue_pb2
from fairlane.worker.v1 import worker_pb2

__all__ = ["MAX_TIMEOUT", "Client", "checked_timeout"]

R = TypeVar("R")

MAX_TIMEOUT = 365 * 24 * 3600.0
"""The longest deadline the client gives a call or a stream: a year. A longer `timeout`
is cut to it (gRPC reads a deadline past the year 2262 as one already passed)."""


def checked_timeout(timeout: float | None, name: str = "timeout") -> float | None:
    """`timeout` (seconds) as the deadline to give gRPC: None or inf is no deadline, a
    value over MAX_TIMEOUT is MAX_TIMEOUT. InvalidArgument for nan, 0 or less (they would
    fail every call at once, as DEADLINE_EXCEEDED) or anything but a number."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise InvalidArgument(f"{name} must be a number of seconds or None, not {timeout!r}")
    seconds = float(timeout)
    if not seconds > 0:  # also nan
        raise InvalidArgument(
            f"{name} must be more than 0 seconds (None or inf: no deadline), not {timeout!r}"
        )
    if math.isinf(seconds):
        return None
    return min(seconds, MAX_TIMEOUT)


AuthMode = Literal["none", "required", "optional"]


class _ClientTimeout:
    """The default of every call's `timeout=`: the client's own `timeout`."""

    def __repr__(self) -> str:
        return "<client timeout>"


_UNSET: Any = _ClientTimeout()


class Client:
    """Async client for a Fairlane suite.

    ```python
    async with Client("127.0.0.1:50051", "127.0.0.1:50052") as client:
        await client.login("alice", "secret-password")
        async with client.session() as session:
            future = await session.submit("echo", b"hello")
            result = await future
    ```

    - Every unary call has a deadline (`timeout` seconds, overridable per call; None or
      inf: none; at most MAX_TIMEOUT, a year; nan, 0 or less: InvalidArgument) and is
      retried on RESOURCE_EXHAUSTED/UNAVAILABLE per `retry` (see RetryPolicy). Broken
      result streams, and Session streams broken before their first answer, are reopened
      per `reconnect` (more patient: a replica restart takes seconds).
    - After `login`, the access token is refreshed shortly before it expires
      (`refresh_margin` seconds before, by default a fifth of its lifetime, at most 60 s);
      a call answered UNAUTHENTICATED refreshes once and is tried once more.
    - `tokens=` starts from saved tokens; `on_tokens` is called with the new Tokens after
      every login and refresh (refresh tokens rotate: persist the newest one) and with
      None after logout.
    - `tls=True` (system roots) or `root_certificates=` (PEM) turn TLS on;
      `client_cert=` and `client_key=` (PEM) present a client certificate to servers that
      require one (mTLS, docs/security.md).
    - Errors are FairlaneError subclasses (see fairlane.client.errors): also a value
      that cannot be sent (InvalidArgument), and a call in progress when the client is
      closed (ClientClosed).

    Inside, the client is the API over three parts that Sessions share with it: Channels
    (where each service is and the channels to it), a TokenManager (when to refresh) and
    a ResultWatcher (WatchResults that reconnects).
    """

    def __init__(
        self,
        auth_target: str,
        queue_target: str,
        worker_target: str | None = None,
        *,
        tls: bool = False,
        root_certificates: bytes | None = None,
        client_cert: bytes | None = None,
        client_key: bytes | None = None,
        timeout: float | None = 10.0,
        tokens: Tokens | None = None,
        on_tokens: TokenListener | None = None,
        retry: RetryPolicy | None = None,
        reconnect: RetryPolicy | None = None,
        refresh_margin: float | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        if (client_cert is None) != (client_key is None):
            raise InvalidArgument("client_cert and client_key go together")
        secure = tls or root_certificates is not None or client_cert is not None
        credentials = (
            grpc.ssl_channel_credentials(root_certificates, client_key, client_cert)
            if secure
            else None
        )
        self._channels = Channels(
            {"auth": auth_target, "queue": queue_target, "worker": worker_target},
            credentials=credentials,
            options=channel_options,
        )
        self._tokens = TokenManager(
            self._exchange, tokens, on_tokens=on_tokens, refresh_margin=refresh_margin
        )
        self.timeout = checked_timeout(timeout)
        self.retry = retry or RetryPolicy()
        self._sleep: Sleep = asyncio.sleep
        self._rng = random.Random()
        self._results = ResultWatcher(
            self._channels,
            self._tokens,
            reconnect or STREAM_RECONNECT,
            sleep=self._sleep,
            rng=self._rng,
        )

    @property
    def targets(self) -> dict[ServiceName, str | None]:
        return self._channels.targets

    @property
    def tls(self) -> bool:
        return self._channels.tls

    @property
    def reconnect(self) -> RetryPolicy:
        return self._results.policy

    # -- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes every channel. Calls, watches and sessions in progress end with
        ClientClosed (a task that is itself cancelled still gets CancelledError)."""
        await self._channels.close()

    # -- tokens ------------------------------------------------------------------------

    @property
    def tokens(self) -> Tokens | None:
        """The current tokens, or None before login."""
        return self._tokens.tokens

    def set_tokens(self, tokens: Tokens | None) -> None:
        """Replaces the tokens (e.g. ones saved earlier) and tells `on_tokens`."""
        self._tokens.set(tokens)

    async def access_token(self) -> str:
        """A valid access token, refreshed first if it is about to expire."""
        return await self._tokens.access_token()

    async def refresh(self) -> Tokens:
        """Exchanges the refresh token for new tokens now."""
        return await self._tokens.refresh()

    async def _exchange(self, refresh_token: str) -> Tokens:
        reply: auth_pb2.RefreshResponse = await self._unary(
            "auth",
            self._channels.auth().Refresh,
            auth_pb2.RefreshRequest(refresh_token=refresh_token),
            auth="none",
            idempotent=False,
        )
        return Tokens.issued(reply.access_token, reply.refresh_token, reply.expires_in)

    # -- the call wrapper --------------------------------------------------------------

    async def _unary(
        self,
        service: ServiceName,
        method: Callable[..., Awaitable[R]],
        request: Any,
        *,
        auth: AuthMode = "required",
        idempotent: bool = True,
        timeout: float | None = _UNSET,
    ) -> R:
        """One unary call with a deadline, the bearer token (refreshed once after
        UNAUTHENTICATED) and retries per `self.retry`."""
        deadline = checked_timeout(self.timeout if timeout is _UNSET else timeout)
        used: list[str] = []
        with_token = auth == "required" or (auth == "optional" and self.tokens is not None)

        async def attempt() -> R:
            metadata = None
            if with_token:
                used.append(await self._tokens.access_token())
                metadata = bearer(used[-1])
            with self._channels.interrupted_by_close():
                return await method(request, metadata=metadata, timeout=deadline)

        async def reauthenticate() -> bool:
            return bool(used) and await self._tokens.refresh_if_current(used[-1])

        try:
            return await call_with_retry(
                attempt,
                policy=self.retry,
                idempotent=idempotent,
                on_unauthenticated=reauthenticate if with_token else None,
                sleep=self._sleep,
                rng=self._rng,
            )
        except Unavailable as exc:
            if exc.retry_after_ms:
                raise
            raise Unavailable(
                f"{service} service at {self.targets[service]} is unavailable: {exc.message}"
            ) from exc

    # -- auth --------------------------------------------------------------------------

    async def register(
        self, username: str, password: str, *, timeout: float | None = _UNSET
    ) -> str:
        """Creates a user; returns its id. ALREADY_EXISTS → AlreadyExists."""
        reply: auth_pb2.RegisterResponse = await self._unary(
            "auth",
            self._channels.auth().Register,
            auth_pb2.RegisterRequest(username=username, password=password),
            auth="none",
            idempotent=False,
            timeout=timeout,
        )
        return reply.user_id

    async def admin_token(
        self, name: str, service_secret: str, *, timeout: float | None = _UNSET
    ) -> Tokens:
        """An operator's (admin) access token for the deployment's service secret: worker
        control, and every lane on GetStatus. The client does not keep it; pass it as
        `tokens=` to a client that should act as the operator. `name` is the operator's
        name in audit events."""
        reply: auth_pb2.IssueServiceTokenResponse = await self._unary(
            "auth",
            self._channels.auth().IssueServiceToken,
            auth_pb2.IssueServiceTokenRequest(
                service=name, secret=service_secret, role=auth_pb2.SERVICE_TOKEN_ROLE_ADMIN
            ),
            auth="none",
            timeout=timeout,
        )
        return Tokens.issued(reply.access_token, "", reply.expires_in, name)

    async def login(
        self, username: str, password: str, *, timeout: float | None = _UNSET
    ) -> Tokens:
        """Logs in; the client keeps (and refreshes) the tokens from now on."""
        reply: auth_pb2.LoginResponse = await self._unary(
            "auth",
            self._channels.auth().Login,
            auth_pb2.LoginRequest(username=username, password=password),
            auth="none",
            timeout=timeout,
        )
        tokens = Tokens.issued(reply.access_token, reply.refresh_token, reply.expires_in, username)
        self._tokens.set(tokens)
        return tokens

    async def logout(self, *, timeout: float | None = _UNSET) -> None:
        """Revokes the refresh token (and its whole family) and forgets the tokens."""
        tokens = self._tokens.tokens
        if tokens is not None and tokens.refresh_token:
            with contextlib.suppress(NotFound):  # already revoked or expired
                await self._unary(
                    "auth",
                    self._channels.auth().Revoke,
                    auth_pb2.RevokeRequest(refresh_token=tokens.refresh_token),
                    auth="none",
                    timeout=timeout,
                )
        self._tokens.set(None)

    async def whoami(self, *, timeout: float | None = _UNSET) -> Identity:
        reply: auth_pb2.WhoAmIResponse = await self._unary(
            "auth", self._channels.auth().WhoAmI, auth_pb2.WhoAmIRequest(), timeout=timeout
        )
        return Identity(user_id=reply.user_id, username=reply.username)

    # -- queue -------------------------------------------------------------------------

    async def enqueue(
        self,
        handler: str,
        payload: Payload = b"",
        *,
        idempotency_key: str | None = None,
        deadline: Deadline = None,
        max_attempts: int = 0,
        client_ref: str = "",
        timeout: float | None = _UNSET,
    ) -> Enqueued:
        """Enqueues one request; returns once it is durable. It always carries an
        idempotency key (a new one if none is given), so it is retried per `retry` even
        after a connection lost mid-call: a request stored by a lost attempt comes back
        as the answer (`duplicate=True`) instead of being stored twice."""
        request = enqueue_request(
            handler,
            payload,
            idempotency_key=idempotency_key,
            deadline=deadline,
            max_attempts=max_attempts,
            client_ref=client_ref,
        )
        # gRPC would fail it on the client side with RESOURCE_EXHAUSTED ("retry"), in vain.
        why = too_large(request, request.ByteSize(), self._channels.max_message_bytes)
        if why is not None:
            raise InvalidArgument(why)
        reply: queue_pb2.EnqueueResponse = await self._unary(
            "queue",
            self._channels.queue().Enqueue,
            request,
            idempotent=True,
            timeout=timeout,
        )
        return Enqueued(
            request_id=reply.request_id,
            duplicate=reply.duplicate,
            idempotency_key=request.idempotency_key,
        )

    async def get(self, request_id: str, *, timeout: float | None = _UNSET) -> Request:
        """One of the caller's requests; NotFound for an unknown id or another user's."""
        reply: queue_pb2.GetRequestResponse = await self._unary(
            "queue",
            self._channels.queue().GetRequest,
            queue_pb2.GetRequestRequest(request_id=request_id),
            timeout=timeout,
        )
        return Request.from_proto(reply.request)

    async def requests(
        self,
        status: Status | str | None = None,
        page_size: int = 50,
        *,
        timeout: float | None = _UNSET,
    ) -> AsyncGenerator[list[Request], None]:
        """The caller's requests, newest first, one page (a list) at a time; payloads
        and outputs are left out (use get)."""
        try:
            wanted = Status.parse(status) if status is not None else None
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        page_size = unsigned("page_size", page_size, UINT32_MAX)
        token = ""
        while True:
            request = queue_pb2.ListRequestsRequest(page_size=page_size, page_token=token)
            if wanted is not None:  # unset (not UNSPECIFIED) means every status
                request.status = common_pb2.RequestStatus.ValueType(wanted)
            reply: queue_pb2.ListRequestsResponse = await self._unary(
                "queue", self._channels.queue().ListRequests, request, timeout=timeout
            )
            page = [Request.from_proto(r) for r in reply.requests]
            if page:
                yield page
            token = reply.next_page_token
            if not token:
                return

    async def cancel(self, request_id: str, *, timeout: float | None = _UNSET) -> Status:
        """Cancels a queued or running request. Returns CANCELLED (it was queued), RUNNING
        (its handler was asked to stop; its CANCELLED result follows), or the final status
        it had already reached."""
        reply: queue_pb2.CancelRequestResponse = await self._unary(
            "queue",
            self._channels.queue().CancelRequest,
            queue_pb2.CancelRequestRequest(request_id=request_id),
            timeout=timeout,
        )
        return Status(reply.status)

    async def lane(self, *, timeout: float | None = _UNSET) -> Lane:
        """The caller's lane; NotFound before the first enqueue."""
        reply: queue_pb2.GetLaneResponse = await self._unary(
            "queue", self._channels.queue().GetLane, queue_pb2.GetLaneRequest(), timeout=timeout
        )
        return Lane.from_proto(reply.lane)

    def watch(
        self, after_lane_seq: int = 0, *, reconnect: bool = True
    ) -> AsyncGenerator[Result, None]:
        """The caller's results with lane_seq > after_lane_seq, stored ones first, then
        live ones, without end. If the stream breaks (UNAVAILABLE), it is reopened after
        the last result seen, with jittered backoff, up to `reconnect.max_attempts` times
        in a row; an expired token is refreshed once."""
        unsigned("after_lane_seq", after_lane_seq, UINT64_MAX)  # raised here, not at anext
        return self._results.watch(after_lane_seq, reconnect=reconnect)

    def session(
        self,
        *,
        max_in_flight: int = 512,
        record_events: bool = True,
        timeout: float | None = None,
        resume: bool = True,
    ) -> Session:
        """A Session stream: `async with client.session() as s: fut = await s.submit(...)`.

        `max_in_flight` bounds the requests submitted and not yet finished (submit waits
        for room); `record_events` keeps every event for `s.events()`; `timeout` is a
        deadline for the whole stream (None or inf: no deadline; at most MAX_TIMEOUT);
        `resume` collects the results of accepted requests from WatchResults if the
        stream breaks."""
        timeout = checked_timeout(timeout)
        return Session(
            self._channels,
            self._tokens,
            self._results,
            max_in_flight=max_in_flight,
            record_events=record_events,
            timeout=timeout,
            resume=resume,
        )

    # -- worker ------------------------------------------------------------------------

    async def worker_status(self, *, timeout: float | None = _UNSET) -> WorkerStatus:
        reply: worker_pb2.GetStatusResponse = await self._unary(
            "worker",
            self._channels.worker().GetStatus,
            worker_pb2.GetStatusRequest(),
            auth="optional",
            timeout=timeout,
        )
        return WorkerStatus.from_proto(reply)

    async def list_handlers(self, *, timeout: float | None = _UNSET) -> list[HandlerInfo]:
        reply: worker_pb2.ListHandlersResponse = await self._unary(
            "worker",
            self._channels.worker().ListHandlers,
            worker_pb2.ListHandlersRequest(),
            auth="optional",
            timeout=timeout,
        )
        return [
            HandlerInfo(
                name=h.name,
                description=h.description,
                max_attempts=h.max_attempts,
                timeout_seconds=h.timeout_seconds,
            )
            for h in reply.handlers
        ]

    async def pause(self, lane: str = "", *, timeout: float | None = _UNSET) -> WorkerState:
        """Stops the worker taking new requests of one lane (a user id), or of all."""
        reply: worker_pb2.PauseResponse = await self._unary(
            "worker",
            self._channels.worker().Pause,
            worker_pb2.PauseRequest(lane=lane),
            auth="optional",
            timeout=timeout,
        )
        return WorkerState(reply.state)

    async def resume(self, lane: str = "", *, timeout: float | None = _UNSET) -> WorkerState:
        """Undoes pause."""
        reply: worker_pb2.ResumeResponse = await self._unary(
            "worker",
            self._channels.worker().Resume,
            worker_pb2.ResumeRequest(lane=lane),
            auth="optional",
            timeout=timeout,
        )
        return WorkerState(reply.state)

    async def drain(
        self, timeout_seconds: float = 0.0, *, timeout: float | None = _UNSET
    ) -> tuple[WorkerState, int]:
        """Finishes in-flight requests, then releases every lane; returns the state and
        how many requests were still running when it gave up. The call's deadline
        defaults to `timeout_seconds` (or 60 s when 0, the server's grace period) plus
        the client timeout."""
        if timeout is _UNSET:
            timeout = (timeout_seconds or 60.0) + (self.timeout or 10.0)
        reply: worker_pb2.DrainResponse = await self._unary(
            "worker",
            self._channels.worker().Drain,
            worker_pb2.DrainRequest(timeout_seconds=timeout_seconds),
            auth="optional",
            timeout=timeout,
        )
        return WorkerState(reply.state), reply.abandoned
