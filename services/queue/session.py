"""One Session stream: reads enqueues and cancels, answers them in the order they came,
and forwards the results of what it accepted.

- Answers (accepted, rejected, and a cancel's rejection) go out in the order their messages
  came in. A result never goes out before the accepted of its request.
- A window bounds the stream: each enqueue (and cancel) takes a slot, given back when its
  last response has been written to the transport. A client that stops reading stops the
  server reading (HTTP/2 flow control does the rest), so a stream holds at most
  FAIRLANE_SESSION_WINDOW requests' answers and results.
- A byte budget bounds their outputs: the results the stream holds and has not written yet
  (waiting to be written, held back, or come before their accepted) keep at most
  FAIRLANE_SESSION_BUFFER_BYTES of outputs. A result that would take them over it is held
  without its output, which is read from the log when its turn to be written comes (the
  log has every result before it is published): those next in line are read together, at
  most a results page and the budget's worth at once. If the log cannot be read for the
  grace time, the stream ends with UNAVAILABLE; the client reads the results it did not get
  with WatchResults. A client that reads keeps the buffer near empty: nothing is read back.
- A result that does not arrive through the replica's fan-out (its publish was lost, or it
  went to a replica that died) is read from the request log, so a Session ends with every
  result or with an error; it never hangs on a result that exists.
- Results go out in lane_seq order. One that arrives while an older request of the stream
  has none yet (its event is late or was lost in a broker fault, or this one was cancelled
  ahead of it) is held while the log is asked about the older ones: what has finished goes
  out first, in lane_seq order; what has not will finish with a greater lane_seq.
- The stream was authenticated when it opened; its login is checked again with every
  message, and watched while the stream waits (services/core/tokens.py, `watch`). Once the
  login has been revoked, nothing more is taken in: the requests admitted before get their
  answers, then the stream ends with UNAUTHENTICATED. Results not sent by then are not sent
  on this stream (they are in the log, for a new login to read). The access token's expiry
  does not end an open stream (see `TokenVerifier.refusal`).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc
from google.rpc import code_pb2

from fairlane.common.v1 import common_pb2, lane_pb2
from fairlane.queue.v1 import queue_pb2
from fairlane_server.core import tracing
from fairlane_server.core.broker import BrokerError
from fairlane_server.core.grpc_host import MAX_MESSAGE_BYTES
from fairlane_server.core.logging import get_logger
from fairlane_server.core.tasks import wait_event
from fairlane_server.core.tokens import Principal, TokenCheck
from fairlane_server.queue.catch_up import CatchUpStopped
from fairlane_server.queue.domain import LogUnavailable, QueueDomain, Withheld
from fairlane_server.queue.intake import Admitted, Rejection
from fairlane_server.queue.validation import InvalidEnqueue

log = get_logger(__name__)

MAX_RESPONSES_PER_MESSAGE = 512  # responses coalesced into one batch message
# Bytes of one coalesced message, framing included: well under the 8 MiB gRPC send limit
# of the server (and the receive limit of the clients). A response larger than this goes
# out alone, in a message of its own.
MAX_BATCH_BYTES = MAX_MESSAGE_BYTES // 4
# A response's framing inside SessionResponseBatch (tag and length), and the batch's own
# inside SessionResponse: at most 1 + 5 bytes each for messages under 4 GiB.
_FRAMING_BYTES = 6

T = TypeVar("T")


class _Mailbox(Generic[T]):
    """An unbounded queue with one consumer: a deque and a waiter.

    Written out rather than asyncio.Queue, which keeps three deques and serves many
    getters and putters: with thousands of Sessions open, a Session's two asyncio.Queues
    were 5.0 of its 31.6 KiB of Python objects (tracemalloc; see docs/performance.md,
    "What an open Session costs in memory"). The responses going out are the one left."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[T] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: T) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def get_nowait(self) -> T:
        return self._items.popleft()

    def peek(self) -> T:
        """The next item, left in place."""
        return self._items[0]

    def waiting(self) -> Iterator[T]:
        """The items in the order they will be taken, left in place (do not put meanwhile)."""
        return iter(self._items)

    async def get(self) -> T:
        while not self._items:
            # One consumer: the waiter is its own, and is dropped once woken.
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items)


