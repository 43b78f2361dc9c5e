"""Session: the bidirectional fast path, with a future per submitted request."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

import grpc

from fairlane.client._wire import (
    Deadline,
    Payload,
    bearer,
    enqueue_request,
    field_size,
    too_large,
)
from fairlane.client.errors import (
    ClientClosed,
    DeadlineExceeded,
    FairlaneError,
    InvalidArgument,
    OutcomeUnknown,
    Rejected,
    SessionClosed,
    Unavailable,
    cancelled_by_caller,
    error_from_rpc,
    retry_delay_ms,
)
from fairlane.client.outbox import MAX_BATCH_BYTES, Outbox
from fairlane.client.types import Accepted, Event, Progress, RejectedEvent, Result
from fairlane.queue.v1 import queue_pb2

if TYPE_CHECKING:
    from fairlane.client.channels import Channels
    from fairlane.client.results import ResultWatcher
    from fairlane.client.tokens import TokenManager

__all__ = ["Session", "SubmitFuture"]


class SubmitFuture(asyncio.Future[Result]):
    """Resolves to the request's Result (whatever its status), or raises Rejected when
    the server did not accept it, or SessionClosed/another FairlaneError when the stream
    ended first. `request_id` is set once the request is accepted. `idempotency_key` is
    the key the request was sent with (generated when the caller gave none): submit
    again with it to be sure a request whose answer was lost does not run twice."""

    client_ref: str
    idempotency_key: str
    request_id: str | None
    duplicate: bool


@dataclass(slots=True)
class _Unanswered:
    request: queue_pb2.EnqueueRequest
    future: SubmitFuture
    # Refused by the client itself (too large to send): never sent, answered in its turn.
    refused: Rejected | None = None


_END: Final = object()
_RESUMABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})
# Before any answer, a stream that ended so is sent again on a new one.
_REOPENABLE = _RESUMABLE
# What grpc.aio reports in place of the server's status when a write fails because the
# server has just ended the stream (grpc/grpc#36066): the stream is over, what the server
# said is lost. Most often it was a refused token, ending the stream as it opened.
_CORE_WRITE_RACE = "Internal error from Core"


def _status_lost(err: grpc.aio.AioRpcError) -> bool:
    code: grpc.StatusCode = err.code()
    details: str | None = err.details()
    return code == grpc.StatusCode.INTERNAL and details == _CORE_WRITE_RACE


def _stream_error(err: grpc.aio.AioRpcError) -> FairlaneError:
    """The error a broken stream ends the session with. A status lost to grpc/grpc#36066
    is Unavailable, as a stream cut on the way is: the stream ended, nothing says why
    (most often the replica died while a submit was being written), and whether the
    submits it had not answered were stored is unknown."""
    if _status_lost(err):
        error = Unavailable(
            "the session stream ended and gRPC lost the server's status "
            f"({_CORE_WRITE_RACE}, grpc/grpc#36066)"
        )
        error.__cause__ = err
        return error
    return error_from_rpc(err)


class Session:
    """One QueueService.Session stream (create it with Client.session()).

    Answers come in the order requests were submitted; a request's result comes after
    its acceptance; results come in lane order. Submits wait in an Outbox until the
    stream can take a write, and those ready together leave as one `enqueue_batch`.
    `close()` (or leaving the `async with` block) half-closes the stream: the server
    still sends the results of everything it accepted, then ends it. Leaving the block
    waits for that; leaving it with an exception cancels the stream instead, unless the
    stream had already broken and the session is collecting results (below).

    An enqueue too large for one gRPC message is not sent: its future fails with
    Rejected (INVALID_ARGUMENT), in its turn, and the stream and other submits go on.

    Rejections are not retried here: resubmitting would reorder the lane. A Rejected
    error carries `retry_after_ms` for callers that want to send it again.

    If the stream breaks (UNAVAILABLE, e.g. the queue replica died) while accepted
    requests are unfinished, their futures still resolve: with `resume` (the default) the
    session collects their results from WatchResults, reconnecting with jittered backoff.
    Submits not answered before the break fail with the stream's error, and so do new
    submits; leaving the block with that error (or any exception but a cancellation)
    waits for the collection before the exception goes on.
    """

    def __init__(
        self,
        channels: Channels,
        tokens: TokenManager,
        results: ResultWatcher,
        *,
        max_in_flight: int = 512,
        record_events: bool = True,
        timeout: float | None = None,
        resume: bool = True,
    ) -> None:
        if max_in_flight < 1:
            raise InvalidArgument("max_in_flight must be at least 1")
        self._channels = channels
        self._tokens = tokens
        self._results = results
        self._max_in_flight = max_in_flight
        self._timeout = timeout
        # When the whole stream must have ended (time.monotonic()), set at open: a stream
        # opened again after a break gets what is left of the timeout, not all of it.
        self._deadline: float | None = None
        self._resume = resume
        self._events: asyncio.Queue[Any] | None = asyncio.Queue() if record_events else None
        self._call: Any = None
        self._token = ""
        # The writer task holds the lock while it writes; _reopen takes it to swap calls.
        self._write_lock = asyncio.Lock()
        # No message may be over what the channel sends (gRPC would fail the whole
        # stream for it): a larger enqueue is refused at submit, a batch stays under it.
        self._max_message = channels.max_message_bytes
        self._outbox = Outbox(max_bytes=min(MAX_BATCH_BYTES, self._max_message))
        self._wake_writer = asyncio.Event()
        self._done_writing = False  # the half-close was sent on the current call
        self._writing_ended = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._unanswered: collections.deque[_Unanswered] = collections.deque()
        self._by_request: dict[str, list[SubmitFuture]] = {}
        self._early_cancels: list[queue_pb2.CancelRequestRequest] = []
        self._answered_any = False
        self._in_flight = 0
        self._room = asyncio.Event()
        self._room.set()
        self._half_closed = False
        self._finished = False
        self._error: FairlaneError | None = None
        self._resuming = False  # collecting results from WatchResults after a break
        self._cancel_reason: SessionClosed | None = None
        self._reader: asyncio.Task[None] | None = None
        self.last_lane_seq = 0
        """lane_seq of the newest result received on this session (for WatchResults)."""

    # -- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> Session:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            await self.close()
            await self.wait_closed()
            if self._error is not None:
                raise self._error
            return
        if issubclass(exc_type, Exception) and self._resuming:
            # The stream broke and its accepted requests' results are being collected from
            # WatchResults; the exception (most often that break, raised by a submit)
            # does not make them lost: let the collection finish, then let it go on.
            self._half_closed = True
            try:
                await self._reader_done()
            except asyncio.CancelledError:
                await self._abort(_cancelled())
                raise
            return
        if issubclass(exc_type, Exception):
            reason = SessionClosed(
                f"the session was left with an exception ({exc_type.__name__}) and "
                f"cancelled before this request was finished; {_STILL_RUNS}"
            )
        else:
            reason = _cancelled()
        await self._abort(reason)

    async def open(self) -> None:
        """Opens the stream (done by `async with`)."""
        if self._call is not None:
            raise FairlaneError("the session is already open")
        if self._timeout is not None:
            self._deadline = time.monotonic() + self._timeout
        self._call = await self._new_call()
        self._reader = asyncio.create_task(self._read_loop(), name="fairlane-session-reader")
        self._writer = asyncio.create_task(self._write_loop(), name="fairlane-session-writer")

    async def _new_call(self) -> Any:
        timeout = None
        if self._deadline is not None:
            timeout = self._deadline - time.monotonic()
            if timeout <= 0:
                raise DeadlineExceeded(f"the session's timeout of {self._timeout:g} s passed")
        self._token = await self._tokens.access_token()
        call = self._channels.queue().Session(metadata=bearer(self._token), timeout=timeout)
        # The server sends its initial metadata once it has accepted the stream (or ends
        # the call if it refuses it). Writing before then can race a refusal, and grpc
        # reports a write into a refused call as INTERNAL, hiding UNAUTHENTICATED.
        try:
            with contextlib.suppress(grpc.aio.AioRpcError), self._channels.interrupted_by_close():
                await call.initial_metadata()
        except BaseException:
            # Cancelled (Ctrl-C, a task cancel) or closed while waiting: the stream would
            # otherwise stay open on the server until the channel closes.
            call.cancel()
            raise
        return call

    async def close(self) -> None:
        """Half-closes the stream once everything submitted is written: no more submits;
        results of accepted requests still arrive, then the stream ends."""
        if self._call is None:
            return
        self._half_closed = True
        self._wake_writer.set()
        await self._writing_ended.wait()

    async def wait_closed(self) -> None:
        """Waits until the stream has ended (and a resume after a break with it)."""
        await self._reader_done()
        reader = self._reader
        if reader is not None and not reader.cancelled() and (bug := reader.exception()):
            raise bug

    async def _reader_done(self) -> None:
        """Waits for the reader to end, without raising what it raised; the caller's own
        cancellation leaves the reader running."""
        if self._reader is not None:
            await asyncio.wait((self._reader,))

    async def abort(self) -> None:
        """Cancels the stream; unfinished futures fail with SessionClosed."""
        await self._abort(_cancelled())

    async def _abort(self, reason: SessionClosed) -> None:
        self._half_closed = True
        if self._cancel_reason is None:
            self._cancel_reason = reason
        if self._call is not None:
            self._call.cancel()
        tasks = [t for t in (self._reader, self._writer) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._finish(reason, report=False)

    @property
    def in_flight(self) -> int:
        """Requests submitted and not finished yet."""
        return self._in_flight

    # -- sending -----------------------------------------------------------------------

    async def submit(
        self,
        handler: str,
        payload: Payload = b"",
        *,
        idempotency_key: str | None = None,
        deadline: Deadline = None,
        max_attempts: int = 0,
        client_ref: str = "",
    ) -> SubmitFuture:
        """Queues one enqueue for the stream; returns a future of its Result.

        Waits while `max_in_flight` requests are unfinished (those not written yet
        count). Raises if the session is closed or has failed, and InvalidArgument for
        a value that cannot be sent. An enqueue over the gRPC message limit is not sent:
        its future fails with Rejected (INVALID_ARGUMENT) in its turn."""
        request = enqueue_request(
            handler,
            payload,
            idempotency_key=idempotency_key,
            deadline=deadline,
            max_attempts=max_attempts,
            client_ref=client_ref,
        )
        refused: Rejected | None = None
        why = too_large(request, field_size(request.ByteSize()), self._max_message)
        if why is not None:
            refused = Rejected("INVALID_ARGUMENT", why, client_ref=client_ref)
        while self._in_flight >= self._max_in_flight and not self._finished:
            self._room.clear()
            await self._room.wait()
        self._check_writable()
        future = SubmitFuture(loop=asyncio.get_running_loop())
        future.client_ref = client_ref
        future.idempotency_key = request.idempotency_key
        future.request_id = None
        future.duplicate = False
        self._in_flight += 1
        self._unanswered.append(_Unanswered(request, future, refused))
        if refused is None:
            self._outbox.enqueue(request)
            self._wake_writer.set()
        else:
            self._answer_refused()
        return future

    async def cancel(self, request_id: str) -> None:
        """Asks the server to cancel a queued request. If it was submitted on this
        session its future resolves to a CANCELLED result; a refusal (unknown id,
        already running) arrives only as a Rejected event whose cancel_request_id is
        request_id.
        Use Client.cancel for a definite answer."""
        self._check_writable()
        request = queue_pb2.CancelRequestRequest(request_id=request_id)
        if not self._answered_any:
            self._early_cancels.append(request)
        self._outbox.cancel(request)
        self._wake_writer.set()

    def _check_writable(self) -> None:
        if self._call is None:
            raise FairlaneError("the session is not open (use `async with client.session()`)")
        if self._error is not None:
            raise self._error
        if self._half_closed or self._finished:
            raise SessionClosed("the session is closed")

    async def _write_loop(self) -> None:
        """Writes what the outbox holds whenever there is something, one coalesced
        message at a time (a write waits while HTTP/2 flow control holds it), then the
        half-close once close() asked for it."""
        try:
            while not self._finished:
                await self._wake_writer.wait()
                self._wake_writer.clear()
                async with self._write_lock:
                    while (message := self._outbox.take()) is not None:
                        await self._write(message)
                    if self._half_closed and not self._done_writing and not self._finished:
                        self._done_writing = True
                        try:
                            await self._call.done_writing()
                        except Exception:
                            pass
                        except asyncio.CancelledError:  # as in _write
                            if cancelled_by_caller():
                                raise
                        self._writing_ended.set()
        except Exception as exc:  # a bug here must not leave futures hanging
            # Reported through the futures and the session's error (nobody awaits this task).
            self._call.cancel()
            self._finish(FairlaneError(f"session writer failed: {exc!r}"))

    async def _write(self, message: queue_pb2.SessionRequest) -> None:
        # If the stream has ended, the reader reports why and fails the future.
        if self._call.done():
            return
        try:
            await self._call.write(message)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError):
            pass
        except asyncio.CancelledError:
            # grpc.aio's, for a call cancelled under us (the client closed): the reader
            # reports it. Our own cancellation (abort) goes on.
            if cancelled_by_caller():
                raise

    # -- receiving ---------------------------------------------------------------------

    async def events(self) -> AsyncIterator[Event]:
        """Every Accepted, Rejected, Progress and Result, in the order received, from
        the start of the session. Ends when the stream ends (after close()); raises the
        stream's error, if it failed, after the events received before it."""
        if self._events is None:
            raise FairlaneError("events are not recorded (session(record_events=False))")
        while True:
            item = await self._events.get()
            if item is _END:
                self._events.put_nowait(_END)  # a later events() call ends too
                if self._error is not None:
                    raise self._error
                return
            yield item

    async def _read_loop(self) -> None:
        try:
            await self._read_stream()
        except asyncio.CancelledError:
            if cancelled_by_caller():  # abort(), or the event loop shutting down
                self._finish(self._cancel_reason or _cancelled(), report=False)
                raise
            # grpc.aio's, for a call cancelled under us: the client was closed.
            self._finish(self._channels.interrupted())
        except FairlaneError as exc:
            self._finish(exc)
        except Exception as exc:  # a bug here must not leave futures hanging
            self._finish(FairlaneError(f"session reader failed: {exc!r}"))
            raise

    async def _read_stream(self) -> None:
        """Reads the stream to its end (and, after a break, resumes); an error it raises
        ends the session (_read_loop)."""
        reauthenticated = False
        reconnects = 0
        while True:
            try:
                while True:
                    response = await self._call.read()
                    if response is grpc.aio.EOF:
                        self._finish(None)
                        return
                    self._handle(response)
            except grpc.aio.AioRpcError as err:
                refresh: bool | None = None  # reopen, and whether with a new token first
                if not self._answered_any:
                    if (
                        err.code() == grpc.StatusCode.UNAUTHENTICATED or _status_lost(err)
                    ) and not reauthenticated:
                        # Refused before reading anything: refresh and send it all again
                        # (once; every enqueue carries an idempotency key, so a resend
                        # cannot run one twice, whatever the lost status was).
                        reauthenticated, refresh = True, True
                    elif err.code() in _REOPENABLE and not self._finished:
                        # Broken before the server answered anything: most often the stream
                        # went out on a connection that had just dropped, before the
                        # channel noticed, and the next call can still meet that dying
                        # connection; or a busy server cancelled the call before it ran
                        # (CANCELLED from the peer: our own cancel ends the session first).
                        # So a new call goes out with everything again after the
                        # `reconnect` policy's backoff, as often as that policy allows (the
                        # idempotency keys make every resend safe); then the error stands.
                        reconnects += 1
                        if await self._results.back_off(
                            reconnects, err.code().name, retry_delay_ms(err)
                        ):
                            refresh = False
                if refresh is not None and await self._reopen(refresh=refresh):
                    continue
                error = _stream_error(err)
                if (
                    self._resume
                    and (err.code() in _RESUMABLE or _status_lost(err))
                    and self._by_request
                ):
                    await self._resume_with_watch(error)
                else:
                    self._finish(error)
                return

    async def _resume_with_watch(self, error: FairlaneError) -> None:
        """The stream broke with accepted requests unfinished: their results are durable,
        so collect them from WatchResults after the newest lane_seq seen here (results come
        in lane order, so every missing one is newer). Enqueues not answered yet fail with
        the error: whether they were accepted is unknown (idempotency keys make sending
        them again safe)."""
        self._error = error  # from now on, submits raise it
        self._resuming = True
        unanswered = list(self._unanswered)
        self._unanswered.clear()
        lost = False
        for item in unanswered:
            lost = lost or item.refused is None
            _fail(item.future, item.refused or error)
            self._done_one()
        try:
            async with contextlib.aclosing(self._results.watch(self.last_lane_seq)) as results:
                async for result in results:
                    self._on_result(result)
                    if not self._by_request:
                        break
        finally:
            self._resuming = False
        if not lost:
            self._error = None  # every request of the session got its result
        self._finish(None)

    async def _reopen(self, *, refresh: bool = True) -> bool:
        async with self._write_lock:
            if refresh and not await self._tokens.refresh_if_current(self._token):
                return False
            self._call = await self._new_call()
            # Everything sent on the refused call goes again, then what was still waiting.
            self._outbox.clear()
            for item in self._unanswered:
                if item.refused is None:
                    self._outbox.enqueue(item.request)
            for cancel in self._early_cancels:
                self._outbox.cancel(cancel)
            self._done_writing = False
            self._wake_writer.set()
            return True

    def _emit(self, event: Event) -> None:
        if self._events is not None:
            self._events.put_nowait(event)

    def _done_one(self) -> None:
        self._in_flight -= 1
        self._room.set()

    def _handle(self, response: queue_pb2.SessionResponse) -> None:
        kind = response.WhichOneof("kind")
        if kind == "batch":  # the server packs responses once we sent an enqueue_batch
            for inner in response.batch.responses:
                self._handle(inner)
        elif kind == "accepted":
            accepted = Accepted.from_proto(response.accepted)
            self._answered_any = True
            self._early_cancels.clear()
            if self._unanswered:
                future = self._unanswered.popleft().future
                future.request_id = accepted.request_id
                future.duplicate = accepted.duplicate
                self._by_request.setdefault(accepted.request_id, []).append(future)
            self._emit(accepted)
            self._answer_refused()
        elif kind == "rejected":
            rejected = RejectedEvent.from_proto(response.rejected)
            # Only an enqueue's rejection answers the oldest unanswered submit; a refused
            # cancel (or a message of no kind) is reported as an event alone.
            if response.rejected.WhichOneof("subject") == "client_ref" and self._unanswered:
                self._answered_any = True
                self._early_cancels.clear()
                future = self._unanswered.popleft().future
                if not future.done():
                    future.set_exception(
                        Rejected(
                            rejected.code,
                            rejected.message,
                            rejected.retry_after_ms,
                            rejected.client_ref,
                        )
                    )
                    future.exception()  # also reported as an event: no "never retrieved"
                self._done_one()
                self._emit(rejected)
                self._answer_refused()
            else:
                self._emit(rejected)
        elif kind == "progress":
            self._emit(Progress.from_proto(response.progress))
        elif kind == "result":
            self._on_result(Result.from_proto(response.result))

    def _answer_refused(self) -> None:
        """Answers the submits the client refused itself that are now first in line (an
        answer is never given before those of earlier submits)."""
        while self._unanswered and (refused := self._unanswered[0].refused) is not None:
            future = self._unanswered.popleft().future
            if not future.done():
                future.set_exception(refused)
                future.exception()  # also reported as an event: no "never retrieved"
            self._done_one()
            self._emit(
                RejectedEvent(
                    client_ref=refused.client_ref, code=refused.code, message=refused.message
                )
            )

    def _on_result(self, result: Result) -> None:
        self.last_lane_seq = max(self.last_lane_seq, result.lane_seq)
        futures = self._by_request.pop(result.request_id, None)
        if futures is None:
            return  # not of this session (WatchResults sees the whole lane)
        for future in futures:
            if not future.done():
                future.set_result(result)
            self._done_one()
        self._emit(result)

    def _finish(self, error: FairlaneError | None, *, report: bool = True) -> None:
        if self._finished:
            return
        self._finished = True
        if error is not None and report:
            self._error = error
        for item in self._unanswered:
            _fail(
                item.future,
                item.refused or error or SessionClosed("the stream ended before an answer"),
            )
        self._unanswered.clear()
        for request_id, futures in self._by_request.items():
            for future in futures:
                _fail(future, _accepted_error(request_id, error))
        self._by_request.clear()
        self._in_flight = 0
        self._room.set()
        self._outbox.clear()
        self._wake_writer.set()  # lets the writer see the end
        self._writing_ended.set()
        if self._events is not None:
            self._events.put_nowait(_END)


_STILL_RUNS = (
    "a request it had accepted (future.request_id is set) still runs: find its result "
    "with Client.get or Client.watch(after_lane_seq=...)"
)


def _cancelled() -> SessionClosed:
    return SessionClosed(f"the session was cancelled; {_STILL_RUNS}")


def _accepted_error(request_id: str, error: FairlaneError | None) -> FairlaneError:
    """What an accepted request's future fails with when the session ends before its
    result: never the stream's bare error, which would read as if the request had failed."""
    if error is None:
        return SessionClosed("the stream ended before the result")
    if isinstance(error, SessionClosed | ClientClosed):
        return error  # the caller's own doing: cancelled, left, or the client closed
    return OutcomeUnknown(request_id, error)


def _fail(future: SubmitFuture, error: FairlaneError) -> None:
    if not future.done():
        future.set_exception(error)
        future.exception()
