"""The wire contract as another language sees it: explicit presence on ListRequests'
status, Rejected's subject and code, against the real queue service."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from google.rpc import code_pb2

from fairlane.common.v1 import common_pb2
from fairlane.queue.v1 import queue_pb2, queue_pb2_grpc
from tests.e2e.suite import Suite
from tests.e2e.users import bearer, new_user, run_session

pytestmark = pytest.mark.e2e


async def test_list_requests_status_set_to_unspecified_or_unknown_is_invalid(
    suite: Suite,
) -> None:
    _, token = await new_user(suite.target("auth"))
    await run_session(
        suite.target("queue"), token, [queue_pb2.EnqueueRequest(handler="echo", payload=b"x")]
    )
    async with grpc.aio.insecure_channel(suite.target("queue")) as channel:
        stub = queue_pb2_grpc.QueueServiceStub(channel)
        everything = await stub.ListRequests(
            queue_pb2.ListRequestsRequest(), metadata=bearer(token)
        )
        assert [r.status for r in everything.requests] == [common_pb2.REQUEST_STATUS_SUCCEEDED]
        done = await stub.ListRequests(
            queue_pb2.ListRequestsRequest(status=common_pb2.REQUEST_STATUS_SUCCEEDED),
            metadata=bearer(token),
        )
        assert len(done.requests) == 1
        queued = await stub.ListRequests(
            queue_pb2.ListRequestsRequest(status=common_pb2.REQUEST_STATUS_QUEUED),
            metadata=bearer(token),
        )
        assert list(queued.requests) == []
        # What a misspelt enum name becomes in many clients (0), and a number from a newer
        # contract: both refused, never read as "every status".
        for wrong in (0, 99):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ListRequests(
                    queue_pb2.ListRequestsRequest(status=common_pb2.RequestStatus.ValueType(wrong)),
                    metadata=bearer(token),
                )
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "leave it unset" in (err.value.details() or "")


async def test_rejections_name_their_subject_and_carry_an_enum_code(suite: Suite) -> None:
    _, token = await new_user(suite.target("auth"))
    unknown = str(uuid.uuid4())
    sent = [
        queue_pb2.SessionRequest(cancel=queue_pb2.CancelRequestRequest(request_id=unknown)),
        queue_pb2.SessionRequest(cancel=queue_pb2.CancelRequestRequest(request_id="not-an-id")),
        queue_pb2.SessionRequest(),
        queue_pb2.SessionRequest(enqueue=queue_pb2.EnqueueRequest(handler="nope")),
        queue_pb2.SessionRequest(enqueue=queue_pb2.EnqueueRequest(handler="echo")),
    ]

    async def requests() -> AsyncIterator[queue_pb2.SessionRequest]:
        for message in sent:
            yield message

    async with grpc.aio.insecure_channel(suite.target("queue")) as channel:
        stub = queue_pb2_grpc.QueueServiceStub(channel)
        responses = [r async for r in stub.Session(requests(), metadata=bearer(token), timeout=60)]
    rejected = [r.rejected for r in responses if r.WhichOneof("kind") == "rejected"]
    by_subject = {
        (r.WhichOneof("subject"), getattr(r, r.WhichOneof("subject") or "message")): r
        for r in rejected
    }
    assert len(by_subject) == len(rejected) == 4
    assert by_subject["cancel_request_id", unknown].code == code_pb2.NOT_FOUND
    assert by_subject["cancel_request_id", "not-an-id"].code == code_pb2.INVALID_ARGUMENT
    assert by_subject[None, "empty SessionRequest"].code == code_pb2.INVALID_ARGUMENT
    # The enqueue without a client_ref still names its subject: the client_ref "".
    unknown_handler = by_subject["client_ref", ""]
    assert unknown_handler.code == code_pb2.INVALID_ARGUMENT
    assert "unknown handler" in unknown_handler.message
    assert all(r.retry_after_ms == 0 for r in rejected)
    assert [r.WhichOneof("kind") for r in responses][-2:] == ["accepted", "result"]
