"""Outbox: submits that are ready together leave as one enqueue_batch, in order."""

from __future__ import annotations

import pytest

from fairlane.client.outbox import Outbox
from fairlane.queue.v1 import queue_pb2


def enqueue(ref: str, payload: bytes = b"") -> queue_pb2.EnqueueRequest:
    return queue_pb2.EnqueueRequest(handler="echo", payload=payload, client_ref=ref)


def cancel(request_id: str) -> queue_pb2.CancelRequestRequest:
    return queue_pb2.CancelRequestRequest(request_id=request_id)


def drain(outbox: Outbox) -> list[tuple[str, list[str]]]:
    """Every message the outbox hands out: (kind, client_refs or the cancelled id)."""
    messages: list[tuple[str, list[str]]] = []
    while (message := outbox.take()) is not None:
        kind = message.WhichOneof("kind")
        if kind == "enqueue_batch":
            messages.append((kind, [r.client_ref for r in message.enqueue_batch.requests]))
        elif kind == "enqueue":
            messages.append((kind, [message.enqueue.client_ref]))
        else:
            messages.append((str(kind), [message.cancel.request_id]))
    return messages


def test_nothing_ready_is_nothing_to_send() -> None:
    outbox = Outbox()
    assert outbox.take() is None
    assert len(outbox) == 0


def test_a_lone_enqueue_leaves_as_it_is() -> None:
    outbox = Outbox()
    outbox.enqueue(enqueue("a"))
    assert drain(outbox) == [("enqueue", ["a"])]


def test_consecutive_enqueues_share_a_message_and_a_cancel_keeps_its_place() -> None:
    outbox = Outbox()
    for ref in "abc":
        outbox.enqueue(enqueue(ref))
    outbox.cancel(cancel("r1"))
    outbox.enqueue(enqueue("d"))
    outbox.cancel(cancel("r2"))
    outbox.enqueue(enqueue("e"))
    outbox.enqueue(enqueue("f"))
    assert len(outbox) == 8
    assert drain(outbox) == [
        ("enqueue_batch", ["a", "b", "c"]),
        ("cancel", ["r1"]),
        ("enqueue", ["d"]),
        ("cancel", ["r2"]),
        ("enqueue_batch", ["e", "f"]),
    ]
    assert len(outbox) == 0


def test_batches_are_bounded_by_count_and_by_bytes() -> None:
    outbox = Outbox(max_requests=3)
    for i in range(7):
        outbox.enqueue(enqueue(str(i)))
    assert [refs for _, refs in drain(outbox)] == [["0", "1", "2"], ["3", "4", "5"], ["6"]]

    # The bound is on the whole message: the enqueues and the framing around each.
    pair = queue_pb2.SessionRequest(
        enqueue_batch=queue_pb2.EnqueueBatch(requests=[enqueue("x", b"p" * 1000)] * 2)
    ).ByteSize()
    outbox = Outbox(max_bytes=pair)
    for ref in "abcde":
        outbox.enqueue(enqueue(ref, b"p" * 1000))
    assert [refs for _, refs in drain(outbox)] == [["a", "b"], ["c", "d"], ["e"]]
    outbox = Outbox(max_bytes=pair - 1)
    for ref in "abc":
        outbox.enqueue(enqueue(ref, b"p" * 1000))
    assert [refs for _, refs in drain(outbox)] == [["a"], ["b"], ["c"]]

    # One enqueue over the bound still goes, on its own.
    outbox = Outbox(max_bytes=10)
    outbox.enqueue(enqueue("big", b"p" * 100))
    outbox.enqueue(enqueue("next"))
    assert drain(outbox) == [("enqueue", ["big"]), ("enqueue", ["next"])]


def requests_of(message: queue_pb2.SessionRequest) -> list[queue_pb2.EnqueueRequest]:
    if message.WhichOneof("kind") == "enqueue_batch":
        return list(message.enqueue_batch.requests)
    return [message.enqueue]


@pytest.mark.parametrize("limit", [300, 4_000, 70_000, 2 * 1024 * 1024])
def test_no_batch_is_over_the_byte_bound_whatever_the_sizes(limit: int) -> None:
    """Sizes around the varint steps of the length prefixes (127, 16383, ...): a batch
    is never over max_bytes, counted as gRPC counts it (the serialized message), and it
    is no smaller than it need be (the next enqueue would not have fitted)."""
    outbox = Outbox(max_bytes=limit)
    sizes = [0, 1, 50, 100, 120, 126, 127, 128, 200, 16_000, 16_380, 16_400, 30_000]
    for n in range(400):
        outbox.enqueue(enqueue(f"r{n}", b"p" * sizes[n * 7 % len(sizes)]))
    messages = []
    while (message := outbox.take()) is not None:
        messages.append(message)
    sent = [r for m in messages for r in requests_of(m)]
    assert [r.client_ref for r in sent] == [f"r{n}" for n in range(400)]
    for n, message in enumerate(messages):
        batch = requests_of(message)
        if len(batch) > 1:
            assert message.ByteSize() <= limit
        if n + 1 < len(messages) and len(batch) < 256:
            grown = [*batch, requests_of(messages[n + 1])[0]]
            bigger = queue_pb2.SessionRequest(enqueue_batch=queue_pb2.EnqueueBatch(requests=grown))
            assert bigger.ByteSize() > limit


def test_clear_forgets_everything_and_bounds_must_allow_one() -> None:
    outbox = Outbox()
    outbox.enqueue(enqueue("a"))
    outbox.cancel(cancel("r"))
    outbox.clear()
    assert outbox.take() is None
    with pytest.raises(ValueError, match="at least one"):
        Outbox(max_requests=0)