class StreamError(Exception):
    """Ends the stream with a status (the client broke the protocol's limits)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def rejection_code(rejection: Rejection) -> grpc.StatusCode:
    """Client's fault (slow down) vs server's trouble (try later)."""
    if rejection.reason in ("lane_full", "rate_limited"):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if rejection.reason == "refused":
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.UNAVAILABLE


@dataclass(slots=True)
class _Enqueued:
    client_ref: str | None  # None: a message of no kind
    request_id: str
    future: asyncio.Future[Admitted] | None  # None: refused by validation
    error: str = ""


@dataclass(slots=True)
class _Cancel:
    request_id: str


@dataclass(slots=True)
class _Refused:
    reason: str


@dataclass(slots=True)
class _Out:
    response: queue_pb2.SessionResponse
    releases: int = 0  # window slots given back once it has been written
    size: int = 0  # bytes of the buffer (its result's output) given back then
    # A result held without its output (this many bytes): read from the log before writing.
    missing: int = 0


@dataclass(slots=True)
class _Thin:
    """A result held without its output, which did not fit in the stream's byte budget."""

    result: common_pb2.Result  # its request_id and lane_seq only
    traceparent: str
    missing: int  # bytes of the output left out


# A worker event held by the stream (a result without its output, or a LaneEvent), and the
# bytes of the buffer it holds (its output's; 0 for a _Thin or progress).
_Held = lane_pb2.LaneEvent | _Thin


_DONE = object()


