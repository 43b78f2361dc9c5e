"""The asyncio client: auth, queue and worker calls with tokens, retries and deadlines."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import random
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

import grpc

from fairlane.auth.v1 import auth_pb2, auth_pb2_grpc
from fairlane.client._wire import (
    CHANNEL_OPTIONS,
    Deadline,
    Metadata,
    Payload,
    bearer,
    enqueue_request,
)
from fairlane.client.errors import (
    FairlaneError,
    NotFound,
    NotLoggedIn,
    Unauthenticated,
    Unavailable,
    error_from_rpc,
    retry_delay_ms,
)
from fairlane.client.retry import RetryPolicy, Sleep, call_with_retry
from fairlane.client.session import Session
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
from fairlane.queue.v1 import queue_pb2, queue_pb2_grpc
from fairlane.worker.v1 import worker_pb2, worker_pb2_grpc

if TYPE_CHECKING:
    from fairlane.auth.v1.auth_pb2_grpc import AuthServiceAsyncStub
    from fairlane.queue.v1.queue_pb2_grpc import QueueServiceAsyncStub
    from fairlane.worker.v1.worker_pb2_grpc import WorkerServiceAsyncStub

R = TypeVar("R")

ServiceName = Literal["auth", "queue", "worker"]
AuthMode = Literal["none", "required", "optional"]
TokenListener = Callable[[Tokens | None], None]

_UNSET: Any = object()

STREAM_RECONNECT = RetryPolicy(max_attempts=10, base_backoff=0.25, max_backoff=5.0)
"""Reopening WatchResults: 10 attempts, at most about 28 s of jittered waits in all."""


class Client:
    """Async client for a Fairlane suite.

    ```python
    async with Client("127.0.0.1:50051", "127.0.0.1:50052") as client:
        await client.login("alice", "secret-password")
        async with client.session() as session:
            future = await session.submit("echo", b"hello")
            result = await future
    ```

    - Every unary call has a deadline (`timeout` seconds, overridable per call) and is
      retried on RESOURCE_EXHAUSTED/UNAVAILABLE per `retry` (see RetryPolicy). Broken
      result streams are reopened per `reconnect` (more patient: a replica restart takes
      seconds).
    - After `login`, the access token is refreshed shortly before it expires
      (`refresh_margin` seconds before, by default a fifth of its lifetime, at most 60 s);
      a call answered UNAUTHENTICATED refreshes once and is tried once more.
    - `tokens=` starts from saved tokens; `on_tokens` is called with the new Tokens after
      every login and refresh (refresh tokens rotate: persist the newest one) and with
      None after logout.
    - Errors are FairlaneError subclasses (see fairlane.client.errors).
    """

    def __init__(
        self,
        auth_target: str,
        queue_target: str,
        worker_target: str | None = None,
        *,
        tls: bool = False,
        root_certificates: bytes | None = None,
        timeout: float | None = 10.0,
        tokens: Tokens | None = None,
        on_tokens: TokenListener | None = None,
        retry: RetryPolicy | None = None,
        reconnect: RetryPolicy | None = None,
        refresh_margin: float | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.targets: dict[ServiceName, str | None] = {
            "auth": auth_target,
            "queue": queue_target,
            "worker": worker_target,
        }
        self.tls = tls or root_certificates is not None
        self._root_certificates = root_certificates
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.reconnect = reconnect or STREAM_RECONNECT
        self._tokens = tokens
        self._on_tokens = on_tokens
        self._refresh_margin = refresh_margin
        self._options = _merge_options(CHANNEL_OPTIONS, channel_options)
        self._channels: dict[str, Any] = {}
        self._refresh_lock = asyncio.Lock()
        self._sleep: Sleep = asyncio.sleep
        self._rng = random.Random()
        self._closed = False

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
        """Closes every channel; calls in progress are cancelled."""
        self._closed = True
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()

    def _channel(self, service: ServiceName) -> Any:
        target = self.targets[service]
        if not target:
            raise FairlaneError(f"no {service} target configured")
        if self._closed:
            raise FairlaneError("the client is closed")
        channel = self._channels.get(target)
        if channel is None:
            address = grpc_target(target)
            if self.tls:
                credentials = grpc.ssl_channel_credentials(
                    root_certificates=self._root_certificates
                )
                channel = grpc.aio.secure_channel(address, credentials, options=self._options)
            else:
                channel = grpc.aio.insecure_channel(address, options=self._options)
            self._channels[target] = channel
        return channel

    def _auth_stub(self) -> AuthServiceAsyncStub:
        return cast("AuthServiceAsyncStub", auth_pb2_grpc.AuthServiceStub(self._channel("auth")))

    def _queue_stub(self) -> QueueServiceAsyncStub:
        return cast(
            "QueueServiceAsyncStub", queue_pb2_grpc.QueueServiceStub(self._channel("queue"))
        )

    def _worker_stub(self) -> WorkerServiceAsyncStub:
        return cast(
            "WorkerServiceAsyncStub", worker_pb2_grpc.WorkerServiceStub(self._channel("worker"))
        )

    # -- tokens ------------------------------------------------------------------------

    @property
    def tokens(self) -> Tokens | None:
        """The current tokens, or None before login."""
        return self._tokens

    def set_tokens(self, tokens: Tokens | None) -> None:
        """Replaces the tokens (e.g. ones saved earlier) and tells `on_tokens`."""
        self._tokens = tokens
        if self._on_tokens is not None:
            self._on_tokens(tokens)

    def _margin(self, tokens: Tokens) -> float:
        if self._refresh_margin is not None:
            return self._refresh_margin
        return min(60.0, tokens.lifetime / 5)

    async def access_token(self) -> str:
        """A valid access token, refreshed first if it is about to expire."""
        tokens = self._tokens
        if tokens is None:
            raise NotLoggedIn("not logged in")
        if tokens.refresh_token and tokens.expires_within(self._margin(tokens)):
            await self._refresh(tokens.access_token)
            tokens = self._tokens
            assert tokens is not None
        return tokens.access_token

    async def _refresh(self, stale: str) -> bool:
        """Exchanges the refresh token unless `stale` was already replaced; False if
        there is no refresh token to use."""
        async with self._refresh_lock:
            current = self._tokens
            if current is None or not current.refresh_token:
                return False
            if current.access_token != stale:
                return True  # another call refreshed meanwhile
            request = auth_pb2.RefreshRequest(refresh_token=current.refresh_token)
            try:
                reply: auth_pb2.RefreshResponse = await self._unary(
                    "auth", self._auth_stub().Refresh, request, auth="none", idempotent=False
                )
            except Unauthenticated as exc:
                raise Unauthenticated(
                    f"the login has expired or was revoked, log in again ({exc.message})"
                ) from exc
            self.set_tokens(
                Tokens.issued(
                    reply.access_token, reply.refresh_token, reply.expires_in, current.username
                )
            )
            return True

    async def refresh(self) -> Tokens:
        """Exchanges the refresh token for new tokens now."""
        tokens = self._tokens
        if tokens is None or not tokens.refresh_token:
            raise NotLoggedIn("not logged in")
        await self._refresh(tokens.access_token)
        assert self._tokens is not None
        return self._tokens

    # -- the call wrapper --------------------------------------------------------------

    async def _metadata(self, auth: AuthMode, used: list[str]) -> Metadata | None:
        if auth == "none" or (auth == "optional" and self._tokens is None):
            return None
        token = await self.access_token()
        used.append(token)
        return bearer(token)

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
        deadline = self.timeout if timeout is _UNSET else timeout
        used: list[str] = []

        async def attempt() -> R:
            metadata = await self._metadata(auth, used)
            return await method(request, metadata=metadata, timeout=deadline)

        async def reauthenticate() -> bool:
            return bool(used) and await self._refresh(used[-1])

        try:
            return await call_with_retry(
                attempt,
                policy=self.retry,
                idempotent=idempotent,
                on_unauthenticated=None if auth == "none" else reauthenticate,
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
            self._auth_stub().Register,
            auth_pb2.RegisterRequest(username=username, password=password),
            auth="none",
            idempotent=False,
            timeout=timeout,
        )
        return reply.user_id

    async def login(
        self, username: str, password: str, *, timeout: float | None = _UNSET
    ) -> Tokens:
        """Logs in; the client keeps (and refreshes) the tokens from now on."""
        reply: auth_pb2.LoginResponse = await self._unary(
            "auth",
            self._auth_stub().Login,
            auth_pb2.LoginRequest(username=username, password=password),
            auth="none",
            timeout=timeout,
        )
        tokens = Tokens.issued(reply.access_token, reply.refresh_token, reply.expires_in, username)
        self.set_tokens(tokens)
        return tokens

    async def logout(self, *, timeout: float | None = _UNSET) -> None:
        """Revokes the refresh token (and its whole family) and forgets the tokens."""
        tokens = self._tokens
        if tokens is not None and tokens.refresh_token:
            with contextlib.suppress(NotFound):  # already revoked or expired
                await self._unary(
                    "auth",
                    self._auth_stub().Revoke,
                    auth_pb2.RevokeRequest(refresh_token=tokens.refresh_token),
                    auth="none",
                    timeout=timeout,
                )
        self.set_tokens(None)

    async def whoami(self, *, timeout: float | None = _UNSET) -> Identity:
        reply: auth_pb2.WhoAmIResponse = await self._unary(
            "auth", self._auth_stub().WhoAmI, auth_pb2.WhoAmIRequest(), timeout=timeout
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
        """Enqueues one request; returns once it is durable. Retried on overload only
        when it cannot create a duplicate (an idempotency key, or the server's RetryInfo
        saying it refused before storing anything)."""
        request = enqueue_request(
            handler,
            payload,
            idempotency_key=idempotency_key,
            deadline=deadline,
            max_attempts=max_attempts,
            client_ref=client_ref,
        )
        reply: queue_pb2.EnqueueResponse = await self._unary(
            "queue",
            self._queue_stub().Enqueue,
            request,
            idempotent=bool(idempotency_key),
            timeout=timeout,
        )
        return Enqueued(request_id=reply.request_id, duplicate=reply.duplicate)

    async def get(self, request_id: str, *, timeout: float | None = _UNSET) -> Request:
        """One of the caller's requests; NotFound for an unknown id or another user's."""
        reply: queue_pb2.GetRequestResponse = await self._unary(
            "queue",
            self._queue_stub().GetRequest,
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
        wanted = Status.parse(status) if status is not None else None
        token = ""
        while True:
            request = queue_pb2.ListRequestsRequest(page_size=page_size, page_token=token)
            if wanted is not None:  # unset (not UNSPECIFIED) means every status
                request.status = common_pb2.RequestStatus.ValueType(wanted)
            reply: queue_pb2.ListRequestsResponse = await self._unary(
                "queue", self._queue_stub().ListRequests, request, timeout=timeout
            )
            page = [Request.from_proto(r) for r in reply.requests]
            if page:
                yield page
            token = reply.next_page_token
            if not token:
                return

    async def cancel(self, request_id: str, *, timeout: float | None = _UNSET) -> Status:
        """Cancels a queued request; returns CANCELLED or the final status it already
        had. FailedPrecondition if it is running."""
        reply: queue_pb2.CancelRequestResponse = await self._unary(
            "queue",
            self._queue_stub().CancelRequest,
            queue_pb2.CancelRequestRequest(request_id=request_id),
            timeout=timeout,
        )
        return Status(reply.status)

    async def lane(self, *, timeout: float | None = _UNSET) -> Lane:
        """The caller's lane; NotFound before the first enqueue."""
        reply: queue_pb2.GetLaneResponse = await self._unary(
            "queue", self._queue_stub().GetLane, queue_pb2.GetLaneRequest(), timeout=timeout
        )
        return Lane.from_proto(reply.lane)

    async def watch(
        self, after_lane_seq: int = 0, *, reconnect: bool = True
    ) -> AsyncGenerator[Result, None]:
        """The caller's results with lane_seq > after_lane_seq, stored ones first, then
        live ones, without end. If the stream breaks (UNAVAILABLE), it is reopened after
        the last result seen, with jittered backoff, up to `reconnect.max_attempts` times
        in a row; an expired token is refreshed once."""
        last = after_lane_seq
        failures = 0
        reauthenticated = False
        while True:
            token = await self.access_token()
            call = self._queue_stub().WatchResults(
                queue_pb2.WatchResultsRequest(after_lane_seq=last), metadata=bearer(token)
            )
            try:
                while True:
                    message = await call.read()
                    if message is grpc.aio.EOF:
                        break
                    result = Result.from_proto(message.result)
                    if result.lane_seq <= last:
                        continue
                    last = result.lane_seq
                    failures = 0
                    reauthenticated = False
                    yield result
                # The server ended the stream (it is shutting down): reopen elsewhere.
                code, server_delay = "UNAVAILABLE", None
                ended: FairlaneError = Unavailable("the server ended the result stream")
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.UNAUTHENTICATED and not reauthenticated:
                    reauthenticated = True
                    if await self._refresh(token):
                        continue
                code, server_delay = err.code().name, retry_delay_ms(err)
                ended = error_from_rpc(err)
            finally:
                call.cancel()
            failures += 1
            wait = (
                self.reconnect.delay(failures, code, server_delay, idempotent=True, rng=self._rng)
                if reconnect
                else None
            )
            if wait is None:
                raise ended
            await self._sleep(wait)

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
        deadline for the whole stream (None: no deadline); `resume` collects the results
        of accepted requests from WatchResults if the stream breaks."""
        return Session(
            self,
            max_in_flight=max_in_flight,
            record_events=record_events,
            timeout=timeout,
            resume=resume,
        )

    # -- worker ------------------------------------------------------------------------

    async def worker_status(self, *, timeout: float | None = _UNSET) -> WorkerStatus:
        reply: worker_pb2.GetStatusResponse = await self._unary(
            "worker",
            self._worker_stub().GetStatus,
            worker_pb2.GetStatusRequest(),
            auth="optional",
            timeout=timeout,
        )
        return WorkerStatus.from_proto(reply)

    async def list_handlers(self, *, timeout: float | None = _UNSET) -> list[HandlerInfo]:
        reply: worker_pb2.ListHandlersResponse = await self._unary(
            "worker",
            self._worker_stub().ListHandlers,
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
            self._worker_stub().Pause,
            worker_pb2.PauseRequest(lane=lane),
            auth="optional",
            timeout=timeout,
        )
        return WorkerState(reply.state)

    async def resume(self, lane: str = "", *, timeout: float | None = _UNSET) -> WorkerState:
        """Undoes pause."""
        reply: worker_pb2.ResumeResponse = await self._unary(
            "worker",
            self._worker_stub().Resume,
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
            self._worker_stub().Drain,
            worker_pb2.DrainRequest(timeout_seconds=timeout_seconds),
            auth="optional",
            timeout=timeout,
        )
        return WorkerState(reply.state), reply.abandoned


def _merge_options(
    base: Sequence[tuple[str, Any]], extra: Sequence[tuple[str, Any]]
) -> list[tuple[str, Any]]:
    merged = dict(base)
    merged.update(extra)
    return list(merged.items())


def grpc_target(target: str) -> str:
    """A gRPC target for `target`: one address, a gRPC URI (e.g. `dns:///queue:50052`, whose
    every address is used), or a comma-separated list of IP:port addresses, spread
    round-robin by the channel (see ROUND_ROBIN in the channel options)."""
    if "," not in target:
        return target
    addresses = [a.strip() for a in target.split(",") if a.strip()]
    for address in addresses:
        host = address.rsplit(":", 1)[0].strip("[]")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise FairlaneError(
                f"{address!r}: a list of targets must be IP:port addresses; for host names "
                "use one dns:///name:port target"
            ) from None
    scheme = "ipv6" if any(a.startswith("[") for a in addresses) else "ipv4"
    return f"{scheme}:{','.join(addresses)}"
