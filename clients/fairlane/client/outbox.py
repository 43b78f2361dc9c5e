"""Outbox: what a Session has to send, coalesced into as few stream messages as it can.

Every gRPC message costs the client, the network and the server a fixed amount of work,
whatever it carries; at thousands of requests a second that cost dominates. So a Session
does not write each submit on its own: submits go into the outbox, and the Session's
writer takes out whatever is ready each time the stream can take a write. Consecutive
enqueues leave as one `enqueue_batch` (the server answers such a client in `batch`
messages too); a cancel goes alone, in its place, so the server sees everything in the
order it was submitted. Nothing waits for company: a lone enqueue leaves at once.
"""

from __future__ import annotations

import collections

from fairlane.client._wire import field_size
from fairlane.queue.v1 import queue_pb2

__all__ = ["MAX_BATCH_BYTES", "MAX_BATCH_REQUESTS", "Outbox"]

MAX_BATCH_REQUESTS = 256
"""Enqueues in one message at most (the server handles a batch as one intake step)."""

MAX_BATCH_BYTES = 2 * 1024 * 1024
"""Bytes of one serialized `enqueue_batch` message at most: well under gRPC's 8 MiB
message limit on both ends. A single larger enqueue still goes, alone (the Session sends
none that is over the message limit)."""

_Item = queue_pb2.EnqueueRequest | queue_pb2.CancelRequestRequest


class Outbox:
    """A FIFO of enqueues and cancels that hands them out as stream messages."""

    def __init__(
        self, *, max_requests: int = MAX_BATCH_REQUESTS, max_bytes: int = MAX_BATCH_BYTES
    ) -> None:
        if max_requests < 1 or max_bytes < 1:
            raise ValueError("a batch must be allowed at least one request and one byte")
        self._items: collections.deque[_Item] = collections.deque()
        self._max_requests = max_requests
        self._max_bytes = max_bytes

    def __len__(self) -> int:
        return len(self._items)

    def enqueue(self, request: queue_pb2.EnqueueRequest) -> None:
        self._items.append(request)

    def cancel(self, request: queue_pb2.CancelRequestRequest) -> None:
        self._items.append(request)

    def clear(self) -> None:
        self._items.clear()

    def take(self) -> queue_pb2.SessionRequest | None:
        """The next message to write, or None when there is nothing to send."""
        items = self._items
        if not items:
            return None
        first = items.popleft()
        if isinstance(first, queue_pb2.CancelRequestRequest):
            return queue_pb2.SessionRequest(cancel=first)
        batch = [first]
        # The EnqueueBatch's size; the message is field_size(body) (the SessionRequest
        # around it), counted whole, framing and all, so that it stays under max_bytes.
        body = field_size(first.ByteSize())
        while items and len(batch) < self._max_requests:
            head = items[0]
            if not isinstance(head, queue_pb2.EnqueueRequest):
                break
            grown = body + field_size(head.ByteSize())
            if field_size(grown) > self._max_bytes:
                break
            batch.append(head)
            items.popleft()
            body = grown
        if len(batch) == 1:
            return queue_pb2.SessionRequest(enqueue=first)
        return queue_pb2.SessionRequest(enqueue_batch=queue_pb2.EnqueueBatch(requests=batch))