class SessionStream:
    def __init__(
        self,
        domain: QueueDomain,
        principal: Principal,
        requests: AsyncIterator[queue_pb2.SessionRequest],
        token: TokenCheck | None = None,
    ) -> None:
        self._d = domain
        self._principal = principal
        self._token = token
        self._user = uuid.UUID(principal.user_id)
        self._requests = requests
        limits = domain.streams
        self._window_size = limits.session_window
        self._window = asyncio.Semaphore(limits.session_window)
        self._max_batch = limits.max_batch_items
        self._grace = limits.result_grace_seconds
        self._budget = limits.session_buffer_bytes
        # Bytes of the outputs of the results held in _out, _early and _stash (each counted
        # once, when it came): at most _budget.
        self._buffered = 0
        self._out: _Mailbox[Any] = _Mailbox()
        self._answers: deque[_Enqueued | _Cancel | _Refused | None] = deque()
        # request id -> monotonic time its accepted was queued, or None before that.
        self._mine: dict[str, float | None] = {}
        # Window slots held by accepted enqueues of each request (a repeated idempotency
        # key on one stream holds more than one), given back with the result.
        self._held: Counter[str] = Counter()
        self._stash: dict[str, list[tuple[_Held, int]]] = {}
        # Results held back until the log says whether older requests finished before them.
        self._early: dict[str, tuple[_Held, int]] = {}
        self._early_since = 0.0
        self._look = asyncio.Event()  # wakes the log reader at once
        # Started when there is work for them and ended when there is none: an idle
        # Session holds only its reader of the client's messages.
        self._answerer: asyncio.Task[None] | None = None
        self._log_reader: asyncio.Task[None] | None = None
        self._reading = True
        self._batching = False  # set once the client sends an enqueue_batch
        self._reader: asyncio.Task[None] | None = None
        # The reader waits for the client or for a window slot: ending it there loses
        # nothing. Elsewhere (admitting) it stops by itself at the next message.
        self._at_rest = False
        self._refused: str | None = None  # why the token no longer holds

    async def run(self) -> AsyncGenerator[queue_pb2.SessionResponse, None]:
        self._d.hub.listen(self._principal.user_id, self._on_event)
        reader = self._reader = asyncio.create_task(self._guard(self._read))
        unwatch = self._token.watch(self._principal, self._on_refused) if self._token else None
        try:
            while True:
                item = await self._out.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                if item.missing:
                    await self._fill(item)
                if not self._batching or self._out.empty():
                    yield item.response
                    self._buffered -= item.size
                    self._release(item.releases)
                    continue
                # Coalesce what is ready into one message: one gRPC write instead of many,
                # bounded by count and by bytes (results carry payloads of up to 1 MiB).
                batch = [item]
                size = 2 * _FRAMING_BYTES + item.response.ByteSize()
                ended: Any = None
                while len(batch) < MAX_RESPONSES_PER_MESSAGE and not self._out.empty():
                    nxt = self._out.peek()
                    if nxt is _DONE or isinstance(nxt, BaseException):
                        ended = self._out.get_nowait()
                        break
                    if nxt.missing:
                        break  # its output is read first: it starts the next message
                    more = _FRAMING_BYTES + nxt.response.ByteSize()
                    if size + more > MAX_BATCH_BYTES:
                        break  # it starts the next message
                    batch.append(self._out.get_nowait())
                    size += more
                if len(batch) == 1:
                    yield item.response
                else:
                    yield queue_pb2.SessionResponse(
                        batch=queue_pb2.SessionResponseBatch(responses=[b.response for b in batch])
                    )
                self._buffered -= sum(b.size for b in batch)
                self._release(sum(b.releases for b in batch))
                if ended is _DONE:
                    return
                if ended is not None:
                    raise ended
        finally:
            # No event may start a log reader once the tasks are being ended.
            self._d.hub.unlisten(self._principal.user_id, self._on_event)
            if unwatch is not None:
                unwatch()
            tasks = [t for t in (reader, self._answerer, self._log_reader) if t is not None]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def buffered_bytes(self) -> int:
        """Bytes of result outputs the stream holds and has not written."""
        return self._buffered

    def _release(self, n: int) -> None:
        for _ in range(n):
            self._window.release()

    async def _guard(self, work: Callable[[], Awaitable[None]]) -> None:
        # Takes the function, not its coroutine: a task cancelled before it first runs
        # (the stream ended meanwhile) then leaves no coroutine that was never awaited.
        try:
            await work()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._out.put_nowait(exc)

    def _send(self, response: queue_pb2.SessionResponse, releases: int = 0) -> None:
        self._out.put_nowait(_Out(response, releases))

    def _reject(
        self,
        client_ref: str | None,
        code: grpc.StatusCode,
        message: str,
        retry_ms: int = 0,
        *,
        cancel_request_id: str | None = None,
        releases: int = 1,
    ) -> None:
        """An enqueue's rejection names its client_ref, a cancel's its request id (the
        `subject` oneof); a message of no kind gets neither."""
        rejected = queue_pb2.Rejected(
            code=code_pb2.Code.ValueType(code.value[0]), message=message, retry_after_ms=retry_ms
        )
        if client_ref is not None:
            rejected.client_ref = client_ref
        elif cancel_request_id is not None:
            rejected.cancel_request_id = cancel_request_id
        self._send(queue_pb2.SessionResponse(rejected=rejected), releases)

    # -- reading ---------------------------------------------------------------------------

    async def _read(self) -> None:
        messages = aiter(self._requests)
        while True:
            try:
                msg = await self._at_rest_on(anext(messages))
            except StopAsyncIteration:
                break
            if self._token is not None and self._refused is None:
                reason = await self._token.refusal(self._principal)
                if self._refused is None:  # the watch may have said so meanwhile
                    self._refused = reason
            if self._stopped():
                return
            kind = msg.WhichOneof("kind")
            if kind == "enqueue":
                await self._enqueue(msg.enqueue)
            elif kind == "enqueue_batch":
                items = msg.enqueue_batch.requests
                if len(items) > self._max_batch:
                    raise StreamError(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"enqueue_batch carries {len(items)} requests; "
                        f"at most {self._max_batch} per message",
                    )
                self._batching = True
                for enqueue in items:
                    if self._stopped():
                        return
                    await self._enqueue(enqueue)
            elif kind == "cancel":
                await self._at_rest_on(self._window.acquire())
                self._to_answer(_Cancel(msg.cancel.request_id))
            else:
                await self._at_rest_on(self._window.acquire())
                self._to_answer(_Enqueued(None, "", None, "empty SessionRequest"))
            if self._stopped():
                return
        self._to_answer(None)

    async def _at_rest_on(self, waiting: Awaitable[T]) -> T:
        self._at_rest = True
        try:
            return await waiting
        finally:
            self._at_rest = False

    def _stopped(self) -> bool:
        """Whether the token no longer holds: then the reader reads no more, and the
        stream ends once what was read has been answered."""
        if self._refused is None:
            return False
        self._to_answer(_Refused(self._refused))
        return True

    def _on_refused(self, reason: str) -> None:
        """The login was revoked while the stream was open."""
        if self._refused is not None:
            return
        self._refused = reason
        reader = self._reader
        if reader is not None and (self._at_rest or reader.done()):
            # Waiting for the client or a window slot (or done reading): end it here.
            reader.cancel()
            self._to_answer(_Refused(reason))
        # Otherwise it is admitting a request: it stops by itself (`_stopped`) after that.

    async def _enqueue(self, enqueue: queue_pb2.EnqueueRequest) -> None:
        await self._at_rest_on(self._window.acquire())
        try:
            request_id, future = await self._d.admit(enqueue, self._principal)
        except InvalidEnqueue as exc:
            self._to_answer(_Enqueued(enqueue.client_ref, "", None, str(exc)))
            return
        rid = str(request_id)
        self._mine[rid] = None
        self._to_answer(_Enqueued(enqueue.client_ref, rid, future))

    # -- answering, in order -----------------------------------------------------------------

    def _to_answer(self, item: _Enqueued | _Cancel | _Refused | None) -> None:
        self._answers.append(item)
        if self._answerer is None:
            self._answerer = asyncio.create_task(self._guard(self._answer))

    async def _answer(self) -> None:
        """Answers what is in the mailbox, in order, and ends when it is empty (the next
        message starts another): one answerer at a time, so the order holds."""
        while self._answers:
            item = self._answers.popleft()
            if item is None:
                # The client half-closed; a revocation seen since may still follow it.
                self._reading = False
                self._maybe_done()
                continue
            if isinstance(item, _Refused):
                self._answers.clear()
                self._out.put_nowait(StreamError(grpc.StatusCode.UNAUTHENTICATED, item.reason))
                break
            if isinstance(item, _Cancel):
                await self._cancel(item.request_id)
                continue
            if item.future is None:
                self._reject(item.client_ref, grpc.StatusCode.INVALID_ARGUMENT, item.error)
                continue
            try:
                admitted = await asyncio.shield(item.future)
            except Rejection as rej:
                self._mine.pop(item.request_id, None)
                self._unstash(item.request_id)
                self._reject(item.client_ref, rejection_code(rej), str(rej), rej.retry_after_ms)
                continue
            rid = str(admitted.request_id)
            if admitted.duplicate:
                # The id of the first request with this key stands in for the new one.
                self._mine.pop(item.request_id, None)
                self._unstash(item.request_id)
            self._mine[rid] = time.monotonic()
            self._held[rid] += 1
            self._watch_log()
            self._send(
                queue_pb2.SessionResponse(
                    accepted=queue_pb2.Accepted(
                        client_ref=item.client_ref or "",
                        request_id=rid,
                        duplicate=admitted.duplicate,
                    )
                )
            )
            for event, size in self._stash.pop(rid, []):
                self._deliver(event, size)
            if admitted.duplicate:
                result = await self._d.stored_result(self._user, admitted.request_id)
                if result is not None:
                    self._deliver(*self._keep(lane_pb2.LaneEvent(result=result)))
        self._answerer = None

    def _unstash(self, request_id: str) -> None:
        """Drops what came for a request before its answer, which was not accepted."""
        for _, size in self._stash.pop(request_id, ()):
            self._buffered -= size

    async def _cancel(self, request_id: str) -> None:
        try:
            rid = uuid.UUID(request_id)
        except ValueError:
            self._reject(
                None,
                grpc.StatusCode.INVALID_ARGUMENT,
                "invalid request_id",
                cancel_request_id=request_id[:64],
            )
            return
        try:
            after = await self._d.cancel(self._user, rid)
        except BrokerError:
            self._reject(
                None,
                grpc.StatusCode.UNAVAILABLE,
                "cannot reach the workers now",
                self._d.retry_after_ms,
                cancel_request_id=request_id,
            )
            return
        except LogUnavailable:
            self._reject(
                None,
                grpc.StatusCode.UNAVAILABLE,
                "the request log is unavailable; retry the cancel",
                self._d.retry_after_ms,
                cancel_request_id=request_id,
            )
            return
        if after is None:
            self._reject(
                None, grpc.StatusCode.NOT_FOUND, "no such request", cancel_request_id=request_id
            )
            return
        self._release(1)  # nothing to answer: the request's CANCELLED result follows

    # -- results -----------------------------------------------------------------------------

    def _on_event(self, event: lane_pb2.LaneEvent) -> None:
        """An event of this user from the hub, handled as it arrives."""
        try:
            kind = event.WhichOneof("kind")
            rid = event.result.request_id if kind == "result" else event.progress.request_id
            if rid not in self._mine:
                return
            if kind == "result":
                held, size = self._keep(event)
                if self._mine[rid] is not None:
                    self._deliver(held, size)
                else:
                    self._stash.setdefault(rid, []).append((held, size))
            elif self._mine[rid] is not None:
                self._deliver(event, 0)
            elif len(self._stash.get(rid, ())) < 16:
                self._stash.setdefault(rid, []).append((event, 0))
        except Exception as exc:
            self._out.put_nowait(exc)  # ends this stream with the error, as _guard does

    def _keep(self, event: lane_pb2.LaneEvent) -> tuple[_Held, int]:
        """A result the stream is to hold: counted in the buffer, or held without its output
        when that would take the buffer over its budget. Returns it and the bytes counted."""
        size = len(event.result.output)
        if self._buffered + size <= self._budget:
            self._buffered += size
            return event, size
        result = event.result
        thin = common_pb2.Result(request_id=result.request_id, lane_seq=result.lane_seq)
        return _Thin(thin, event.traceparent, size), 0

    def _deliver(self, event: _Held, size: int) -> None:
        """Sends or holds back a result (or progress) the stream holds, with `size` bytes of
        its buffer, given back when it goes out or is dropped."""
        if not isinstance(event, _Thin) and event.WhichOneof("kind") == "progress":
            # Progress is advice: when the client is not reading, it is dropped rather
            # than held, so it cannot grow the stream's memory.
            if event.progress.request_id in self._mine and self._out.qsize() < self._window_size:
                self._send(queue_pb2.SessionResponse(progress=event.progress))
            return
        rid = event.result.request_id
        if self._mine.get(rid) is None:
            self._buffered -= size
            return  # already delivered (a redelivered result)
        # The oldest accepted request of the stream is the first key of _mine: answers go
        # out in the order requests came in, and delivered ones are removed.
        if self._early or next(iter(self._mine)) != rid:
            if rid in self._early:
                self._buffered -= size
                return  # already held back (a redelivered result)
            if not self._early:
                self._early_since = time.monotonic()
            self._early[rid] = (event, size)
            self._look.set()
            self._watch_log()
            return
        self._send_result(event, size)

    def _send_result(self, event: _Held, size: int) -> None:
        rid = event.result.request_id
        if self._mine.pop(rid, None) is None:
            self._buffered -= size
            return
        if event.traceparent:
            tracing.end(
                tracing.start(
                    "deliver result",
                    parent_traceparent=event.traceparent,
                    attributes={"fairlane.request_id": rid},
                )
            )
        self._out.put_nowait(
            _Out(
                queue_pb2.SessionResponse(result=event.result),
                self._held.pop(rid, 0),
                size,
                event.missing if isinstance(event, _Thin) else 0,
            )
        )
        self._maybe_done()

    async def _fill(self, first: _Out) -> None:
        """Reads from the log the output of a result held without it, with those of the
        next results so held (one read: at most a results page, and at most the budget's
        worth unless the first alone is more; the log loads no more than its read bound of
        them, and those it leaves out wait for their turn). Retried while the log fails,
        for at most the grace time; then the stream ends with UNAVAILABLE (the client reads
        what it did not get with WatchResults)."""
        wanted = [first]
        total = first.missing
        page = self._d.streams.results_page
        for nxt in self._out.waiting():
            if not isinstance(nxt, _Out) or len(wanted) >= page:
                break  # the end of the stream, or a full read
            if not nxt.missing:
                continue  # an answer, or a result held with its output
            if total + nxt.missing > self._budget:
                break
            wanted.append(nxt)
            total += nxt.missing
        since = time.monotonic()
        wait = 0.1
        while True:
            ids = [uuid.UUID(out.response.result.request_id) for out in wanted]
            try:
                found = await self._d.finished(self._user, ids)
            except CatchUpStopped as exc:
                raise StreamError(grpc.StatusCode.UNAVAILABLE, str(exc)) from exc
            except Exception as exc:
                log.warning("session_output_read_failed", error=str(exc)[:200])
            else:
                by_id = {held.request_id: held for held in found}
                for out in wanted:
                    result = by_id.get(out.response.result.request_id)
                    if isinstance(result, common_pb2.Result):
                        out.response = queue_pb2.SessionResponse(result=result)
                        out.missing = 0
                if not first.missing:
                    return
                if isinstance(by_id.get(first.response.result.request_id), Withheld):
                    # The read's bytes went to other Sessions' asks read with this one (the
                    # first output of a read always comes): ask again, behind them.
                    wanted = [out for out in wanted if out.missing]
                    continue
                # Never so far: results are written to the log before they are published.
                log.warning("session_output_not_in_log", request_id=str(ids[0]))
            if time.monotonic() - since >= self._grace:
                raise StreamError(
                    grpc.StatusCode.UNAVAILABLE,
                    "cannot read results from the request log now; read the rest with WatchResults",
                )
            await asyncio.sleep(wait)
            wait = min(wait * 2, 1.0)
            wanted = [out for out in wanted if out.missing]

    def _watch_log(self) -> None:
        if self._log_reader is None:
            self._log_reader = asyncio.create_task(self._guard(self._from_log))

    async def _from_log(self) -> None:
        """Reads from the log the results the fan-out has not brought: those overdue by
        the grace time, and the older ones a held-back result waits for. Runs while an
        accepted request waits for its result; the next accepted starts it again."""
        wait = self._grace
        while self._early or any(at is not None for at in self._mine.values()):
            await wait_event(self._look, wait)
            self._look.clear()
            now = time.monotonic()
            early = list(self._early)  # held before this read; later ones wait for the next
            older_than_early = len(early)
            wanted: list[uuid.UUID] = []
            for rid, at in self._mine.items():
                if rid in self._early:
                    older_than_early -= rid in early
                    continue
                if at is not None and (older_than_early > 0 or now - at >= self._grace):
                    wanted.append(uuid.UUID(rid))
            # Each page read is held as it comes, before the next is read: what does not
            # fit in the budget is held without its output, as is what the log left out
            # (a read loads a bounded number of bytes of outputs), so no more than the
            # budget and one read's outputs are held at once.
            ready: list[tuple[_Held, int]] = []
            try:
                page = self._d.streams.results_page
                for start in range(0, len(wanted), page):
                    for held in await self._d.finished(self._user, wanted[start : start + page]):
                        if isinstance(held, Withheld):
                            ready.append((_Thin(held.result, "", held.size), 0))
                        else:
                            ready.append(self._keep(lane_pb2.LaneEvent(result=held)))
            except Exception as exc:
                log.warning("session_catch_up_failed", error=str(exc)[:200])
                for _, size in ready:
                    self._buffered -= size  # an older result may be among those not read
                ready = []
                if early and now - self._early_since < self._grace:
                    wait = 0.2  # ask again soon; past the grace time, order yields
                    continue
            found = len(ready)
            ready.extend(self._early.pop(rid) for rid in early if rid in self._early)
            for event, size in sorted(ready, key=lambda held: held[0].result.lane_seq):
                self._send_result(event, size)
            if self._early:
                self._early_since = now
                self._look.set()
            # Long handlers: look less often while nothing turns up, at most every 30 s.
            wait = self._grace if found or not wanted else min(wait * 2, 30.0)
        self._log_reader = None

    def _maybe_done(self) -> None:
        if not self._reading and not self._mine:
            self._out.put_nowait(_DONE)
